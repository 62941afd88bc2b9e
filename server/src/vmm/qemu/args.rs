//! The QEMU command line. Parent and children must use the *same* machine,
//! devices, kernel and memory size: the device state a child loads has no
//! configuration section, so any difference would be loaded into the wrong
//! device model. Only the memory backend's `share` flag and the incoming
//! options differ (and the backends that do not reach device state: which
//! descriptor a volume or tap arrives on, and how the memory file is opened).

use std::os::fd::RawFd;

use crate::vmm::{Accel, VmDir, VmSpec};

/// QEMU's own seccomp filter: no obsolete system calls, no privilege
/// changes, no fork/exec, no scheduler or resource changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Size QEMU reports for an empty volume slot: a `null-co` disk, which reads
/// zeros and discards writes, so nothing on the host backs it and no two VMs
/// share anything through it. It is not marked read-only: the guest acks the
/// virtio read-only feature at boot, and a child restored with a read-write
/// volume in that slot could then not load the parent's device state.
pub const SLOT_BYTES: u64 = 1 << 20;

/// Host resources handed to this VMM as descriptors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wiring {
    /// One entry per `spec.drives`: the descriptors of the volume's file
    /// (QEMU opens a read-write disk read-only too, while probing it, so a
    /// read-write volume brings one of each), or none for an empty slot.
    pub drive_fds: Vec<Vec<RawFd>>,
    /// The tap behind the NIC; None: an isolated hub.
    pub tap_fd: Option<RawFd>,
}

/// How the VM starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A parent booting with RAM mapped shared from the memory file.
    Boot,
    /// A child that will load device state, RAM mapped private (copy-on-write).
    Restore,
}

pub fn build(spec: &VmSpec, dir: &VmDir, start: Start, wiring: &Wiring) -> Vec<String> {
    // A child opens the snapshot's memory read-only and maps it private: a
    // compromised child cannot write the file its siblings share.
    let share = match start {
        Start::Boot => "on",
        Start::Restore => "off,readonly=on,rom=off",
    };
    let mem = format!("{}M", spec.mem_mib);
    let accel = match spec.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let cpu = match spec.accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    };
    let mut a: Vec<String> = vec![
        "-sandbox".into(),
        SANDBOX.into(),
        // Thread names ("CPU 0/TCG", "CPU 0/KVM") tell the guest's CPU time
        // from the VMM's own in /proc and in `top -H`.
        "-name".into(),
        "forkd,debug-threads=on".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-display".into(),
        "none".into(),
        "-machine".into(),
        "microvm,acpi=on,memory-backend=mem,suppress-vmdesc=on".into(),
        "-accel".into(),
        accel.into(),
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-m".into(),
        mem.clone(),
        "-object".into(),
        format!("memory-backend-file,id=mem,size={mem},mem-path={},share={share}", spec.mem_file.display()),
        "-kernel".into(),
        spec.kernel.display().to_string(),
        "-initrd".into(),
        spec.initrd.display().to_string(),
        "-append".into(),
        spec.cmdline.clone(),
        "-drive".into(),
        format!("file={},if=none,id=root,format=raw,readonly=on", spec.rootfs.display()),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
    ];
    for (i, d) in spec.drives.iter().enumerate() {
        match wiring.drive_fds.get(i).filter(|fds| !fds.is_empty()) {
            Some(fds) if !d.slot => {
                // fdset i+1 holds the volume's descriptors (set 0 is unused).
                let ro = if d.read_only { "on" } else { "off" };
                for fd in fds {
                    a.push("-add-fd".into());
                    a.push(format!("fd={fd},set={}", i + 1));
                }
                a.push("-drive".into());
                // No QEMU image locks: they are taken per open file
                // description, so the two descriptors of one volume would
                // conflict with each other. The daemon already gives a
                // read-write volume to one live VM at a time.
                a.push(format!(
                    "file=/dev/fdset/{},if=none,id=vol{i},format=raw,readonly={ro},file.locking=off",
                    i + 1
                ));
            }
            _ => {
                a.push("-blockdev".into());
                a.push(format!("driver=null-co,node-name=vol{i},read-zeroes=on,size={SLOT_BYTES}"));
            }
        }
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=vol{i}"));
    }
    if spec.nic {
        let backend = match wiring.tap_fd {
            None => "hubport,id=net0,hubid=0".to_string(),
            Some(fd) => format!("tap,id=net0,fd={fd}"),
        };
        a.extend([
            "-netdev".into(),
            backend,
            "-device".into(),
            // Every child keeps its parent's MAC; each sits on its own link.
            "virtio-net-device,netdev=net0,mac=52:54:00:f0:4d:01".into(),
        ]);
    }
    a.extend([
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!("socket,id=agent,path={},server=on,wait=off", dir.agent_socket().display()),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={}", forkd_agent_protocol::PORT_NAME),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", dir.control_socket().display()),
        // The console goes to the daemon, which keeps a bounded log of it.
        "-chardev".into(),
        format!("socket,id=console,path={},server=on,wait=off", dir.console_socket().display()),
        "-serial".into(),
        "chardev:console".into(),
    ]);
    if start == Start::Restore {
        a.extend([
            "-global".into(),
            "migration.send-configuration=off".into(),
            "-incoming".into(),
            "defer".into(),
            "-S".into(),
        ]);
    }
    a
}

