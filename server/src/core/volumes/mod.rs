//! Volumes: persistent ext4 disks attached as `HOST_FILE:GUEST_PATH[:ro]`.
//!
//! A VM's devices are fixed when it boots and every child must be restored
//! with the same devices. So a snapshot carries its own volumes (every child
//! inherits them) plus spare *slots*: disks backed by a placeholder file. A
//! sandbox or workspace given volumes of its own gets them plugged into free
//! slots: the child is restored with the volume file behind the slot's
//! device, and its agent re-probes that disk before mounting it. The parent
//! never mounts anything; each child mounts after its identity is set, and a
//! child of a snapshot taken from a sandbox finds its volumes still mounted.
//! A read-write volume belongs to at most one live sandbox (or suspended
//! workspace) at a time; read-only ones are shared.

pub mod claims;

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::host::paths::Root;
use crate::vmm::Drive;

/// Most extra disks (volumes and slots) one VM may have: QEMU's `microvm`
/// machine has 24 virtio-mmio transports and the root disk, the agent
/// channel and the NIC take three.
pub const MAX_DRIVES: usize = 21;

/// Most volumes one VM may have.
pub const MAX_VOLUMES: usize = MAX_DRIVES;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

impl VolumeSpec {
    /// Parses `HOST_FILE:GUEST_PATH[:ro|:rw]` and checks the host file: a
    /// regular file beneath `root`, reached without following any symlink,
    /// that can be opened as the volume asks (read-write unless `:ro`).
    pub fn parse(spec: &str, root: &Root) -> Result<Self> {
        let bad = |why: &str| Error::invalid("volumes", format!("{spec:?}: {why} (use HOST_FILE:GUEST_PATH[:ro])"));
        let parts: Vec<&str> = spec.split(':').collect();
        let (host, guest, read_only) = match parts.as_slice() {
            [h, g] => (*h, *g, false),
            [h, g, "ro"] => (*h, *g, true),
            [h, g, "rw"] => (*h, *g, false),
            _ => return Err(bad("malformed")),
        };
        for (what, p) in [("host file", host), ("guest path", guest)] {
            if !p.starts_with('/') {
                return Err(bad(&format!("the {what} must be absolute")));
            }
            if Path::new(p).components().any(|c| matches!(c, Component::ParentDir)) {
                return Err(bad(&format!("the {what} must not contain '..'")));
            }
            if p.contains('\0') || p.contains(',') || p.len() > 1024 {
                return Err(bad(&format!("the {what} contains ',' or NUL, or is too long")));
            }
        }
        if guest == "/" {
            return Err(bad("the guest path must not be /"));
        }
        root.open_file(Path::new(host), !read_only).map_err(|e| Error::invalid("volumes", e.to_string()))?;
        Ok(VolumeSpec { host: PathBuf::from(host), guest: guest.to_string(), read_only })
    }

    pub fn to_spec_string(&self) -> String {
        format!("{}:{}{}", self.host.display(), self.guest, if self.read_only { ":ro" } else { "" })
    }
}

/// Parses a list of volume specs, refusing duplicates and too many.
pub fn parse_all(specs: &[String], root: &Root) -> Result<Vec<VolumeSpec>> {
    if specs.len() > MAX_VOLUMES {
        return Err(Error::invalid("volumes", format!("{} volumes, at most {MAX_VOLUMES}", specs.len())));
    }
    let vols = specs.iter().map(|s| VolumeSpec::parse(s, root)).collect::<Result<Vec<_>>>()?;
    for (i, v) in vols.iter().enumerate() {
        if vols[..i].iter().any(|w| w.guest == v.guest || w.host == v.host) {
            return Err(Error::invalid("volumes", format!("{} is given twice", v.to_spec_string())));
        }
    }
    Ok(vols)
}

/// The host files of the read-write volumes among `volumes`.
pub fn read_write_files(volumes: &[VolumeSpec]) -> Vec<PathBuf> {
    volumes.iter().filter(|v| !v.read_only).map(|v| v.host.clone()).collect()
}

