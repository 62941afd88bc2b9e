//! The host's resources that sandboxes use: control groups, capabilities,
//! networking, the VMM processes visible in /proc, and admission control
//! (what the host can still take).

pub mod admission;
pub mod caps;
pub mod cgroup;
pub mod net;
pub mod paths;
pub mod procs;
