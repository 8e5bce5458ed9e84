use anyhow::Context;
use clap::Parser;
use itw_relay::{Relay, config::Args};

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
    let stop = itw_telemetry::signals::stop_signal()
        .context("installing the SIGTERM and SIGINT handlers")?;
    let relay = Relay::bind(config).await?;
    tracing::info!(grpc = %relay.grpc_addr(), metrics = %relay.metrics_addr(), "listening");
    relay.serve(stop).await?;
    tracing::info!("stopped");
    Ok(())
}
