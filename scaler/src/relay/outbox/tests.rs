//! The outbox under paused time: what leaves when, in what order.

use itw_proto::itw::v1::{Ack, RelayEnded, ReportResponse, Welcome};

use super::*;

const DELAY: Duration = Duration::from_millis(5);

fn ack(stream: u64, sequence: u64) -> RelayResponse {
    RelayResponse {
        stream,
        message: Some(relay_response::Message::Report(ReportResponse {
            message: Some(report_response::Message::Ack(Ack { sequence })),
        })),
    }
}

fn welcome(stream: u64) -> RelayResponse {
    RelayResponse {
        stream,
        message: Some(relay_response::Message::Report(ReportResponse {
            message: Some(report_response::Message::Welcome(Welcome {
                applied_sequence: 0,
                history_seconds: 60,
            })),
        })),
    }
}

fn ended(stream: u64) -> RelayResponse {
    RelayResponse {
        stream,
        message: Some(relay_response::Message::Ended(RelayEnded {
            code: 3,
            message: "bad".into(),
        })),
    }
}

/// What a response is, in short: `ack 2/7` (stream 2, sequence 7),
/// `welcome 2`, `ended 2`.
fn show(response: &Result<RelayResponse, Status>) -> String {
    let Ok(response) = response else {
        return "error".into();
    };
    let stream = response.stream;
    match &response.message {
        Some(relay_response::Message::Report(ReportResponse {
            message: Some(report_response::Message::Ack(ack)),
        })) => format!("ack {stream}/{}", ack.sequence),
        Some(relay_response::Message::Report(_)) => format!("welcome {stream}"),
        Some(relay_response::Message::Ended(_)) => format!("ended {stream}"),
        None => "none".into(),
    }
}

/// Everything in the channel now, without waiting.
fn sent(rx: &mut mpsc::Receiver<Result<RelayResponse, Status>>) -> Vec<String> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .map(|r| show(&r))
        .collect()
}

struct Fixture {
    outbox: Outbox,
    rx: mpsc::Receiver<Result<RelayResponse, Status>>,
    metrics: Arc<ScalerMetrics>,
    start: Instant,
}

fn fixture(delay: Duration, capacity: usize) -> Fixture {
    let (tx, rx) = mpsc::channel(capacity);
    let metrics = Arc::new(ScalerMetrics::default());
    let start = Instant::now();
    let outbox = Outbox::new(tx, AckGrid::new(start, delay), Arc::clone(&metrics));
    Fixture {
        outbox,
        rx,
        metrics,
        start,
    }
}

/// Runs the outbox as the Relay stream's task does: flushes at each due
/// tick until nothing is held.
async fn until_idle(outbox: &mut Outbox) {
    while let Some(due) = outbox.due() {
        tokio::time::sleep_until(due).await;
        outbox.flush(Cause::Tick).await.unwrap();
    }
}

#[test]
fn ticks_are_on_one_grid_and_at_most_one_delay_away() {
    let start = Instant::now();
    let grid = AckGrid::new(start, DELAY);
    let at = |ms: u64| start + Duration::from_micros(ms);
    // Times in microseconds after the grid's start.
    assert_eq!(grid.next_tick(at(0)), at(5_000));
    assert_eq!(grid.next_tick(at(1)), at(5_000));
    assert_eq!(grid.next_tick(at(4_999)), at(5_000));
    // On a tick: the next one, never "now", so a tick fired is not re-armed
    // at the same instant.
    assert_eq!(grid.next_tick(at(5_000)), at(10_000));
    assert_eq!(grid.next_tick(at(123_456)), at(125_000));
}

#[tokio::test(start_paused = true)]
async fn acks_wait_for_the_tick_and_leave_together_in_order() {
    let mut f = fixture(DELAY, 256);
    tokio::time::advance(Duration::from_millis(2)).await;
    f.outbox.push(ack(1, 1), false).await.unwrap();
    f.outbox.push(ack(2, 1), false).await.unwrap();
    f.outbox.push(ack(1, 2), false).await.unwrap();
    assert_eq!(sent(&mut f.rx), Vec::<String>::new());
    // Due at the grid's next tick, 3 ms on: no later than DELAY.
    assert_eq!(f.outbox.due(), Some(f.start + DELAY));
    tokio::time::advance(Duration::from_millis(2)).await;
    assert_eq!(sent(&mut f.rx), Vec::<String>::new());
    until_idle(&mut f.outbox).await;
    assert_eq!(Instant::now(), f.start + DELAY);
    assert_eq!(sent(&mut f.rx), ["ack 1/1", "ack 2/1", "ack 1/2"]);
    assert_eq!(f.metrics.relay_bursts("tick"), (1, 3));
    assert_eq!(f.outbox.due(), None);
}

