//! The QEMU backend: `microvm` machine, RAM in a file, device state saved and
//! loaded without RAM (see args.rs for why command lines must match).

pub mod args;
pub mod qmp;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use self::args::{Start, Wiring};
use self::qmp::Qmp;
use crate::host::paths::Root;
use crate::vmm::jail::{self, JailConfig, Needs, Plan, UidLease, Uids};
use crate::vmm::{
    Accel, Backend, Drive, NetAttach, PendingVm, Placement, VmControl, VmDir, VmProcess, VmSpec, VmmError, console,
    process,
};

/// How long QEMU gets to create its control socket, and to load state.
const QMP_TIMEOUT: Duration = qmp::TIMEOUT;

/// How the backend confines and wires its VMMs.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// None: VMMs run unconfined (`--vmm-jail off`), only without
    /// capabilities.
    pub jail: Option<JailConfig>,
    /// Volume files are opened only beneath this root.
    pub volume_root: Option<Root>,
    /// Bytes of serial console kept per VM.
    pub console_cap: u64,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig { jail: None, volume_root: None, console_cap: console::DEFAULT_CAP }
    }
}

pub struct QemuBackend {
    binary: PathBuf,
    accel: Accel,
    config: QemuConfig,
    uids: Option<Arc<Uids>>,
    /// The empty network namespace VMMs without a tap run in.
    empty_netns: Option<OwnedFd>,
}

impl QemuBackend {
    /// An unconfined backend (tools and probes that run without a daemon).
    pub fn new(binary: PathBuf, accel: Accel) -> Self {
        Self { binary, accel, config: QemuConfig::default(), uids: None, empty_netns: None }
    }

    /// A backend whose VMMs are confined as `config` says.
    pub fn with_config(binary: PathBuf, accel: Accel, config: QemuConfig) -> std::io::Result<Self> {
        let (uids, empty_netns) = match &config.jail {
            Some(j) => {
                std::fs::create_dir_all(&j.mountpoint)?;
                (Some(Uids::new(j.uids)), Some(jail::netns::empty()?))
            }
            None => (None, None),
        };
        Ok(Self { binary, accel, config, uids, empty_netns })
    }

