//! Package builds: `forkd image build NAME [--from python|minimal|IMAGE]
//! [--apt PKG]… [--pip PKG]… [--run CMD]…` turns a base into a new root
//! tree: Debian packages, then Python packages, then shell commands, in that
//! order. This module is the build step only; the caller checks its store
//! for `input_digest` first (a rebuild with the same inputs is a store hit),
//! stages an empty directory, calls `build` on a blocking thread, and turns
//! the tree into an image (`ext4`).
//!
//! **Bases.** A *recipe* base (`python`, `minimal`) runs the guest recipe
//! (`guest/images/<name>.sh`) from scratch with the extra Debian packages
//! added to its package list (`FORKD_EXTRA_PACKAGES`; the minimal recipe
//! unpacks them without dpkg, as it has none). `scripts/build-guest.sh`
//! installs the recipes into `<guest-dir>/recipes/` (`RECIPES_SUBDIR`), which
//! is where the daemon loads them from (`Recipe::load`). A *tree* base is a
//! stored image's staged root tree (e.g. an imported Debian-based OCI image);
//! it is copied and built on: the host's apt resolves and downloads the
//! packages against the tree's dpkg database (from the configured mirror and
//! the tree's Debian codename, never the tree's own apt sources or
//! configuration), and the tree's own dpkg installs them.
//!
//! **Isolation.** Every step runs in new user (identity-mapped), PID, mount,
//! UTS and IPC namespaces: mounts exist only inside the step and vanish with
//! it (nothing to unmount, also on failure), and killing the step kills every
//! process it started. Mapping root into the user namespace needs
//! CAP_SETUID, CAP_SETGID, CAP_SETFCAP and CAP_SYS_ADMIN in the caller.
//! Steps that execute the image's own code (probes, dpkg, pip, `--run`) are
//! jailed in the tree with `pivot_root` (the host's file system is not
//! mounted in their namespace): `/dev` is a tmpfs with six device nodes,
//! `/proc` is the step's own with `/proc/sys` and `/proc/sysrq-trigger`
//! read-only, the capability bounding set keeps only what package installs
//! use (`JAIL_KEEP_CAPS`: file owners and modes, setuid/setgid, kill,
//! chroot, mknod, file capabilities — no CAP_SYS_ADMIN, CAP_SYS_PTRACE,
//! CAP_NET_ADMIN, …), and no_new_privs is set.
//! Probes and dpkg run without network; pip and `--run` have the host's
//! network (and the host's resolv.conf bound over `/etc/resolv.conf`, which
//! is left as it was afterwards). The recipes (trusted, from the guest dir)
//! and the host's apt run outside the jail.
//!
//! **Cache.** `cache/apt/archives` keeps downloaded `.deb` files across
//! builds (bound over the recipe's `/var/cache/apt/archives` with
//! `FORKD_APT_CACHE`, used directly by the host apt for tree bases), and
//! `cache/apt/lists` the package lists of tree builds. `cache/apt.lock`
//! serialises the steps that write them; the archive is pruned to
//! `APT_CACHE_MAX_BYTES`, least recently used first. pip never caches
//! (`--no-cache-dir`).
//!
//! **Bounds.** Inputs are validated before anything runs (`BuildSpec::
//! validate`); each step has `step_timeout`; tool output is passed line by
//! line to the caller's `log`, and a failed step's error carries its last
//! lines.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{ImageConfig, ImageError};

/// Version of this build step, part of every input digest: bump it when a
/// change here changes what a build produces.
pub const BUILD_VERSION: &str = "forkd-image-build/1";
/// Where the recipes live under the guest dir (`<guest-dir>/recipes/`,
/// written by scripts/build-guest.sh).
pub const RECIPES_SUBDIR: &str = "recipes";
/// The recipe bases.
pub const RECIPES: &[&str] = &["python", "minimal"];
/// Debian mirror unless `FORKD_DEBIAN_MIRROR` says otherwise (the same
/// default as the recipes).
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
pub const MAX_APT_PACKAGES: usize = 256;
pub const MAX_PIP_PACKAGES: usize = 256;
/// Longest package argument (name plus version), apt or pip.
pub const MAX_PACKAGE_LEN: usize = 200;
pub const MAX_RUN_COMMANDS: usize = 64;
/// Longest `--run` command, in bytes.
pub const MAX_RUN_LEN: usize = 8192;
/// Size the apt archive cache is pruned to after a build that used it.
pub const APT_CACHE_MAX_BYTES: u64 = 8 << 30;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Lines of a failed step's output its error carries.
const TAIL_LINES: usize = 40;
/// Longest output line passed on; longer ones are split.
const MAX_LINE: usize = 4096;
/// Exit code of a step whose namespace or jail could not be set up (the
/// reason is on its stderr, prefixed `forkd-build:`).
const SETUP_FAILED: i32 = 125;
/// Where the dpkg step sees the apt archive (inside its own /dev tmpfs).
const JAIL_DEBS: &str = "/dev/.forkd-debs";
/// The host's CA bundle: network steps trust what the host trusts (a host
/// behind a TLS-inspecting proxy has its CA there), seen at `JAIL_CA`.
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const JAIL_CA: &str = "/dev/.forkd-ca.crt";
/// Variables pointing TLS clients at `JAIL_CA`, unless the image sets them.
const CA_VARS: &[&str] = &["SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO"];
/// The caller's proxy settings, passed on to the steps that use the network.
const PROXY_VARS: &[&str] = &["http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"];

/// A guest recipe, read into memory: the digest covers exactly what runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    name: &'static str,
    script: Vec<u8>,
    common: Vec<u8>,
    /// What else the recipe reads from the host (the minimal recipe: the
    /// version of busybox-static it copies).
    host_input: String,
}

impl Recipe {
    /// Reads recipe `name` (`python` or `minimal`) and `common.sh` from
    /// `dir`, normally `<guest-dir>/recipes` (see `RECIPES_SUBDIR`).
    pub fn load(dir: &Path, name: &str) -> Result<Recipe, ImageError> {
        let name =
            RECIPES.iter().copied().find(|r| *r == name).ok_or_else(|| {
                ImageError::Invalid(format!("no recipe {name:?} (there are: {})", RECIPES.join(", ")))
            })?;
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read(&path).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    ImageError::Precondition(format!(
                        "recipe file {} is missing (scripts/build-guest.sh installs the recipes into <guest-dir>/{RECIPES_SUBDIR})",
                        path.display()
                    ))
                } else {
                    ImageError::io(format!("reading {}", path.display()), e)
                }
            })
        };
        let script = read(&format!("{name}.sh"))?;
        let common = read("common.sh")?;
        let host_input = if name == "minimal" { host_package_version("busybox-static") } else { String::new() };
        Ok(Recipe { name, script, common, host_input })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// `Package Version` of an installed host package, or "none".
fn host_package_version(package: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Version}", package])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success() && !o.stdout.is_empty())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| "none".into())
}

/// What a build starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildBase {
    /// A guest recipe, run from scratch.
    Recipe(Recipe),
    /// The staged root tree of a stored image (copied, never changed) and
    /// its configuration (its env and working dir apply to pip and `--run`).
    Tree { dir: PathBuf, config: ImageConfig },
}

/// Everything a build is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildSpec {
    pub base: BuildBase,
    /// Debian packages (`name` or `name=version`), installed first.
    pub apt: Vec<String>,
    /// pip requirements (`name`, `name[extra]`, `name>=1,<2`), installed
    /// after the Debian packages.
    pub pip: Vec<String>,
    /// Shell commands (`/bin/sh -c`), run last, in order.
    pub run: Vec<String>,
    /// Debian mirror for the recipes and tree bases.
    pub mirror: String,
    /// Longest any one step may take (not an input of the result).
    pub step_timeout: Duration,
}

impl BuildSpec {
    /// A spec with no packages or commands, the default mirror
    /// (`FORKD_DEBIAN_MIRROR` or `DEFAULT_MIRROR`) and step timeout.
    pub fn new(base: BuildBase) -> BuildSpec {
        BuildSpec {
            base,
            apt: vec![],
            pip: vec![],
            run: vec![],
            mirror: default_mirror(),
            step_timeout: DEFAULT_STEP_TIMEOUT,
        }
    }

