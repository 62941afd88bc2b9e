//! `forkd doctor`: is this host ready to run forkd, and is the daemon
//! reachable? Every check says pass, warn, fail or skip, with a fix for
//! anything that is not a pass. Any fail makes the exit status non-zero.

use std::path::{Path, PathBuf};
use std::process::Command;

use forkd_api::v1::GetVersionRequest;
use forkd_server::host::cgroup::{Cgroups, Version};
use forkd_server::vmm::accel::KvmFacts;
use forkd_server::vmm::jail::probe as jail_probe;
use forkd_server::vmm::jail::{JailConfig, UidRange};
use serde_json::json;

use crate::args::{DoctorArgs, GlobalArgs};
use crate::client::Conn;
use crate::exit::{AUTH, FAILURE, OK};
use crate::output::{emit, emit_json, table};

/// Oldest QEMU whose `microvm` machine and migration options forkd uses.
pub const MIN_QEMU_MAJOR: u32 = 10;
/// Free space below which the data dir check fails / warns.
const FAIL_FREE_BYTES: u64 = 2 << 30;
const WARN_FREE_BYTES: u64 = 10 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Pass,
    Warn,
    Fail,
    Skip,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Pass => "pass",
            Level::Warn => "warn",
            Level::Fail => "fail",
            Level::Skip => "skip",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    /// How to fix it ("" for a pass).
    pub fix: String,
}

fn check(name: &'static str, level: Level, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    let fix = if level == Level::Pass { String::new() } else { fix.into() };
    Check { name, level, detail: detail.into(), fix }
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// `(major, minor, patch)` from `qemu-system-x86_64 --version` output.
pub fn parse_qemu_version(text: &str) -> Option<(u32, u32, u32)> {
    let at = text.find("version ")? + "version ".len();
    let v: String = text[at..].chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let major = it.next()??;
    let minor = it.next().flatten().unwrap_or(0);
    let patch = it.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

fn platform() -> Check {
    let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
    if os == "linux" && arch == "x86_64" {
        check("platform", Level::Pass, format!("{os} {arch}"), "")
    } else {
        check("platform", Level::Fail, format!("{os} {arch}"), "forkd runs on Linux x86_64 hosts")
    }
}

fn kvm() -> Vec<Check> {
    let facts = KvmFacts::read();
    let present = Path::new("/dev/kvm").exists();
    let dev = if !present {
        check(
            "kvm",
            Level::Warn,
            "/dev/kvm is absent: guests run under TCG emulation (slow)",
            "load kvm_intel or kvm_amd, or run on a host with nested virtualisation",
        )
    } else if !facts.dev_kvm_usable {
        check(
            "kvm",
            Level::Warn,
            "/dev/kvm exists but cannot be opened read-write",
            "run the daemon as root or add its user to the kvm group",
        )
    } else {
        check("kvm", Level::Pass, "/dev/kvm present and usable", "")
    };
    let guest = if facts.pvm {
        check(
            "kvm-guest",
            Level::Warn,
            "/dev/kvm is PVM (kvm_pvm module), which cannot run the stock guest kernel: TCG fallback",
            "use a host with hardware KVM for full speed; TCG works, only slower",
        )
    } else if present && facts.dev_kvm_usable {
        check("kvm-guest", Level::Pass, "hardware KVM; the daemon confirms with a boot probe at start", "")
    } else {
        check("kvm-guest", Level::Skip, "no usable KVM: TCG fallback", "")
    };
    vec![dev, guest]
}

fn qemu() -> Check {
    let bin = std::env::var_os("FORKD_QEMU").map(PathBuf::from).or_else(|| on_path("qemu-system-x86_64"));
    let Some(bin) = bin else {
        return check(
            "qemu",
            Level::Fail,
            "qemu-system-x86_64 not found on PATH",
            "apt-get install qemu-system-x86 (version 10 or newer), or set FORKD_QEMU",
        );
    };
    let out = match Command::new(&bin).arg("--version").output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => return check("qemu", Level::Fail, format!("{}: {e}", bin.display()), "check the QEMU installation"),
    };
    match parse_qemu_version(&out) {
        Some((maj, min, pat)) if maj >= MIN_QEMU_MAJOR => {
            check("qemu", Level::Pass, format!("{} {maj}.{min}.{pat}", bin.display()), "")
        }
        Some((maj, min, pat)) => check(
            "qemu",
            Level::Fail,
            format!("{} is {maj}.{min}.{pat}, older than {MIN_QEMU_MAJOR}", bin.display()),
            "install QEMU 10 or newer (e.g. from Debian backports)",
        ),
        None => check(
            "qemu",
            Level::Fail,
            format!("cannot read the version of {}", bin.display()),
            "check the QEMU installation",
        ),
    }
}

fn firecracker() -> Check {
    match on_path("firecracker") {
        Some(p) => {
            let v = Command::new(&p)
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
                .unwrap_or_default();
            check("firecracker", Level::Pass, format!("{} {v}", p.display()), "")
        }
        None => check("firecracker", Level::Skip, "not installed (optional; the QEMU backend is used)", ""),
    }
}

fn guest_assets(dir: &Path) -> Check {
    let missing: Vec<&str> = ["vmlinux", "initramfs.img"].into_iter().filter(|f| !dir.join(f).is_file()).collect();
    let images: Vec<String> = std::fs::read_dir(dir.join("images"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".ext4"))
                .map(|n| n.trim_end_matches(".ext4").to_string())
                .collect()
        })
        .unwrap_or_default();
    let fix = "run scripts/build-guest.sh, or point --guest-dir / FORKD_GUEST_DIR at the assets";
    if !missing.is_empty() {
        return check("guest", Level::Fail, format!("{}: missing {}", dir.display(), missing.join(", ")), fix);
    }
    if images.is_empty() {
        return check("guest", Level::Fail, format!("{}: kernel present, no images/*.ext4", dir.display()), fix);
    }
    let mut images = images;
    images.sort();
    check("guest", Level::Pass, format!("{}: kernel, initramfs, images {}", dir.display(), images.join(", ")), "")
}

