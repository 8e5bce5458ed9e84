//! One parking listener: the connects to one held ClusterIP:port land here
//! (the kernel rewrote them), wait until the Service has a ready endpoint,
//! then are handed over to it and spliced both ways.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
    time::Instant,
};

use super::{
    metrics::{HoldMetrics, ServiceLabels},
    net,
};

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
    pub labels: ServiceLabels,
    /// The agent's exempting socket mark.
    pub mark: u32,
    pub metrics: Arc<HoldMetrics>,
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
                Ok((stream, _)) => {
                    connections.spawn(one(stream, parking.clone(), phase.clone(), timeout));
                }
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

/// One parked connection, from accept to the end of its splice. `timeout`:
/// the hold timeout when it was accepted (a held connection follows changes).
async fn one(
    mut client: TcpStream,
    parking: Arc<Parking>,
    mut phase: watch::Receiver<Phase>,
    mut timeout: Duration,
) {
    let labels = &parking.labels;
    let metrics = &parking.metrics;
    let accepted = Instant::now();
    let held = *phase.borrow() != Phase::Released;
    let mut buffer = Vec::new();
    let mut client_done = false;
    if held {
        metrics.held.get_or_create(labels).inc();
        metrics.held_total.get_or_create(labels).inc();
        let outcome = loop {
            match *phase.borrow_and_update() {
                Phase::Released => break Outcome::Released,
                Phase::Holding { timeout: now } => timeout = now,
            }
            let deadline = accepted + timeout;
            tokio::select! {
                changed = phase.changed() => if changed.is_err() {
                    break Outcome::Shutdown;
                },
                () = tokio::time::sleep_until(deadline) => break Outcome::TimedOut,
                read = client.read_buf(&mut buffer), if !client_done && buffer.len() < PARK_BUFFER => match read {
                    // Closed without a byte sent (`nc -z`, a dropped
                    // client): nobody is waiting. A close after a request is
                    // a half-close: the reply is still wanted.
                    Ok(0) if buffer.is_empty() => break Outcome::Left,
                    Ok(0) => client_done = true,
                    Ok(_) => {}
                    Err(_) => break Outcome::Left,
                },
            }
        };
        metrics.held.get_or_create(labels).dec();
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
    }
    let mut upstream = match connect_upstream(&parking, accepted + timeout).await {
        Ok(upstream) => upstream,
        Err(error) => {
            metrics.release_failed.get_or_create(labels).inc();
            tracing::warn!(dest = %parking.dest, %error, "handing a held connection over failed within its hold timeout; resetting it");
            net::reset(client);
            return;
        }
    };
    if !buffer.is_empty() && upstream.write_all(&buffer).await.is_err() {
        net::reset(client);
        return;
    }
    drop(buffer);
    // The client's end-of-stream (if it came while parked) is seen again by
    // the copy, which passes it on.
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(dest = %parking.dest, %error, "a held connection's splice ended with an error");
    }
}

/// Connects to the held destination, again and again with a growing pause,
/// until it answers or `deadline` (the connection's hold timeout) passes:
/// the datapath may refuse for a while after the endpoint is ready.
async fn connect_upstream(parking: &Parking, deadline: Instant) -> std::io::Result<TcpStream> {
    let mut pause = RELEASE_RETRY_FIRST;
    loop {
        let attempt =
            tokio::time::timeout_at(deadline, net::connect_marked(parking.dest, parking.mark))
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