/// Reads back specs stored by `to_spec_string` (already validated when they
/// were accepted; the host file is not re-checked).
pub fn parse_stored(specs: &[String]) -> Vec<VolumeSpec> {
    specs
        .iter()
        .filter_map(|s| {
            let (rest, read_only) = match s.strip_suffix(":ro") {
                Some(r) => (r, true),
                None => (s.as_str(), false),
            };
            let (host, guest) = rest.split_once(':')?;
            Some(VolumeSpec { host: PathBuf::from(host), guest: guest.to_string(), read_only })
        })
        .collect()
}

/// Guest device of the i-th extra disk: the root image is /dev/vda.
pub fn guest_device(i: usize) -> String {
    format!("/dev/vd{}", (b'b' + i as u8) as char)
}

/// One volume a child mounts once it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub device: String,
    pub volume: VolumeSpec,
    /// The disk was a slot in the snapshot: the guest must probe it again.
    pub reprobe: bool,
}

/// A child's disks: the snapshot's drives with the child's own volumes
/// plugged into spare slots.
#[derive(Debug, Clone, PartialEq)]
pub struct Plugged {
    pub drives: Vec<Drive>,
    /// Every volume the child has, the snapshot's first.
    pub volumes: Vec<VolumeSpec>,
    pub mounts: Vec<Mount>,
}

/// Plugs `own` into the free slots of a snapshot's `drives`. A volume the
/// snapshot already has, identically, is kept as it is (a workspace resumed
/// from its state snapshot asks for the volumes that state already holds).
pub fn plug(tag: &str, drives: &[Drive], snapshot_volumes: &[VolumeSpec], own: &[VolumeSpec]) -> Result<Plugged> {
    let mut volumes = snapshot_volumes.to_vec();
    let mut fresh = vec![];
    for v in own {
        if snapshot_volumes.contains(v) {
            continue;
        }
        if let Some(s) = snapshot_volumes.iter().find(|s| s.host == v.host || s.guest == v.guest) {
            return Err(Error::invalid(
                "volumes",
                format!("{} clashes with volume {} of snapshot {tag:?}", v.to_spec_string(), s.to_spec_string()),
            ));
        }
        fresh.push(v.clone());
    }
    let free: Vec<usize> = drives.iter().enumerate().filter(|(_, d)| d.slot).map(|(i, _)| i).collect();
    if fresh.len() > free.len() {
        return Err(Error::FailedPrecondition(format!(
            "snapshot {tag:?} has {} spare volume slot(s) and {} volume(s) were asked for; \
             give the volumes to the snapshot or bake one with more (forkd-server --volume-slots)",
            free.len(),
            fresh.len()
        )));
    }
    let mut plugged = drives.to_vec();
    for (v, &i) in fresh.iter().zip(&free) {
        plugged[i] = Drive { path: v.host.clone(), read_only: v.read_only, slot: false };
    }
    volumes.extend(fresh);
    let mut mounts = vec![];
    for v in &volumes {
        let i = plugged.iter().position(|d| d.path == v.host && !d.slot).ok_or_else(|| {
            Error::FailedPrecondition(format!("snapshot {tag:?} has no disk for its volume {}", v.to_spec_string()))
        })?;
        mounts.push(Mount { device: guest_device(i), volume: v.clone(), reprobe: drives[i].slot });
    }
    Ok(Plugged { drives: plugged, volumes, mounts })
}

