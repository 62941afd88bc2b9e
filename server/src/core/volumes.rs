//! Volumes: persistent ext4 disks attached as `HOST_FILE:GUEST_PATH[:ro]`.
//!
//! A VM's devices are fixed when it boots and every child must be restored
//! with the same devices, so volumes are attached to a snapshot and every
//! child inherits them. The parent never mounts them; each child mounts them
//! after its identity is set. A read-write volume belongs to at most one live
//! sandbox at a time; read-only ones are shared.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Error, Result};

/// Most volumes one VM may have.
pub const MAX_VOLUMES: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

impl VolumeSpec {
    /// Parses `HOST_FILE:GUEST_PATH[:ro|:rw]` and checks the host file.
    pub fn parse(spec: &str) -> Result<Self> {
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
        let meta = std::fs::metadata(host).map_err(|e| Error::invalid("volumes", format!("{host}: {e}")))?;
        if !meta.is_file() {
            return Err(Error::invalid("volumes", format!("{host} is not a regular file")));
        }
        Ok(VolumeSpec { host: PathBuf::from(host), guest: guest.to_string(), read_only })
    }

    pub fn to_spec_string(&self) -> String {
        format!("{}:{}{}", self.host.display(), self.guest, if self.read_only { ":ro" } else { "" })
    }
}

/// Parses a list of volume specs, refusing duplicates and too many.
pub fn parse_all(specs: &[String]) -> Result<Vec<VolumeSpec>> {
    if specs.len() > MAX_VOLUMES {
        return Err(Error::invalid("volumes", format!("{} volumes, at most {MAX_VOLUMES}", specs.len())));
    }
    let vols = specs.iter().map(|s| VolumeSpec::parse(s)).collect::<Result<Vec<_>>>()?;
    for (i, v) in vols.iter().enumerate() {
        if vols[..i].iter().any(|w| w.guest == v.guest || w.host == v.host) {
            return Err(Error::invalid("volumes", format!("{} is given twice", v.to_spec_string())));
        }
    }
    Ok(vols)
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

/// Guest device of the i-th volume: the root image is /dev/vda.
pub fn guest_device(i: usize) -> String {
    format!("/dev/vd{}", (b'b' + i as u8) as char)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_specs() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("v.ext4");
        std::fs::write(&f, b"x").unwrap();
        let host = f.display().to_string();
        let v = VolumeSpec::parse(&format!("{host}:/data:ro")).unwrap();
        assert!(v.read_only);
        assert_eq!(v.guest, "/data");
        assert!(!VolumeSpec::parse(&format!("{host}:/data")).unwrap().read_only);
        for bad in [
            host.to_string(),
            format!("{host}:data"),
            format!("{host}:/data:rx"),
            format!("{host}:/a/../b"),
            format!("{host}:/"),
            "relative:/data".to_string(),
            format!("{}/missing:/data", dir.path().display()),
            format!("{}:/data", dir.path().display()),
        ] {
            let e = VolumeSpec::parse(&bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
        }
        let too_many: Vec<String> = (0..25).map(|i| format!("{host}:/d{i}")).collect();
        assert!(parse_all(&too_many).is_err());
        assert!(parse_all(&[format!("{host}:/a"), format!("{host}:/b")]).is_err(), "same file twice");
        assert_eq!(guest_device(0), "/dev/vdb");
    }
}
