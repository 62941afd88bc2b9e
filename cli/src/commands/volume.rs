//! `forkd volume-create`: an ext4 image file for a volume.

use anyhow::{Context, bail};

use crate::args::VolumeCreateArgs;

/// The daemon's default volume root (forkd-server --volume-root).
pub const DEFAULT_VOLUME_ROOT: &str = "/var/lib/forkd/volumes";

/// Where a bare file name is created: the volume root.
fn resolve(path: &std::path::Path) -> std::path::PathBuf {
    if path.components().count() == 1 && !path.is_absolute() {
        let root = std::env::var_os("FORKD_VOLUME_ROOT").map(std::path::PathBuf::from);
        root.unwrap_or_else(|| DEFAULT_VOLUME_ROOT.into()).join(path)
    } else {
        path.to_path_buf()
    }
}

pub fn create(mut a: VolumeCreateArgs) -> anyhow::Result<u8> {
    a.path = resolve(&a.path);
    if a.path.exists() {
        bail!("{} already exists; refusing to overwrite it", a.path.display());
    }
    let dir = a.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let name = a.path.file_name().context("the path has no file name")?.to_string_lossy();
    let staging = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut cmd = std::process::Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-t", "ext4", "-O", "^has_journal"]);
    if let Some(d) = &a.from_dir {
        cmd.arg("-d").arg(d);
    }
    cmd.arg(&staging).arg(format!("{}M", a.size_mib));
    let status = cmd.status().context("run mkfs.ext4 (install e2fsprogs)")?;
    if !status.success() {
        let _ = std::fs::remove_file(&staging);
        bail!("mkfs.ext4 failed ({status})");
    }
    std::fs::rename(&staging, &a.path).with_context(|| format!("rename into {}", a.path.display()))?;
    println!("{}", a.path.display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names_go_to_the_volume_root() {
        let p = resolve(std::path::Path::new("data.ext4"));
        assert!(p.ends_with("data.ext4") && p.is_absolute(), "{}", p.display());
        assert_eq!(resolve(std::path::Path::new("./x/y.ext4")), std::path::PathBuf::from("./x/y.ext4"));
        assert_eq!(resolve(std::path::Path::new("/srv/v.ext4")), std::path::PathBuf::from("/srv/v.ext4"));
    }
}
