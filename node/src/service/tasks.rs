//! The owner of everything a node starts: async tasks (the network loop, request handlers,
//! announcements, the metrics endpoint) and experiment threads. Stopping the node cancels
//! them all and waits for them, so nothing outlives the node: not in `medmesh run`, and not
//! in a test that drops an in-process node.

use std::future::Future;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

/// Tasks and threads of one node.
pub struct Tasks {
    cancel: CancellationToken,
    tracker: TaskTracker,
    threads: Mutex<Vec<JoinHandle<()>>>,
    runtime: Handle,
}

impl Tasks {
    /// An owner spawning on `runtime`.
    pub fn new(runtime: Handle) -> Self {
        Self {
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            threads: Mutex::new(Vec::new()),
            runtime,
        }
    }

    /// Whether the node is stopping: long work checks it between steps.
    pub fn is_stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// A guard that stops the node when dropped (the node's main future going away, even by
    /// abort, stops everything it started).
    pub fn stop_on_drop(&self) -> DropGuard {
        self.cancel.clone().drop_guard()
    }

    /// Runs `task` until it ends or the node stops, whichever comes first.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tracker.spawn_on(
            async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = task => {}
                }
            },
            &self.runtime,
        );
    }

    /// Runs `work` on a thread of its own (blocking work: training). It must return soon
    /// after [`Tasks::is_stopping`] turns true.
    pub fn spawn_thread<F>(&self, name: String, work: F) -> std::io::Result<()>
    where
        F: FnOnce() + Send + 'static,
    {
        let handle = std::thread::Builder::new().name(name).spawn(work)?;
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
        Ok(())
    }

    /// Blocks on `future` unless the node stops first (then `None`). For threads that wait
    /// on the network.
    pub fn block_on<F: Future>(&self, future: F) -> Option<F::Output> {
        self.runtime
            .block_on(self.cancel.run_until_cancelled(future))
    }

    /// Stops everything and waits up to `grace` for tasks and threads to end; false if some
    /// were still running then (a thread deep in a training epoch: its last checkpoint is
    /// on disk, and the process exit ends it).
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.cancel.cancel();
        self.tracker.close();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        tokio::time::timeout(grace, async {
            self.tracker.wait().await;
            let _ = joined.await;
        })
        .await
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_stops_tasks_and_joins_threads() {
        let tasks = Arc::new(Tasks::new(Handle::current()));
        let task_ended = Arc::new(AtomicBool::new(false));
        {
            let ended = task_ended.clone();
            tasks.spawn(async move {
                struct Flag(Arc<AtomicBool>);
                impl Drop for Flag {
                    fn drop(&mut self) {
                        self.0.store(true, Ordering::SeqCst);
                    }
                }
                let _flag = Flag(ended);
                std::future::pending::<()>().await;
            });
        }
        let thread_ended = Arc::new(AtomicBool::new(false));
        {
            let (t, ended) = (tasks.clone(), thread_ended.clone());
            tasks
                .spawn_thread("worker".into(), move || {
                    // Waits on the network until the node stops.
                    let waited = t.block_on(std::future::pending::<()>());
                    assert!(waited.is_none());
                    while !t.is_stopping() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    ended.store(true, Ordering::SeqCst);
                })
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task_ended.load(Ordering::SeqCst));
        assert!(tasks.shutdown(Duration::from_secs(5)).await);
        assert!(task_ended.load(Ordering::SeqCst));
        assert!(thread_ended.load(Ordering::SeqCst));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_guard_stops_the_node() {
        let tasks = Tasks::new(Handle::current());
        let guard = tasks.stop_on_drop();
        assert!(!tasks.is_stopping());
        drop(guard);
        assert!(tasks.is_stopping());
    }
}
