//! One parking listener: the connects to one held ClusterIP:port land here
//! (the kernel rewrote them), wait until the Service has a ready endpoint,
//! then are handed over to it from their client's own network namespace and
//! spliced both ways.
//!
//! Only connections the programs parked (a record of theirs) are handed on;
//! anything else that reaches the port is reset. What the parked clients
//! send is kept within the node's byte budget.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
    time::Instant,
};

use itw_common::Redirect;

use super::{
    budget::HoldBudget,
    cold_start::{HeldColdStart, Watched},
    metrics::{HoldMetrics, ServiceLabels},
    net,
    netns::Dialer,
};
use crate::capture::RedirectBook;

/// Client bytes kept while parked; past this the client's own socket
/// buffers (and TCP flow control) hold the rest.
const PARK_BUFFER: usize = 64 * 1024;

/// After release, how long a listener keeps accepting: a connect the kernel
/// rewrote just before the hold entry went away may still be on its way.
pub const RELEASE_GRACE: Duration = Duration::from_secs(1);

/// The first wait before connecting a released connection again; it doubles
/// up to [`RELEASE_RETRY_MAX`]. The datapath (kube-proxy's sync, a socket
/// load balancer's agent) follows an EndpointSlice change up to a second or
/// more after the agent does, and refuses until then.
pub const RELEASE_RETRY_FIRST: Duration = Duration::from_millis(10);
pub const RELEASE_RETRY_MAX: Duration = Duration::from_millis(250);

/// What the parked connections of one listener are waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Keep them, each up to `timeout` after it was accepted (the Service's
    /// setting, which may change while it is held).
    Holding { timeout: Duration },
    /// Hand them over to the original destination now.
    Released,
}

/// What a listener needs besides its socket.
pub struct Parking {
    /// The ClusterIP:port the held connects asked for.
    pub dest: SocketAddr,
    /// The listener's own port, under which the programs record what they
    /// parked here.
    pub port: u16,
    pub labels: ServiceLabels,
    /// The agent's exempting socket mark.
    pub mark: u32,
    pub metrics: Arc<HoldMetrics>,
    /// What the programs parked: only connections found there are handed on.
    pub redirects: Arc<dyn RedirectBook>,
    pub budget: Arc<HoldBudget>,
    /// Makes a released connection's upstream socket in its client's
    /// network namespace.
    pub dialer: Arc<Dialer>,
    /// The destination's cold start, told by its parked clients.
    pub cold_start: Arc<HeldColdStart>,
}

