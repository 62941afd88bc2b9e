//! Per-sandbox control groups: memory, CPU and pids limits for one VMM.
//!
//! Every sandbox gets a cgroup named `forkd/<sandbox-id>`. cgroup v2 is used
//! when the unified hierarchy offers the memory, cpu and pids controllers;
//! otherwise the v1 hierarchies of those controllers (each one that is
//! mounted) get a directory of that name.
//!
//! The memory limit covers the whole VMM process: guest RAM the guest has
//! written (copy-on-write pages of the snapshot's memory file) plus QEMU's
//! own heap, translation cache and I/O buffers. A limit close to the guest's
//! RAM size therefore kills the VMM before the guest itself runs out of
//! memory. When the kernel's out-of-memory killer ends the VMM, the cgroup's
//! counter (`memory.events` oom_kill in v2, `memory.oom_control` oom_kill in
//! v1) tells the daemon why it died.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Parent of every sandbox cgroup.
pub const PARENT: &str = "forkd";
/// CFS period used for CPU quotas.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The controllers a sandbox cgroup uses.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// Limits of one sandbox; zero means "no limit".
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CPUs worth of time (0.5 = half of one CPU).
    pub cpu_quota: f64,
    pub pids_max: u32,
    /// CPU only when nothing else wants it (the lowest weight): for work
    /// done ahead of time, such as filling a pool.
    pub background: bool,
}

/// cgroup v2 cpu.weight and v1 cpu.shares of background and normal groups.
const WEIGHT: (u32, u32) = (1, 100);
const SHARES: (u32, u32) = (2, 1024);

/// The host's cgroup hierarchies as forkd uses them.
#[derive(Debug, Clone)]
pub struct Cgroups {
    pub version: Version,
    /// v2: the unified mount. v1: unused.
    unified: Option<PathBuf>,
    /// v1: controller name → mount point (only those mounted).
    v1: Vec<(&'static str, PathBuf)>,
}

/// One cgroup mount from /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    pub path: PathBuf,
    pub v2: bool,
    /// v1 controllers (from the super options), empty for v2.
    pub controllers: Vec<String>,
}

/// Parses the cgroup mounts out of mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = vec![];
    for line in text.lines() {
        // id parent maj:min root mountpoint opts [optional...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let mountpoint = match left.split(' ').nth(4) {
            Some(m) => unescape_mount(m),
            None => continue,
        };
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let _source = r.next();
        let superopts = r.next().unwrap_or("");
        match fstype {
            "cgroup2" => out.push(Mount { path: mountpoint.into(), v2: true, controllers: vec![] }),
            "cgroup" => out.push(Mount {
                path: mountpoint.into(),
                v2: false,
                controllers: superopts
                    .split(',')
                    .filter(|o| CONTROLLERS.contains(o) || matches!(*o, "cpuacct" | "cpuset"))
                    .map(String::from)
                    .collect(),
            }),
            _ => {}
        }
    }
    out
}