fn cgroups() -> Check {
    match Cgroups::host() {
        Some(cg) => {
            let have = cg.controllers();
            let missing: Vec<&str> = ["memory", "cpu", "pids"].into_iter().filter(|c| !have.contains(c)).collect();
            let v2 = std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
                .or_else(|_| std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers"))
                .map(|s| format!("; unified hierarchy controllers: [{}]", s.trim()))
                .unwrap_or_default();
            let detail = format!("{}{}", cg.describe(), if cg.version == Version::V1 { v2 } else { String::new() });
            if missing.is_empty() {
                check("cgroups", Level::Pass, detail, "")
            } else {
                check(
                    "cgroups",
                    Level::Warn,
                    format!("{detail}; no {} controller", missing.join(", ")),
                    "mount the missing cgroup controllers; limits needing them are refused",
                )
            }
        }
        None => check(
            "cgroups",
            Level::Warn,
            "no cgroup hierarchy with memory, cpu or pids",
            "mount cgroup2 (or the v1 controllers) under /sys/fs/cgroup; without it limits are refused",
        ),
    }
}

fn netns() -> Vec<Check> {
    let ip = on_path("ip");
    let ns = match &ip {
        Some(p) => match Command::new(p).args(["netns", "list"]).output() {
            Ok(o) if o.status.success() => check("netns", Level::Pass, format!("{} netns works", p.display()), ""),
            Ok(o) => check(
                "netns",
                Level::Warn,
                format!("ip netns list failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
                "run as root with CAP_SYS_ADMIN for network \"nat\"",
            ),
            Err(e) => check("netns", Level::Warn, format!("ip: {e}"), "apt-get install iproute2"),
        },
        None => check(
            "netns",
            Level::Warn,
            "ip (iproute2) not found: network \"nat\" unavailable",
            "apt-get install iproute2",
        ),
    };
    let fw = match (on_path("nft"), on_path("iptables")) {
        (Some(n), _) => check("firewall", Level::Pass, format!("nftables at {}", n.display()), ""),
        (None, Some(i)) => check("firewall", Level::Pass, format!("iptables at {}", i.display()), ""),
        (None, None) => check(
            "firewall",
            Level::Warn,
            "neither nft nor iptables found: egress filtering for network \"nat\" unavailable",
            "apt-get install nftables",
        ),
    };
    vec![ns, fw]
}

fn free_space(data_dir: &Path) -> Check {
    // The data dir may not exist yet: measure the nearest existing parent.
    let mut p = data_dir.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            break;
        }
    }
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return check("data-dir", Level::Fail, format!("bad path {}", data_dir.display()), "pass a plain --data-dir");
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return check(
            "data-dir",
            Level::Fail,
            format!("{}: {}", p.display(), std::io::Error::last_os_error()),
            "create the data dir or pass --data-dir",
        );
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    let detail = format!(
        "{} ({}): {} free",
        data_dir.display(),
        if data_dir.exists() { "exists" } else { "not created yet" },
        crate::output::human_bytes(free)
    );
    let fix = "free space or move --data-dir to a larger filesystem (snapshots hold guest RAM)";
    if free < FAIL_FREE_BYTES {
        check("data-dir", Level::Fail, detail, fix)
    } else if free < WARN_FREE_BYTES {
        check("data-dir", Level::Warn, detail, fix)
    } else {
        check("data-dir", Level::Pass, detail, "")
    }
}

