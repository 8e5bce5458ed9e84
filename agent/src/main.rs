//! `itw-agent`: wiring only. See the library's modules for what each piece does.

use std::process::ExitCode;

use clap::Parser;
use itw_agent::{Agent, config::Args, process};

fn main() -> ExitCode {
    process::limit_malloc_arenas();
    process::raise_open_files_limit();
    let args = Args::parse();
    if let Err(error) = itw_telemetry::logging::init(args.log_format) {
        eprintln!("itw-agent: {error}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("itw-agent")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = process::shutdown_signal();
    let config = args.config()?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node = %config.node_name,
        "itw-agent starting"
    );
    let agent = Agent::start(config).await?;
    agent.serve(shutdown).await?;
    tracing::info!("itw-agent stopped");
    Ok(())
}