    /// Checks every input before anything runs; the error names the
    /// offending item.
    pub fn validate(&self) -> Result<(), ImageError> {
        let invalid = |m: String| Err(ImageError::Invalid(m));
        if self.apt.len() > MAX_APT_PACKAGES {
            return invalid(format!("{} apt packages: at most {MAX_APT_PACKAGES}", self.apt.len()));
        }
        if self.pip.len() > MAX_PIP_PACKAGES {
            return invalid(format!("{} pip packages: at most {MAX_PIP_PACKAGES}", self.pip.len()));
        }
        if self.run.len() > MAX_RUN_COMMANDS {
            return invalid(format!("{} run commands: at most {MAX_RUN_COMMANDS}", self.run.len()));
        }
        for p in &self.apt {
            if let Err(why) = check_apt_package(p) {
                return invalid(format!("apt package {p:?}: {why}"));
            }
        }
        for p in &self.pip {
            if let Err(why) = check_pip_requirement(p) {
                return invalid(format!("pip package {p:?}: {why}"));
            }
        }
        for (i, c) in self.run.iter().enumerate() {
            if let Err(why) = check_run_command(c) {
                return invalid(format!("run command {} ({:?}): {why}", i + 1, shorten(c, 60)));
            }
        }
        if let Err(why) = check_mirror(&self.mirror) {
            return invalid(format!("Debian mirror {:?}: {why}", self.mirror));
        }
        if self.step_timeout.is_zero() {
            return invalid("step timeout must be positive".into());
        }
        if let BuildBase::Recipe(r) = &self.base
            && r.name == "minimal"
            && !self.pip.is_empty()
        {
            return invalid(format!(
                "pip package {:?}: the minimal base has no python3 (build --from python, or from an image with python3)",
                self.pip[0]
            ));
        }
        Ok(())
    }
}

/// `FORKD_DEBIAN_MIRROR`, or `DEFAULT_MIRROR`.
pub fn default_mirror() -> String {
    std::env::var("FORKD_DEBIAN_MIRROR").ok().filter(|m| !m.is_empty()).unwrap_or_else(|| DEFAULT_MIRROR.into())
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max { s.to_string() } else { format!("{}…", s.chars().take(max).collect::<String>()) }
}

/// A Debian package: `[a-z0-9][a-z0-9+.-]+`, optionally `=version`.
fn check_apt_package(p: &str) -> Result<(), &'static str> {
    if p.is_empty() {
        return Err("empty");
    }
    if p.len() > MAX_PACKAGE_LEN {
        return Err("too long");
    }
    let (name, version) = match p.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (p, None),
    };
    let b = name.as_bytes();
    let first_ok = b.first().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if b.len() < 2 || !first_ok || !b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+.-".contains(c))
    {
        return Err("not a Debian package name ([a-z0-9][a-z0-9+.-]+, optionally =version)");
    }
    if let Some(v) = version {
        let ok = v.as_bytes().first().is_some_and(|c| c.is_ascii_digit())
            && v.bytes().all(|c| c.is_ascii_alphanumeric() || b".+~:-".contains(&c));
        if !ok {
            return Err("not a Debian version (after '=': a digit, then [A-Za-z0-9.+~:-])");
        }
    }
    Ok(())
}

/// A PEP 508-ish requirement without URLs, markers or spaces:
/// `name[extra,…]` followed by `op version` clauses joined with `,`.
fn check_pip_requirement(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("empty".into());
    }
    if p.len() > MAX_PACKAGE_LEN {
        return Err("too long".into());
    }
    let s = p.as_bytes();
    let ident = |i: usize| -> Result<usize, String> {
        let mut j = i;
        while j < s.len() && (s[j].is_ascii_alphanumeric() || b"._-".contains(&s[j])) {
            j += 1;
        }
        if j == i || !s[i].is_ascii_alphanumeric() || !s[j - 1].is_ascii_alphanumeric() {
            return Err(format!(
                "expected a name (letters, digits, . _ -, starting and ending alphanumeric) at offset {i}"
            ));
        }
        Ok(j)
    };
    let mut i = ident(0)?;
    if i < s.len() && s[i] == b'[' {
        i += 1;
        loop {
            i = ident(i)?;
            match s.get(i) {
                Some(b',') => i += 1,
                Some(b']') => {
                    i += 1;
                    break;
                }
                _ => return Err(format!("unterminated extras at offset {i}")),
            }
        }
    }
    if i == s.len() {
        return Ok(());
    }
    loop {
        if i == s.len() {
            return Err("a ',' with no version clause after it".into());
        }
        let op = ["===", "==", "!=", "<=", ">=", "~=", "<", ">"]
            .into_iter()
            .find(|op| s[i..].starts_with(op.as_bytes()))
            .ok_or_else(|| {
                format!("unexpected {:?} at offset {i} (no URLs, markers, spaces or options)", s[i] as char)
            })?;
        i += op.len();
        let start = i;
        while i < s.len() && (s[i].is_ascii_alphanumeric() || b".*+!_-".contains(&s[i])) {
            i += 1;
        }
        if i == start {
            return Err(format!("missing version after {op:?}"));
        }
        match s.get(i) {
            None => return Ok(()),
            Some(b',') => i += 1,
            Some(c) => return Err(format!("unexpected {:?} at offset {i}", *c as char)),
        }
    }
}

fn check_run_command(c: &str) -> Result<(), String> {
    if c.trim().is_empty() {
        return Err("empty".into());
    }
    if c.len() > MAX_RUN_LEN {
        return Err(format!("{} bytes: at most {MAX_RUN_LEN}", c.len()));
    }
    if c.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    Ok(())
}

fn check_mirror(m: &str) -> Result<(), &'static str> {
    if !(m.starts_with("http://") || m.starts_with("https://")) {
        return Err("must be an http:// or https:// URL");
    }
    if m.len() > 512 || !m.bytes().all(|c| c.is_ascii_graphic() && !b"\"'\\$`".contains(&c)) {
        return Err("must be at most 512 printable characters without quotes, backslashes or $");
    }
    Ok(())
}

/// `sha256:<hex>` over everything that changes what `build` produces: this
/// step's version, the base (a tree base's image digest `base_digest`; a
/// recipe base's recipe, `common.sh` and host input — `base_digest` is
/// ignored then), the mirror, and the apt, pip and run lists in order.
pub fn input_digest(spec: &BuildSpec, base_digest: &str) -> String {
    digest_with_version(BUILD_VERSION, spec, base_digest)
}