fn userfaultfd() -> Check {
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    if fd >= 0 {
        unsafe { libc::close(fd as i32) };
        return check("userfaultfd", Level::Pass, format!("available (vm.unprivileged_userfaultfd={sysctl})"), "");
    }
    let e = std::io::Error::last_os_error();
    check(
        "userfaultfd",
        Level::Warn,
        format!("userfaultfd(2): {e} (vm.unprivileged_userfaultfd={sysctl})"),
        "run as root or sysctl vm.unprivileged_userfaultfd=1; needed only for lazy memory restore",
    )
}

fn memfd() -> Check {
    let fd = unsafe { libc::memfd_create(c"forkd-doctor".as_ptr(), libc::MFD_CLOEXEC) };
    if fd >= 0 {
        unsafe { libc::close(fd) };
        check("memfd", Level::Pass, "memfd_create works", "")
    } else {
        check(
            "memfd",
            Level::Warn,
            format!("memfd_create: {}", std::io::Error::last_os_error()),
            "use a kernel with memfd_create (3.17+) and no seccomp filter blocking it",
        )
    }
}

fn ksm() -> Check {
    match std::fs::read_to_string("/sys/kernel/mm/ksm/run") {
        Ok(run) => {
            let run = run.trim().to_string();
            let level = if run == "1" { Level::Pass } else { Level::Warn };
            check(
                "ksm",
                level,
                format!("available, run={run}"),
                "echo 1 > /sys/kernel/mm/ksm/run to merge identical guest pages (optional)",
            )
        }
        Err(_) => check("ksm", Level::Skip, "/sys/kernel/mm/ksm absent (kernel without KSM)", ""),
    }
}

