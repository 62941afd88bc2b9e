//! Blocking work (SQLite, cgroup rmdir retries, multi-GiB deletes, pagemap
//! reads) called from async code. On the daemon's multi-threaded runtime it
//! runs under `block_in_place`, so the worker hands its other tasks to a
//! peer instead of stalling them; elsewhere (a current-thread runtime in a
//! test, or no runtime at all) it simply runs.

/// Runs `f`, letting the executor move other tasks off this worker first.
pub fn run<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_outside_a_runtime() {
        assert_eq!(super::run(|| 2 + 2), 4);
    }

    #[tokio::test]
    async fn runs_on_a_current_thread_runtime() {
        assert_eq!(super::run(|| 5), 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_tasks_keep_running_while_one_blocks() {
        let ticker = tokio::spawn(async {
            let mut n = 0;
            for _ in 0..20 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                n += 1;
            }
            n
        });
        // Block both workers in turn; the ticker still finishes.
        let a = tokio::spawn(async { super::run(|| std::thread::sleep(std::time::Duration::from_millis(300))) });
        super::run(|| std::thread::sleep(std::time::Duration::from_millis(300)));
        a.await.unwrap();
        assert_eq!(tokio::time::timeout(std::time::Duration::from_secs(5), ticker).await.unwrap().unwrap(), 20);
    }
}
