//! The daemon's token file: read from `--token-file`, or created at
//! `<data-dir>/token` on the first start (32 random bytes, hex, mode 0600) so
//! that a daemon nobody configured still requires a token. A token file that
//! group or others can read is refused: anyone who reads it drives every VM.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::auth::{Token, TokenError};

/// Random bytes in a generated token.
pub const GENERATED_TOKEN_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error(
        "token file {path} is readable by {who} (mode {mode:04o}); only its owner may read it: run `chmod 600 {path}`"
    )]
    TooOpen { path: String, who: &'static str, mode: u32 },
    #[error("token file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("token file {path}: {source}")]
    Weak { path: String, source: TokenError },
}

/// What a daemon started with: the token and where it came from.
pub struct Loaded {
    pub token: Token,
    pub path: PathBuf,
    /// True when this start wrote the file.
    pub created: bool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TokenFileError + '_ {
    move |source| TokenFileError::Io { path: path.display().to_string(), source }
}

/// Refuses a file that group or others may read or write.
pub fn check_mode(path: &Path, mode: u32) -> Result<(), TokenFileError> {
    let who = match (mode & 0o070 != 0, mode & 0o007 != 0) {
        (true, true) => "group and others",
        (true, false) => "its group",
        (false, true) => "others",
        (false, false) => return Ok(()),
    };
    Err(TokenFileError::TooOpen { path: path.display().to_string(), who, mode: mode & 0o7777 })
}

/// Reads and validates an existing token file.
pub fn read(path: &Path) -> Result<Token, TokenFileError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    check_mode(path, meta.permissions().mode())?;
    let raw = std::fs::read_to_string(path).map_err(io(path))?;
    Token::parse(&raw).map_err(|source| TokenFileError::Weak { path: path.display().to_string(), source })
}

/// The configured file, or `default` — created with a fresh token when it
/// does not exist yet. Creation is exclusive and staged: a concurrent
/// start never sees a half-written token.
pub fn load_or_create(configured: Option<&Path>, default: &Path) -> Result<Loaded, TokenFileError> {
    if let Some(p) = configured {
        return Ok(Loaded { token: read(p)?, path: p.to_path_buf(), created: false });
    }
    if default.exists() {
        return Ok(Loaded { token: read(default)?, path: default.to_path_buf(), created: false });
    }
    let mut bytes = [0u8; GENERATED_TOKEN_BYTES];
    rand::fill(&mut bytes[..]);
    let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let staged = default.with_extension(format!("tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&staged)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        // A link fails if another start created the file meanwhile; that one wins.
        std::fs::hard_link(&staged, default)
    })();
    let _ = std::fs::remove_file(&staged);
    match written {
        Ok(()) => {
            let token = read(default)?;
            Ok(Loaded { token, path: default.to_path_buf(), created: true })
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(Loaded { token: read(default)?, path: default.to_path_buf(), created: false })
        }
        Err(e) => Err(io(default)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let first = load_or_create(None, &path).unwrap();
        assert!(first.created);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), GENERATED_TOKEN_BYTES * 2);
        assert!(first.token.matches(text.trim()));
        let again = load_or_create(None, &path).unwrap();
        assert!(!again.created);
        assert!(again.token.matches(text.trim()));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no staging file is left");
    }

    #[test]
    fn a_file_others_can_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "q3U9vZ1xL0pT7sWmq3U9vZ1xL0pT7sWm").unwrap();
        for (mode, who) in [(0o640, "its group"), (0o604, "others"), (0o644, "group and others")] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load_or_create(Some(&path), &dir.path().join("unused")).err().unwrap().to_string();
            assert!(e.contains(who) && e.contains("chmod 600"), "{e}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load_or_create(Some(&path), &dir.path().join("unused")).is_ok());
        assert!(!dir.path().join("unused").exists(), "a configured file means nothing is created");
    }
}