#[tokio::test(start_paused = true)]
async fn a_wake_batchs_ack_leaves_at_once_with_the_held_before_it() {
    let mut f = fixture(DELAY, 256);
    f.outbox.push(ack(1, 4), false).await.unwrap();
    f.outbox.push(ack(2, 9), true).await.unwrap();
    // No time passed: the wake ack did not wait, and the ack held before it
    // went first.
    assert_eq!(sent(&mut f.rx), ["ack 1/4", "ack 2/9"]);
    assert_eq!(f.outbox.due(), None);
    assert_eq!(f.metrics.relay_bursts("urgent"), (1, 2));
    assert_eq!(f.metrics.relay_bursts("tick"), (0, 2));
}

#[tokio::test(start_paused = true)]
async fn welcomes_and_ends_never_wait_and_keep_their_place() {
    let mut f = fixture(DELAY, 256);
    f.outbox.push(welcome(1), false).await.unwrap();
    assert_eq!(sent(&mut f.rx), ["welcome 1"]);
    f.outbox.push(ack(1, 1), false).await.unwrap();
    f.outbox.push(ended(1), false).await.unwrap();
    assert_eq!(sent(&mut f.rx), ["ack 1/1", "ended 1"]);
    f.outbox.push(ack(3, 1), false).await.unwrap();
    f.outbox.push(welcome(4), false).await.unwrap();
    f.outbox.push(ack(3, 2), false).await.unwrap();
    assert_eq!(sent(&mut f.rx), ["ack 3/1", "welcome 4"]);
    until_idle(&mut f.outbox).await;
    assert_eq!(sent(&mut f.rx), ["ack 3/2"]);
    assert_eq!(f.metrics.relay_bursts("urgent"), (3, 6));
    assert_eq!(f.metrics.relay_bursts("tick"), (1, 6));
}

#[tokio::test(start_paused = true)]
async fn a_zero_delay_sends_every_ack_at_once() {
    let mut f = fixture(Duration::ZERO, 256);
    f.outbox.push(ack(1, 1), false).await.unwrap();
    assert_eq!(sent(&mut f.rx), ["ack 1/1"]);
    f.outbox.push(ack(1, 2), false).await.unwrap();
    assert_eq!(sent(&mut f.rx), ["ack 1/2"]);
    assert_eq!(f.outbox.due(), None);
}

#[tokio::test(start_paused = true)]
async fn a_full_burst_leaves_before_the_tick() {
    let mut f = fixture(DELAY, 256);
    for sequence in 1..MAX_BURST as u64 {
        f.outbox.push(ack(1, sequence), false).await.unwrap();
    }
    assert_eq!(sent(&mut f.rx).len(), 0);
    f.outbox
        .push(ack(1, MAX_BURST as u64), false)
        .await
        .unwrap();
    let burst = sent(&mut f.rx);
    assert_eq!(burst.len(), MAX_BURST);
    assert_eq!(burst[0], "ack 1/1");
    assert_eq!(burst[MAX_BURST - 1], format!("ack 1/{MAX_BURST}"));
    assert_eq!(f.metrics.relay_bursts("full"), (1, MAX_BURST as u64));
    assert_eq!(f.outbox.due(), None);
}

#[tokio::test(start_paused = true)]
async fn a_burst_larger_than_the_channel_goes_in_parts_as_the_relay_reads() {
    let mut f = fixture(DELAY, 2);
    for sequence in 1..=5 {
        f.outbox.push(ack(1, sequence), false).await.unwrap();
    }
    let mut outbox = f.outbox;
    let flushing = tokio::spawn(async move {
        outbox.flush(Cause::Tick).await.unwrap();
        outbox
    });
    let mut read = Vec::new();
    while read.len() < 5 {
        read.push(show(&f.rx.recv().await.unwrap()));
    }
    let outbox = flushing.await.unwrap();
    assert_eq!(
        read,
        ["ack 1/1", "ack 1/2", "ack 1/3", "ack 1/4", "ack 1/5"]
    );
    assert_eq!(outbox.due(), None);
}

#[tokio::test(start_paused = true)]
async fn a_relay_that_left_is_gone_and_the_end_flush_never_waits() {
    let mut f = fixture(DELAY, 1);
    f.outbox.push(ack(1, 1), false).await.unwrap();
    f.outbox.push(ack(1, 2), false).await.unwrap();
    // The channel holds one: the first goes, the second is left, no wait.
    f.outbox.flush_ready();
    assert_eq!(sent(&mut f.rx), ["ack 1/1"]);
    drop(f.rx);
    assert_eq!(f.outbox.push(welcome(2), false).await, Err(Gone));
}

#[tokio::test(start_paused = true)]
async fn a_failed_stream_ends_after_what_was_held() {
    let mut f = fixture(DELAY, 256);
    f.outbox.push(ack(1, 1), false).await.unwrap();
    f.outbox.fail(Status::invalid_argument("broken")).await;
    assert_eq!(sent(&mut f.rx), ["ack 1/1", "error"]);
}