#[cfg(test)]
fn tests_spec() -> VmSpec {
    tests::spec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    pub(super) fn spec() -> VmSpec {
        VmSpec {
            kernel: "/g/vmlinux".into(),
            initrd: "/g/initramfs.img".into(),
            cmdline: "console=ttyS0 quiet".into(),
            rootfs: "/g/images/python.ext4".into(),
            mem_mib: 256,
            vcpus: 1,
            accel: Accel::Tcg,
            mem_file: "/d/snapshots/t/mem".into(),
            drives: vec![],
            nic: true,
        }
    }

    #[test]
    fn parent_and_child_differ_only_in_share_and_incoming() {
        let dir = VmDir(PathBuf::from("/d/vm"));
        let boot = build(&spec(), &dir, Start::Boot, &Wiring::default());
        let restore = build(&spec(), &dir, Start::Restore, &Wiring::default());
        assert!(boot.iter().any(|a| a.ends_with("share=on")));
        assert!(restore.iter().any(|a| a.ends_with("share=off,readonly=on,rom=off")));
        assert_eq!(boot[..2], ["-sandbox".to_string(), SANDBOX.to_string()]);
        let common: Vec<_> = restore[..boot.len()].iter().zip(&boot).filter(|(a, b)| a != b).collect();
        assert_eq!(common.len(), 1, "only the memory backend differs: {common:?}");
        assert!(restore.ends_with(&["-incoming".to_string(), "defer".into(), "-S".into()]));
        assert!(restore.contains(&"migration.send-configuration=off".to_string()));
    }
}

#[cfg(test)]
mod wiring_tests {
    use super::*;
    use crate::vmm::Drive;
    use std::path::PathBuf;

    #[test]
    fn volumes_arrive_as_descriptors_and_slots_need_no_file() {
        let mut spec = super::tests_spec();
        spec.drives = vec![
            Drive { path: "/v/a.ext4".into(), read_only: true, slot: false },
            Drive { path: "/unused".into(), read_only: false, slot: true },
        ];
        let w = Wiring { drive_fds: vec![vec![17, 18], vec![]], tap_fd: Some(23) };
        let a = build(&spec, &VmDir(PathBuf::from("/d/vm")), Start::Restore, &w);
        let joined = a.join(" ");
        assert!(joined.contains(
            "-add-fd fd=17,set=1 -add-fd fd=18,set=1 -drive file=/dev/fdset/1,if=none,id=vol0,format=raw,readonly=on,file.locking=off"
        ));
        assert!(joined.contains("-blockdev driver=null-co,node-name=vol1,read-zeroes=on"));
        assert!(joined.contains("tap,id=net0,fd=23"));
        assert!(!joined.contains("/unused"), "a slot's placeholder path never reaches QEMU");
        assert!(!joined.contains("/v/a.ext4"), "volumes are passed as descriptors, not paths");
    }
}
