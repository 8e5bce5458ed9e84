//! The threads the agents' report streams run on (INGEST_THREADS).
//!
//! At 5,000 agents each stream's messages cost the scaler tens of
//! microseconds to decode, check and apply. On the runtime that also answers
//! KEDA, a GetMetrics call then waits in tokio's run queue behind every
//! stream task that became ready before it: tokio's scheduler is cooperative
//! and first in, first out. On their own threads the stream tasks are
//! scheduled against KEDA's by the kernel, which preempts.
//!
//! This module owns those threads and must never run anything but report
//! streams on them: KEDA's calls, the HTTP/2 connections and the sweeper stay
//! on the caller's runtime.

use std::{future::Future, io};

use tokio::runtime::{Builder, Handle, Runtime};

/// Where report streams are spawned: a runtime of their own, or (with
/// INGEST_THREADS=0) the runtime that serves everything else.
pub struct IngestRuntime {
    /// `None` once dropped; a runtime cannot be dropped inside another's
    /// async context, so `Drop` shuts it down in the background.
    own: Option<Runtime>,
    handle: Handle,
}

impl IngestRuntime {
    /// Starts `threads` ingest threads; 0 spawns report streams on the
    /// current runtime instead. Must be called within a tokio runtime.
    pub fn start(threads: usize) -> io::Result<Self> {
        if threads == 0 {
            return Ok(Self {
                own: None,
                handle: Handle::current(),
            });
        }
        let runtime = Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("itw-ingest")
            .enable_all()
            .build()?;
        Ok(Self {
            handle: runtime.handle().clone(),
            own: Some(runtime),
        })
    }

    /// Where report streams are spawned.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Spawns one report stream.
    pub fn spawn<F>(handle: &Handle, stream: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // The task ends on its own (agent gone, stream rejected, scaler
        // stopping); nothing waits for it.
        drop(handle.spawn(stream));
    }

    /// Whether report streams run on threads of their own.
    pub fn dedicated(&self) -> bool {
        self.own.is_some()
    }
}

impl Drop for IngestRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.own.take() {
            // By now every stream has ended on the scaler's stop signal;
            // anything left is dropped with its task.
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_name() -> Option<String> {
        std::thread::current().name().map(str::to_owned)
    }

    #[tokio::test]
    async fn streams_run_on_the_ingest_threads() {
        let runtime = IngestRuntime::start(2).unwrap();
        assert!(runtime.dedicated());
        let (tx, rx) = tokio::sync::oneshot::channel();
        IngestRuntime::spawn(&runtime.handle(), async move {
            let _ = tx.send(thread_name());
        });
        assert_eq!(rx.await.unwrap().as_deref(), Some("itw-ingest"));
        // Dropped inside an async context without panicking.
        drop(runtime);
    }

    #[tokio::test]
    async fn zero_threads_run_streams_on_the_current_runtime() {
        let runtime = IngestRuntime::start(0).unwrap();
        assert!(!runtime.dedicated());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let here = thread_name();
        IngestRuntime::spawn(&runtime.handle(), async move {
            let _ = tx.send(thread_name());
        });
        // A current-thread test runtime: the stream ran on this very thread.
        assert_eq!(rx.await.unwrap(), here);
    }
}
