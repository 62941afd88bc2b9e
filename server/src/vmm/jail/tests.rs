//! The jail, tried on an ordinary program: it sees only what it was given,
//! runs as its leased uid, and holds no capability.

use std::os::unix::process::CommandExt;

use super::*;

fn status_field(text: &str, key: &str) -> String {
    text.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string()).unwrap_or_default()
}

#[test]
fn a_jailed_process_sees_only_its_files_and_has_no_privilege() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "the jail tests need root, as the daemon does");
    let dir = tempfile::tempdir().unwrap();
    let mine = dir.path().join("mine.txt");
    let other = dir.path().join("other.txt");
    std::fs::write(&mine, "visible").unwrap();
    std::fs::write(&other, "hidden").unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::os::unix::fs::chown(&work, Some(4_100_000), Some(4_100_000)).unwrap();
    let cfg = JailConfig {
        enabled: true,
        uids: UidRange { base: 4_100_000, count: 4, gid: 4_100_000 },
        mountpoint: dir.path().join("jail-root"),
    };
    std::fs::create_dir(&cfg.mountpoint).unwrap();
    let uids = Uids::new(cfg.uids);
    let lease = uids.lease().unwrap();
    let mut needs = Needs::default();
    needs.read_only(mine.clone());
    needs.writable(work.clone());
    let passed = needs.pass(std::fs::File::open(&other).unwrap().into());
    let plan = Plan::confined(&cfg, &lease, None, needs).unwrap();
    let script = format!(
        "cat {mine}; echo; test -e {other} && echo SEES-OTHER; test -e /etc/shadow && echo SEES-SHADOW; \
         echo x > {mine} 2>/dev/null && echo WROTE-RO; echo ok > {work}/out && echo WROTE-WORK; \
         cat <&{passed}; echo; cat /proc/self/status 2>/dev/null | head -1; \
         grep -E '^(Uid|Gid|CapEff|CapPrm|CapInh|CapAmb|CapBnd|NoNewPrivs)' /proc/1/status 2>/dev/null; echo done",
        mine = mine.display(),
        other = other.display(),
        work = work.display(),
    );
    // bash: dash redirects only single-digit descriptors.
    let mut cmd = std::process::Command::new("/bin/bash");
    cmd.args(["-c", &script]);
    unsafe {
        cmd.pre_exec(move || plan.enter());
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("visible\n"), "{text}");
    for bad in ["SEES-OTHER", "SEES-SHADOW", "WROTE-RO"] {
        assert!(!text.contains(bad), "{bad}: {text}");
    }
    assert!(text.contains("WROTE-WORK"), "{text}");
    assert!(text.contains("hidden"), "a passed descriptor is readable: {text}");
    assert!(text.contains("done"));
    // The host is untouched: nothing was mounted outside the namespace.
    assert!(std::fs::read_dir(&cfg.mountpoint).unwrap().next().is_none());
    assert_eq!(std::fs::read_to_string(work.join("out")).unwrap(), "ok\n");
    let meta = std::fs::metadata(work.join("out")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), lease.uid);
}

#[test]
fn capabilities_and_uid_of_a_jailed_process() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "the jail tests need root, as the daemon does");
    let dir = tempfile::tempdir().unwrap();
    let cfg = JailConfig {
        enabled: true,
        uids: UidRange { base: 4_200_000, count: 4, gid: 4_200_000 },
        mountpoint: dir.path().join("jail-root"),
    };
    std::fs::create_dir(&cfg.mountpoint).unwrap();
    let uids = Uids::new(cfg.uids);
    let lease = uids.lease().unwrap();
    let plan = Plan::confined(&cfg, &lease, None, Needs::default()).unwrap();
    // No /proc in the jail: the child reports on itself before exec, and
    // the parent reads its /proc entry while it sleeps.
    let mut cmd = std::process::Command::new("/bin/sleep");
    cmd.arg("5");
    unsafe {
        cmd.pre_exec(move || plan.enter());
    }
    let mut child = cmd.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    let (child_ns, own_ns) = (ns(&child.id().to_string()), ns("self"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(status_field(&status, "Uid:").starts_with(&lease.uid.to_string()), "{status}");
    assert!(status_field(&status, "Gid:").starts_with(&lease.gid.to_string()), "{status}");
    for cap in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:", "CapBnd:"] {
        assert_eq!(u64::from_str_radix(&status_field(&status, cap), 16).unwrap(), 0, "{cap} in {status}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1");
    assert_ne!(child_ns, own_ns, "own mount namespace");
}
