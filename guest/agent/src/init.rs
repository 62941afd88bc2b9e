//! PID 1 duties: bring up the initramfs, load modules, switch to the
//! copy-on-write root, then serve the agent channel forever.

use crate::cmdline::{self, BootConfig};
use crate::reinit::{self, RUN_DIR};
use crate::runtime::Runtime;
use crate::server::{self, Agent};
use crate::{log, proc, sys};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MODULE_LIST: &str = "/forkd/modules.list";
const ROOT_WAIT: Duration = Duration::from_secs(10);

pub fn boot() -> ! {
    early_mounts();
    sys::ensure_std_fds();
    log::use_kmsg();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cfg = cmdline::parse(&cmdline);
    proc::start_reaper();
    load_modules();
    match switch_root(&cfg) {
        Ok(()) => after_root(&cfg),
        // Keep serving from the initramfs so the host can see what went wrong.
        Err(e) => log::error(&format!("switching to the root image failed: {e}")),
    }
    // A runtime the image cannot run is reported as none (Pong.runtime ""),
    // so the host does not wait for a warm-up that will never finish.
    let has_python = proc::resolve_program("python3", crate::exec::DEFAULT_PATH).is_some();
    let kind = match cfg.runtime.as_str() {
        "auto" | "python" if has_python => "python",
        "auto" | "" => "",
        other => {
            log::error(&format!("runtime {other:?} is not available in this image"));
            ""
        }
    };
    let runtime = Runtime::new(kind, cfg.warm.clone(), RUN_DIR);
    runtime.start_background();
    let agent = Agent::new(runtime, RUN_DIR);
    loop {
        serve_port(&agent, &cfg.port);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn early_mounts() {
    for (src, target, fstype, data) in
        [("proc", "/proc", "proc", ""), ("sysfs", "/sys", "sysfs", ""), ("devtmpfs", "/dev", "devtmpfs", "mode=0755")]
    {
        let _ = sys::mkdir_p(target, 0o755);
        let flags = libc::MS_NOSUID | if fstype == "devtmpfs" { 0 } else { libc::MS_NODEV | libc::MS_NOEXEC };
        if let Err(e) = sys::mount(src, target, fstype, flags, data)
            && e.raw_os_error() != Some(libc::EBUSY)
        {
            log::error(&format!("mount {target}: {e}"));
        }
    }
}

fn load_modules() {
    let Ok(list) = std::fs::read_to_string(MODULE_LIST) else { return };
    let empty = c"";
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let fd = match sys::open(path, libc::O_RDONLY, 0) {
            Ok(fd) => fd,
            Err(e) => {
                log::error(&format!("module {path}: {e}"));
                continue;
            }
        };
        let r = unsafe { libc::syscall(libc::SYS_finit_module, fd.as_raw_fd(), empty.as_ptr(), 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                log::error(&format!("loading {path}: {e}"));
            }
        }
    }
}

fn wait_for(path: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if Path::new(path).exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Mounts the image read-only under a RAM-backed overlay and makes that the
/// root: every VM writes only to its own memory, the image is shared and
/// never modified.
fn switch_root(cfg: &BootConfig) -> io::Result<()> {
    if !wait_for(&cfg.root, ROOT_WAIT) {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} did not appear", cfg.root)));
    }
    for d in ["/mnt/lower", "/mnt/rw", "/newroot"] {
        sys::mkdir_p(d, 0o755)?;
    }
    sys::mount(&cfg.root, "/mnt/lower", &cfg.rootfstype, libc::MS_RDONLY, "")?;
    sys::mount("tmpfs", "/mnt/rw", "tmpfs", 0, "mode=0755")?;
    sys::mkdir_p("/mnt/rw/upper", 0o755)?;
    sys::mkdir_p("/mnt/rw/work", 0o755)?;
    sys::mount("overlay", "/newroot", "overlay", 0, "lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work")?;
    for d in ["proc", "sys", "dev"] {
        let target = format!("/newroot/{d}");
        sys::mkdir_p(&target, 0o755)?;
        sys::mount(&format!("/{d}"), &target, "", libc::MS_MOVE, "")?;
    }
    let newroot = sys::cstr("/newroot")?;
    let dot = sys::cstr(".")?;
    let slash = sys::cstr("/")?;
    sys::check(unsafe { libc::chdir(newroot.as_ptr()) })?;
    sys::mount(".", "/", "", libc::MS_MOVE, "")?;
    sys::check(unsafe { libc::chroot(dot.as_ptr()) })?;
    sys::check(unsafe { libc::chdir(slash.as_ptr()) })?;
    Ok(())
}

fn after_root(cfg: &BootConfig) {
    let try_mount = |src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str| {
        let _ = sys::mkdir_p(target, 0o755);
        if let Err(e) = sys::mount(src, target, fstype, flags, data) {
            log::error(&format!("mount {target}: {e}"));
        }
    };
    try_mount("devpts", "/dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666");
    try_mount("tmpfs", "/dev/shm", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777");
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    // The overlay's upper layer is RAM already, so /tmp and /run need no
    // tmpfs of their own; they only have to exist with the usual modes.
    for (dir, mode) in [("/tmp", 0o1777), ("/run", 0o755), (RUN_DIR, 0o755), ("/root", 0o700)] {
        let _ = sys::mkdir_p(dir, mode);
        if let Ok(c) = sys::cstr(dir) {
            unsafe { libc::chmod(c.as_ptr(), mode) };
        }
    }
    if let Err(e) = reinit::set_hostname(&cfg.hostname) {
        log::error(&format!("hostname: {}", e.message));
    }
    if let Err(e) = reinit::link_up("lo") {
        log::error(&format!("lo up: {e}"));
    }
}

/// Finds the virtio-serial port named `name`: /sys/class/virtio-ports/vportNpM/name.
fn find_port(name: &str) -> Option<String> {
    let rd = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for ent in rd.flatten() {
        let n = std::fs::read_to_string(ent.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            return Some(format!("/dev/{}", ent.file_name().to_string_lossy()));
        }
    }
    None
}

fn serve_port(agent: &Arc<Agent>, name: &str) {
    let started = Instant::now();
    let mut warned = false;
    let fd = loop {
        if let Some(dev) = find_port(name) {
            // The node can exist before the port accepts opens (ENXIO).
            match sys::open(&dev, libc::O_RDWR | libc::O_NONBLOCK | libc::O_NOCTTY, 0) {
                Ok(fd) => break fd,
                Err(e) if !warned && started.elapsed() > Duration::from_secs(10) => {
                    log::error(&format!("opening {dev}: {e} (still retrying)"));
                    warned = true;
                }
                Err(_) => {}
            }
        } else if !warned && started.elapsed() > Duration::from_secs(10) {
            log::error(&format!("no virtio-serial port named {name} yet (still waiting)"));
            warned = true;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    log::info(&format!("serving on port {name}"));
    let fd = Arc::new(fd);
    agent.writer.set(Some(fd.clone()));
    server::serve(agent, fd.as_raw_fd(), true);
}
