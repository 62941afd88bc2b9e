//! The `forkd.*` parameters on the kernel command line.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// Block device holding the (read-only) root image.
    pub root: String,
    pub rootfstype: String,
    /// "python", "" for no warm runtime, or "auto" (python when the image
    /// has python3; resolved once the root is mounted).
    pub runtime: String,
    /// Modules the runtime imports before it reports ready.
    pub warm: Vec<String>,
    pub hostname: String,
    /// virtio-serial port name the agent serves on.
    pub port: String,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            root: "/dev/vda".into(),
            rootfstype: "ext4".into(),
            runtime: String::new(),
            warm: Vec::new(),
            hostname: "forkd".into(),
            port: forkd_agent_protocol::PORT_NAME.into(),
        }
    }
}

/// Splits a kernel command line into words; double quotes group spaces, as
/// the kernel's own parser does (`key="a b"`).
fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

pub fn parse(cmdline: &str) -> BootConfig {
    let mut cfg = BootConfig::default();
    for word in words(cmdline) {
        let Some((key, value)) = word.split_once('=') else { continue };
        let value = value.trim();
        match key {
            "forkd.root" if !value.is_empty() => cfg.root = value.into(),
            "forkd.rootfstype" if !value.is_empty() => cfg.rootfstype = value.into(),
            "forkd.runtime" => {
                cfg.runtime = match value {
                    "none" | "" => String::new(),
                    other => other.into(),
                }
            }
            "forkd.warm" => {
                cfg.warm = value.split(',').map(str::trim).filter(|m| is_module_name(m)).map(String::from).collect()
            }
            "forkd.hostname" if !value.is_empty() => cfg.hostname = value.into(),
            "forkd.port" if !value.is_empty() => cfg.port = value.into(),
            _ => {}
        }
    }
    cfg
}

/// A dotted Python module path; anything else is dropped rather than handed
/// to the interpreter.
fn is_module_name(m: &str) -> bool {
    !m.is_empty()
        && m.split('.').all(|part| {
            let mut chars = part.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_absent() {
        let c = parse("console=ttyS0 quiet tsc=reliable");
        assert_eq!(c, BootConfig::default());
        assert_eq!(c.root, "/dev/vda");
        assert_eq!(c.rootfstype, "ext4");
        assert_eq!(c.runtime, "");
    }

    #[test]
    fn reads_forkd_keys() {
        let c = parse(
            "console=ttyS0 forkd.root=/dev/vdb forkd.rootfstype=erofs forkd.runtime=python \
             forkd.warm=numpy,os.path forkd.hostname=box\n",
        );
        assert_eq!(c.root, "/dev/vdb");
        assert_eq!(c.rootfstype, "erofs");
        assert_eq!(c.runtime, "python");
        assert_eq!(c.warm, vec!["numpy", "os.path"]);
        assert_eq!(c.hostname, "box");
    }

    #[test]
    fn runtime_none_and_bad_modules() {
        let c = parse("forkd.runtime=none forkd.warm=numpy,,1bad,os;rm,ok_2");
        assert_eq!(c.runtime, "");
        assert_eq!(c.warm, vec!["numpy", "ok_2"]);
    }

    #[test]
    fn quotes_and_empty_values() {
        let c = parse("forkd.hostname=\"my box\" forkd.root= forkd.warm=");
        assert_eq!(c.hostname, "my box");
        assert_eq!(c.root, "/dev/vda");
        assert!(c.warm.is_empty());
        assert_eq!(words("a \"b c\" d=\"\""), vec!["a", "b c", "d="]);
    }
}
