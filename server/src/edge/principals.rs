//! `--tokens-file`: which token is which principal. TOML or JSON (chosen
//! by the file's extension, `.json` for JSON), readable by its owner only:
//!
//! ```toml
//! [[tokens]]
//! name = "ci"            # [a-z0-9][a-z0-9_-]{0,63}
//! role = "tenant"        # or "admin"
//! token = "…"            # ≥ 16 bytes, not a placeholder
//! max_sandboxes = 8      # optional quota
//! max_memory_mib = 4096  # optional quota (sum of memory limits)
//! ```
//!
//! The daemon's own token file (`--token-file` or `<data-dir>/token`) stays
//! the `admin` principal, so the host's administrator keeps working.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::auth::Token;
use super::token_file::{TokenFileError, check_mode};
use crate::core::tenants::{Principal, PrincipalName, Quota, Role};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tokens: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    role: Role,
    token: String,
    #[serde(default)]
    max_sandboxes: Option<u32>,
    #[serde(default)]
    max_memory_mib: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PrincipalsError {
    #[error(transparent)]
    File(#[from] TokenFileError),
    #[error("tokens file {path}: {msg}")]
    Invalid { path: String, msg: String },
}

/// Tokens and the principals they stand for.
#[derive(Clone, Default)]
pub struct Principals {
    entries: Vec<(Token, Arc<Principal>)>,
}

impl Principals {
    /// Only the daemon's own token, as the admin.
    pub fn admin_only(token: Token) -> Self {
        Principals { entries: vec![(token, Arc::new(Principal::admin()))] }
    }

    /// The principal a presented token stands for. Every entry is compared
    /// (in constant time each), so timing tells nothing about which matched.
    pub fn find(&self, presented: &str) -> Option<Arc<Principal>> {
        let mut found = None;
        for (t, p) in &self.entries {
            if t.matches(presented) && found.is_none() {
                found = Some(p.clone());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds the entries of a tokens file.
    pub fn load(mut self, path: &Path) -> Result<Self, PrincipalsError> {
        let shown = path.display().to_string();
        let invalid = |msg: String| PrincipalsError::Invalid { path: shown.clone(), msg };
        let io = |source| TokenFileError::Io { path: shown.clone(), source };
        let meta = std::fs::metadata(path).map_err(io)?;
        check_mode(path, meta.permissions().mode())?;
        let text = std::fs::read_to_string(path).map_err(io)?;
        let file: File = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| invalid(e.to_string()))?
        };
        if file.tokens.is_empty() {
            return Err(invalid("no [[tokens]] entries".into()));
        }
        for (i, e) in file.tokens.into_iter().enumerate() {
            let at = |msg: String| invalid(format!("entry {} ({:?}): {msg}", i + 1, e.name));
            let name = PrincipalName::parse(&e.name).map_err(|err| at(err.to_string()))?;
            let token = Token::parse(&e.token).map_err(|err| at(err.to_string()))?;
            if self.find(e.token.trim()).is_some() {
                return Err(at("this token is already given to another entry (or is the daemon's own)".into()));
            }
            if let Some((_, other)) = self.entries.iter().find(|(_, p)| p.name == name && p.role != e.role) {
                return Err(at(format!("{} is already named with role {:?}", other.name, other.role)));
            }
            if e.role == Role::Admin && (e.max_sandboxes.is_some() || e.max_memory_mib.is_some()) {
                return Err(at("admins have no quota".into()));
            }
            let quota = Quota { max_sandboxes: e.max_sandboxes, max_memory_mib: e.max_memory_mib };
            self.entries.push((token, Arc::new(Principal { name, role: e.role, quota })));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "0123456789abcdef0123456789abcdef";
    const A: &str = "a1f4e2d3c9b8a7f6e5d4";
    const B: &str = "b9a8b7c6d5e4f3a2b1c0";

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn base() -> Principals {
        Principals::admin_only(Token::parse(ADMIN).unwrap())
    }

    #[test]
    fn toml_and_json_map_tokens_to_principals() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[[tokens]]\nname = \"a\"\nrole = \"tenant\"\ntoken = \"{A}\"\nmax_sandboxes = 2\n\n\
             [[tokens]]\nname = \"ops\"\nrole = \"admin\"\ntoken = \"{B}\"\n"
        );
        let p = base().load(&write(dir.path(), "t.toml", &toml, 0o600)).unwrap();
        assert_eq!(p.len(), 3);
        let a = p.find(A).unwrap();
        assert_eq!((a.name.as_str(), a.role, a.quota.max_sandboxes), ("a", Role::Tenant, Some(2)));
        assert!(p.find(B).unwrap().is_admin());
        assert!(p.find(ADMIN).unwrap().is_admin());
        assert!(p.find("nobody-has-this-token").is_none());

        let json = format!(r#"{{"tokens":[{{"name":"b","role":"tenant","token":"{B}","max_memory_mib":512}}]}}"#);
        let p = base().load(&write(dir.path(), "t.json", &json, 0o600)).unwrap();
        assert_eq!(p.find(B).unwrap().quota.max_memory_mib, Some(512));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |name: &str, role: &str, token: &str| {
            format!("[[tokens]]\nname = \"{name}\"\nrole = \"{role}\"\ntoken = \"{token}\"\n")
        };
        let cases = [
            (entry("a", "tenant", A), 0o644, "chmod 600"),
            (entry("A!", "tenant", A), 0o600, "principal name"),
            (entry("a", "root", A), 0o600, "unknown variant"),
            (entry("a", "tenant", "short"), 0o600, "shorter"),
            (entry("a", "tenant", ADMIN), 0o600, "already given"),
            (format!("{}{}", entry("a", "tenant", A), entry("b", "tenant", A)), 0o600, "already given"),
            (format!("{}{}", entry("a", "tenant", A), entry("a", "admin", B)), 0o600, "already named"),
            (format!("{}color = \"red\"\n", entry("a", "tenant", A)), 0o600, "unknown field"),
            (format!("{}max_sandboxes = 1\n", entry("x", "admin", A)), 0o600, "no quota"),
            (String::new(), 0o600, "no [[tokens]]"),
        ];
        for (i, (text, mode, needle)) in cases.iter().enumerate() {
            let f = write(dir.path(), &format!("c{i}.toml"), text, *mode);
            let e = base().load(&f).err().unwrap_or_else(|| panic!("case {i} accepted"));
            assert!(e.to_string().contains(needle), "case {i}: {e}");
        }
    }
}