fn hugepages() -> Check {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |k: &str| {
        meminfo.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    match (field("HugePages_Total:"), field("HugePages_Free:"), field("Hugepagesize:")) {
        (Some(total), free, size) if total > 0 => check(
            "hugepages",
            Level::Pass,
            format!("{total} pages of {} kB, {} free", size.unwrap_or(0), free.unwrap_or(0)),
            "",
        ),
        (Some(_), _, size) => check(
            "hugepages",
            Level::Warn,
            format!("none reserved (page size {} kB)", size.unwrap_or(0)),
            "sysctl vm.nr_hugepages=N to back guest memory with huge pages (optional)",
        ),
        _ => check("hugepages", Level::Skip, "no HugePages_Total in /proc/meminfo", ""),
    }
}

/// Starts QEMU jailed as the daemon would and reports what the kernel says
/// of it: the confinement this host can really give a VMM.
async fn vmm_confinement(a: &DoctorArgs) -> Check {
    const NAME: &str = "vmm-confinement";
    if !nix::unistd::geteuid().is_root() {
        return check(NAME, Level::Skip, "not root: the jail probe needs the daemon's privileges", "sudo forkd doctor");
    }
    let Some(qemu) = on_path("qemu-system-x86_64") else {
        return check(NAME, Level::Skip, "qemu-system-x86_64 not found", "scripts/setup-host.sh");
    };
    let mountpoint = std::env::temp_dir().join(format!("forkd-doctor-jail-{}", std::process::id()));
    let cfg = JailConfig {
        enabled: true,
        uids: UidRange { base: a.vmm_uid_base, count: a.vmm_uid_count, gid: a.vmm_uid_base },
        mountpoint: mountpoint.clone(),
    };
    let secrets = vec![
        PathBuf::from("/etc/shadow"),
        a.data_dir.join("token"),
        a.data_dir.join("forkd.db"),
        a.data_dir.join("sandboxes"),
    ];
    let observed = tokio::task::spawn_blocking(move || jail_probe::run(&qemu, &cfg, &secrets)).await;
    let _ = std::fs::remove_dir(&mountpoint);
    match observed {
        Ok(Ok(o)) if o.confined() => check(NAME, Level::Pass, format!("a jailed QEMU runs with {}", o.describe()), ""),
        Ok(Ok(o)) if o.own_mount_ns.is_none() && o.uid != 0 && o.cap_eff == 0 && o.seccomp == 2 => check(
            NAME,
            Level::Warn,
            format!("a jailed QEMU runs with {}; its mount namespace could not be inspected", o.describe()),
            "run forkd doctor with CAP_SYS_PTRACE (as the shipped unit grants the daemon) to check the namespace",
        ),
        Ok(Ok(o)) => check(
            NAME,
            Level::Fail,
            format!("a jailed QEMU is not fully confined: {}", o.describe()),
            "run forkd-server with the shipped unit's capabilities (deploy/systemd) on a kernel with seccomp and mount namespaces",
        ),
        Ok(Err(e)) => check(
            NAME,
            Level::Fail,
            format!("QEMU cannot be started jailed: {e}"),
            "grant CAP_SETUID, CAP_SETGID, CAP_SETPCAP, CAP_SYS_ADMIN and CAP_CHOWN (see deploy/systemd), and use a QEMU built with seccomp",
        ),
        Err(e) => check(NAME, Level::Fail, format!("the jail probe failed: {e}"), ""),
    }
}

/// How the daemon says it confines its VMMs.
fn vmm_jail(confinement: &str) -> Check {
    if confinement.starts_with("jail") {
        check("vmm-jail", Level::Pass, confinement, "")
    } else if confinement.is_empty() {
        check(
            "vmm-jail",
            Level::Warn,
            "the daemon does not report VMM confinement (older version)",
            "upgrade forkd-server",
        )
    } else {
        check(
            "vmm-jail",
            Level::Warn,
            confinement,
            "restart forkd-server without --vmm-jail off; a compromised VMM can reach every file the daemon can",
        )
    }
}

/// How the daemon authenticates: a daemon without auth is a warning.
fn auth(mode: &str, sent_token: bool) -> Check {
    match mode {
        "off" => check(
            "auth",
            Level::Warn,
            "off (--no-auth): every local user and process can drive every VM",
            "restart forkd-server without --no-auth; it then creates <data-dir>/token",
        ),
        "token" if sent_token => check("auth", Level::Pass, "token required; ours was accepted", ""),
        // An old daemon does not say; it answered, so our call was allowed.
        _ => check("auth", Level::Pass, format!("{mode:?}; the call was accepted"), ""),
    }
}

async fn daemon(global: &GlobalArgs) -> Vec<Check> {
    let conn = match Conn::connect(global).await {
        Ok(c) => c,
        Err(e) => {
            return vec![check(
                "daemon",
                Level::Fail,
                e.message,
                "start forkd-server, or point --url / FORKD_URL at it",
            )];
        }
    };
    vec![match conn.call(conn.system().get_version(GetVersionRequest {})).await {
        Ok(v) => {
            return vec![
                check(
                    "daemon",
                    Level::Pass,
                    format!("{} {} ({}, {}: {})", conn.url, v.version, v.backend, v.accel, v.accel_reason),
                    "",
                ),
                auth(&v.auth, conn.has_token()),
                vmm_jail(&v.vmm_confinement),
            ];
        }
        Err(e) if e.code == AUTH => check(
            "daemon",
            Level::Fail,
            format!("{}: the token was refused: {}", conn.url, e.message),
            "pass the daemon's token with --token, --token-file, FORKD_TOKEN or FORKD_TOKEN_FILE",
        ),
        Err(e) => check("daemon", Level::Fail, e.message, "start forkd-server, or point --url / FORKD_URL at it"),
    }]
}

/// Runs every check.
pub async fn checks(global: &GlobalArgs, a: &DoctorArgs) -> Vec<Check> {
    let mut out = vec![platform()];
    out.extend(kvm());
    out.push(qemu());
    out.push(firecracker());
    out.push(guest_assets(&a.guest_dir()));
    out.push(cgroups());
    out.push(vmm_confinement(a).await);
    out.extend(netns());
    out.push(free_space(&a.data_dir));
    out.push(userfaultfd());
    out.push(memfd());
    out.push(ksm());
    out.push(hugepages());
    if a.no_daemon {
        out.push(check("daemon", Level::Skip, "skipped (--no-daemon)", ""));
    } else {
        out.extend(daemon(global).await);
    }
    out
}

pub async fn run(global: &GlobalArgs, a: DoctorArgs) -> anyhow::Result<u8> {
    let all = checks(global, &a).await;
    let count = |l: Level| all.iter().filter(|c| c.level == l).count();
    let failed = count(Level::Fail) > 0;
    if global.json {
        emit_json(&json!({
            "ok": !failed,
            "summary": {
                "pass": count(Level::Pass),
                "warn": count(Level::Warn),
                "fail": count(Level::Fail),
                "skip": count(Level::Skip),
            },
            "checks": all.iter().map(|c| json!({
                "name": c.name,
                "status": c.level.as_str(),
                "detail": c.detail,
                "fix": c.fix,
            })).collect::<Vec<_>>(),
        }))?;
    } else {
        let mut text = table(
            &["CHECK", "STATUS", "DETAIL"],
            all.iter().map(|c| vec![c.name.to_string(), c.level.as_str().to_string(), c.detail.clone()]),
        );
        let hints: Vec<String> = all
            .iter()
            .filter(|c| !c.fix.is_empty())
            .map(|c| format!("  {} ({}): {}", c.name, c.level.as_str(), c.fix))
            .collect();
        if !hints.is_empty() {
            text.push_str("\nfixes:\n");
            text.push_str(&hints.join("\n"));
            text.push('\n');
        }
        text.push_str(&format!(
            "\n{} pass, {} warn, {} fail, {} skip\n",
            count(Level::Pass),
            count(Level::Warn),
            count(Level::Fail),
            count(Level::Skip)
        ));
        emit(&text)?;
    }
    Ok(if failed { FAILURE } else { OK })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions() {
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"),
            Some((10, 0, 2))
        );
        assert_eq!(parse_qemu_version("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)"), Some((7, 2, 15)));
        assert_eq!(parse_qemu_version("QEMU emulator version 9.1"), Some((9, 1, 0)));
        assert_eq!(parse_qemu_version("nothing here"), None);
    }

    #[test]
    fn local_checks_never_panic() {
        for c in [
            platform(),
            qemu(),
            firecracker(),
            cgroups(),
            free_space(Path::new("/nonexistent/forkd")),
            userfaultfd(),
            memfd(),
            ksm(),
            hugepages(),
        ] {
            assert!(!c.detail.is_empty(), "{c:?}");
            if matches!(c.level, Level::Warn | Level::Fail) {
                assert!(!c.fix.is_empty(), "{c:?}");
            }
            if c.level == Level::Pass {
                assert!(c.fix.is_empty(), "{c:?}");
            }
        }
    }
}
