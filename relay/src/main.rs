use anyhow::Context;
use clap::Parser;
use itw_relay::{Relay, config::Args};
use tokio::signal::unix::{SignalKind, signal};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    itw_telemetry::logging::init(args.log_format)?;
    let config = args.config();
    let open_files = itw_telemetry::listener::raise_open_files_limit();
    tracing::info!(open_files, "open-files limit");
    tracing::info!(?config, "itw-relay starting");
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let relay = Relay::bind(config).await?;
    tracing::info!(grpc = %relay.grpc_addr(), metrics = %relay.metrics_addr(), "listening");
    relay
        .serve(async move {
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
                _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
            }
        })
        .await?;
    tracing::info!("stopped");
    Ok(())
}
