//! `forkd volume-create`: an ext4 image file for a volume.

use anyhow::{Context, bail};

use crate::args::VolumeCreateArgs;

pub fn create(a: VolumeCreateArgs) -> anyhow::Result<u8> {
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
