//! The `internal_tcp_attempts_total` exposition, and the rule that makes
//! Prometheus see a series' first increment.
//!
//! `rate()` and `increase()` need two samples of a series. A series whose first
//! sample is already 1 never shows that first attempt, and for a Service at
//! zero replicas that first attempt is the whole signal. The usual cure,
//! creating the series at 0 ahead of time, cannot work for the `process_comm`
//! label: nobody knows which process will connect first.
//!
//! So each scraper (a request carrying Prometheus' or vmagent's
//! `X-Prometheus-Scrape-Timeout-Seconds` header, told apart by peer address and
//! user agent) is shown every series created since its previous scrape at 0,
//! once; its next scrape shows the count. The counter then reads 0 -> n to
//! that scraper, as if it had been created at 0 a moment before the attempt,
//! which is what happened. Requests without the header (`curl`, tests, people)
//! always get the true count, and a scraper's first scrape gets true counts
//! too, so a new or restarted Prometheus never sees counters drop.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, LazyLock},
    time::Duration,
};

use parking_lot::Mutex;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::counter::ConstCounter,
    registry::Registry,
};
use tokio::time::Instant;

/// Content type of the OpenMetrics text format `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The header Prometheus and vmagent send with every scrape.
pub const SCRAPE_HEADER: &str = "x-prometheus-scrape-timeout-seconds";

/// Name of the attempts counter, without the `_total` the encoder appends.
pub const ATTEMPTS_NAME: &str = "internal_tcp_attempts";
const ATTEMPTS_HELP: &str =
    "TCP connect attempts to watched Kubernetes destinations, by destination and calling process";

/// The `process_comm` value that stands for every process beyond a cap on
/// distinct names. Longer than a kernel process name can be (15 bytes), so no
/// real process can take it.
pub const OVERFLOW_COMM: &str = "(other processes)";

/// Scrapers not seen for this long are forgotten (their next scrape counts as a first one).
const SCRAPER_TTL: Duration = Duration::from_secs(3600);
/// At most this many scrapers are remembered; the longest idle one goes first.
const MAX_SCRAPERS: usize = 64;

/// The labels of `internal_tcp_attempts_total`, exactly as the seed names them.
///
/// Shared strings: a binary that already holds the names (the agent's
/// resolver, its Services and processes) keeps a series for a pointer each,
/// and encoding a scrape clones them without copying.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct AttemptLabels {
    pub destination_namespace: Arc<str>,
    pub destination_service: Arc<str>,
    /// Empty for connects to a ClusterIP.
    pub destination_pod: Arc<str>,
    pub process_comm: Arc<str>,
}

/// One empty label value for every series that has none: `Arc::from("")`
/// would allocate each time.
static EMPTY: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));

/// The shared empty label value.
pub fn empty_label() -> Arc<str> {
    EMPTY.clone()
}

impl AttemptLabels {
    /// The per-service series (no pod, no process) that exists at 0 from the
    /// moment the service is known, so a query for the service returns 0
    /// rather than nothing.
    pub fn service(namespace: &str, service: &str) -> Self {
        Self::shared_service(&namespace.into(), &service.into())
    }

    /// [`AttemptLabels::service`] with names the caller already holds.
    pub fn shared_service(namespace: &Arc<str>, service: &Arc<str>) -> Self {
        Self {
            destination_namespace: namespace.clone(),
            destination_service: service.clone(),
            destination_pod: empty_label(),
            process_comm: empty_label(),
        }
    }
}

/// What one `/metrics` request may see of series created recently.
#[derive(Clone, Copy, Debug)]
pub struct ScrapeView {
    /// Series created after this instant are shown at 0.
    zero_after: Option<Instant>,
}

impl ScrapeView {
    /// The view of a request that is not a scraper, or of a scraper's first scrape.
    pub const fn truth() -> Self {
        Self { zero_after: None }
    }

    /// The value to publish for a series created at `created` with count `value`.
    pub fn value(&self, created: Instant, value: u64) -> u64 {
        match self.zero_after {
            Some(after) if created > after => 0,
            _ => value,
        }
    }
}