fn digest_with_version(version: &str, spec: &BuildSpec, base_digest: &str) -> String {
    let mut h = Sha256::new();
    // Every field is tagged and length-prefixed, so no two different
    // inputs encode alike.
    let mut field = |tag: &str, bytes: &[u8]| {
        h.update(tag.as_bytes());
        h.update([0]);
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field("version", version.as_bytes());
    match &spec.base {
        BuildBase::Recipe(r) => {
            field("recipe", r.name.as_bytes());
            field("recipe.sh", &r.script);
            field("common.sh", &r.common);
            field("host", r.host_input.as_bytes());
        }
        BuildBase::Tree { .. } => field("base", base_digest.as_bytes()),
    }
    field("mirror", spec.mirror.as_bytes());
    for (tag, list) in [("apt", &spec.apt), ("pip", &spec.pip), ("run", &spec.run)] {
        field(tag, &(list.len() as u64).to_le_bytes());
        for item in list {
            field(tag, item.as_bytes());
        }
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Builds `spec` into `root` (an existing empty directory) and returns the
/// new image's configuration. `cache` holds the apt cache and scratch files
/// (e.g. `$FORKD_CACHE_DIR/build`). Blocking: minutes for a recipe base;
/// call it from a blocking thread. On error `root` holds a partial tree
/// for the caller to remove.
pub fn build(
    spec: &BuildSpec,
    root: &Path,
    cache: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<ImageConfig, ImageError> {
    spec.validate()?;
    let meta =
        std::fs::symlink_metadata(root).map_err(|e| ImageError::io(format!("staging dir {}", root.display()), e))?;
    if !meta.is_dir() {
        return Err(ImageError::Invalid(format!("staging dir {} is not a directory", root.display())));
    }
    let root = root.canonicalize().map_err(|e| ImageError::io(format!("staging dir {}", root.display()), e))?;
    if std::fs::read_dir(&root)
        .map_err(|e| ImageError::io(format!("staging dir {}", root.display()), e))?
        .next()
        .is_some()
    {
        return Err(ImageError::Invalid(format!("staging dir {} is not empty", root.display())));
    }
    for d in ["apt/archives/partial", "apt/lists/partial", "tmp"] {
        let p = cache.join(d);
        std::fs::create_dir_all(&p).map_err(|e| ImageError::io(format!("creating {}", p.display()), e))?;
    }
    let cache = cache.canonicalize().map_err(|e| ImageError::io(format!("cache dir {}", cache.display()), e))?;
    let scratch = Scratch::new(&cache.join("tmp"))?;
    let started = Instant::now();
    let mut b = Builder { spec, root, cache, scratch, log, resolv: None };
    let result = match &spec.base {
        BuildBase::Recipe(r) => b.build_recipe(r),
        BuildBase::Tree { dir, config } => b.build_on_tree(dir, config),
    };
    // Puts /etc/resolv.conf back before the caller looks at the tree.
    b.resolv.take();
    if result.is_ok() {
        (b.log)(&format!("==> done in {:.1}s", started.elapsed().as_secs_f64()));
    }
    result
}

/// A private directory under the cache, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(parent: &Path) -> Result<Scratch, ImageError> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        for n in 0..100u32 {
            let p = parent.join(format!("build-{}-{nanos}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&p) {
                Ok(()) => return Ok(Scratch(p)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ImageError::io(format!("creating {}", p.display()), e)),
            }
        }
        Err(ImageError::Precondition(format!("no free scratch directory name under {}", parent.display())))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a probe found in the tree (the tree's own word: it only decides
/// what to try next).
#[derive(Debug, Default, Clone, PartialEq)]
struct Probe {
    python3: bool,
    pip: bool,
    /// The interpreter is marked EXTERNALLY-MANAGED (PEP 668).
    managed: bool,
    dpkg: bool,
    os_id: String,
    codename: String,
}

/// Copies tree $1 into $2, all but /dev: device nodes cannot be made in
/// the step's user namespace, and a booted guest mounts its own /dev.
const COPY_SCRIPT: &str = r#"
set -e
for e in "$1"/* "$1"/.[!.]* "$1"/..?*; do
  [ -e "$e" ] || [ -L "$e" ] || continue
  [ "$e" = "$1/dev" ] && continue
  cp -a --reflink=auto -- "$e" "$2/"
done
mkdir -m 0755 "$2/dev"
"#;

const PROBE_SCRIPT: &str = r#"
if command -v python3 >/dev/null 2>&1; then
  echo python3=1
  python3 -m pip --version >/dev/null 2>&1 && echo pip=1
  python3 -c 'import os, sysconfig; print("managed=%d" % os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))' 2>/dev/null
fi
command -v dpkg >/dev/null 2>&1 && [ -f /var/lib/dpkg/status ] && echo dpkg=1
if [ -r /etc/os-release ]; then
  ID= VERSION_CODENAME=
  . /etc/os-release >/dev/null 2>&1
  echo "os=$ID"
  echo "codename=$VERSION_CODENAME"
fi
exit 0
"#;

impl Probe {
    fn parse(lines: &[String]) -> Probe {
        let mut p = Probe::default();
        for l in lines {
            let Some((k, v)) = l.split_once('=') else { continue };
            match k {
                "python3" => p.python3 = v == "1",
                "pip" => p.pip = v == "1",
                "managed" => p.managed = v == "1",
                "dpkg" => p.dpkg = v == "1",
                "os" => p.os_id = v.trim().to_string(),
                "codename" => p.codename = v.trim().to_string(),
                _ => {}
            }
        }
        p
    }
}

/// Who is to blame when a step fails: the request's inputs (a package that
/// does not exist, a failing command: 400) or the host (409).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Blame {
    Input,
    Host,
}

/// How a step runs.
enum Mode {
    /// A plain child of the caller (the host's apt).
    Plain,
    /// New namespaces, on the host's file system, all capabilities in its
    /// user namespace (the recipe, copying a base tree).
    Host,
    /// New namespaces, jailed in the tree being built.
    Jail(JailSpec),
}

struct JailSpec {
    network: bool,
    binds: Vec<BindSpec>,
    cwd: String,
}

/// A host path shown inside the jail.
struct BindSpec {
    src: PathBuf,
    /// Absolute path inside the jail.
    dst: String,
    read_only: bool,
    /// Whether `dst` is made first (only under /dev, which is the step's
    /// own tmpfs).
    make: MountPoint,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum MountPoint {
    Existing,
    Dir,
    File,
}

struct Step {
    title: String,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    mode: Mode,
    blame: Blame,
    /// Lines are collected (all of them, bounded) rather than logged.
    capture: bool,
}

struct Builder<'a> {
    spec: &'a BuildSpec,
    root: PathBuf,
    cache: PathBuf,
    scratch: Scratch,
    log: &'a mut dyn FnMut(&str),
    resolv: Option<ResolvGuard>,
}

impl Builder<'_> {
    fn say(&mut self, msg: &str) {
        (self.log)(msg);
    }

    fn build_recipe(&mut self, recipe: &Recipe) -> Result<ImageConfig, ImageError> {
        let mut extra = self.spec.apt.clone();
        if !self.spec.pip.is_empty() && !extra.iter().any(|p| p == "python3-pip" || p.starts_with("python3-pip=")) {
            self.say("==> pip packages asked for: adding python3-pip to the Debian packages");
            extra.push("python3-pip".into());
        }
        let uses_apt = recipe.name == "python" || !extra.is_empty();
        if uses_apt {
            find_tool("mmdebstrap")?;
        }
        let bash = find_tool("bash")?;
        let dir = self.scratch.0.join("recipe");
        std::fs::create_dir(&dir).map_err(|e| ImageError::io("creating the recipe copy", e))?;
        let script = dir.join(format!("{}.sh", recipe.name));
        std::fs::write(&script, &recipe.script).map_err(|e| ImageError::io("writing the recipe copy", e))?;
        std::fs::write(dir.join("common.sh"), &recipe.common)
            .map_err(|e| ImageError::io("writing the recipe copy", e))?;
        let archives = self.cache.join("apt/archives");
        let mut env = host_env();
        with_proxy(&mut env);
        env.push(("FORKD_DEBIAN_MIRROR".into(), self.spec.mirror.clone()));
        env.push(("FORKD_EXTRA_PACKAGES".into(), extra.join(",")));
        env.push(("FORKD_APT_CACHE".into(), archives.display().to_string()));
        let title = if extra.is_empty() {
            format!("recipe {}", recipe.name)
        } else {
            format!("recipe {} with {}", recipe.name, extra.join(" "))
        };
        let lock = if uses_apt { Some(self.lock_apt_cache()?) } else { None };
        self.run(Step {
            title,
            argv: vec![bash.display().to_string(), script.display().to_string(), self.root.display().to_string()],
            env,
            mode: Mode::Host,
            blame: if extra.is_empty() { Blame::Host } else { Blame::Input },
            capture: false,
        })?;
        if lock.is_some() {
            self.prune_apt_cache();
        }
        drop(lock);
        let config = ImageConfig {
            env: vec![format!("PATH={DEFAULT_PATH}")],
            working_dir: "/root".into(),
            cmd: vec![if recipe.name == "python" { "python3" } else { "/bin/sh" }.into()],
            ..Default::default()
        };
        self.finish(config)
    }

    fn build_on_tree(&mut self, base: &Path, base_config: &ImageConfig) -> Result<ImageConfig, ImageError> {
        let meta = std::fs::metadata(base).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ImageError::NotFound(format!("base tree {} is missing", base.display()))
            } else {
                ImageError::io(format!("base tree {}", base.display()), e)
            }
        })?;
        if !meta.is_dir() {
            return Err(ImageError::Invalid(format!("base tree {} is not a directory", base.display())));
        }
        find_tool("cp")?;
        self.run(Step {
            title: "copying the base tree".into(),
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                COPY_SCRIPT.into(),
                "sh".into(),
                base.display().to_string(),
                self.root.display().to_string(),
            ],
            env: host_env(),
            mode: Mode::Host,
            blame: Blame::Host,
            capture: false,
        })?;
        let mut config = base_config.clone();
        if config.working_dir.is_empty() {
            config.working_dir = "/root".into();
        }
        let mut apt = self.spec.apt.clone();
        if !apt.is_empty() || !self.spec.pip.is_empty() {
            let probe = self.probe(&config)?;
            if !self.spec.pip.is_empty() && !probe.pip {
                if !probe.dpkg {
                    return Err(ImageError::Precondition(if probe.python3 {
                        "the base image has python3 without pip, and no dpkg to install python3-pip: pip packages cannot be installed".into()
                    } else {
                        "the base image has no python3 (and no dpkg to install it): pip packages need python3".into()
                    }));
                }
                if !apt.iter().any(|p| p == "python3-pip" || p.starts_with("python3-pip=")) {
                    self.say(if probe.python3 {
                        "==> the base image has python3 but no pip: adding python3-pip to the Debian packages"
                    } else {
                        "==> the base image has no python3: adding python3-pip (which brings Debian's python3) to the Debian packages"
                    });
                    apt.push("python3-pip".into());
                }
            }
            if !apt.is_empty() {
                self.apt_install(&probe, &apt, &config)?;
            }
        }
        self.finish(config)
    }

    /// pip, then the run commands.
    fn finish(&mut self, config: ImageConfig) -> Result<ImageConfig, ImageError> {
        let spec = self.spec;
        if !spec.pip.is_empty() {
            let probe = self.probe(&config)?;
            if !probe.python3 {
                return Err(ImageError::Precondition(
                    "the image has no python3: pip packages need one (add --apt python3-pip, or build --from python)"
                        .into(),
                ));
            }
            if !probe.pip {
                return Err(ImageError::Precondition("python3 -m pip does not work in the image".into()));
            }
            let mut script = "exec python3 -m pip install --no-cache-dir".to_string();
            if probe.managed {
                script.push_str(" --break-system-packages");
            }
            script.push_str(" \"$@\"");
            let mut argv = vec!["/bin/sh".into(), "-c".into(), script, "sh".into()];
            argv.extend(spec.pip.iter().cloned());
            let mut env = net_env(&config);
            for (k, v) in [
                ("PIP_ROOT_USER_ACTION", "ignore"),
                ("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
                ("PIP_NO_INPUT", "1"),
                ("PIP_PROGRESS_BAR", "off"),
            ] {
                env.push((k.into(), v.into()));
            }
            let mode = self.network_jail(&config)?;
            self.run(Step {
                title: format!("pip install {}", spec.pip.join(" ")),
                argv,
                env,
                mode,
                blame: Blame::Input,
                capture: false,
            })?;
        }
        let n = spec.run.len();
        for (i, cmd) in spec.run.iter().enumerate() {
            let mode = self.network_jail(&config)?;
            self.run(Step {
                title: format!("run {}/{n}: {}", i + 1, shorten(cmd.lines().next().unwrap_or(""), 100)),
                argv: vec!["/bin/sh".into(), "-c".into(), cmd.clone()],
                env: net_env(&config),
                mode,
                blame: Blame::Input,
                capture: false,
            })?;
        }
        Ok(config)
    }

    fn probe(&mut self, config: &ImageConfig) -> Result<Probe, ImageError> {
        self.prepare_jail()?;
        let lines = self.run(Step {
            title: "looking at the image".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), PROBE_SCRIPT.into()],
            env: jail_env(config),
            mode: Mode::Jail(JailSpec { network: false, binds: vec![], cwd: "/".into() }),
            blame: Blame::Host,
            capture: true,
        })?;
        Ok(Probe::parse(&lines))
    }

    /// A jail with the host's network and DNS.
    fn network_jail(&mut self, config: &ImageConfig) -> Result<Mode, ImageError> {
        self.prepare_jail()?;
        if self.resolv.is_none() {
            self.resolv = Some(ResolvGuard::prepare(&self.root, &mut *self.log)?);
        }
        let mut binds = vec![];
        let host_resolv = Path::new("/etc/resolv.conf");
        if self.resolv.as_ref().is_some_and(|g| g.usable(&self.root)) && host_resolv.exists() {
            binds.push(BindSpec {
                src: host_resolv.into(),
                dst: "/etc/resolv.conf".into(),
                read_only: true,
                make: MountPoint::Existing,
            });
        }
        if Path::new(HOST_CA_BUNDLE).is_file() {
            binds.push(BindSpec {
                src: HOST_CA_BUNDLE.into(),
                dst: JAIL_CA.into(),
                read_only: true,
                make: MountPoint::File,
            });
        }
        Ok(Mode::Jail(JailSpec { network: true, binds, cwd: config.working_dir.clone() }))
    }

    /// The tree's /dev and /proc must be plain directories (mount points of
    /// the jail); they are created when missing. Checked before every jailed
    /// step, as an earlier one may have changed them.
    fn prepare_jail(&self) -> Result<(), ImageError> {
        for d in ["dev", "proc"] {
            ensure_plain_dir(&self.root, d)?;
        }
        Ok(())
    }

    /// Debian packages into a tree base: the host's apt resolves them against
    /// the tree's dpkg database and downloads them into the cache; the
    /// tree's dpkg installs them, jailed and offline.
    fn apt_install(&mut self, probe: &Probe, packages: &[String], config: &ImageConfig) -> Result<(), ImageError> {
        if !probe.dpkg {
            return Err(ImageError::Precondition(
                "the base image has no dpkg: --apt needs a Debian-based image (an image built --from minimal \
                 takes --apt packages only in the same build)"
                    .into(),
            ));
        }
        if probe.os_id != "debian" {
            return Err(ImageError::Precondition(format!(
                "--apt needs a Debian base image; its /etc/os-release says ID={:?}",
                probe.os_id
            )));
        }
        let codename = &probe.codename;
        if codename.is_empty() || codename.len() > 32 || !codename.bytes().all(|c| c.is_ascii_lowercase()) {
            return Err(ImageError::Precondition(format!(
                "--apt: the base image's /etc/os-release names no usable VERSION_CODENAME ({codename:?})"
            )));
        }
        let status = self.root.join("var/lib/dpkg/status");
        match std::fs::symlink_metadata(&status) {
            Ok(m) if m.is_file() => {}
            _ => {
                return Err(ImageError::Precondition(
                    "the base image has no /var/lib/dpkg/status (a plain file): its dpkg database is unusable".into(),
                ));
            }
        }
        let apt_get = find_tool("apt-get")?;
        let arch = host_arch()?;
        let dir = self.scratch.0.join("apt");
        for d in ["", "cache", "log", "empty"] {
            std::fs::create_dir_all(dir.join(d)).map_err(|e| ImageError::io("creating the apt scratch dir", e))?;
        }
        let debs_file = dir.join("debs");
        let debs_str = debs_file.display().to_string();
        if debs_str.contains('\'') {
            return Err(ImageError::Precondition(format!("cache path {debs_str} contains a quote")));
        }
        let archives = self.cache.join("apt/archives");
        let q = |p: &Path| apt_quote(&p.display().to_string());
        let conf = format!(
            "// Written by forkd's image build; nothing from the host's or the image's apt configuration applies.\n\
             Dir::Etc::Parts {empty};\n\
             Dir::Etc::main {main};\n\
             Dir::Etc::SourceList {sources};\n\
             Dir::Etc::SourceParts {empty};\n\
             Dir::Etc::Preferences {prefs};\n\
             Dir::Etc::PreferencesParts {empty};\n\
             Dir::Etc::Trusted \"/etc/apt/trusted.gpg\";\n\
             Dir::Etc::TrustedParts \"/etc/apt/trusted.gpg.d/\";\n\
             Dir::State::status {status};\n\
             Dir::State::Lists {lists};\n\
             Dir::State::extended_states {ext};\n\
             Dir::Cache {cachedir};\n\
             Dir::Cache::Archives {archives};\n\
             Dir::Log {logdir};\n\
             APT::Architecture \"{arch}\";\n\
             APT::Architectures {{ \"{arch}\"; }};\n\
             APT::Install-Recommends \"false\";\n\
             APT::Install-Suggests \"false\";\n\
             APT::Get::Assume-Yes \"true\";\n\
             Acquire::Languages \"none\";\n\
             Acquire::Retries \"3\";\n\
             pkgCacheGen::ForceEssential \",\";\n\
             Debug::NoLocking \"true\";\n\
             Dpkg::Use-Pty \"false\";\n\
             Debug::pkgDpkgPm \"true\";\n\
             Dpkg::Pre-Install-Pkgs {{ \"cat > '{debs_str}'\"; }};\n",
            empty = q(&dir.join("empty/")),
            main = q(&dir.join("empty/apt.conf")),
            sources = q(&dir.join("sources.list")),
            prefs = q(&dir.join("empty/preferences")),
            status = q(&status),
            lists = q(&self.cache.join("apt/lists/")),
            ext = q(&dir.join("extended_states")),
            cachedir = q(&dir.join("cache/")),
            archives = q(&archives),
            logdir = q(&dir.join("log/")),
        );
        let conf_path = dir.join("apt.conf");
        std::fs::write(&conf_path, conf).map_err(|e| ImageError::io("writing the apt configuration", e))?;
        std::fs::write(dir.join("sources.list"), format!("deb {} {codename} main\n", self.spec.mirror))
            .map_err(|e| ImageError::io("writing the apt sources", e))?;
        let mut env = host_env();
        with_proxy(&mut env);
        env.push(("APT_CONFIG".into(), conf_path.display().to_string()));
        env.push(("DEBIAN_FRONTEND".into(), "noninteractive".into()));
        let apt = apt_get.display().to_string();
        let lock = self.lock_apt_cache()?;
        self.run(Step {
            title: format!("apt-get update ({} {codename})", self.spec.mirror),
            argv: vec![apt.clone(), "-q".into(), "update".into()],
            env: env.clone(),
            mode: Mode::Plain,
            blame: Blame::Host,
            capture: false,
        })?;
        let mut argv = vec![apt, "-q".into(), "install".into()];
        argv.extend(packages.iter().cloned());
        self.run(Step {
            title: format!("apt-get install {} (resolve and download)", packages.join(" ")),
            argv,
            env,
            mode: Mode::Plain,
            blame: Blame::Input,
            capture: false,
        })?;
        let listed = std::fs::read_to_string(&debs_file).unwrap_or_default();
        let mut debs = vec![];
        for line in listed.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let p = Path::new(line);
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let ok = p.parent() == Some(archives.as_path())
                && name.ends_with(".deb")
                && name.bytes().all(|c| c.is_ascii_alphanumeric() || b"._+~%:-".contains(&c));
            if !ok {
                return Err(ImageError::Precondition(format!("apt listed an unexpected package file {line:?}")));
            }
            debs.push(format!("{JAIL_DEBS}/{name}"));
        }
        if debs.is_empty() {
            self.say("==> the Debian packages are all installed already");
            self.prune_apt_cache();
            return Ok(());
        }
        self.prepare_jail()?;
        let mut argv = vec![
            "/bin/sh".into(),
            "-c".into(),
            "dpkg --unpack --force-depends --force-confdef --force-confold \"$@\" && dpkg --configure -a --force-confdef --force-confold".into(),
            "sh".into(),
        ];
        argv.extend(debs.iter().cloned());
        let mut env = jail_env(config);
        env.push(("DEBIAN_FRONTEND".into(), "noninteractive".into()));
        env.push(("DEBCONF_NONINTERACTIVE_SEEN".into(), "true".into()));
        // dpkg reads the cache while it is locked, so no prune can take a
        // package away in between.
        self.run(Step {
            title: format!("dpkg: installing {} packages", debs.len()),
            argv,
            env,
            mode: Mode::Jail(JailSpec {
                network: false,
                binds: vec![BindSpec { src: archives, dst: JAIL_DEBS.into(), read_only: true, make: MountPoint::Dir }],
                cwd: "/".into(),
            }),
            blame: Blame::Input,
            capture: false,
        })?;
        self.prune_apt_cache();
        drop(lock);
        Ok(())
    }

    /// Exclusive use of the apt cache (waits for another build's, within
    /// the step timeout).
    fn lock_apt_cache(&mut self) -> Result<File, ImageError> {
        let path = self.cache.join("apt.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| ImageError::io(format!("opening {}", path.display()), e))?;
        let deadline = Instant::now() + self.spec.step_timeout;
        let mut said = false;
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(f);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(ImageError::io(format!("locking {}", path.display()), e));
            }
            if Instant::now() >= deadline {
                return Err(ImageError::Unavailable("the apt cache stayed busy with another build".into()));
            }
            if !said {
                self.say("==> waiting for the apt cache (another build is using it)");
                said = true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn prune_apt_cache(&mut self) {
        let removed = prune_dir(&self.cache.join("apt/archives"), APT_CACHE_MAX_BYTES);
        if removed > 0 {
            self.say(&format!("==> apt cache: removed {removed} least recently used packages"));
        }
    }

    /// Runs one step to its end: output lines go to the log (or are
    /// returned, with `capture`), a non-zero exit or the timeout is an
    /// error carrying the last lines.
    fn run(&mut self, step: Step) -> Result<Vec<String>, ImageError> {
        if !step.capture {
            self.say(&format!("==> {}", step.title));
        }
        let started = Instant::now();
        let timeout = self.spec.step_timeout;
        let outcome = run_process(&step, &self.root, timeout, &mut |line| {
            if !step.capture {
                (self.log)(line)
            }
        })?;
        let secs = started.elapsed().as_secs_f64();
        if outcome.timed_out {
            return Err(ImageError::Unavailable(format!(
                "{}: still running after {}s and killed; last output:\n{}",
                step.title,
                timeout.as_secs(),
                outcome.tail.join("\n")
            )));
        }
        if outcome.code != 0 {
            let tail = outcome.tail.join("\n");
            let what = if outcome.code == SETUP_FAILED && tail.contains("forkd-build:") {
                format!("{}: the build sandbox could not be set up", step.title)
            } else if outcome.code > 128 {
                format!("{}: killed by signal {}", step.title, outcome.code - 128)
            } else {
                format!("{}: exit code {}", step.title, outcome.code)
            };
            let msg = format!("{what} after {secs:.1}s; last output:\n{tail}");
            return Err(if outcome.code == SETUP_FAILED && tail.contains("forkd-build:") {
                ImageError::Precondition(msg)
            } else if looks_like_network_trouble(&tail) {
                ImageError::Unavailable(msg)
            } else if step.blame == Blame::Input {
                ImageError::Invalid(msg)
            } else {
                ImageError::Precondition(msg)
            });
        }
        if !step.capture && secs >= 1.0 {
            self.say(&format!("==> {} ({secs:.1}s)", step.title));
        }
        Ok(outcome.lines)
    }
}

fn looks_like_network_trouble(tail: &str) -> bool {
    [
        "Temporary failure resolving",
        "Temporary failure in name resolution",
        "Could not resolve",
        "Name or service not known",
        "Network is unreachable",
        "Connection timed out",
        "Connection refused",
        "NewConnectionError",
        "Max retries exceeded",
        "Failed to fetch",
    ]
    .iter()
    .any(|s| tail.contains(s))
}

/// An apt configuration string value.
fn apt_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', ""))
}

fn host_env() -> Vec<(String, String)> {
    vec![("PATH".into(), DEFAULT_PATH.into()), ("HOME".into(), "/root".into()), ("LC_ALL".into(), "C.UTF-8".into())]
}

/// The image's environment with defaults for what it does not set.
fn jail_env(config: &ImageConfig) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![];
    for e in &config.env {
        if let Some((k, v)) = e.split_once('=')
            && !k.is_empty()
            && !k.contains('\0')
            && !v.contains('\0')
        {
            env.retain(|(ek, _)| ek != k);
            env.push((k.into(), v.into()));
        }
    }
    for (k, v) in [("PATH", DEFAULT_PATH), ("HOME", "/root"), ("LANG", "C.UTF-8"), ("TERM", "dumb")] {
        if !env.iter().any(|(ek, _)| ek == k) {
            env.push((k.into(), v.into()));
        }
    }
    env
}

/// `jail_env` plus what the steps with network need: the host's CA bundle
/// (unless the image names its own) and the caller's proxy settings.
fn net_env(config: &ImageConfig) -> Vec<(String, String)> {
    let mut env = jail_env(config);
    if Path::new(HOST_CA_BUNDLE).is_file() {
        for k in CA_VARS {
            if !env.iter().any(|(ek, _)| ek == k) {
                env.push((k.to_string(), JAIL_CA.into()));
            }
        }
    }
    with_proxy(&mut env);
    env
}

fn with_proxy(env: &mut Vec<(String, String)>) {
    for k in PROXY_VARS {
        if let Ok(v) = std::env::var(k)
            && !env.iter().any(|(ek, _)| ek == k)
        {
            env.push((k.to_string(), v));
        }
    }
}

fn find_tool(name: &str) -> Result<PathBuf, ImageError> {
    for dir in DEFAULT_PATH.split(':') {
        let p = Path::new(dir).join(name);
        if let Ok(m) = std::fs::metadata(&p)
            && m.is_file()
            && m.mode() & 0o111 != 0
        {
            return Ok(p);
        }
    }
    Err(ImageError::Precondition(format!("{name} is not installed on the host (run scripts/setup-host.sh)")))
}

fn host_arch() -> Result<String, ImageError> {
    let out = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .map_err(|e| ImageError::Precondition(format!("dpkg --print-architecture: {e}")))?;
    let arch = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || arch.is_empty() || !arch.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
        return Err(ImageError::Precondition("dpkg --print-architecture failed".into()));
    }
    Ok(arch)
}

/// `root/rel` as a directory, every component a real directory (not a
/// symlink); missing ones are created.
fn ensure_plain_dir(root: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let mut p = root.to_path_buf();
    for c in rel.split('/').filter(|c| !c.is_empty()) {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ImageError::Invalid(format!(
                    "the image's /{rel} is not a plain directory (/{} is a symlink or a file)",
                    p.strip_prefix(root).unwrap_or(&p).display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&p)
                    .map_err(|e| ImageError::io(format!("creating {}", p.display()), e))?;
            }
            Err(e) => return Err(ImageError::io(format!("looking at {}", p.display()), e)),
        }
    }
    Ok(p)
}

/// Makes the tree's /etc/resolv.conf a plain file the host's can be bound
/// over for the steps with network, and puts back what was there when
/// dropped: a file created for the purpose is removed, a symlink moved
/// aside is moved back. The tree is never written through a symlink.
struct ResolvGuard {
    etc: PathBuf,
    undo: ResolvUndo,
}

#[derive(PartialEq)]
enum ResolvUndo {
    Nothing,
    Remove,
    MoveBack,
    /// No DNS for the steps (an /etc that is not a directory, a
    /// resolv.conf that is one).
    Unusable,
}

const RESOLV_ASIDE: &str = ".resolv.conf.forkd-build";

impl ResolvGuard {
    fn prepare(root: &Path, log: &mut dyn FnMut(&str)) -> Result<ResolvGuard, ImageError> {
        let etc = root.join("etc");
        let mut g = ResolvGuard { etc: etc.clone(), undo: ResolvUndo::Unusable };
        if !std::fs::symlink_metadata(&etc).is_ok_and(|m| m.is_dir()) {
            log("==> warning: the image has no /etc directory: no DNS for pip and run steps");
            return Ok(g);
        }
        let file = etc.join("resolv.conf");
        let create = |f: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW)
                .open(f)
                .map(drop)
                .map_err(|e| ImageError::io(format!("creating {}", f.display()), e))
        };
        match std::fs::symlink_metadata(&file) {
            Ok(m) if m.is_file() => g.undo = ResolvUndo::Nothing,
            Ok(m) if m.file_type().is_symlink() => {
                let aside = etc.join(RESOLV_ASIDE);
                if std::fs::symlink_metadata(&aside).is_ok() {
                    log("==> warning: /etc/resolv.conf is a symlink and /etc/.resolv.conf.forkd-build exists: no DNS");
                    return Ok(g);
                }
                std::fs::rename(&file, &aside).map_err(|e| ImageError::io("moving /etc/resolv.conf aside", e))?;
                g.undo = ResolvUndo::MoveBack;
                create(&file)?;
            }
            Ok(_) => log("==> warning: the image's /etc/resolv.conf is not a file: no DNS for pip and run steps"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create(&file)?;
                g.undo = ResolvUndo::Remove;
            }
            Err(e) => return Err(ImageError::io("looking at /etc/resolv.conf", e)),
        }
        Ok(g)
    }

    /// Whether the host's file can be bound over the tree's (checked again
    /// before each step: an earlier step may have replaced /etc).
    fn usable(&self, root: &Path) -> bool {
        self.undo != ResolvUndo::Unusable && self.plain(root)
    }

    fn plain(&self, root: &Path) -> bool {
        let etc_ok = std::fs::symlink_metadata(&self.etc).is_ok_and(|m| m.is_dir())
            && std::fs::symlink_metadata(root).is_ok_and(|m| m.is_dir());
        etc_ok && std::fs::symlink_metadata(self.etc.join("resolv.conf")).is_ok_and(|m| m.is_file())
    }
}

impl Drop for ResolvGuard {
    fn drop(&mut self) {
        // Nothing runs in the tree any more; still, never follow a symlink
        // that a step may have left in place of /etc.
        if !std::fs::symlink_metadata(&self.etc).is_ok_and(|m| m.is_dir()) {
            return;
        }
        let file = self.etc.join("resolv.conf");
        let is_file = std::fs::symlink_metadata(&file).is_ok_and(|m| m.is_file());
        match self.undo {
            ResolvUndo::Remove if is_file => {
                let _ = std::fs::remove_file(&file);
            }
            ResolvUndo::MoveBack => {
                if is_file {
                    let _ = std::fs::remove_file(&file);
                }
                let _ = std::fs::rename(self.etc.join(RESOLV_ASIDE), &file);
            }
            _ => {}
        }
    }
}

/// Removes the least recently used files of `dir` (atime, then mtime)
/// until it holds at most three quarters of `max_bytes`, if it holds more
/// than `max_bytes`. Returns how many went.
fn prune_dir(dir: &Path, max_bytes: u64) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    let mut files: Vec<(i64, i64, u64, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            m.is_file().then(|| (m.atime(), m.mtime(), m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.2).sum();
    if total <= max_bytes {
        return 0;
    }
    files.sort();
    let target = max_bytes / 4 * 3;
    let mut removed = 0;
    for (_, _, len, path) in files {
        if total <= target {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total = total.saturating_sub(len);
            removed += 1;
        }
    }
    removed
}

// ---- running a step ---------------------------------------------------------

struct Outcome {
    /// Exit code; 128 + signal when killed.
    code: i32,
    timed_out: bool,
    /// The last `TAIL_LINES` lines.
    tail: Vec<String>,
    /// Every line (at most 10000), when captured.
    lines: Vec<String>,
}

/// Spawns the step, streams its output to `on_line`, enforces `timeout`
/// and reaps it. With a namespaced mode the whole process tree goes when
/// the step ends or is killed.
fn run_process(
    step: &Step,
    root: &Path,
    timeout: Duration,
    on_line: &mut dyn FnMut(&str),
) -> Result<Outcome, ImageError> {
    let (reader, writer) = io::pipe().map_err(|e| ImageError::io("creating a pipe", e))?;
    let mut cmd = Command::new(&step.argv[0]);
    cmd.args(&step.argv[1..])
        .env_clear()
        .envs(step.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(writer.try_clone().map_err(|e| ImageError::io("creating a pipe", e))?)
        .stderr(writer)
        .process_group(0);
    match &step.mode {
        Mode::Plain => {
            cmd.current_dir("/");
        }
        Mode::Host => {
            let plan = NsPlan::new(None, true)?;
            // SAFETY: NsPlan::enter only makes raw system calls on data
            // prepared here (see its comment).
            unsafe { cmd.pre_exec(move || plan.enter()) };
        }
        Mode::Jail(j) => {
            let plan = NsPlan::new(Some(JailPlan::new(root, j)?), j.network)?;
            // SAFETY: as above.
            unsafe { cmd.pre_exec(move || plan.enter()) };
        }
    }
    let spawned = cmd.spawn();
    // The Command holds the pipe's write ends: without dropping it the
    // reader never sees the end.
    drop(cmd);
    let mut child = spawned.map_err(|e| {
        let what = match &step.mode {
            Mode::Jail(_) => format!("{}: cannot start {} in the image: {e}", step.title, step.argv[0]),
            _ => format!("{}: cannot start {}: {e}", step.title, step.argv[0]),
        };
        ImageError::Precondition(what)
    })?;
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::Builder::new()
        .name("image-build-output".into())
        .spawn(move || read_lines(reader, &tx))
        .map_err(|e| ImageError::io("starting the output reader", e))?;
    let deadline = Instant::now() + timeout;
    let mut tail = std::collections::VecDeque::with_capacity(TAIL_LINES);
    let mut lines = vec![];
    let mut take = |line: String, on_line: &mut dyn FnMut(&str)| {
        on_line(&line);
        if step.capture && lines.len() < 10_000 {
            lines.push(line.clone());
        }
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    };
    let mut eof = false;
    let mut exited_at: Option<Instant> = None;
    let mut timed_out = false;
    loop {
        if eof {
            std::thread::sleep(Duration::from_millis(20));
        } else {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => take(line, on_line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => eof = true,
            }
        }
        if exited_at.is_none() && exited_unreaped(pid) {
            exited_at = Some(Instant::now());
        }
        // Output may trail the exit a little; a descendant that keeps the
        // pipe open (only possible in Plain mode) is not waited for long.
        if let Some(t) = exited_at
            && (eof || t.elapsed() > Duration::from_secs(2))
        {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
    }
    // The group leader is unreaped still, so its pid (the group's id) cannot
    // have been reused: whatever is left of the group goes.
    // SAFETY: plain kill(2).
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let _ = child.kill();
    let status = child.wait().map_err(|e| ImageError::io("waiting for a build step", e))?;
    while let Ok(line) = rx.try_recv() {
        take(line, on_line);
    }
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(Outcome { code, timed_out, tail: tail.into(), lines })
}

/// Whether `pid` has exited, leaving it to be reaped.
fn exited_unreaped(pid: libc::pid_t) -> bool {
    // SAFETY: waitid with WNOWAIT only looks; siginfo_t is plain data.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT);
        rc == 0 && info.si_pid() != 0
    }
}

/// Splits the output into lines (on `\n` or `\r`, at most `MAX_LINE`
/// bytes), lossily decoded.
fn read_lines(reader: impl Read, tx: &mpsc::Sender<String>) {
    let mut r = BufReader::new(reader);
    let mut buf: Vec<u8> = vec![];
    loop {
        let chunk = match r.fill_buf() {
            Ok([]) => break,
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let n = chunk.len();
        for &b in chunk {
            if b == b'\n' || b == b'\r' {
                if !buf.is_empty() && tx.send(String::from_utf8_lossy(&buf).into_owned()).is_err() {
                    return;
                }
                buf.clear();
            } else {
                buf.push(b);
                if buf.len() >= MAX_LINE {
                    if tx.send(String::from_utf8_lossy(&buf).into_owned()).is_err() {
                        return;
                    }
                    buf.clear();
                }
            }
        }
        r.consume(n);
    }
    if !buf.is_empty() {
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    }
}

// ---- namespaces and the jail ------------------------------------------------
//
// Between fork and exec in a multi-threaded process nothing may allocate:
// everything below that runs in the child uses data prepared by `new` and
// raw system calls only. The child of `Command` (I) forks U, writes U's
// uid and gid maps once U has its own user namespace (the map needs a
// process outside it), and waits. U creates the other namespaces and forks
// G, the first process of the new PID namespace, and waits. G sets up the
// mounts (and the jail) and returns, so that `Command` execs the program.
// I and U close every inherited descriptor; each dies with its parent
// (PDEATHSIG), and when G dies the kernel kills the rest of its namespace.

/// Capabilities a jailed step keeps in its bounding set: owning files,
/// setuid/setgid, signals, binding low ports, chroot (harmless without the
/// host's file system in the namespace), mknod (which a user namespace
/// refuses for devices anyway), audit writes, file capabilities.
const JAIL_KEEP_CAPS: &[u32] = &[0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 27, 29, 31];
const LAST_CAP: u32 = 63;
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

struct NsPlan {
    /// unshare(2) flags for U, after the user namespace.
    flags: libc::c_int,
    jail: Option<JailPlan>,
}

struct JailPlan {
    root: CString,
    root_dev: CString,
    root_proc: CString,
    /// (host node, mount point in the tree's /dev tmpfs)
    devices: Vec<(CString, CString)>,
    dev_dirs: Vec<CString>,
    /// (target, link)
    dev_links: Vec<(CString, CString)>,
    /// Read-only re-binds inside the step's /proc.
    proc_ro: Vec<CString>,
    binds: Vec<JailBind>,
    cwd: CString,
}

struct JailBind {
    src: CString,
    dst: CString,
    read_only: bool,
    make: MountPoint,
}

fn cstring(s: impl AsRef<[u8]>) -> Result<CString, ImageError> {
    CString::new(s.as_ref().to_vec()).map_err(|_| ImageError::Invalid("a path or argument contains a NUL byte".into()))
}

fn in_root(root: &Path, abs: &str) -> Result<CString, ImageError> {
    cstring(root.join(abs.trim_start_matches('/')).as_os_str().as_bytes())
}

impl NsPlan {
    fn new(jail: Option<JailPlan>, network: bool) -> Result<NsPlan, ImageError> {
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if !network {
            flags |= libc::CLONE_NEWNET;
        }
        Ok(NsPlan { flags, jail })
    }
}

impl JailPlan {
    fn new(root: &Path, spec: &JailSpec) -> Result<JailPlan, ImageError> {
        let mut devices = vec![];
        for name in ["null", "zero", "full", "random", "urandom", "tty"] {
            let host = format!("/dev/{name}");
            if std::fs::metadata(&host).is_ok_and(|m| m.file_type().is_char_device()) {
                devices.push((cstring(&host)?, in_root(root, &host)?));
            }
        }
        let mut dev_links = vec![(cstring("pts/ptmx")?, in_root(root, "/dev/ptmx")?)];
        dev_links.push((cstring("/proc/self/fd")?, in_root(root, "/dev/fd")?));
        for (i, n) in ["stdin", "stdout", "stderr"].into_iter().enumerate() {
            dev_links.push((cstring(format!("/proc/self/fd/{i}"))?, in_root(root, &format!("/dev/{n}"))?));
        }
        let mut binds = vec![];
        for b in &spec.binds {
            binds.push(JailBind {
                src: cstring(b.src.as_os_str().as_bytes())?,
                dst: in_root(root, &b.dst)?,
                read_only: b.read_only,
                make: b.make,
            });
        }
        Ok(JailPlan {
            root: cstring(root.as_os_str().as_bytes())?,
            root_dev: in_root(root, "/dev")?,
            root_proc: in_root(root, "/proc")?,
            devices,
            dev_dirs: vec![in_root(root, "/dev/pts")?, in_root(root, "/dev/shm")?],
            dev_links,
            proc_ro: ["sys", "sysrq-trigger", "irq", "bus", "fs"]
                .into_iter()
                .map(|p| in_root(root, &format!("/proc/{p}")))
                .collect::<Result<_, _>>()?,
            binds,
            cwd: cstring(if spec.cwd.is_empty() { "/" } else { &spec.cwd })?,
        })
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes `parts` to stderr (the step's output). Async-signal-safe.
fn say_raw(parts: &[&[u8]]) {
    for p in parts {
        // SAFETY: write(2) of a live buffer.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
}

/// Formats `n` into `buf` without allocating; returns the digits.
fn fmt_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Reports a failed setup call with its errno and exits with SETUP_FAILED.
fn die(what: &str) -> ! {
    let e = errno();
    let mut buf = [0u8; 20];
    say_raw(&[b"forkd-build: ", what.as_bytes(), b" failed: errno ", fmt_u64(e as u64, &mut buf), b"\n"]);
    // SAFETY: _exit never returns and runs no atexit handlers.
    unsafe { libc::_exit(SETUP_FAILED) }
}

fn ok_or_die(rc: libc::c_int, what: &str) {
    if rc < 0 {
        die(what);
    }
}

/// Closes every descriptor from 3 up except `keep`.
fn close_fds_except(keep: &mut [libc::c_int]) {
    keep.sort_unstable();
    let mut from: libc::c_uint = 3;
    for &k in keep.iter() {
        let k = k as libc::c_uint;
        if k >= from {
            if k > from {
                // SAFETY: close_range on our own descriptor table.
                unsafe { libc::syscall(libc::SYS_close_range, from, k - 1, 0) };
            }
            from = k + 1;
        }
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, libc::c_uint::MAX, 0) };
}

/// Waits for `pid` and exits with its status (128 + signal when killed).
fn wait_and_exit(pid: libc::pid_t) -> ! {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        if rc < 0 && errno() != libc::EINTR {
            // SAFETY: _exit.
            unsafe { libc::_exit(SETUP_FAILED) }
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        SETUP_FAILED
    };
    // SAFETY: _exit.
    unsafe { libc::_exit(code) }
}

fn read_byte(fd: libc::c_int) -> Option<u8> {
    let mut b = 0u8;
    loop {
        // SAFETY: read(2) into a live byte.
        let n = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        if n == 1 {
            return Some(b);
        }
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        return None;
    }
}

fn write_byte(fd: libc::c_int, b: u8) -> bool {
    // SAFETY: write(2) of a live byte.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) == 1 }
}

/// Writes the identity map "0 0 4294967295" to /proc/<pid>/<file>.
fn write_id_map(pid: libc::pid_t, file: &[u8]) -> bool {
    let mut path = [0u8; 64];
    let mut n = 0;
    let mut digits = [0u8; 20];
    for part in [b"/proc/".as_slice(), fmt_u64(pid as u64, &mut digits), b"/", file, b"\0"] {
        if n + part.len() > path.len() {
            return false;
        }
        path[n..n + part.len()].copy_from_slice(part);
        n += part.len();
    }
    let map = b"0 0 4294967295\n";
    // SAFETY: open/write/close of a NUL-terminated path we built.
    unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let ok = libc::write(fd, map.as_ptr().cast(), map.len()) == map.len() as isize;
        libc::close(fd);
        ok
    }
}

fn mount(src: Option<&CStr>, dst: &CStr, fstype: Option<&CStr>, flags: libc::c_ulong, data: Option<&CStr>) -> i32 {
    let p = |c: Option<&CStr>| c.map(|c| c.as_ptr()).unwrap_or(std::ptr::null());
    // SAFETY: mount(2) with NUL-terminated strings or nulls.
    unsafe { libc::mount(p(src), dst.as_ptr(), p(fstype), flags, p(data).cast()) }
}

/// `struct statfs` as 64-bit Linux lays it out (libc's hides `f_flags`).
#[repr(C)]
#[derive(Default)]
struct KernelStatfs {
    f_type: i64,
    f_bsize: i64,
    f_blocks: u64,
    f_bfree: u64,
    f_bavail: u64,
    f_files: u64,
    f_ffree: u64,
    f_fsid: [i32; 2],
    f_namelen: i64,
    f_frsize: i64,
    f_flags: i64,
    f_spare: [i64; 4],
}

/// Remounts the bind mount at `dst` read-only, keeping the flags it has
/// (those of a mount from a more privileged namespace are locked).
fn remount_read_only(dst: &CStr) -> i32 {
    let mut st = KernelStatfs::default();
    // SAFETY: statfs(2) into a struct of the kernel's 64-bit layout.
    if unsafe { libc::syscall(libc::SYS_statfs, dst.as_ptr(), &mut st as *mut KernelStatfs) } < 0 {
        return -1;
    }
    let f = st.f_flags as libc::c_ulong;
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
    flags |= f & (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOATIME | libc::MS_NODIRATIME);
    // statfs reports relatime as ST_RELATIME (4096).
    if f & 4096 != 0 {
        flags |= libc::MS_RELATIME;
    }
    mount(None, dst, None, flags, None)
}

impl NsPlan {
    /// Runs in the child of `Command`; see the comment above. Returns only
    /// in G, the process that execs.
    fn enter(&self) -> io::Result<()> {
        // SAFETY (whole function): raw system calls on prepared data.
        unsafe {
            for sig in 1..=libc::SIGRTMAX() {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            let mut up = [0; 2];
            let mut down = [0; 2];
            if libc::pipe2(up.as_mut_ptr(), libc::O_CLOEXEC) < 0 || libc::pipe2(down.as_mut_ptr(), libc::O_CLOEXEC) < 0
            {
                return Err(io::Error::last_os_error());
            }
            let u = libc::fork();
            if u < 0 {
                return Err(io::Error::last_os_error());
            }
            if u > 0 {
                // I: maps root into U's user namespace.
                libc::close(up[1]);
                libc::close(down[0]);
                close_fds_except(&mut [up[0], down[1]]);
                if read_byte(up[0]) != Some(b'u') {
                    wait_and_exit(u);
                }
                if !write_id_map(u, b"uid_map") || !write_id_map(u, b"gid_map") {
                    let mut buf = [0u8; 20];
                    say_raw(&[
                        b"forkd-build: mapping root into the build's user namespace failed: errno ",
                        fmt_u64(errno() as u64, &mut buf),
                        b" (the caller needs CAP_SETUID, CAP_SETGID and CAP_SETFCAP)\n",
                    ]);
                    libc::kill(u, libc::SIGKILL);
                    wait_and_exit(u);
                }
                write_byte(down[1], b'm');
                libc::close(up[0]);
                libc::close(down[1]);
                wait_and_exit(u);
            }
            // U
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            libc::close(up[0]);
            libc::close(down[1]);
            ok_or_die(libc::unshare(libc::CLONE_NEWUSER), "unshare(CLONE_NEWUSER)");
            write_byte(up[1], b'u');
            if read_byte(down[0]) != Some(b'm') {
                libc::_exit(SETUP_FAILED);
            }
            libc::close(up[1]);
            libc::close(down[0]);
            ok_or_die(libc::unshare(self.flags), "unshare(mount, pid, uts, ipc namespaces)");
            let g = libc::fork();
            if g < 0 {
                die("fork");
            }
            if g > 0 {
                close_fds_except(&mut []);
                wait_and_exit(g);
            }
            // G: the first process of the new PID namespace.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            ok_or_die(mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None), "making mounts private");
            let host = b"forkd";
            libc::sethostname(host.as_ptr().cast(), host.len());
            if let Some(j) = &self.jail {
                j.enter();
            }
            libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC);
            Ok(())
        }
    }
}

impl JailPlan {
    /// In G: builds the jail in the tree and moves into it.
    fn enter(&self) {
        // SAFETY (whole function): raw system calls on prepared data.
        unsafe {
            libc::umask(0o022);
            ok_or_die(
                mount(Some(&self.root), &self.root, None, libc::MS_BIND | libc::MS_REC, None),
                "binding the tree",
            );
            ok_or_die(
                mount(
                    Some(c"tmpfs"),
                    &self.root_dev,
                    Some(c"tmpfs"),
                    libc::MS_NOSUID | libc::MS_NOEXEC,
                    Some(c"mode=0755,size=4m"),
                ),
                "mounting /dev",
            );
            for (host, dst) in &self.devices {
                let fd = libc::open(dst.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                ok_or_die(fd, "creating a /dev node");
                libc::close(fd);
                ok_or_die(mount(Some(host), dst, None, libc::MS_BIND, None), "binding a /dev node");
            }
            for d in &self.dev_dirs {
                ok_or_die(libc::mkdir(d.as_ptr(), 0o755), "creating /dev/pts or /dev/shm");
            }
            for (target, link) in &self.dev_links {
                ok_or_die(libc::symlink(target.as_ptr(), link.as_ptr()), "creating a /dev link");
            }
            ok_or_die(
                mount(
                    Some(c"proc"),
                    &self.root_proc,
                    Some(c"proc"),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    None,
                ),
                "mounting /proc",
            );
            for p in &self.proc_ro {
                if mount(Some(p), p, None, libc::MS_BIND, None) < 0 {
                    if errno() == libc::ENOENT {
                        continue;
                    }
                    die("binding a /proc entry read-only");
                }
                ok_or_die(remount_read_only(p), "making a /proc entry read-only");
            }
            for b in &self.binds {
                match b.make {
                    MountPoint::Existing => {}
                    MountPoint::Dir => ok_or_die(libc::mkdir(b.dst.as_ptr(), 0o755), "creating a bind mount point"),
                    MountPoint::File => {
                        let fd = libc::open(b.dst.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                        ok_or_die(fd, "creating a bind mount point");
                        libc::close(fd);
                    }
                }
                ok_or_die(mount(Some(&b.src), &b.dst, None, libc::MS_BIND | libc::MS_REC, None), "binding a host path");
                if b.read_only {
                    ok_or_die(remount_read_only(&b.dst), "making a bind mount read-only");
                }
            }
            ok_or_die(libc::chdir(self.root.as_ptr()), "entering the tree");
            ok_or_die(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
                "pivot_root into the tree",
            );
            ok_or_die(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), "detaching the host's file system");
            ok_or_die(libc::chdir(c"/".as_ptr()), "chdir /");
            // Best effort: a pty and POSIX shared memory for tools that want them.
            mount(
                Some(c"devpts"),
                c"/dev/pts",
                Some(c"devpts"),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                Some(c"newinstance,ptmxmode=0666,mode=0620"),
            );
            mount(
                Some(c"tmpfs"),
                c"/dev/shm",
                Some(c"tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV,
                Some(c"mode=1777,size=64m"),
            );
            if libc::chdir(self.cwd.as_ptr()) < 0 {
                libc::chdir(c"/".as_ptr());
            }
            for cap in 0..=LAST_CAP {
                if !JAIL_KEEP_CAPS.contains(&cap) {
                    // EINVAL for capabilities this kernel does not know.
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0 && errno() != libc::EINVAL
                    {
                        die("dropping capabilities");
                    }
                }
            }
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0);
            ok_or_die(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0), "no_new_privs");
        }
    }
}

#[cfg(test)]
mod tests;
