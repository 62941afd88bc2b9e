//! The VMM boundary. A `Backend` boots a parent VM whose RAM is a shared file,
//! saves device state without RAM, and restores children that map that file
//! copy-on-write. QEMU (KVM or TCG) is the backend built here; the trait is
//! shaped so that Firecracker (snapshot/load with a File memory backend) is a
//! second module, not a rewrite.

pub mod accel;
pub mod console;
pub mod jail;
pub mod process;
pub mod qemu;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use accel::Accel;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("failed to start the VMM: {0}")]
    Spawn(String),
    #[error("VMM control channel: {0}")]
    Control(String),
    #[error("VMM exited: {0}")]
    Exited(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Connects to a Unix socket that a just-started VMM is about to create,
/// retrying until `timeout`.
pub async fn connect_when_ready(path: &Path, timeout: std::time::Duration) -> std::io::Result<tokio::net::UnixStream> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(2)).await,
        }
    }
}

/// An extra block device: a volume, or a spare slot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Drive {
    pub path: PathBuf,
    pub read_only: bool,
    /// A spare slot: `path` is a placeholder that a child may replace with a
    /// volume of its own. The device exists from boot (no hotplug on the
    /// machine we use), so only its backing file changes.
    #[serde(default)]
    pub slot: bool,
}

/// Everything that determines a VM's hardware. A child must be restored with
/// exactly the spec its snapshot was taken with (only `mem_file` moves when a
/// snapshot's files are renamed into the store).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub rootfs: PathBuf,
    pub mem_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
    /// File backing guest RAM: shared by a parent, mapped private by children.
    pub mem_file: PathBuf,
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// A virtio-net NIC. Part of the machine, so decided when the parent
    /// boots; children choose only what the NIC is plugged into.
    #[serde(default)]
    pub nic: bool,
}

/// Where a VMM process runs from its first instruction, set before it
/// executes QEMU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    /// The lowest scheduling priority (nice 19), for work done ahead of
    /// time. Its threads keep it: once the process is in a cgroup of its
    /// own, a nice value only weighs its threads against each other.
    pub background: bool,
    /// `cgroup.procs` files (one per hierarchy) the process joins before
    /// exec: it starts inside its cgroup, so no migration — a global lock
    /// and an RCU grace period per hierarchy on cgroup v1 — is on the spawn
    /// path, and everything it allocates is charged there. Best effort: the
    /// caller still checks and places it.
    pub cgroup_procs: Vec<PathBuf>,
}

/// What a VM's NIC is plugged into (not part of the snapshot: a child may
/// differ from its parent here).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum NetAttach {
    /// A hub with nothing else on it: the NIC exists but reaches nothing.
    #[default]
    Isolated,
    /// A tap device inside a network namespace.
    Tap { netns: PathBuf, tap: String },
}

/// Where one VM keeps its sockets and logs.
#[derive(Debug, Clone)]
pub struct VmDir(pub PathBuf);

impl VmDir {
    pub fn agent_socket(&self) -> PathBuf {
        self.0.join("agent.sock")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.0.join("control.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.0.join("console.log")
    }
    pub fn console_socket(&self) -> PathBuf {
        self.0.join("console.sock")
    }
    /// Where the VMM writes device state (inside its own dir, the only
    /// place it may write) before the daemon moves it into the store.
    pub fn saved_state(&self) -> PathBuf {
        self.0.join("state.save")
    }
    /// The copy of the device state a restoring VMM loads.
    pub fn incoming_state(&self) -> PathBuf {
        self.0.join("state.in")
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// Control of one running VMM process.
#[async_trait]
pub trait VmControl: Send {
    /// Stops the vCPUs.
    async fn pause(&mut self) -> Result<(), VmmError>;
    /// Starts the vCPUs again.
    async fn resume(&mut self) -> Result<(), VmmError>;
    /// Writes device and CPU state (never RAM) of the paused VM to `path`.
    async fn save_state(&mut self, path: &Path) -> Result<(), VmmError>;
}

/// Control of a VMM that no longer exists: every call says so.
pub struct GoneControl;

#[async_trait]
impl VmControl for GoneControl {
    async fn pause(&mut self) -> Result<(), VmmError> {
        Err(VmmError::Exited("the VMM is gone".into()))
    }
    async fn resume(&mut self) -> Result<(), VmmError> {
        Err(VmmError::Exited("the VMM is gone".into()))
    }
    async fn save_state(&mut self, _path: &Path) -> Result<(), VmmError> {
        Err(VmmError::Exited("the VMM is gone".into()))
    }
}

/// A started VMM process.
pub struct VmProcess {
    pub pid: u32,
    pub start_time: u64,
    pub dir: VmDir,
    pub control: Box<dyn VmControl>,
    /// Set when this daemon started the process (it can wait for it).
    pub child: Option<tokio::process::Child>,
}

/// A VMM started ahead of time for a child of one snapshot: its machine
/// exists, its RAM is mapped, and it waits for device state (a pool entry).
#[async_trait]
pub trait PendingVm: Send + Sync {
    fn pid(&self) -> u32;
    fn start_time(&self) -> u64;
    /// Loads `state`; the child is left paused, as after `Backend::restore`.
    /// On failure the process is gone.
    async fn load(self: Box<Self>, state: &Path) -> Result<VmProcess, VmmError>;
    /// Stops the process and waits for it.
    async fn kill(self: Box<Self>);
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn accel(&self) -> Accel;
    /// Boots a parent VM whose RAM is `spec.mem_file`, mapped shared.
    async fn boot(&self, spec: &VmSpec, dir: &VmDir) -> Result<VmProcess, VmmError>;
    /// Starts a child from `state`, RAM mapped private from `spec.mem_file`.
    /// The child is left paused; call `resume` once its identity is set.
    async fn restore(
        &self,
        spec: &VmSpec,
        state: &Path,
        dir: &VmDir,
        net: &NetAttach,
        place: &Placement,
    ) -> Result<VmProcess, VmmError>;
    /// Starts a child's VMM that waits for its state (no network attached):
    /// `restore` split in two, so the process start is off the spawn path.
    async fn prestart(
        &self,
        spec: &VmSpec,
        dir: &VmDir,
        net: &NetAttach,
        place: &Placement,
    ) -> Result<Box<dyn PendingVm>, VmmError>;
    /// Reopens control of a VMM started by an earlier daemon.
    async fn attach(&self, pid: u32, start_time: u64, dir: &VmDir) -> Result<VmProcess, VmmError>;
}