/// Identity of a scraper: peer address and user agent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ScraperId {
    peer: IpAddr,
    user_agent: String,
}

/// Remembers when each scraper last scraped.
#[derive(Debug, Default)]
pub struct Scrapers {
    last_start: Mutex<HashMap<ScraperId, Instant>>,
}

impl Scrapers {
    /// Call when a scrape begins; returns the view that scrape gets.
    pub fn begin(&self, peer: IpAddr, user_agent: &str, is_scraper: bool) -> ScrapeView {
        if !is_scraper {
            return ScrapeView::truth();
        }
        let now = Instant::now();
        let id = ScraperId {
            peer,
            user_agent: user_agent.to_owned(),
        };
        let mut last = self.last_start.lock();
        last.retain(|_, at| now.duration_since(*at) < SCRAPER_TTL);
        let previous = last.insert(id, now);
        if last.len() > MAX_SCRAPERS
            && let Some(oldest) = last
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(id, _)| id.clone())
        {
            last.remove(&oldest);
        }
        ScrapeView {
            zero_after: previous,
        }
    }
}

/// One series of the attempts counter as a binary holds it.
pub struct AttemptSeries<'a> {
    pub labels: &'a AttemptLabels,
    pub attempts: u64,
    /// When the binary first created the series.
    pub created: Instant,
}

/// Encodes `internal_tcp_attempts_total` for one scrape.
pub fn encode_attempts<'a>(
    out: &mut String,
    view: &ScrapeView,
    series: impl IntoIterator<Item = AttemptSeries<'a>>,
) -> std::fmt::Result {
    let samples = series
        .into_iter()
        .map(|s| (s.labels.clone(), view.value(s.created, s.attempts)))
        .collect();
    let mut registry = Registry::default();
    registry.register_collector(Box::new(CounterFamily {
        name: ATTEMPTS_NAME,
        help: ATTEMPTS_HELP,
        samples,
    }));
    prometheus_client::encoding::text::encode_registry(out, &registry)
}

/// Writes the OpenMetrics end marker; call once, after every family.
pub fn encode_eof(out: &mut String) -> std::fmt::Result {
    prometheus_client::encoding::text::encode_eof(out)
}

#[derive(Debug)]
struct CounterFamily<L> {
    name: &'static str,
    help: &'static str,
    samples: Vec<(L, u64)>,
}

