//! The QEMU backend: `microvm` machine, RAM in a file, device state saved and
//! loaded without RAM (see args.rs for why command lines must match).

pub mod args;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use self::args::Start;
use self::qmp::Qmp;
use crate::vmm::{Accel, Backend, NetAttach, PendingVm, VmControl, VmDir, VmProcess, VmSpec, VmmError, process};

/// How long QEMU gets to create its control socket, and to load state.
const QMP_TIMEOUT: Duration = qmp::TIMEOUT;

pub struct QemuBackend {
    binary: PathBuf,
    accel: Accel,
}

impl QemuBackend {
    pub fn new(binary: PathBuf, accel: Accel) -> Self {
        Self { binary, accel }
    }

    /// Finds `qemu-system-x86_64` on PATH.
    pub fn find_binary() -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).map(|d| d.join("qemu-system-x86_64")).find(|p| p.is_file())
    }

    /// Starts QEMU and opens its control socket. On failure nothing is left
    /// running.
    async fn spawn(
        &self,
        spec: &VmSpec,
        dir: &VmDir,
        start: Start,
        net: &NetAttach,
    ) -> Result<(Started, Qmp), VmmError> {
        let args = args::build(spec, dir, start, net);
        // The namespace is opened here; the child enters it before exec,
        // while it still has the capability to.
        let netns = match net {
            NetAttach::Tap { netns, .. } => Some(
                std::fs::File::open(netns).map_err(|e| VmmError::Spawn(format!("open {}: {e}", netns.display())))?,
            ),
            NetAttach::Isolated => None,
        };
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
        // The VMM runs with no capabilities at all (see host::caps).
        unsafe {
            cmd.pre_exec(move || {
                if let Some(ns) = &netns {
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                }
                crate::host::caps::vmm_pre_exec();
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| VmmError::Spawn(format!("{}: {e}", self.binary.display())))?;
        let pid = child.id().ok_or_else(|| VmmError::Spawn("no pid".into()))?;
        let start_time = process::start_time(pid).unwrap_or(0);
        let mut started = Started { pid, start_time, child };
        // Fail fast when QEMU exits before its control socket answers.
        let control = dir.control_socket();
        let connected = tokio::select! {
            r = Qmp::connect(&control, QMP_TIMEOUT) => r,
            status = started.child.wait() => Err(VmmError::Exited(format!("qemu exited at start ({})", status.map(|s| s.to_string()).unwrap_or_default()))),
        };
        match connected {
            Ok(q) => Ok((started, q)),
            Err(e) => {
                let why = std::fs::read_to_string(dir.path().join("vmm.stderr")).unwrap_or_default();
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
            control: Box::new(QemuControl { qmp: Some(qmp), socket: dir.control_socket() }),
            child: Some(self.child),
        }
    }
}

struct QemuControl {
    qmp: Option<Qmp>,
    socket: PathBuf,
}

impl QemuControl {
    fn qmp(&mut self) -> Result<&mut Qmp, VmmError> {
        self.qmp.as_mut().ok_or_else(|| VmmError::Control(format!("no QMP connection to {}", self.socket.display())))
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
        // block devices active (the default would release image locks).
        self.qmp()?
            .execute("xen-save-devices-state", Some(json!({ "filename": path.display().to_string(), "live": false })))
            .await
            .map(|_| ())
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
        let (started, qmp) = self.spawn(spec, dir, Start::Boot, &NetAttach::Isolated).await?;
        Ok(started.into_process(dir, qmp))
    }

    async fn restore(&self, spec: &VmSpec, state: &Path, dir: &VmDir, net: &NetAttach) -> Result<VmProcess, VmmError> {
        let (started, mut qmp) = self.spawn(spec, dir, Start::Restore, net).await?;
        if let Err(e) = load_state(&mut qmp, state).await {
            started.kill().await;
            return Err(e);
        }
        Ok(started.into_process(dir, qmp))
    }

    async fn prestart(&self, spec: &VmSpec, dir: &VmDir) -> Result<Box<dyn PendingVm>, VmmError> {
        let (started, qmp) = self.spawn(spec, dir, Start::Restore, &NetAttach::Isolated).await?;
        Ok(Box::new(Waiting { started, qmp, dir: dir.clone() }))
    }

    async fn attach(&self, pid: u32, start_time: u64, dir: &VmDir) -> Result<VmProcess, VmmError> {
        if !process::is_alive(pid, start_time) {
            return Err(VmmError::Exited(format!("pid {pid} is gone")));
        }
        let qmp = Qmp::connect(&dir.control_socket(), Duration::from_secs(2)).await?;
        Ok(VmProcess {
            pid,
            start_time,
            dir: dir.clone(),
            control: Box::new(QemuControl { qmp: Some(qmp), socket: dir.control_socket() }),
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
        if let Err(e) = load_state(&mut qmp, state).await {
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
/// child stays paused.
async fn load_state(qmp: &mut Qmp, state: &Path) -> Result<(), VmmError> {
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
