//! Who holds each read-write volume file: a live sandbox, a suspended
//! workspace, or a fork in progress. One holder at a time, so two VMs never
//! write one ext4 image.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::core::{Error, Result};

/// Prefix of a holder that is a workspace (it keeps its volumes while
/// suspended: its state snapshot has them mounted).
pub const WORKSPACE_HOLDER: &str = "workspace:";

/// Read-write volume files → their holder.
#[derive(Default)]
pub struct VolumeClaims {
    held: Mutex<HashMap<PathBuf, String>>,
}

impl VolumeClaims {
    /// Claims `files` for `holder`; refuses one that another holder has,
    /// except `take_from`, whose claims pass to `holder`.
    pub fn reserve(&self, files: &[PathBuf], holder: &str, take_from: Option<&str>) -> Result<()> {
        let mut map = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let taken = |h: &&String| *h != holder && Some(h.as_str()) != take_from;
        if let Some((f, other)) = files.iter().find_map(|f| map.get(f).filter(taken).map(|h| (f, h))) {
            return Err(Error::FailedPrecondition(format!(
                "read-write volume {} is attached to {}",
                f.display(),
                if other.starts_with("sb-") {
                    format!("live sandbox {other}")
                } else if let Some(ws) = other.strip_prefix(WORKSPACE_HOLDER) {
                    format!("workspace {ws:?}")
                } else {
                    "a sandbox being forked".into()
                }
            )));
        }
        for f in files {
            map.insert(f.clone(), holder.to_string());
        }
        Ok(())
    }

    /// Hands the claims of `from` over to `to`.
    pub fn transfer(&self, from: &str, to: &str) {
        for h in self.held.lock().unwrap_or_else(|p| p.into_inner()).values_mut() {
            if h == from {
                *h = to.to_string();
            }
        }
    }

    pub fn release(&self, holder: &str) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, h| h != holder);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_claims_move_whole() {
        let c = VolumeClaims::default();
        let f = vec![PathBuf::from("/v/a.ext4")];
        c.reserve(&f, "pending-1", None).unwrap();
        let e = c.reserve(&f, "sb-x", None).unwrap_err();
        assert!(e.to_string().contains("a sandbox being forked"), "{e}");
        c.transfer("pending-1", "sb-x");
        let e = c.reserve(&f, "sb-y", None).unwrap_err();
        assert!(e.to_string().contains("live sandbox sb-x"), "{e}");
        c.transfer("sb-x", "workspace:w");
        // The workspace's next sandbox takes them back.
        c.reserve(&f, "pending-2", Some("workspace:w")).unwrap();
        c.release("pending-2");
        c.reserve(&f, "sb-z", None).unwrap();
    }
}