/// The drives of a new snapshot: its volumes, then `slots` spare slots
/// backed by `placeholder` (as many as fit).
pub fn snapshot_drives(volumes: &[VolumeSpec], slots: usize, placeholder: &Path) -> Vec<Drive> {
    let slots = slots.min(MAX_DRIVES.saturating_sub(volumes.len()));
    volumes
        .iter()
        .map(|v| Drive { path: v.host.clone(), read_only: v.read_only, slot: false })
        .chain((0..slots).map(|_| Drive { path: placeholder.to_path_buf(), read_only: false, slot: true }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_specs() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path()).unwrap();
        let dir_path = root.path().to_path_buf();
        let f = dir_path.join("v.ext4");
        std::fs::write(&f, b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir_path.join("sneaky.ext4")).unwrap();
        let host = f.display().to_string();
        let v = VolumeSpec::parse(&format!("{host}:/data:ro"), &root).unwrap();
        assert!(v.read_only);
        assert_eq!(v.guest, "/data");
        assert!(!VolumeSpec::parse(&format!("{host}:/data"), &root).unwrap().read_only);
        for bad in [
            host.to_string(),
            format!("{host}:data"),
            format!("{host}:/data:rx"),
            format!("{host}:/a/../b"),
            format!("{host}:/"),
            "relative:/data".to_string(),
            format!("{}/missing:/data", dir_path.display()),
            format!("{}:/data", dir_path.display()),
            format!("{}/sneaky.ext4:/data", dir_path.display()),
            "/etc/shadow:/data".to_string(),
            "/dev/sda:/data".to_string(),
        ] {
            let e = VolumeSpec::parse(&bad, &root).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
        }
        let too_many: Vec<String> = (0..25).map(|i| format!("{host}:/d{i}")).collect();
        assert!(parse_all(&too_many, &root).is_err());
        assert!(parse_all(&[format!("{host}:/a"), format!("{host}:/b")], &root).is_err(), "same file twice");
        assert_eq!(guest_device(0), "/dev/vdb");
    }

    fn vol(host: &str, guest: &str, read_only: bool) -> VolumeSpec {
        VolumeSpec { host: host.into(), guest: guest.into(), read_only }
    }

    #[test]
    fn plugs_own_volumes_into_free_slots() {
        let base = [vol("/v/base.ext4", "/base", true)];
        let drives = snapshot_drives(&base, 2, Path::new("/d/volume-slot.img"));
        assert_eq!(drives.len(), 3);
        assert!(!drives[0].slot && drives[1].slot && drives[2].slot);

        let own = [vol("/v/a.ext4", "/a", false)];
        let p = plug("t", &drives, &base, &own).unwrap();
        assert_eq!(p.drives[1], Drive { path: "/v/a.ext4".into(), read_only: false, slot: false });
        assert!(p.drives[2].slot, "the unused slot stays a slot");
        assert_eq!(p.volumes, vec![base[0].clone(), own[0].clone()]);
        assert_eq!(
            p.mounts.iter().map(|m| (m.device.as_str(), m.reprobe)).collect::<Vec<_>>(),
            vec![("/dev/vdb", false), ("/dev/vdc", true)]
        );

        // A snapshot taken from that child: the plugged disk is part of it
        // and asking for the same volume again changes nothing.
        let again = plug("state", &p.drives, &p.volumes, &own).unwrap();
        assert_eq!(again.drives, p.drives);
        assert_eq!(again.volumes, p.volumes);
        assert!(again.mounts.iter().all(|m| !m.reprobe));

        let three = [vol("/v/a", "/a", false), vol("/v/b", "/b", false), vol("/v/c", "/c", false)];
        assert!(matches!(plug("t", &drives, &base, &three), Err(Error::FailedPrecondition(_))));
        let clash = [vol("/v/base.ext4", "/elsewhere", true)];
        assert!(matches!(plug("t", &drives, &base, &clash), Err(Error::InvalidArgument(_))));
        let same_target = [vol("/v/other.ext4", "/base", true)];
        assert!(matches!(plug("t", &drives, &base, &same_target), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn slots_never_exceed_the_machine() {
        let many: Vec<VolumeSpec> = (0..20).map(|i| vol(&format!("/v/{i}"), &format!("/m{i}"), true)).collect();
        assert_eq!(snapshot_drives(&many, 4, Path::new("/p")).len(), MAX_DRIVES);
        assert_eq!(snapshot_drives(&[], 4, Path::new("/p")).len(), 4);
    }
}