fn unescape_mount(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Controllers the unified hierarchy offers (its root's cgroup.controllers).
pub fn v2_controllers(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("cgroup.controllers"))
        .map(|s| s.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

impl Cgroups {
    /// The hierarchies of this host, detected once.
    pub fn host() -> Option<&'static Cgroups> {
        static HOST: OnceLock<Option<Cgroups>> = OnceLock::new();
        HOST.get_or_init(|| {
            let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            Cgroups::from_mounts(&parse_mountinfo(&text))
        })
        .as_ref()
    }

    /// Chooses v2 when a unified mount has every controller forkd uses,
    /// else the v1 hierarchies that are mounted.
    pub fn from_mounts(mounts: &[Mount]) -> Option<Cgroups> {
        for m in mounts.iter().filter(|m| m.v2) {
            let have = v2_controllers(&m.path);
            if CONTROLLERS.iter().all(|c| have.iter().any(|h| h == c)) {
                return Some(Cgroups { version: Version::V2, unified: Some(m.path.clone()), v1: vec![] });
            }
        }
        let mut v1 = vec![];
        for c in CONTROLLERS {
            if let Some(m) = mounts.iter().find(|m| !m.v2 && m.controllers.iter().any(|x| x == c)) {
                v1.push((c, m.path.clone()));
            }
        }
        if v1.is_empty() {
            return None;
        }
        Some(Cgroups { version: Version::V1, unified: None, v1 })
    }

    /// Controllers in use ("memory", "cpu", "pids" where available).
    pub fn controllers(&self) -> Vec<&'static str> {
        match self.version {
            Version::V2 => CONTROLLERS.to_vec(),
            Version::V1 => self.v1.iter().map(|(c, _)| *c).collect(),
        }
    }

    /// Describes the hierarchies, for logs and `forkd doctor`.
    pub fn describe(&self) -> String {
        match self.version {
            Version::V2 => {
                format!("cgroup v2 at {}", self.unified.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
            }
            Version::V1 => format!(
                "cgroup v1 ({})",
                self.v1.iter().map(|(c, p)| format!("{c} at {}", p.display())).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// Roots of the hierarchies forkd writes to (deduplicated).
    fn roots(&self) -> Vec<PathBuf> {
        match self.version {
            Version::V2 => self.unified.iter().cloned().collect(),
            Version::V1 => {
                let mut seen = BTreeSet::new();
                self.v1.iter().filter(|(_, p)| seen.insert(p.clone())).map(|(_, p)| p.clone()).collect()
            }
        }
    }

    fn root_of(&self, controller: &str) -> Option<&Path> {
        match self.version {
            Version::V2 => self.unified.as_deref(),
            Version::V1 => self.v1.iter().find(|(c, _)| *c == controller).map(|(_, p)| p.as_path()),
        }
    }

    /// Directories of cgroup `name` in every hierarchy.
    pub fn dirs(&self, name: &str) -> io::Result<Vec<PathBuf>> {
        check_name(name)?;
        Ok(self.roots().into_iter().map(|r| r.join(name)).collect())
    }

    /// Creates `name` (e.g. "forkd/sb-x") with its limits. Idempotent.
    pub fn create(&self, name: &str, limits: &Limits) -> io::Result<()> {
        check_name(name)?;
        if self.version == Version::V2 {
            let root = self.unified.as_deref().expect("v2 root");
            // Each level must pass the controllers down to the next.
            let mut dir = root.to_path_buf();
            enable_controllers(&dir)?;
            let comps: Vec<&str> = name.split('/').collect();
            for (i, c) in comps.iter().enumerate() {
                dir.push(c);
                mkdir(&dir)?;
                if i + 1 < comps.len() {
                    enable_controllers(&dir)?;
                }
            }
        } else {
            for d in self.dirs(name)? {
                std::fs::create_dir_all(&d)?;
            }
        }
        self.apply(name, limits)
    }

    /// Writes the limits of `name`.
    pub fn apply(&self, name: &str, l: &Limits) -> io::Result<()> {
        check_name(name)?;
        let file = |controller: &str, f: &str| self.root_of(controller).map(|r| r.join(name).join(f));
        match self.version {
            Version::V2 => {
                if let Some(p) = file("memory", "memory.max") {
                    write(&p, &if l.memory_bytes > 0 { l.memory_bytes.to_string() } else { "max".into() })?;
                }
                if l.memory_bytes > 0
                    && let Some(p) = file("memory", "memory.swap.max")
                    && p.exists()
                {
                    write(&p, "0")?;
                }
                if let Some(p) = file("cpu", "cpu.max") {
                    write(
                        &p,
                        &match cpu_quota_us(l.cpu_quota) {
                            Some(q) => format!("{q} {CPU_PERIOD_US}"),
                            None => format!("max {CPU_PERIOD_US}"),
                        },
                    )?;
                }
                if let Some(p) = file("pids", "pids.max") {
                    write(&p, &if l.pids_max > 0 { l.pids_max.to_string() } else { "max".into() })?;
                }
                if let Some(p) = file("cpu", "cpu.weight").filter(|p| p.exists()) {
                    write(&p, &if l.background { WEIGHT.0 } else { WEIGHT.1 }.to_string())?;
                }
            }
            Version::V1 => {
                if let Some(p) = file("memory", "memory.limit_in_bytes") {
                    let v = if l.memory_bytes > 0 { l.memory_bytes.to_string() } else { "-1".into() };
                    // memsw must stay ≥ the memory limit: raise order matters.
                    let memsw = file("memory", "memory.memsw.limit_in_bytes").filter(|p| p.exists());
                    if l.memory_bytes > 0 {
                        write(&p, &v)?;
                        if let Some(m) = memsw {
                            write(&m, &v)?;
                        }
                    } else {
                        if let Some(m) = memsw {
                            write(&m, "-1")?;
                        }
                        write(&p, "-1")?;
                    }
                }
                if let Some(p) = file("cpu", "cpu.cfs_quota_us") {
                    if let Some(per) = file("cpu", "cpu.cfs_period_us") {
                        write(&per, &CPU_PERIOD_US.to_string())?;
                    }
                    write(&p, &cpu_quota_us(l.cpu_quota).map(|q| q.to_string()).unwrap_or_else(|| "-1".into()))?;
                }
                if let Some(p) = file("cpu", "cpu.shares").filter(|p| p.exists()) {
                    write(&p, &if l.background { SHARES.0 } else { SHARES.1 }.to_string())?;
                }
                if let Some(p) = file("pids", "pids.max") {
                    write(&p, &if l.pids_max > 0 { l.pids_max.to_string() } else { "max".into() })?;
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` (all its threads) into `name`, in each
    /// hierarchy it is not in yet (a move costs a global lock even when it
    /// changes nothing).
    pub fn add_pid(&self, name: &str, pid: u32) -> io::Result<()> {
        for d in self.dirs(name)? {
            let procs = d.join("cgroup.procs");
            let member = std::fs::read_to_string(&procs)
                .is_ok_and(|s| s.split_whitespace().any(|p| p.parse::<u32>().ok() == Some(pid)));
            if !member {
                write(&procs, &pid.to_string())?;
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files of `name`, one per hierarchy: what a
    /// process writes to join it.
    pub fn procs_files(&self, name: &str) -> io::Result<Vec<PathBuf>> {
        Ok(self.dirs(name)?.into_iter().map(|d| d.join("cgroup.procs")).collect())
    }

    /// Processes in `name` (union over hierarchies).
    pub fn procs(&self, name: &str) -> Vec<u32> {
        let mut out = BTreeSet::new();
        for d in self.dirs(name).unwrap_or_default() {
            if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
        out.into_iter().collect()
    }

    /// How often the OOM killer killed a process of `name` (None if unknown).
    pub fn oom_kills(&self, name: &str) -> Option<u64> {
        check_name(name).ok()?;
        let root = self.root_of("memory")?;
        let file = match self.version {
            Version::V2 => "memory.events",
            Version::V1 => "memory.oom_control",
        };
        let text = std::fs::read_to_string(root.join(name).join(file)).ok()?;
        parse_counter(&text, "oom_kill")
    }

    /// Reads a control file of `name` in the hierarchy of `controller`.
    pub fn read(&self, name: &str, controller: &str, file: &str) -> Option<String> {
        check_name(name).ok()?;
        if file.contains('/') {
            return None;
        }
        std::fs::read_to_string(self.root_of(controller)?.join(name).join(file)).ok()
    }

    pub fn exists(&self, name: &str) -> bool {
        self.dirs(name).map(|ds| ds.iter().any(|d| d.is_dir())).unwrap_or(false)
    }

    /// Removes `name` from every hierarchy. Processes must be gone; a cgroup
    /// whose last process is still exiting is retried for up to `wait`.
    /// Missing directories are fine.
    pub fn remove(&self, name: &str, wait: Duration) -> io::Result<()> {
        let deadline = Instant::now() + wait;
        let mut last = Ok(());
        for d in self.dirs(name)? {
            loop {
                match std::fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        last = Err(io::Error::new(e.kind(), format!("rmdir {}: {e}", d.display())));
                        break;
                    }
                }
            }
        }
        last
    }

    /// Names of the child cgroups of `parent` ("forkd" → ["forkd/sb-…"]),
    /// over every hierarchy.
    pub fn children(&self, parent: &str) -> Vec<String> {
        let mut out = BTreeSet::new();
        let Ok(dirs) = self.dirs(parent) else { return vec![] };
        for d in dirs {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        out.insert(format!("{parent}/{}", e.file_name().to_string_lossy()));
                    }
                }
            }
        }
        out.into_iter().collect()
    }

    /// Seconds since `name` was created (its oldest directory), if it exists.
    pub fn age(&self, name: &str) -> Option<Duration> {
        let mut best: Option<Duration> = None;
        for d in self.dirs(name).ok()? {
            if let Ok(m) = std::fs::metadata(&d)
                && let Ok(t) = m.modified().or_else(|_| m.created())
                && let Ok(age) = t.elapsed()
            {
                best = Some(best.map_or(age, |b: Duration| b.max(age)));
            }
        }
        best
    }
}

/// The cgroup name of a sandbox.
pub fn sandbox_name(id: &str) -> String {
    format!("{PARENT}/{id}")
}

/// cfs quota in µs per period for `cores` CPUs, None for no limit.
pub fn cpu_quota_us(cores: f64) -> Option<u64> {
    (cores.is_finite() && cores > 0.0).then(|| ((cores * CPU_PERIOD_US as f64).round() as u64).max(1000))
}

/// Reads `key N` out of a flat-keyed cgroup file.
pub fn parse_counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok()).flatten()
    })
}

/// Only relative names made of plain components: nothing outside the
/// hierarchy is ever touched.
fn check_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    if ok { Ok(()) } else { Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad cgroup name {name:?}"))) }
}

fn mkdir(p: &Path) -> io::Result<()> {
    match std::fs::create_dir(p) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn enable_controllers(dir: &Path) -> io::Result<()> {
    let have = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let want: Vec<String> =
        CONTROLLERS.iter().filter(|c| !have.split_whitespace().any(|h| h == **c)).map(|c| format!("+{c}")).collect();
    if want.is_empty() {
        return Ok(());
    }
    write(&dir.join("cgroup.subtree_control"), &want.join(" "))
}

fn write(p: &Path, v: &str) -> io::Result<()> {
    std::fs::write(p, v).map_err(|e| io::Error::new(e.kind(), format!("write {v:?} to {}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
24 31 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
25 24 0:23 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
26 24 0:24 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
27 24 0:25 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
28 24 0:26 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
29 24 0:27 / /sys/fs/cgroup/my\\040dir rw - cgroup cgroup rw,cpuacct
";

    #[test]
    fn parses_mountinfo() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 5);
        assert!(m.iter().any(|x| x.v2 && x.path == Path::new("/sys/fs/cgroup/unified")));
        assert!(m.iter().any(|x| x.path == Path::new("/sys/fs/cgroup/my dir")));
        // The unified mount here is a path without controllers: v1 is chosen.
        let c = Cgroups::from_mounts(&m).unwrap();
        assert_eq!(c.version, Version::V1);
        assert_eq!(c.controllers(), vec!["memory", "cpu", "pids"]);
        assert_eq!(c.dirs("forkd/sb-1").unwrap().len(), 3);
    }

    #[test]
    fn names_stay_inside() {
        let c = Cgroups::from_mounts(&parse_mountinfo(MOUNTINFO)).unwrap();
        for bad in ["", "/", "../x", "forkd/../../etc", "forkd//x", "forkd/a b", "/abs"] {
            assert!(c.dirs(bad).is_err(), "{bad}");
        }
        assert!(c.dirs("forkd/sb-abc").is_ok());
    }

    #[test]
    fn counters_and_quota() {
        assert_eq!(parse_counter("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"), Some(3));
        assert_eq!(parse_counter("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n", "oom_kill"), Some(1));
        assert_eq!(parse_counter("oom 1\n", "oom_kill"), None);
        assert_eq!(cpu_quota_us(0.5), Some(50_000));
        assert_eq!(cpu_quota_us(0.0), None);
        assert_eq!(cpu_quota_us(f64::NAN), None);
        assert_eq!(cpu_quota_us(0.001), Some(1000));
    }
}