/// Accepts and parks until released, then keeps accepting (and handing over
/// at once) for [`RELEASE_GRACE`] and until every connection it accepted has
/// ended; then closes the listener. Returns when the listener is closed.
pub async fn run(listener: TcpListener, parking: Parking, mut phase: watch::Receiver<Phase>) {
    let parking = Arc::new(parking);
    let mut connections = JoinSet::new();
    let mut released_at: Option<Instant> = None;
    // The hold timeout last seen: how long a connection accepted after
    // release may keep trying to reach the Service.
    let mut timeout = Duration::ZERO;
    loop {
        match *phase.borrow() {
            Phase::Released if released_at.is_none() => released_at = Some(Instant::now()),
            Phase::Holding { timeout: now } => timeout = now,
            Phase::Released => {}
        }
        let grace_over = async {
            match released_at {
                Some(at) => tokio::time::sleep_until(at + RELEASE_GRACE).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match parking.redirects.take(peer, parking.port) {
                    Ok(Some(record)) => {
                        connections.spawn(one(stream, record, parking.clone(), phase.clone(), timeout));
                    }
                    // Not a connect our programs parked: someone who reached
                    // the parking address itself. Never handed on.
                    Ok(None) => {
                        parking.metrics.not_redirected.get_or_create(&parking.labels).inc();
                        tracing::debug!(dest = %parking.dest, %peer, "a connection to a parking port that no program parked: reset");
                        net::reset(stream);
                    }
                    Err(error) => {
                        parking.metrics.not_redirected.get_or_create(&parking.labels).inc();
                        tracing::warn!(dest = %parking.dest, %peer, %error, "cannot look up a parked connection's record: reset");
                        net::reset(stream);
                    }
                },
                Err(error) => {
                    // Out of descriptors and the like: the client stays in
                    // the backlog; try again shortly rather than spin.
                    tracing::warn!(dest = %parking.dest, %error, "accepting a held connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            changed = phase.changed(), if released_at.is_none() => {
                if changed.is_err() {
                    // The holder is gone (shutdown): what is parked is reset.
                    break;
                }
            }
            () = grace_over, if connections.is_empty() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Dropping the set aborts what is left (shutdown only): those clients'
    // sockets close with the tasks.
    connections.shutdown().await;
}

/// How much of the byte budget a parked connection asks for at a time.
const READ_CHUNK: usize = 16 * 1024;
/// How long a connection that found the byte budget spent waits before
/// asking again.
const BUDGET_RETRY: Duration = Duration::from_millis(100);

/// What a parked client sent, its bytes counted in the node's budget until
/// dropped.
struct Kept<'a> {
    bytes: Vec<u8>,
    budget: &'a HoldBudget,
}

impl Drop for Kept<'_> {
    fn drop(&mut self) {
        self.budget.release(self.bytes.len());
    }
}

/// One parked connection, from accept to the end of its splice. `timeout`:
/// the hold timeout when it was accepted (a held connection follows changes).
async fn one(
    mut client: TcpStream,
    record: Redirect,
    parking: Arc<Parking>,
    mut phase: watch::Receiver<Phase>,
    mut timeout: Duration,
) {
    let labels = &parking.labels;
    let metrics = &parking.metrics;
    let accepted = Instant::now();
    let held = *phase.borrow() != Phase::Released;
    let mut kept = Kept {
        bytes: Vec::new(),
        budget: &parking.budget,
    };
    let mut client_done = false;
    if held {
        metrics.held.get_or_create(labels).inc();
        metrics.held_total.get_or_create(labels).inc();
        parking.cold_start.parked(accepted);
        let mut starved = false;
        let outcome = loop {
            match *phase.borrow_and_update() {
                Phase::Released => break Outcome::Released,
                Phase::Holding { timeout: now } => timeout = now,
            }
            let deadline = accepted + timeout;
            let room = PARK_BUFFER - kept.bytes.len();
            let granted = if client_done || room == 0 {
                0
            } else {
                parking.budget.reserve(room.min(READ_CHUNK))
            };
            if granted == 0 && !client_done && room > 0 && !starved {
                starved = true;
                metrics.buffer_full.inc();
            }
            let mut chunk = (&mut client).take(granted as u64);
            tokio::select! {
                changed = phase.changed() => {
                    parking.budget.release(granted);
                    if changed.is_err() {
                        break Outcome::Shutdown;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    parking.budget.release(granted);
                    break Outcome::TimedOut;
                }
                () = tokio::time::sleep(BUDGET_RETRY), if granted == 0 && !client_done && room > 0 => {}
                read = chunk.read_buf(&mut kept.bytes), if granted > 0 => {
                    let n = *read.as_ref().unwrap_or(&0);
                    parking.budget.release(granted - n);
                    match read {
                        // Closed without a byte sent (`nc -z`, a dropped
                        // client): nobody is waiting. A close after a request
                        // is a half-close: the reply is still wanted.
                        Ok(0) if kept.bytes.is_empty() => break Outcome::Left,
                        Ok(0) => client_done = true,
                        Ok(_) => {}
                        Err(_) => break Outcome::Left,
                    }
                },
            }
        };
        metrics.held.get_or_create(labels).dec();
        parking.budget.finish(record.slot);
        match outcome {
            Outcome::Released => {
                metrics.released.get_or_create(labels).inc();
                metrics
                    .hold_seconds
                    .get_or_create(labels)
                    .observe(accepted.elapsed().as_secs_f64());
            }
            Outcome::TimedOut => {
                metrics.timed_out.get_or_create(labels).inc();
                tracing::info!(dest = %parking.dest, service = ?labels, ?timeout, "held connection reset: no ready endpoint within the hold timeout");
                net::reset(client);
                return;
            }
            Outcome::Left => {
                metrics.left.get_or_create(labels).inc();
                return;
            }
            Outcome::Shutdown => {
                net::reset(client);
                return;
            }
        }
    } else {
        // Rewritten just before the release took the destination out of
        // the hold map: never parked, handed over at once.
        parking.budget.finish(record.slot);
    }
    let upstream = match connect_upstream(&parking, &record, accepted + timeout).await {
        Ok(upstream) => upstream,
        Err(error) => {
            metrics.release_failed.get_or_create(labels).inc();
            tracing::warn!(dest = %parking.dest, netns = record.netns, %error, "handing a held connection over failed within its hold timeout; resetting it");
            net::reset(client);
            return;
        }
    };
    // Only a client that waited tells the cold start.
    let first_byte = held
        .then(|| parking.cold_start.released(Instant::now()))
        .flatten();
    let mut upstream = Watched::new(upstream, first_byte);
    if !kept.bytes.is_empty() && upstream.write_all(&kept.bytes).await.is_err() {
        net::reset(client);
        return;
    }
    drop(kept);
    // The client's end-of-stream (if it came while parked) is seen again by
    // the copy, which passes it on.
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(dest = %parking.dest, %error, "a held connection's splice ended with an error");
    }
}

/// Connects to the held destination from the client's own network
/// namespace, again and again with a growing pause, until it answers or
/// `deadline` (the connection's hold timeout) passes: the datapath may
/// refuse for a while after the endpoint is ready, and a policy that denies
/// the client never lets it through.
async fn connect_upstream(
    parking: &Parking,
    record: &Redirect,
    deadline: Instant,
) -> std::io::Result<TcpStream> {
    let mut pause = RELEASE_RETRY_FIRST;
    loop {
        let attempt = tokio::time::timeout_at(deadline, async {
            let socket = parking
                .dialer
                .socket(
                    u64::from(record.netns),
                    parking.dest.is_ipv6(),
                    parking.mark,
                )
                .await?;
            socket.connect(parking.dest).await
        })
        .await;
        let error = match attempt {
            Ok(Ok(upstream)) => return Ok(upstream),
            Ok(Err(error)) => error,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the hold timeout passed while connecting",
                ));
            }
        };
        if Instant::now() + pause >= deadline {
            return Err(error);
        }
        parking
            .metrics
            .release_retries
            .get_or_create(&parking.labels)
            .inc();
        tracing::debug!(dest = %parking.dest, %error, ?pause, "the Service refused a released connection; trying again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RELEASE_RETRY_MAX);
    }
}

enum Outcome {
    Released,
    TimedOut,
    Left,
    Shutdown,
}
