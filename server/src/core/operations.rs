//! Operations that change the host are owned by the runtime, not by the
//! request that asked for them. hyper drops a handler's future at its
//! current `.await` when the client goes away (a gRPC deadline, Ctrl-C, a
//! dropped connection); work done inline would stop half-way — VMs started
//! but never listed, a source left paused, a tag left busy. Here the work
//! runs as its own task: the request only waits for it, and a request that
//! stops waiting abandons the wait, never the work.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::error::{Error, Result};

/// What to do with a result nobody is left to receive.
pub type Abandoned<T> = Box<dyn FnOnce(T) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Operations running now (all kinds), for tests and metrics.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::SeqCst)
}

struct InFlight;

impl InFlight {
    fn enter() -> Self {
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `work` to completion as a runtime task and waits for its result.
/// If the caller stops waiting, `work` still finishes; a successful result
/// that has no receiver is handed to `abandoned` (e.g. children of a fork
/// whose ids nobody learnt are killed). A panic in `work` is an internal
/// error, never a lost operation.
pub async fn owned<T, F>(what: &'static str, work: F, abandoned: Option<Abandoned<T>>) -> Result<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    if std::env::var_os("FORKD_INLINE_OPS").is_some() {
        let _ = (what, abandoned);
        return work.await;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _in_flight = InFlight::enter();
        let result = work.await;
        if let Err(unsent) = tx.send(result) {
            match (unsent, abandoned) {
                (Ok(value), Some(hook)) => {
                    tracing::info!(operation = what, "the caller went away before the answer; cleaning up");
                    hook(value).await;
                }
                (Ok(_), None) => tracing::debug!(operation = what, "finished after its caller went away"),
                (Err(e), _) => tracing::debug!(operation = what, "failed after its caller went away: {e}"),
            }
        }
    });
    rx.await.map_err(|_| Error::Internal(format!("{what} stopped unexpectedly (see the daemon's log)")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn work_finishes_when_the_caller_goes_away_and_the_hook_gets_the_result() {
        let done = Arc::new(tokio::sync::Notify::new());
        let got = Arc::new(std::sync::Mutex::new(None));
        let (d, g) = (done.clone(), got.clone());
        let hook: Abandoned<u32> = Box::new(move |v| {
            Box::pin(async move {
                *g.lock().unwrap() = Some(v);
                d.notify_one();
            })
        });
        let call = owned(
            "test",
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(7u32)
            },
            Some(hook),
        );
        // The caller gives up long before the work ends.
        assert!(tokio::time::timeout(Duration::from_millis(10), call).await.is_err());
        tokio::time::timeout(Duration::from_secs(5), done.notified()).await.expect("the hook ran");
        assert_eq!(*got.lock().unwrap(), Some(7));
    }

    #[tokio::test]
    async fn a_waiting_caller_gets_the_result_and_the_hook_does_not_run() {
        let hook: Abandoned<u32> = Box::new(|_| Box::pin(async { panic!("not abandoned") }));
        assert_eq!(owned("test", async { Ok(3u32) }, Some(hook)).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_panic_is_an_internal_error() {
        let r: Result<u32> = owned("test", async { panic!("boom") }, None).await;
        assert!(matches!(r, Err(Error::Internal(m)) if m.contains("test")));
    }
}
