//! One lock per workspace name: create, suspend, resume and delete of one
//! workspace run one at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct WorkspaceLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl WorkspaceLocks {
    pub fn of(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(name.to_string()).or_default().clone()
    }

    /// Forgets the lock of a deleted workspace.
    pub fn forget(&self, name: &str) {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }
}