    /// Finds `qemu-system-x86_64` on PATH.
    pub fn find_binary() -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).map(|d| d.join("qemu-system-x86_64")).find(|p| p.is_file())
    }

    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// Opens a volume's file for the VMM: beneath the volume root, never
    /// through a symlink, read-write only when the volume is.
    fn open_drive(&self, d: &Drive) -> Result<OwnedFd, VmmError> {
        match &self.config.volume_root {
            Some(root) => root.open_file(&d.path, !d.read_only).map_err(|e| VmmError::Spawn(format!("volume: {e}"))),
            None => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(!d.read_only)
                    .open(&d.path)
                    .map_err(|e| VmmError::Spawn(format!("volume {}: {e}", d.path.display())))?;
                Ok(f.into())
            }
        }
    }

    /// Everything the VMM gets from the host, and how it is confined.
    fn prepare(
        &self,
        spec: &VmSpec,
        dir: &VmDir,
        start: Start,
        net: &NetAttach,
    ) -> Result<(Plan, Wiring, Option<UidLease>), VmmError> {
        let spawn_err = |what: &str, e: &dyn std::fmt::Display| VmmError::Spawn(format!("{what}: {e}"));
        let mut needs = Needs::default();
        let mut wiring = Wiring::default();
        for d in &spec.drives {
            let mut fds = vec![];
            if !d.slot {
                let fd = self.open_drive(d)?;
                if !d.read_only {
                    // The same file again, read-only: reopened through the
                    // descriptor, so it cannot be another file.
                    let again = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                        .map_err(|e| VmmError::Spawn(format!("volume {}: {e}", d.path.display())))?;
                    fds.push(needs.pass(again.into()));
                }
                fds.push(needs.pass(fd));
            }
            wiring.drive_fds.push(fds);
        }
        let netns = match net {
            NetAttach::Tap { netns, tap } => {
                let fd = jail::netns::open_tap(netns, tap).map_err(|e| spawn_err(&format!("tap {tap}"), &e))?;
                wiring.tap_fd = Some(needs.pass(fd));
                Some(jail::netns::open(netns).map_err(|e| spawn_err(&format!("open {}", netns.display()), &e))?)
            }
            NetAttach::Isolated => match &self.empty_netns {
                Some(ns) => Some(ns.try_clone()?),
                None => None,
            },
        };
        if start == Start::Boot && !spec.mem_file.exists() {
            let f = std::fs::File::create(&spec.mem_file)?;
            f.set_len(spec.mem_mib as u64 * 1024 * 1024)?;
        }
        let (Some(cfg), Some(uids)) = (&self.config.jail, &self.uids) else {
            let plan = Plan::unconfined(netns, needs).map_err(|e| spawn_err("jail", &e))?;
            return Ok((plan, wiring, None));
        };
        let lease = uids.lease().map_err(|e| spawn_err("jail", &e))?;
        let owner = |p: &Path| {
            std::os::unix::fs::chown(p, Some(lease.uid), Some(lease.gid))
                .map_err(|e| spawn_err(&format!("chown {}", p.display()), &e))
        };
        // Its own dir is the only place the VMM may create files (sockets).
        // Mode first: once the dir is the VMM's, changing it would need
        // CAP_FOWNER, which the shipped unit does not grant.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        owner(dir.path())?;
        needs.writable(dir.path());
        for f in [&spec.kernel, &spec.initrd, &spec.rootfs] {
            needs.read_only(f.clone());
        }
        match start {
            Start::Boot => {
                owner(&spec.mem_file)?;
                needs.writable(spec.mem_file.clone());
            }
            Start::Restore => needs.read_only(spec.mem_file.clone()),
        }
        // /usr is in every jail; a binary elsewhere is bound by its real
        // path (a path through a symlink into /usr needs nothing more).
        let binary = std::fs::canonicalize(&self.binary).unwrap_or_else(|_| self.binary.clone());
        if !binary.starts_with("/usr") {
            needs.read_only(binary);
        }
        if spec.accel == Accel::Kvm {
            needs.devices.push(PathBuf::from("/dev/kvm"));
        }
        let plan = Plan::confined(cfg, &lease, netns, needs).map_err(|e| spawn_err("jail", &e))?;
        Ok((plan, wiring, Some(lease)))
    }

    /// Starts QEMU and opens its control socket. On failure nothing is left
    /// running.
    async fn spawn(
        &self,
        spec: &VmSpec,
        dir: &VmDir,
        start: Start,
        net: &NetAttach,
        place: &Placement,
    ) -> Result<(Started, Qmp), VmmError> {
        let (plan, wiring, lease) = self.prepare(spec, dir, start, net)?;
        let background = place.background;
        let cgroup_procs: Vec<std::ffi::CString> = place
            .cgroup_procs
            .iter()
            .filter_map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok())
            .collect();
        let args = args::build(spec, dir, start, &wiring);
        let stderr = std::fs::File::create(dir.path().join("vmm.stderr"))?;
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            // Own process group: signals aimed at the daemon's terminal never
            // reach the VMs, and the VMs outlive a daemon crash.
            .process_group(0)
            .kill_on_drop(false);
        // SAFETY: `Plan::enter` only makes raw system calls on data prepared
        // before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // Before the jail drops privileges: "0" is the writer itself.
                for procs in &cgroup_procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd >= 0 {
                        libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                    }
                }
                if background {
                    // Threads QEMU starts inherit it.
                    libc::setpriority(libc::PRIO_PROCESS, 0, 19);
                }
                plan.enter()
            });
        }
        let child = cmd.spawn().map_err(|e| VmmError::Spawn(format!("{}: {e}", self.binary.display())))?;
        let pid = child.id().ok_or_else(|| VmmError::Spawn("no pid".into()))?;
        let start_time = process::start_time(pid).unwrap_or(0);
        if let Some(lease) = lease {
            lease.bind(pid, start_time);
        }
        let mut started = Started { pid, start_time, child };
        // Fail fast when QEMU exits before its control socket answers.
        let control = dir.control_socket();
        let connected = tokio::select! {
            r = Qmp::connect(&control, QMP_TIMEOUT) => r,
            status = started.child.wait() => Err(VmmError::Exited(format!("qemu exited at start ({})", status.map(|s| s.to_string()).unwrap_or_default()))),
        };
        match connected {
            Ok(q) => {
                console::spawn_pump(dir.console_socket(), dir.console_log(), self.config.console_cap);
                Ok((started, q))
            }
            Err(e) => {
                let why = console::tail(&dir.path().join("vmm.stderr"), 4096);
                started.kill().await;
                Err(VmmError::Spawn(format!("{e}; qemu said: {}", why.trim())))
            }
        }
    }
}

