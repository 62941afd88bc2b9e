//! `forkd doctor` and `forkd cleanup` against a real daemon (no VMs).

use std::process::Command;

use forkd_integration::{Daemon, Options, TEST_TOKEN, cli_bin};
use serde_json::Value;

fn no_vm(token: bool) -> Daemon {
    Daemon::start(Options {
        token: token.then(|| TEST_TOKEN.to_string()),
        extra_args: ["--accel", "tcg", "--qemu", "/bin/false"].iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

fn forkd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cli_bin())
        .args(args)
        .env_remove("FORKD_TOKEN")
        .env_remove("FORKD_TOKEN_FILE")
        .env_remove("FORKD_URL")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report}"))
}

#[tokio::test]
async fn doctor_checks_the_host_and_the_token() {
    let d = no_vm(true);
    let url = d.http_url();
    let data = d.data_dir.display().to_string();

    // Right token: the daemon check passes.
    let (code, out, err) = forkd(&["--url", &url, "--token", TEST_TOKEN, "--json", "doctor", "--data-dir", &data]);
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    eprintln!("{}", serde_json::to_string_pretty(&report["summary"]).unwrap());
    assert_eq!(check(&report, "daemon")["status"], "pass", "{report}");
    assert_eq!(check(&report, "auth")["status"], "pass", "{report}");
    for name in [
        "platform",
        "kvm",
        "kvm-guest",
        "qemu",
        "firecracker",
        "guest",
        "cgroups",
        "netns",
        "firewall",
        "data-dir",
        "userfaultfd",
        "memfd",
        "ksm",
        "hugepages",
    ] {
        let c = check(&report, name);
        let status = c["status"].as_str().unwrap();
        assert!(["pass", "warn", "fail", "skip"].contains(&status), "{c}");
        if status == "warn" || status == "fail" {
            assert!(!c["fix"].as_str().unwrap().is_empty(), "a fix for {c}");
        }
    }
    let failed = report["summary"]["fail"].as_u64().unwrap();
    assert_eq!(code == 0, failed == 0, "exit {code} with {failed} fails");
    assert_eq!(report["ok"], failed == 0);

    // No token: the daemon check fails and so does the command.
    let (code, out, _) = forkd(&["--url", &url, "--json", "doctor", "--data-dir", &data]);
    let report: Value = serde_json::from_str(&out).unwrap();
    let c = check(&report, "daemon");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["fix"].as_str().unwrap().contains("token"), "{c}");
    assert_ne!(code, 0);

    // A wrong token fails as well; the table output names the check.
    let (code, out, _) =
        forkd(&["--url", &url, "--token", "Zq8wX3vB0nM5kL7jH2gF4dS6aP9oI1uY", "doctor", "--data-dir", &data]);
    assert_ne!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("daemon") && l.contains("fail")), "{out}");

    // --no-daemon skips it.
    let (_, out, _) = forkd(&["--url", "http://127.0.0.1:1", "--json", "doctor", "--no-daemon", "--data-dir", &data]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(check(&report, "daemon")["status"], "skip");
}

#[tokio::test]
async fn cleanup_lists_then_removes_orphans() {
    let d = no_vm(false);
    let url = d.http_url();
    let data = std::fs::canonicalize(&d.data_dir).unwrap();
    let data_s = data.display().to_string();
    // Orphans as a crashed daemon would leave them, made while this daemon
    // is stopped so that its reconciler does not remove them first.
    let mut d = d;
    d.stop();
    let orphan_dir = data.join("sandboxes/sb-cleanuptest1");
    std::fs::create_dir_all(&orphan_dir).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(orphan_dir.join("agent.sock")).unwrap();
    let staging = data.join("staging/gone.abcd1234");
    std::fs::create_dir_all(&staging).unwrap();
    let cg = forkd_server::host::cgroup::Cgroups::host();
    let cg_name = "forkd/sb-cleanuptest1";
    if let Some(cg) = cg {
        cg.create(cg_name, &Default::default()).unwrap();
    }

    // Dry run: listed, nothing removed (the daemon is down: noted).
    let (code, out, err) = forkd(&["--url", &url, "--json", "cleanup", "--data-dir", &data_s]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["daemon_reachable"], false);
    let names: Vec<String> =
        v["orphans"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap().to_string()).collect();
    assert!(names.contains(&orphan_dir.display().to_string()), "{v}");
    assert!(names.contains(&staging.display().to_string()), "{v}");
    let sock_detail =
        v["orphans"].as_array().unwrap().iter().find(|o| o["kind"] == "workdir").unwrap()["detail"].clone();
    assert!(sock_detail.as_str().unwrap().contains("agent.sock"), "{sock_detail}");
    if cg.is_some() {
        assert!(names.contains(&cg_name.to_string()), "{v}");
    }
    assert!(orphan_dir.exists() && staging.exists());

    // --yes removes them.
    let (code, out, err) = forkd(&["--url", &url, "cleanup", "--data-dir", &data_s, "--yes"]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("removed"), "{out}");
    assert!(!orphan_dir.exists() && !staging.exists());
    if let Some(cg) = cg {
        assert!(!cg.exists(cg_name));
    }
    let (_, out, _) = forkd(&["--url", &url, "--json", "cleanup", "--data-dir", &data_s]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let left: Vec<&Value> = v["orphans"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| {
            o["name"].as_str().unwrap().contains("cleanuptest1") || o["name"].as_str().unwrap().contains("gone.abcd")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Runs `forkd doctor --no-daemon --json` under a capability bounding set.
fn doctor_with_caps(bounding: &str) -> Value {
    let out = Command::new("setpriv")
        .arg(format!("--bounding-set={bounding}"))
        .arg(cli_bin())
        .args(["--json", "doctor", "--no-daemon"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

fn qemus_of_doctor() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains("-machine\0none\0-nodefaults"))
        .count()
}

#[test]
fn doctor_probes_the_confinement_a_vmm_gets_here() {
    // With the shipped unit's capabilities a jailed QEMU is fully confined.
    let report = doctor_with_caps(&forkd_integration::support::unit_bounding_set());
    let c = check(&report, "vmm-confinement");
    assert_eq!(c["status"], "pass", "{c}");
    let detail = c["detail"].as_str().unwrap();
    for want in ["CapEff 0x0", "CapPrm 0x0", "CapBnd 0x0", "seccomp 2", "no_new_privs 1", "own mount ns true"] {
        assert!(detail.contains(want), "{want} in {detail}");
    }

    // Without the capabilities the jail needs, doctor says so, and the probe
    // leaves no QEMU behind.
    let report = doctor_with_caps("-all");
    let c = check(&report, "vmm-confinement");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["fix"].as_str().unwrap().contains("CAP_SETUID"), "{c}");
    // Able to start it but not to kill it or look inside: a warning, and
    // still nothing left running.
    let report = doctor_with_caps("-all,+sys_admin,+setuid,+setgid,+setpcap,+chown");
    assert_eq!(check(&report, "vmm-confinement")["status"], "warn", "{report}");
    // Other tests' doctor runs probe too, briefly: only one that stays is
    // left behind.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while qemus_of_doctor() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(qemus_of_doctor(), 0, "a probe QEMU was left running");
}
