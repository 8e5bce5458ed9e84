//! What a relayed agent's state costs the scaler, without the network, for
//! `hack/bench scaler_state` (issue #18): the store and the ingest sessions
//! of the real scaler in this process, fed the messages
//! `hack/bench scaler_stream_cost` sends (a snapshot of `--services-per-agent`
//! Services x 4 processes, then steady batches), one layer at a time, with
//! this process's VmRSS read after each:
//!
//! 0. seed: one agent reports every Service's 4 series, so the Services and
//!    the exported series exist before the measured agents come (their
//!    cost per series is printed: shared, not an agent's);
//! 1. hellos: a session per agent (its instance, identity, connection);
//! 2. snapshots: the instance's totals and Services, the session's series
//!    cache, the last second's counts;
//! 3. batches: `--batches` batches of `--deltas-per-batch` deltas each;
//! 4. sessions closed: what the sessions held (their series caches) freed,
//!    the instances kept for INSTANCE_RETENTION. What RSS shows of it is a
//!    lower bound: mimalloc returns freed pages to the system lazily (a
//!    debug build gave back 6.1 KiB per agent here, a release build none).
//!
//! Layers 1-3 are what a relayed agent costs a replica beyond the Relay
//! stream that carries it: no HTTP/2 connection, call or buffer is in this
//! process, so the figures move only with the per-agent state. The
//! allocator is the scaler's (mimalloc), so size classes and pages are the
//! scaler's too.

// Only its memory and load figures: no scaler to connect to here.
#[allow(dead_code)]
mod bench_support;
#[path = "bench_support/fleet.rs"]
mod fleet;

use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use itw_proto::itw::v1::report_request;
use itw_scaler::{
    config::Limits,
    ingest::{Origin, Session},
    metrics::ScalerMetrics,
    store::Store,
    window::Clock,
};

use bench_support::{load_average, memory};
use fleet::{COMMS, hello, snapshot};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Agents measured.
    #[arg(long, default_value_t = 5_000)]
    agents: usize,
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Services each agent's snapshot names (4 series each).
    #[arg(long, default_value_t = 50)]
    services_per_agent: usize,
    #[arg(long, default_value_t = 3)]
    batches: u64,
    #[arg(long, default_value_t = 20)]
    deltas_per_batch: usize,
}

/// Agent `i`'s Services, as `streamcost` gives them.
fn first_service(args: &Args, i: usize) -> usize {
    i * args.services / args.agents
}

fn agent_batch(args: &Args, i: usize, sequence: u64) -> report_request::Message {
    fleet::batch(
        first_service(args, i),
        args.services_per_agent,
        args.services,
        args.deltas_per_batch,
        sequence,
    )
}

/// This process's memory once the allocator has had a moment to return
/// what the layer's messages took while they were applied (mimalloc purges
/// freed pages after a short delay).
fn settled_memory() -> anyhow::Result<bench_support::Memory> {
    std::thread::sleep(std::time::Duration::from_millis(500));
    memory(std::process::id())
}

/// This process's VmRSS after each layer, and what each added per agent.
struct Readings {
    agents: usize,
    last_kib: u64,
    per_agent: Vec<f64>,
}

impl Readings {
    fn read(&mut self, layer: &str) -> anyhow::Result<()> {
        let now = settled_memory()?;
        let added = now.rss_kib as i64 - self.last_kib as i64;
        let per_agent = added as f64 / self.agents as f64;
        println!("{layer}: {now}; {added:+} kB, {per_agent:+.2} KiB per agent");
        self.per_agent.push(per_agent);
        self.last_kib = now.rss_kib;
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "state size: {} agents, {} Services x 4 series each, {} batches of {} deltas (machine load average {})",
        args.agents,
        args.services_per_agent,
        args.batches,
        args.deltas_per_batch,
        load_average()
    );
    let metrics = Arc::new(ScalerMetrics::default());
    let store = Arc::new(Store::new(
        Clock::system(),
        Limits::default(),
        Arc::clone(&metrics),
    ));
    let origin = Origin::Relayed {
        relay: None,
        stream: 0,
    };
    let open = |node: &str| -> anyhow::Result<Session> {
        let (session, _welcome) = Session::open(&store, &metrics, hello(node, "statesize"), origin)
            .with_context(|| format!("{node}: hello"))?;
        Ok(session)
    };

    let before_seed = settled_memory()?.rss_kib;
    let mut seed = open("seed")?;
    seed.handle(&store, &metrics, snapshot(0..args.services))
        .context("seed snapshot")?;
    let mut readings = Readings {
        agents: args.agents,
        last_kib: settled_memory()?.rss_kib,
        per_agent: Vec::new(),
    };
    // Shared by every agent reporting the Services, so not in the figures
    // per agent below; a bench that divides all RSS by agents counts it.
    let seeded = readings.last_kib as i64 - before_seed as i64;
    println!(
        "0. seed (every Service's 4 series, one agent): VmRSS {} kB; {seeded:+} kB, {:+.0} bytes per series",
        readings.last_kib,
        seeded as f64 * 1024.0 / (args.services * COMMS.len()) as f64
    );

    let mut sessions = (0..args.agents)
        .map(|i| open(&format!("node-{i:05}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    readings.read("1. hellos (sessions, instances)")?;

    for (i, session) in sessions.iter_mut().enumerate() {
        let first = first_service(&args, i);
        let services = (0..args.services_per_agent).map(|k| (first + k) % args.services);
        session.handle(&store, &metrics, snapshot(services))?;
    }
    readings.read("2. snapshots")?;

    for sequence in 1..=args.batches {
        for (i, session) in sessions.iter_mut().enumerate() {
            let ack = session.handle(&store, &metrics, agent_batch(&args, i, sequence))?;
            if ack.sequence != sequence {
                bail!(
                    "agent {i}: batch {sequence} acknowledged as {}",
                    ack.sequence
                );
            }
        }
    }
    readings.read("3. batches")?;

    for session in sessions.drain(..) {
        session.leave();
    }
    readings.read("4. sessions closed (instances held)")?;
    drop(seed);

    let total: f64 = readings.per_agent.iter().take(3).sum();
    println!(
        "per relayed agent's state (layers 1-3): {total:.2} KiB (goal for all a relayed agent costs a replica: <= 30 KiB)"
    );
    Ok(())
}