/// A QEMU process this daemon started, before it is handed out.
struct Started {
    pid: u32,
    start_time: u64,
    child: tokio::process::Child,
}

impl Started {
    async fn kill(mut self) {
        process::kill(self.pid, self.start_time, Duration::from_secs(2)).await;
        let _ = self.child.wait().await;
    }

    fn into_process(self, dir: &VmDir, qmp: Qmp) -> VmProcess {
        VmProcess {
            pid: self.pid,
            start_time: self.start_time,
            dir: dir.clone(),
            control: Box::new(QemuControl { qmp: Some(qmp), dir: dir.clone() }),
            child: Some(self.child),
        }
    }
}

struct QemuControl {
    qmp: Option<Qmp>,
    dir: VmDir,
}

impl QemuControl {
    fn qmp(&mut self) -> Result<&mut Qmp, VmmError> {
        let socket = self.dir.control_socket();
        self.qmp.as_mut().ok_or_else(|| VmmError::Control(format!("no QMP connection to {}", socket.display())))
    }
}

#[async_trait]
impl VmControl for QemuControl {
    async fn pause(&mut self) -> Result<(), VmmError> {
        self.qmp()?.execute("stop", None).await.map(|_| ())
    }

    async fn resume(&mut self) -> Result<(), VmmError> {
        self.qmp()?.execute("cont", None).await.map(|_| ())
    }

