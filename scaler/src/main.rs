use anyhow::Context;
use clap::Parser;
use itw_scaler::{Scaler, config::Args};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    itw_telemetry::logging::init(args.log_format)?;
    let config = args.config();
    let open_files = itw_telemetry::listener::raise_open_files_limit();
    tracing::info!(open_files, "open-files limit");
    tracing::info!(?config, "itw-scaler starting");
    let stop = itw_telemetry::signals::stop_signal()
        .context("installing the SIGTERM and SIGINT handlers")?;
    let scaler = Scaler::bind(config).await?;
    tracing::info!(grpc = %scaler.grpc_addr(), metrics = %scaler.metrics_addr(), "listening");
    scaler.serve(stop).await?;
    tracing::info!("stopped");
    Ok(())
}
