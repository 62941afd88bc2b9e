//! Polling file watchers (envd's CreateWatcher / GetWatcherEvents /
//! RemoveWatcher): a watch whose events wait in a bounded queue until the
//! client asks for them. Each belongs to one sandbox and one owner; one
//! not polled for `IDLE` is dropped, and there are at most `MAX` at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forkd_agent_protocol::v1 as pb;
use forkd_api::e2b::filesystem as fs;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

use crate::agent::Subscription;
use crate::api::process as procs;
use crate::core::sandboxes::Sandbox;

/// Events a watcher keeps before it drops the oldest.
const QUEUE: usize = 4096;
/// Watchers at once, over all sandboxes.
const MAX: usize = 256;
/// A watcher nobody polls for this long is removed.
const IDLE: Duration = Duration::from_secs(600);

struct Watcher {
    sandbox: String,
    owner: String,
    queue: Mutex<VecDeque<fs::FilesystemEvent>>,
    polled: Mutex<Instant>,
    task: tokio::task::AbortHandle,
}

#[derive(Default)]
pub struct Watchers {
    map: Mutex<HashMap<String, Arc<Watcher>>>,
}

impl Watchers {
    pub fn start(
        &self,
        sandbox: &str,
        owner: &str,
        sb: Arc<Sandbox>,
        req: pb::WatchRequest,
        armed: Subscription,
    ) -> Result<String, Status> {
        self.sweep();
        let mut map = self.map.lock().unwrap();
        if map.len() >= MAX {
            return Err(Status::resource_exhausted(format!("{MAX} file watchers are open; remove one first")));
        }
        let id = format!("w{}", crate::core::ids::random_name(15));
        let (etx, mut erx) = mpsc::channel(32);
        let root = req.path.clone();
        let follower = tokio::spawn(procs::watch(sb, req, armed, etx));
        let slot: Arc<Mutex<Option<Arc<Watcher>>>> = Arc::new(Mutex::new(None));
        let slot2 = slot.clone();
        let pump = tokio::spawn(async move {
            while let Some(Ok(batch)) = erx.recv().await {
                let Some(w) = slot2.lock().unwrap().clone() else { continue };
                let mut q = w.queue.lock().unwrap();
                for e in super::filesystem::events(&root, batch) {
                    if q.len() >= QUEUE {
                        q.pop_front();
                    }
                    q.push_back(e);
                }
            }
            follower.abort();
        });
        let w = Arc::new(Watcher {
            sandbox: sandbox.to_string(),
            owner: owner.to_string(),
            queue: Mutex::new(VecDeque::new()),
            polled: Mutex::new(Instant::now()),
            task: pump.abort_handle(),
        });
        *slot.lock().unwrap() = Some(w.clone());
        map.insert(id.clone(), w);
        Ok(id)
    }

    fn get(&self, id: &str, sandbox: &str, owner: &str) -> Result<Arc<Watcher>, Status> {
        let map = self.map.lock().unwrap();
        map.get(id)
            .filter(|w| w.sandbox == sandbox && (owner.is_empty() || w.owner == owner))
            .cloned()
            .ok_or_else(|| Status::not_found(format!("watcher {id:?} not found")))
    }

    /// The events since the last call.
    pub fn take(&self, id: &str, sandbox: &str, owner: &str) -> Result<Vec<fs::FilesystemEvent>, Status> {
        let w = self.get(id, sandbox, owner)?;
        *w.polled.lock().unwrap() = Instant::now();
        Ok(w.queue.lock().unwrap().drain(..).collect())
    }

    pub fn remove(&self, id: &str, sandbox: &str, owner: &str) -> Result<(), Status> {
        let w = self.get(id, sandbox, owner)?;
        w.task.abort();
        self.map.lock().unwrap().remove(id);
        Ok(())
    }

    /// Drops watchers nobody polls.
    fn sweep(&self) {
        self.map.lock().unwrap().retain(|_, w| {
            let keep = w.polled.lock().unwrap().elapsed() < IDLE && !w.task.is_finished();
            if !keep {
                w.task.abort();
            }
            keep
        });
    }
}
