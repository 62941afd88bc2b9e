//! VMM processes as /proc shows them. Used to find VMMs that nothing owns
//! any more: a VMM is forkd's when its command line names a directory under
//! a data dir (its sockets live there).

use std::path::Path;

/// A QEMU process.
#[derive(Debug, Clone, PartialEq)]
pub struct VmmProc {
    pub pid: u32,
    /// Start time (clock ticks since boot), with the pid its identity.
    pub start_time: u64,
    /// Arguments joined with spaces.
    pub cmdline: String,
}

/// Every `qemu-system-*` process on the host.
pub fn qemu_processes() -> Vec<VmmProc> {
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<String> =
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let Some(argv0) = args.first() else { continue };
        let base = argv0.rsplit('/').next().unwrap_or(argv0);
        if !base.starts_with("qemu-system") {
            continue;
        }
        let Some(start_time) = crate::vmm::process::start_time(pid) else { continue };
        out.push(VmmProc { pid, start_time, cmdline: args.join(" ") });
    }
    out
}

/// The directory name right under `parent` that `cmdline` mentions
/// (`<parent>/<name>/…`), e.g. the sandbox id of a VMM whose sockets live in
/// `<data>/sandboxes/<id>/`.
pub fn child_dir_named(cmdline: &str, parent: &Path) -> Option<String> {
    let mut needle = parent.display().to_string();
    if !needle.ends_with('/') {
        needle.push('/');
    }
    let at = cmdline.find(&needle)? + needle.len();
    let rest = &cmdline[at..];
    let name: String = rest.chars().take_while(|c| *c != '/' && *c != ',' && !c.is_whitespace()).collect();
    (!name.is_empty()).then_some(name)
}

/// VMMs whose command line mentions `dir`.
pub fn vmms_under(dir: &Path) -> Vec<VmmProc> {
    let mut needle = dir.display().to_string();
    if !needle.ends_with('/') {
        needle.push('/');
    }
    qemu_processes().into_iter().filter(|p| p.cmdline.contains(&needle)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_sandbox_dir() {
        let c = "qemu-system-x86_64 -chardev socket,id=agent,path=/d/sandboxes/sb-abc/agent.sock,server=on";
        assert_eq!(child_dir_named(c, Path::new("/d/sandboxes")), Some("sb-abc".into()));
        assert_eq!(child_dir_named(c, Path::new("/d/sandboxes/")), Some("sb-abc".into()));
        assert_eq!(child_dir_named(c, Path::new("/e/sandboxes")), None);
        assert_eq!(child_dir_named("x /d/sandboxes/", Path::new("/d/sandboxes")), None);
    }
}
