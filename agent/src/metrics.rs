//! The agent's `/metrics`: `internal_tcp_attempts_total` as the seed names it,
//! `internal_tcp_filtered_total`, the source series (`source_metrics`), and
//! the agent's own figures.
//!
//! Each part of the agent registers its figures in one prometheus-client
//! `Registry` at start; the attempts series live in [`AttemptCounters`]
//! because their exposition depends on the scraper (see
//! `itw_telemetry::exposition`).

mod attempts;

use std::sync::Arc;

use itw_telemetry::{exposition::ScrapeView, http::MetricsSource};
use parking_lot::Mutex;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

pub use attempts::AttemptCounters;

use crate::{
    capture::{CaptureMode, KernelStats},
    source_metrics::SourceMetrics,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommLabels {
    pub process_comm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    pub trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabels {
    pub program: String,
    pub id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    pub hook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaptureLabels {
    pub mode: String,
    pub process_name: String,
}

/// Figures of the counting loop.
#[derive(Debug, Default)]
pub struct CountingMetrics {
    pub filtered: Family<CommLabels, Counter>,
    pub collections: Family<TriggerLabels, Counter>,
    pub wakes: Counter,
    pub capped: Counter,
    pub unattributed: Counter,
    pub kernel_map_full: Family<MapLabels, Counter>,
    pub wakes_dropped: Counter,
    pub leader_comm_failed: Counter,
    pub watched_destinations: Gauge,
    pub services: Gauge,
    pub map_apply_failures: Counter,
    pub service_map_reload_failures: Counter,
    pub capture: Family<CaptureLabels, Gauge>,
    pub programs: Family<ProgramLabels, Gauge>,
    pub programs_before_ours: Family<HookLabels, Gauge>,
    pub holding_blocked: Gauge,
    /// `internal_tcp_source_attempts_total` and the filtered-by-source counts.
    pub sources: SourceMetrics,
    last_stats: Mutex<KernelStats>,
}

impl CountingMetrics {
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "internal_tcp_filtered",
            "Attempts by processes in EXCLUDE_COMMS (health checks), not counted as traffic",
            self.filtered.clone(),
        );
        self.sources.register(registry);
        let agent = registry.sub_registry_with_prefix("itw_agent");
        agent.register(
            "collections",
            "Reads of the kernel counters, by what triggered them",
            self.collections.clone(),
        );
        agent.register(
            "wakes",
            "Idle -> active wakes received from the kernel",
            self.wakes.clone(),
        );
        agent.register(
            "comm_overflow_attempts",
            "Attempts counted under the overflow process name because a destination reached MAX_COMMS_PER_DESTINATION",
            self.capped.clone(),
        );
        agent.register(
            "unattributed_attempts",
            "Attempts whose destination id was unknown when read (should stay 0)",
            self.unattributed.clone(),
        );
        agent.register(
            "kernel_map_full",
            "Attempts that found a kernel map full: attempts -> counted per destination under the overflow name; overflow -> lost",
            self.kernel_map_full.clone(),
        );
        agent.register(
            "wakes_dropped",
            "Wakes the kernel could not queue (the attempts still counted; they reach the scaler at the next tick)",
            self.wakes_dropped.clone(),
        );
        agent.register(
            "leader_comm_failed",
            "Attempts whose process name could not be read from the thread-group leader (the thread's name was used)",
            self.leader_comm_failed.clone(),
        );
        agent.register(
            "watched_destinations",
            "IP:port destinations the kernel counts",
            self.watched_destinations.clone(),
        );
        agent.register(
            "services",
            "Services known to the service map",
            self.services.clone(),
        );
        agent.register(
            "map_apply_failures",
            "Destinations the kernel refused to watch (e.g. MAX_DESTINATIONS reached)",
            self.map_apply_failures.clone(),
        );
        agent.register(
            "service_map_reload_failures",
            "Reloads of the static service map that failed (the last good map stays)",
            self.service_map_reload_failures.clone(),
        );
        agent.register(
            "capture",
            "The capture mode in use and where process names come from (value 1)",
            self.capture.clone(),
        );
        agent.register(
            "cgroup_programs_before_ours",
            "Cgroup mode: other programs of the same hook that run before ours (a socket load balancer among them rewrites ClusterIPs to pod IPs before we see them)",
            self.programs_before_ours.clone(),
        );
        agent.register(
            "cgroup_holding_blocked",
            "1 while holding is on and another program runs before ours where the pods' connects meet ours: it may refuse a held Service's connects first (see the log and /readyz)",
            self.holding_blocked.clone(),
        );
        agent.register(
            "bpf_programs",
            "The eBPF programs this agent attached, by kernel program id (value 1; see bpftool prog show id ID)",
            self.programs.clone(),
        );
    }

    /// Records the capture mode chosen at start and the programs attached.
    pub fn capture_started(
        &self,
        mode: CaptureMode,
        process_name: &str,
        programs: &[(&'static str, u32)],
    ) {
        self.capture
            .get_or_create(&CaptureLabels {
                mode: mode.to_string(),
                process_name: process_name.to_owned(),
            })
            .set(1);
        for (program, id) in programs {
            self.programs
                .get_or_create(&ProgramLabels {
                    program: (*program).to_owned(),
                    id: id.to_string(),
                })
                .set(1);
        }
    }

    /// Records where our cgroup programs run among each hook's programs,
    /// and whether that blocks holding (when `holding`); returns why, if so.
    pub fn attach_order(
        &self,
        orders: &[crate::capture::order::AttachOrder],
        holding: bool,
    ) -> Option<String> {
        for order in orders {
            self.programs_before_ours
                .get_or_create(&HookLabels { hook: order.hook })
                .set(i64::try_from(order.before_ours().len()).unwrap_or(i64::MAX));
        }
        let blocked = orders
            .iter()
            .filter_map(|o| o.holding_blocked())
            .next()
            .filter(|_| holding);
        self.holding_blocked.set(i64::from(blocked.is_some()));
        blocked
    }

    /// Turns the kernel's cumulative trouble counters into counter increments.
    pub fn kernel_stats(&self, now: KernelStats) {
        let mut last = self.last_stats.lock();
        let up = |new: u64, old: u64| new.saturating_sub(old);
        self.kernel_map_full
            .get_or_create(&MapLabels { map: "attempts" })
            .inc_by(up(now.attempts_map_full, last.attempts_map_full));
        self.kernel_map_full
            .get_or_create(&MapLabels { map: "overflow" })
            .inc_by(up(now.overflow_map_full, last.overflow_map_full));
        self.wakes_dropped
            .inc_by(up(now.wakes_dropped, last.wakes_dropped));
        self.leader_comm_failed
            .inc_by(up(now.leader_comm_failed, last.leader_comm_failed));
        *last = now;
    }
}

/// Everything `/metrics` serves.
#[derive(Debug)]
pub struct Exporter {
    registry: Registry,
    attempts: Arc<AttemptCounters>,
}

impl Exporter {
    pub fn new(registry: Registry, attempts: Arc<AttemptCounters>) -> Self {
        Self { registry, attempts }
    }
}

impl MetricsSource for Exporter {
    fn encode(&self, out: &mut String, view: &ScrapeView) -> std::fmt::Result {
        self.attempts.encode(out, view)?;
        prometheus_client::encoding::text::encode_registry(out, &self.registry)
    }
}

#[cfg(test)]
mod tests {
    use itw_telemetry::exposition::{OVERFLOW_COMM, parse_samples};

    use super::*;
    use crate::{deltas::SeriesKey, resolve::ServiceRef};

    fn key(svc: &str, port: u16, pod: &str, comm: &str) -> SeriesKey {
        SeriesKey {
            service: ServiceRef::new("default", svc),
            port,
            pod: pod.into(),
            comm: comm.into(),
        }
    }

    fn render(exporter: &Exporter) -> String {
        let mut out = String::new();
        exporter.encode(&mut out, &ScrapeView::truth()).unwrap();
        out
    }

    #[tokio::test]
    async fn sums_ports_and_keeps_zero_series() {
        let attempts = Arc::new(AttemptCounters::default());
        let mut registry = Registry::default();
        let counting = Arc::new(CountingMetrics::default());
        counting.register(&mut registry);
        let exporter = Exporter::new(registry, attempts.clone());

        attempts.service_seen(&ServiceRef::new("default", "idle"));
        attempts.service_seen(&ServiceRef::new("default", "gone"));
        attempts.service_gone(&ServiceRef::new("default", "gone"));
        attempts.add(&[
            (key("web", 80, "", "curl"), 2),
            (key("web", 443, "", "curl"), 3),
            (key("web", 80, "web-0", OVERFLOW_COMM), 1),
        ]);
        counting
            .filtered
            .get_or_create(&CommLabels {
                process_comm: "kubelet".into(),
            })
            .inc_by(4);

        let body = render(&exporter);
        let samples = parse_samples(&body);
        let attempts: Vec<_> = samples
            .iter()
            .filter(|s| s.name == "internal_tcp_attempts_total")
            .map(|s| {
                (
                    s.label("destination_service").unwrap().to_owned(),
                    s.label("destination_pod").unwrap().to_owned(),
                    s.label("process_comm").unwrap().to_owned(),
                    s.value,
                )
            })
            .collect();
        assert_eq!(
            attempts,
            vec![
                ("idle".into(), "".into(), "".into(), 0.0),
                ("web".into(), "".into(), "curl".into(), 5.0),
                ("web".into(), "web-0".into(), OVERFLOW_COMM.into(), 1.0),
            ]
        );
        let filtered = samples
            .iter()
            .find(|s| s.name == "internal_tcp_filtered_total")
            .unwrap();
        assert_eq!(filtered.label("process_comm"), Some("kubelet"));
        assert_eq!(filtered.value, 4.0);
    }

    #[test]
    fn kernel_stats_become_increments() {
        let counting = CountingMetrics::default();
        counting.kernel_stats(KernelStats {
            wakes_dropped: 2,
            attempts_map_full: 5,
            ..Default::default()
        });
        counting.kernel_stats(KernelStats {
            wakes_dropped: 3,
            attempts_map_full: 5,
            ..Default::default()
        });
        assert_eq!(counting.wakes_dropped.get(), 3);
        assert_eq!(
            counting
                .kernel_map_full
                .get_or_create(&MapLabels { map: "attempts" })
                .get(),
            5
        );
    }
}
