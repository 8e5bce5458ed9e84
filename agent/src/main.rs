use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = itw_agent::config::Args::parse();
    itw_telemetry::logging::init(args.log_format)?;
    tracing::info!(?args, "itw-agent starting");
    Ok(())
}
