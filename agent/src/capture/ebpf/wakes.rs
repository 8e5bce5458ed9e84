//! Wakes: the programs' ring buffer of destinations going idle -> active,
//! read as records arrive and handed on as [`Wake`]s.
//!
//! The reader only forwards: it never reads counters or touches another map,
//! so a burst of wakes costs the kernel side nothing more than the records.

use aya::maps::{MapData, RingBuf};
use itw_common::{AttemptKey, Destination, WakeEvent, maps};
use itw_telemetry::timeline::{TARGET as TIMELINE, monotonic_us};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
    task::JoinHandle,
};

use crate::capture::{CaptureError, Wake};

/// Wakes buffered between the ring buffer reader and the agent.
const WAKE_CHANNEL: usize = 4096;

/// Starts reading `ring` on `runtime`: the wakes, and the reader's task
/// (which owns the ring buffer's descriptor).
pub(super) fn spawn_reader(
    ring: RingBuf<MapData>,
    runtime: &tokio::runtime::Handle,
) -> Result<(mpsc::Receiver<Wake>, JoinHandle<()>), CaptureError> {
    // Registering with the reactor needs the runtime's context.
    let ring = {
        let _guard = runtime.enter();
        // SAFETY: the RingBuf owns its map's descriptor, which stays open
        // and the same for as long as the RingBuf lives inside the AsyncFd.
        unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|err| {
            CaptureError::Map {
                map: maps::WAKES,
                source: err.into(),
            }
        })?
    };
    let (tx, rx) = mpsc::channel(WAKE_CHANNEL);
    let reader = runtime.spawn(forward_wakes(ring, tx));
    Ok((rx, reader))
}

/// Reads wake records as the kernel writes them and hands them on. Ends when
/// the receiver is gone.
async fn forward_wakes(mut ring: AsyncFd<RingBuf<MapData>>, tx: mpsc::Sender<Wake>) {
    let mut ids = Vec::new();
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(guard) => guard,
            Err(error) => {
                tracing::error!(%error, "waiting on the wake ring buffer failed; wakes now come with the next collection only");
                return;
            }
        };
        // Clear first, then drain: a record written after the drain raises
        // readiness again, so none is left behind until the next one.
        guard.clear_ready();
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match parse_wake(&item) {
                Some(wake) => ids.push(Wake {
                    key: AttemptKey::new(wake.dest_id, wake.cgroup_id, wake.comm),
                    dest: wake.dest,
                    overflowed: wake.overflowed != 0,
                    // Stamped below, once the ring is drained.
                    read_at_us: 0,
                }),
                None => tracing::warn!(len = item.len(), "ignoring a malformed wake record"),
            }
        }
        if !ids.is_empty() {
            let read_at_us = monotonic_us();
            for wake in &mut ids {
                wake.read_at_us = read_at_us;
            }
            tracing::trace!(
                target: TIMELINE,
                t_us = read_at_us,
                wakes = ids.len(),
                "wakes read from the ring buffer"
            );
        }
        for id in ids.drain(..) {
            // Waiting here (rather than dropping) lets the ring buffer absorb
            // a burst; past its size the kernel counts what it drops.
            if tx.send(id).await.is_err() {
                return;
            }
        }
    }
}

fn parse_wake(record: &[u8]) -> Option<WakeEvent> {
    if record.len() != size_of::<WakeEvent>() {
        return None;
    }
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(record.get(at..at + 4)?.try_into().ok()?))
    };
    let dest = Destination {
        addr: record.get(32..48)?.try_into().ok()?,
        port: u16::from_ne_bytes(record.get(48..50)?.try_into().ok()?),
        _pad: 0,
    };
    Some(WakeEvent {
        dest_id: word(0)?,
        overflowed: word(4)?,
        comm: record.get(8..24)?.try_into().ok()?,
        cgroup_id: u64::from_ne_bytes(record.get(24..32)?.try_into().ok()?),
        dest,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_records_must_have_the_shared_layout() {
        let mut record = 7u32.to_ne_bytes().to_vec();
        record.extend_from_slice(&1u32.to_ne_bytes());
        record.extend_from_slice(b"java\0\0\0\0\0\0\0\0\0\0\0\0");
        record.extend_from_slice(&0x1234_5678_9abc_u64.to_ne_bytes());
        let dest = Destination::v4([10, 96, 0, 1], 8080);
        record.extend_from_slice(&dest.addr);
        record.extend_from_slice(&dest.port.to_ne_bytes());
        record.extend_from_slice(&[0; 6]);
        assert_eq!(
            parse_wake(&record),
            Some(WakeEvent {
                dest_id: 7,
                overflowed: 1,
                comm: *b"java\0\0\0\0\0\0\0\0\0\0\0\0",
                cgroup_id: 0x1234_5678_9abc,
                dest,
                _pad: 0,
            })
        );
        assert_eq!(parse_wake(&record[..8]), None);
        record.push(0);
        assert_eq!(parse_wake(&record), None);
    }
}
