//! Stopping on SIGTERM (Kubernetes) or SIGINT (a terminal), one way for
//! every binary.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// Installs the SIGTERM and SIGINT handlers now and returns a future that
/// resolves on the first of them, logging which. Call it inside the runtime
/// before starting anything: a signal that arrives during the start then
/// stops the process once started, instead of killing it halfway.
pub fn stop_signal() -> std::io::Result<impl Future<Output = ()> + Send> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
            _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
        }
    })
}