    async fn save_state(&mut self, path: &Path) -> Result<(), VmmError> {
        // Device and CPU sections only, never RAM; `live: false` keeps the
        // block devices active (the default would release image locks). The
        // VMM writes into its own dir (all it can write); the daemon then
        // owns the file and moves it where it belongs.
        let saved = self.dir.saved_state();
        let _ = std::fs::remove_file(&saved);
        self.qmp()?
            .execute("xen-save-devices-state", Some(json!({ "filename": saved.display().to_string(), "live": false })))
            .await?;
        std::os::unix::fs::chown(&saved, Some(0), Some(0)).or_else(|e| {
            // An unprivileged daemon runs unconfined VMMs as itself.
            if e.raw_os_error() == Some(libc::EPERM) { Ok(()) } else { Err(e) }
        })?;
        if std::fs::rename(&saved, path).is_err() {
            std::fs::copy(&saved, path)?;
            let _ = std::fs::remove_file(&saved);
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    async fn boot(&self, spec: &VmSpec, dir: &VmDir) -> Result<VmProcess, VmmError> {
        let (started, qmp) = self.spawn(spec, dir, Start::Boot, &NetAttach::Isolated, &Placement::default()).await?;
        Ok(started.into_process(dir, qmp))
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        state: &Path,
        dir: &VmDir,
        net: &NetAttach,
        place: &Placement,
    ) -> Result<VmProcess, VmmError> {
        let (started, mut qmp) = self.spawn(spec, dir, Start::Restore, net, place).await?;
        if let Err(e) = load_state(&mut qmp, state, dir).await {
            started.kill().await;
            return Err(e);
        }
        Ok(started.into_process(dir, qmp))
    }

    async fn prestart(
        &self,
        spec: &VmSpec,
        dir: &VmDir,
        net: &NetAttach,
        place: &Placement,
    ) -> Result<Box<dyn PendingVm>, VmmError> {
        let (started, qmp) = self.spawn(spec, dir, Start::Restore, net, place).await?;
        Ok(Box::new(Waiting { started, qmp, dir: dir.clone() }))
    }

    async fn attach(&self, pid: u32, start_time: u64, dir: &VmDir) -> Result<VmProcess, VmmError> {
        if !process::is_alive(pid, start_time) {
            return Err(VmmError::Exited(format!("pid {pid} is gone")));
        }
        if let Some(uids) = &self.uids
            && let Some(uid) = jail::uids::uid_of(pid)
        {
            uids.adopt(uid, pid, start_time);
        }
        let qmp = Qmp::connect(&dir.control_socket(), Duration::from_secs(2)).await?;
        console::spawn_pump(dir.console_socket(), dir.console_log(), self.config.console_cap);
        Ok(VmProcess {
            pid,
            start_time,
            dir: dir.clone(),
            control: Box::new(QemuControl { qmp: Some(qmp), dir: dir.clone() }),
            child: None,
        })
    }
}

/// A QEMU started with `-incoming defer -S`, waiting for its state.
struct Waiting {
    started: Started,
    qmp: Qmp,
    dir: VmDir,
}

#[async_trait]
impl PendingVm for Waiting {
    fn pid(&self) -> u32 {
        self.started.pid
    }

    fn start_time(&self) -> u64 {
        self.started.start_time
    }

    async fn load(self: Box<Self>, state: &Path) -> Result<VmProcess, VmmError> {
        let Waiting { started, mut qmp, dir } = *self;
        if let Err(e) = load_state(&mut qmp, state, &dir).await {
            started.kill().await;
            return Err(e);
        }
        Ok(started.into_process(&dir, qmp))
    }

    async fn kill(self: Box<Self>) {
        self.started.kill().await;
    }
}

/// Loads device state into a child started with `-incoming defer -S`; the
/// child stays paused. The VMM sees only its own dir: the state (a few KiB)
/// is copied there first.
async fn load_state(qmp: &mut Qmp, state: &Path, dir: &VmDir) -> Result<(), VmmError> {
    let incoming = dir.incoming_state();
    std::fs::copy(state, &incoming)
        .and_then(|_| {
            // Readable by the VMM's uid; the dir (0700, the VMM's own) keeps
            // everyone else out.
            std::fs::set_permissions(&incoming, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        })
        .map_err(|e| VmmError::Spawn(format!("copy device state {}: {e}", state.display())))?;
    let state = incoming.as_path();
    // x-ignore-shared must be set on the loading side too, before the load.
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [ { "capability": "x-ignore-shared", "state": true } ] })),
    )
    .await?;
    qmp.execute("migrate-incoming", Some(json!({ "uri": format!("file:{}", state.display()) }))).await?;
    let deadline = tokio::time::Instant::now() + QMP_TIMEOUT;
    loop {
        let status = qmp.status().await?;
        match status.as_str() {
            "inmigrate" => {}
            "paused" | "prelaunch" | "postmigrate" => return Ok(()),
            "running" => return Ok(()),
            other if other.contains("error") || other == "shutdown" => {
                let info = qmp.execute("query-migrate", None).await.unwrap_or_default();
                return Err(VmmError::Control(format!("loading device state failed: {status} {info}")));
            }
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            return Err(VmmError::Timeout("loading device state".into()));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
