//! The QEMU command line. Parent and children must use the *same* machine,
//! devices, kernel and memory size: the device state a child loads has no
//! configuration section, so any difference would be loaded into the wrong
//! device model. Only the memory backend's `share` flag and the incoming
//! options differ.

use crate::vmm::{Accel, NetAttach, VmDir, VmSpec};

/// How the VM starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A parent booting with RAM mapped shared from the memory file.
    Boot,
    /// A child that will load device state, RAM mapped private (copy-on-write).
    Restore,
}

pub fn build(spec: &VmSpec, dir: &VmDir, start: Start, net: &NetAttach) -> Vec<String> {
    let share = match start {
        Start::Boot => "on",
        Start::Restore => "off",
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
        a.push("-drive".into());
        a.push(format!(
            "file={},if=none,id=vol{i},format=raw,readonly={}{}",
            d.path.display(),
            if d.read_only { "on" } else { "off" },
            // Every VM opens the same placeholder, which no guest mounts.
            if d.slot { ",file.locking=off" } else { "" }
        ));
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=vol{i}"));
    }
    if spec.nic {
        let backend = match net {
            NetAttach::Isolated => "hubport,id=net0,hubid=0".to_string(),
            NetAttach::Tap { tap, .. } => format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
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
        "-serial".into(),
        format!("file:{}", dir.console_log().display()),
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
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec() -> VmSpec {
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
        let boot = build(&spec(), &dir, Start::Boot, &NetAttach::Isolated);
        let restore = build(&spec(), &dir, Start::Restore, &NetAttach::Isolated);
        assert!(boot.iter().any(|a| a.ends_with("share=on")));
        assert!(restore.iter().any(|a| a.ends_with("share=off")));
        let common: Vec<_> = restore[..boot.len()].iter().zip(&boot).filter(|(a, b)| a != b).collect();
        assert_eq!(common.len(), 1, "only the memory backend differs: {common:?}");
        assert!(restore.ends_with(&["-incoming".to_string(), "defer".into(), "-S".into()]));
        assert!(restore.contains(&"migration.send-configuration=off".to_string()));
    }
}
