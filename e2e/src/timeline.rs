//! The activation timeline read back from the binaries' JSON logs
//! (`LOG_FORMAT=json`, `RUST_LOG=info,itw_timeline=trace`; see
//! `itw_telemetry::timeline`), so a bench can say which hand-off a slow
//! activation lost its time in.

use std::{collections::BTreeMap, fmt::Write as _};

use itw_telemetry::timeline::TARGET;

/// One timeline event of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub t_us: u64,
    pub process: String,
    pub message: String,
    /// The other fields, `key=value` in key order.
    pub detail: String,
}

/// The environment that makes a binary write its timeline.
pub fn log_env() -> [(&'static str, String); 2] {
    [
        ("RUST_LOG", format!("info,{TARGET}=trace")),
        ("LOG_FORMAT", "json".to_owned()),
    ]
}

/// The timeline events in `log` (other lines are skipped), in time order.
pub fn events(process: &str, log: &str) -> Vec<Event> {
    let mut events: Vec<Event> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["target"] == TARGET)
        .filter_map(|v| {
            let fields = v.as_object()?;
            let mut detail = BTreeMap::new();
            for (key, value) in fields {
                if !matches!(
                    key.as_str(),
                    "timestamp" | "level" | "target" | "message" | "t_us"
                ) {
                    detail.insert(key.clone(), value.to_string().trim_matches('"').to_owned());
                }
            }
            Some(Event {
                t_us: fields.get("t_us")?.as_u64()?,
                process: process.to_owned(),
                message: fields.get("message")?.as_str()?.to_owned(),
                detail: detail
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            })
        })
        .collect();
    events.sort_by_key(|e| e.t_us);
    events
}

/// One activation: the caller's stamps around it and the processes' events
/// between them.
#[derive(Clone, Debug)]
pub struct Activation {
    pub connect_us: u64,
    pub received_us: u64,
    /// Every step in order: the connect, the processes' events, the receipt.
    pub steps: Vec<(u64, String)>,
}

impl Activation {
    /// Picks the events (sorted by time) that fall within the activation.
    pub fn new(connect_us: u64, received_us: u64, events: &[Event]) -> Self {
        let first = events.partition_point(|e| e.t_us < connect_us);
        let mut steps = vec![(connect_us, "caller: connect()".to_owned())];
        steps.extend(
            events[first..]
                .iter()
                .take_while(|e| e.t_us <= received_us)
                .map(|e| (e.t_us, format!("{}: {}", e.process, e.message))),
        );
        steps.push((
            received_us,
            "caller: StreamIsActive true received".to_owned(),
        ));
        Self {
            connect_us,
            received_us,
            steps,
        }
    }

    /// Each step's time since the previous one, labelled `from -> to`.
    pub fn phases(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        self.steps
            .windows(2)
            .map(|w| (format!("{} -> {}", w[0].1, w[1].1), w[1].0 - w[0].0))
    }

    /// The steps with their offsets from the connect, one per line.
    pub fn render(&self, events: &[Event]) -> String {
        let mut out = String::new();
        for (t, step) in &self.steps {
            let detail = events
                .iter()
                .find(|e| e.t_us == *t && step.ends_with(&e.message))
                .map(|e| e.detail.as_str())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  +{:>8.3} ms  {step}{}{detail}",
                (t - self.connect_us) as f64 / 1000.0,
                if detail.is_empty() { "" } else { "  " }
            );
        }
        out
    }
}

/// Per phase label: how many activations went through it, and its p50, p99
/// and max in microseconds, slowest p99 first.
pub fn phase_summary(activations: &[Activation]) -> Vec<(String, usize, u64, u64, u64)> {
    let mut by_phase: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for activation in activations {
        for (label, us) in activation.phases() {
            by_phase.entry(label).or_default().push(us);
        }
    }
    let mut rows: Vec<_> = by_phase
        .into_iter()
        .map(|(label, mut us)| {
            us.sort_unstable();
            let at = |p: f64| us[((us.len() - 1) as f64 * p).round() as usize];
            (label, us.len(), at(0.5), at(0.99), us[us.len() - 1])
        })
        .collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.3));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"{"timestamp":"2026-12-07T10:00:00.000000Z","level":"INFO","message":"agent connected","target":"itw_scaler::ingest"}
{"timestamp":"2026-12-07T10:00:00.000100Z","level":"TRACE","message":"wake batch applied","t_us":1300,"sequence":7,"target":"itw_timeline"}
not json at all
{"timestamp":"2026-12-07T10:00:00.000100Z","level":"TRACE","message":"wake batch received","t_us":1200,"sequence":7,"target":"itw_timeline"}
{"timestamp":"2026-12-07T10:00:00.000200Z","level":"TRACE","message":"StreamIsActive true handed to the stream","t_us":1450,"namespace":"bench","service":"svc-00001","target":"itw_timeline"}
{"timestamp":"2026-12-07T10:00:09.000000Z","level":"TRACE","message":"wake batch received","t_us":9000,"sequence":8,"target":"itw_timeline"}"#;

    #[test]
    fn reads_only_timeline_events_in_time_order() {
        let events = events("scaler", LOG);
        let got: Vec<_> = events
            .iter()
            .map(|e| (e.t_us, e.message.as_str(), e.detail.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (1200, "wake batch received", "sequence=7"),
                (1300, "wake batch applied", "sequence=7"),
                (
                    1450,
                    "StreamIsActive true handed to the stream",
                    "namespace=bench service=svc-00001"
                ),
                (9000, "wake batch received", "sequence=8"),
            ]
        );
    }

    #[test]
    fn an_activation_takes_the_events_within_it_and_splits_into_phases() {
        let events = events("scaler", LOG);
        let activation = Activation::new(1000, 1600, &events);
        let phases: Vec<_> = activation.phases().collect();
        assert_eq!(
            phases,
            [
                ("caller: connect() -> scaler: wake batch received".to_owned(), 200),
                ("scaler: wake batch received -> scaler: wake batch applied".to_owned(), 100),
                (
                    "scaler: wake batch applied -> scaler: StreamIsActive true handed to the stream"
                        .to_owned(),
                    150
                ),
                (
                    "scaler: StreamIsActive true handed to the stream -> caller: StreamIsActive true received"
                        .to_owned(),
                    150
                ),
            ]
        );
        let rendered = activation.render(&events);
        assert!(
            rendered.contains("+   0.200 ms  scaler: wake batch received  sequence=7"),
            "{rendered}"
        );
        assert!(rendered.contains("+   0.600 ms  caller: StreamIsActive true received"));
    }

    #[test]
    fn phases_are_summarised_slowest_p99_first() {
        let events = events("scaler", LOG);
        let fast = Activation::new(1100, 1500, &events);
        let faster = Activation::new(1100, 1480, &events);
        let slow = Activation::new(1000, 3000, &events);
        let rows = phase_summary(&[fast, slow, faster]);
        assert_eq!(
            rows[0].0,
            "scaler: StreamIsActive true handed to the stream -> caller: StreamIsActive true received"
        );
        assert_eq!(
            (rows[0].1, rows[0].2, rows[0].3, rows[0].4),
            (3, 50, 1550, 1550)
        );
        assert_eq!(rows.len(), 4);
    }
}
