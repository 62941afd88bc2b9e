//! The host's resources that sandboxes use: control groups, capabilities,
//! and the VMM processes visible in /proc.

pub mod caps;
pub mod cgroup;
pub mod net;
pub mod paths;
pub mod procs;