impl<L: EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static> Collector for CounterFamily<L> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let counter_type = ConstCounter::new(0u64).metric_type();
        let mut family = encoder.encode_descriptor(self.name, self.help, None, counter_type)?;
        for (labels, value) in &self.samples {
            ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

/// One sample of a Prometheus/OpenMetrics text body.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses one sample line of a text body. For tests and tools that check
/// `/metrics` exactly; our label values never hold escaped quotes.
pub fn parse_sample(line: &str) -> Option<Sample> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        None => (head.to_owned(), Vec::new()),
        Some((name, rest)) => {
            let mut labels = Vec::new();
            let mut rest = rest.strip_suffix('}')?;
            while !rest.is_empty() {
                let (key, after) = rest.split_once("=\"")?;
                let (value, after) = after.split_once('"')?;
                labels.push((key.to_owned(), value.to_owned()));
                rest = after.strip_prefix(',').unwrap_or(after);
            }
            (name.to_owned(), labels)
        }
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Every sample of a text body.
pub fn parse_samples(body: &str) -> Vec<Sample> {
    body.lines().filter_map(parse_sample).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(comm: &str) -> AttemptLabels {
        AttemptLabels {
            destination_namespace: "default".into(),
            destination_service: "my-svc".into(),
            destination_pod: empty_label(),
            process_comm: comm.into(),
        }
    }

    fn render(view: &ScrapeView, series: &[(AttemptLabels, u64, Instant)]) -> String {
        let mut out = String::new();
        encode_attempts(
            &mut out,
            view,
            series.iter().map(|(l, v, c)| AttemptSeries {
                labels: l,
                attempts: *v,
                created: *c,
            }),
        )
        .unwrap();
        encode_eof(&mut out).unwrap();
        out
    }

    #[tokio::test(start_paused = true)]
    async fn encodes_the_seed_metric_name_and_labels() {
        let now = Instant::now();
        let body = render(&ScrapeView::truth(), &[(labels("curl"), 3, now)]);
        assert_eq!(
            body,
            "# HELP internal_tcp_attempts TCP connect attempts to watched Kubernetes destinations, by destination and calling process\n\
             # TYPE internal_tcp_attempts counter\n\
             internal_tcp_attempts_total{destination_namespace=\"default\",destination_service=\"my-svc\",destination_pod=\"\",process_comm=\"curl\"} 3\n\
             # EOF\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_scraper_sees_a_new_series_at_zero_once() {
        let scrapers = Scrapers::default();
        let peer: IpAddr = [127, 0, 0, 1].into();
        let old = Instant::now();

        // First scrape ever: truth for everything, even what is brand new.
        let first = scrapers.begin(peer, "Prometheus/2.42.0", true);
        assert_eq!(first.value(old, 5), 5);

        tokio::time::advance(Duration::from_secs(1)).await;
        let created = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;

        // Second scrape: the series created since the first one reads 0 ...
        let second = scrapers.begin(peer, "Prometheus/2.42.0", true);
        assert_eq!(second.value(created, 1), 0);
        assert_eq!(second.value(old, 7), 7);

        // ... and its count from the next scrape on.
        tokio::time::advance(Duration::from_secs(1)).await;
        let third = scrapers.begin(peer, "Prometheus/2.42.0", true);
        assert_eq!(third.value(created, 1), 1);

        // A person with curl always sees the truth, and does not use up the
        // scraper's zero sample.
        tokio::time::advance(Duration::from_secs(1)).await;
        let later = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(scrapers.begin(peer, "curl/8.0", false).value(later, 2), 2);
        assert_eq!(
            scrapers
                .begin(peer, "Prometheus/2.42.0", true)
                .value(later, 2),
            0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn scrapers_are_told_apart_and_forgotten() {
        let scrapers = Scrapers::default();
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        scrapers.begin(a, "Prometheus/2.42.0", true);
        tokio::time::advance(Duration::from_secs(1)).await;
        let created = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        // b's first scrape: truth. a's second: zero for the new series.
        assert_eq!(
            scrapers
                .begin(b, "Prometheus/2.42.0", true)
                .value(created, 4),
            4
        );
        assert_eq!(
            scrapers
                .begin(a, "Prometheus/2.42.0", true)
                .value(created, 4),
            0
        );
        // After the TTL a scraper starts over with truth.
        tokio::time::advance(SCRAPER_TTL + Duration::from_secs(1)).await;
        let newer = Instant::now() - Duration::from_millis(1);
        assert_eq!(
            scrapers.begin(a, "Prometheus/2.42.0", true).value(newer, 4),
            4
        );
    }

    #[tokio::test(start_paused = true)]
    async fn remembers_a_bounded_number_of_scrapers() {
        let scrapers = Scrapers::default();
        for i in 0..(MAX_SCRAPERS as u32 + 10) {
            scrapers.begin(IpAddr::from(i.to_be_bytes()), "vm_promscrape", true);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(scrapers.last_start.lock().len(), MAX_SCRAPERS);
    }

    #[test]
    fn parses_sample_lines() {
        let sample = parse_sample(
            "internal_tcp_attempts_total{destination_namespace=\"default\",destination_pod=\"\"} 12",
        )
        .unwrap();
        assert_eq!(sample.name, "internal_tcp_attempts_total");
        assert_eq!(sample.label("destination_pod"), Some(""));
        assert_eq!(
            sample.labels,
            vec![
                ("destination_namespace".to_owned(), "default".to_owned()),
                ("destination_pod".to_owned(), String::new())
            ]
        );
        assert_eq!(sample.value, 12.0);
        assert_eq!(parse_sample("# TYPE x counter"), None);
        assert_eq!(
            parse_sample("up 1"),
            Some(Sample {
                name: "up".into(),
                labels: vec![],
                value: 1.0
            })
        );
        assert_eq!(
            parse_samples("# HELP a b\na 1\nb{x=\"y\"} 2.5\n# EOF\n").len(),
            2
        );
    }
}
