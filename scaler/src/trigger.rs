//! A ScaledObject trigger as KEDA hands it to us: the `scalerMetadata` keys of
//! the design's table, parsed and checked.
//!
//! Keys we do not know (`scalerAddress`, KEDA's TLS keys, anything a user adds)
//! are ignored; a known key with a bad value is refused with the key and the
//! value in the message, because that message is what a user sees in the
//! ScaledObject's events.

use std::{collections::HashMap, time::Duration};

use itw_proto::externalscaler::{MetricSpec, ScaledObjectRef};

use itw_proto::names;

use crate::window::DEFAULT_WINDOW;

/// Target rate when the trigger sets none.
pub const DEFAULT_TARGET_RATE: f64 = 1.0;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TriggerError {
    #[error("the request has no scaledObjectRef")]
    MissingRef,
    #[error("scalerMetadata.service is required: the name of the destination Service")]
    MissingService,
    #[error(
        "scalerMetadata.namespace is not set and the ScaledObject reference has no namespace: set namespace to the destination Service's namespace"
    )]
    MissingNamespace,
    #[error("scalerMetadata.{key} = {value}: {problem}")]
    Invalid {
        /// The value as sent, quoted; cut after [`SHOWN_VALUE_CHARS`]
        /// characters with its length, so a huge value neither fills the
        /// log nor overflows the status header.
        key: &'static str,
        value: String,
        problem: String,
    },
}

impl From<TriggerError> for tonic::Status {
    fn from(e: TriggerError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// One trigger: which destination, over which window, with which targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub namespace: String,
    pub service: String,
    /// Only attempts to this Service port; `None` sums every port.
    pub port: Option<u16>,
    pub window: Duration,
    pub target_rate: f64,
    pub activation_threshold: f64,
    /// `prewake: "true"`: also active while any Service that reaches this
    /// one through the dependency graph is active ([`crate::prewake`]).
    pub prewake: bool,
}

impl Trigger {
    /// Parses a trigger; `max_window` is the scaler's `MAX_WINDOW`.
    pub fn parse(object: &ScaledObjectRef, max_window: Duration) -> Result<Self, TriggerError> {
        let meta = &object.scaler_metadata;
        let service = match meta.get("service") {
            None => return Err(TriggerError::MissingService),
            Some(s) if s.is_empty() => return Err(TriggerError::MissingService),
            Some(s) => s.clone(),
        };
        names::service(&service).map_err(|problem| invalid("service", &service, problem))?;
        let namespace = match meta.get("namespace") {
            Some(ns) if !ns.is_empty() => ns.clone(),
            _ if !object.namespace.is_empty() => object.namespace.clone(),
            _ => return Err(TriggerError::MissingNamespace),
        };
        names::namespace(&namespace)
            .map_err(|problem| invalid("namespace", &namespace, problem))?;
        Ok(Self {
            namespace,
            service,
            port: parse_port(meta)?,
            window: parse_window(meta, max_window)?,
            target_rate: parse_number(
                meta,
                "targetRate",
                DEFAULT_TARGET_RATE,
                |v| v > 0.0,
                "must be a number above 0",
            )?,
            activation_threshold: parse_number(
                meta,
                "activationThreshold",
                0.0,
                |v| v >= 0.0,
                "must be a number, 0 or more",
            )?,
            prewake: parse_prewake(meta)?,
        })
    }

    /// Parses the trigger of a `GetMetrics` request.
    pub fn parse_ref(
        object: Option<&ScaledObjectRef>,
        max_window: Duration,
    ) -> Result<Self, TriggerError> {
        Self::parse(object.ok_or(TriggerError::MissingRef)?, max_window)
    }

    /// The window in whole seconds (parsing refuses anything else).
    pub fn window_secs(&self) -> u64 {
        self.window.as_secs()
    }

    /// The metric's name: a valid URL path segment (KEDA prefixes it with
    /// `s<index>-` and does not sanitise it), unique per destination.
    pub fn metric_name(&self) -> String {
        match self.port {
            None => format!("itw-{}-{}", self.namespace, self.service),
            Some(port) => format!("itw-{}-{}-{port}", self.namespace, self.service),
        }
    }

    /// The single metric spec of `GetMetricSpec`.
    #[allow(deprecated)] // targetSize is deprecated in the proto but older KEDA reads it.
    pub fn metric_spec(&self) -> MetricSpec {
        MetricSpec {
            metric_name: self.metric_name(),
            target_size: rounded_at_least_one(self.target_rate),
            target_size_float: self.target_rate,
        }
    }
}

/// `round(value)`, at least 1, for KEDA versions that read only the integer target.
fn rounded_at_least_one(value: f64) -> i64 {
    // `as` saturates for huge values; parsing guarantees a finite value > 0.
    (value.round() as i64).max(1)
}

/// Characters of a bad metadata value shown in its error.
const SHOWN_VALUE_CHARS: usize = 64;

/// A caller's value as logs and errors show it: quoted, and cut after
/// [`SHOWN_VALUE_CHARS`] characters with its length.
pub fn shown(value: &str) -> String {
    if value.chars().count() > SHOWN_VALUE_CHARS {
        let cut: String = value.chars().take(SHOWN_VALUE_CHARS).collect();
        format!("{cut:?}… ({} bytes)", value.len())
    } else {
        format!("{value:?}")
    }
}

fn invalid(key: &'static str, value: &str, problem: &str) -> TriggerError {
    TriggerError::Invalid {
        key,
        value: shown(value),
        problem: problem.to_owned(),
    }
}

fn parse_port(meta: &HashMap<String, String>) -> Result<Option<u16>, TriggerError> {
    let Some(value) = meta.get("port") else {
        return Ok(None);
    };
    match value.parse::<u16>() {
        Ok(port) if port > 0 => Ok(Some(port)),
        _ => Err(invalid(
            "port",
            value,
            "must be a Service port number, 1-65535",
        )),
    }
}

fn parse_window(
    meta: &HashMap<String, String>,
    max_window: Duration,
) -> Result<Duration, TriggerError> {
    let Some(value) = meta.get("window") else {
        return Ok(DEFAULT_WINDOW.min(max_window));
    };
    let window = humantime::parse_duration(value).map_err(|e| {
        invalid(
            "window",
            value,
            &format!("not a duration ({e}); use e.g. 30s or 2m"),
        )
    })?;
    if window < Duration::from_secs(1) {
        return Err(invalid("window", value, "must be at least 1s"));
    }
    if window.subsec_nanos() != 0 {
        return Err(invalid(
            "window",
            value,
            "must be a whole number of seconds (windows count per second)",
        ));
    }
    if window > max_window {
        return Err(invalid(
            "window",
            value,
            &format!(
                "is longer than this scaler's MAX_WINDOW of {}",
                humantime::format_duration(max_window)
            ),
        ));
    }
    Ok(window)
}

fn parse_prewake(meta: &HashMap<String, String>) -> Result<bool, TriggerError> {
    match meta.get("prewake").map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(invalid("prewake", other, "must be \"true\" or \"false\"")),
    }
}

fn parse_number(
    meta: &HashMap<String, String>,
    key: &'static str,
    default: f64,
    allowed: impl Fn(f64) -> bool,
    rule: &str,
) -> Result<f64, TriggerError> {
    let Some(value) = meta.get(key) else {
        return Ok(default);
    };
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() && allowed(v) => Ok(v),
        _ => Err(invalid(key, value, rule)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(15 * 60);

    fn object(namespace: &str, pairs: &[(&str, &str)]) -> ScaledObjectRef {
        ScaledObjectRef {
            name: "so".into(),
            namespace: namespace.into(),
            scaler_metadata: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<Trigger, TriggerError> {
        Trigger::parse(&object("apps", pairs), MAX)
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        parse(pairs).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_unknown_keys() {
        let t = parse(&[
            ("service", "web"),
            ("scalerAddress", "itw-scaler:9090"),
            ("enableTLS", "x"),
        ])
        .unwrap();
        assert_eq!(
            t,
            Trigger {
                namespace: "apps".into(),
                service: "web".into(),
                port: None,
                window: Duration::from_secs(60),
                target_rate: 1.0,
                activation_threshold: 0.0,
                prewake: false,
            }
        );
        assert_eq!(t.metric_name(), "itw-apps-web");
        // A MAX_WINDOW below the default window caps the default.
        let t = Trigger::parse(
            &object("apps", &[("service", "web")]),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(t.window, Duration::from_secs(20));
    }

    #[test]
    fn every_key_set() {
        let t = parse(&[
            ("service", "web"),
            ("namespace", "shop"),
            ("port", "8080"),
            ("window", "2m"),
            ("targetRate", "2.5"),
            ("activationThreshold", "3"),
            ("prewake", "true"),
        ])
        .unwrap();
        assert_eq!(
            t,
            Trigger {
                namespace: "shop".into(),
                service: "web".into(),
                port: Some(8080),
                window: Duration::from_secs(120),
                target_rate: 2.5,
                activation_threshold: 3.0,
                prewake: true,
            }
        );
        assert_eq!(t.window_secs(), 120);
        assert_eq!(t.metric_name(), "itw-shop-web-8080");
        #[allow(deprecated)]
        let spec = t.metric_spec();
        assert_eq!(spec.metric_name, "itw-shop-web-8080");
        assert_eq!(spec.target_size_float, 2.5);
        #[allow(deprecated)]
        let size = spec.target_size;
        assert_eq!(size, 3);
        assert_eq!(
            parse(&[("service", "web"), ("port", "65535"), ("window", "1s")])
                .unwrap()
                .port,
            Some(65535)
        );
        assert_eq!(
            parse(&[("service", "web"), ("window", "15m")])
                .unwrap()
                .window,
            MAX
        );
        assert_eq!(
            parse(&[("service", "web"), ("activationThreshold", "0")])
                .unwrap()
                .activation_threshold,
            0.0
        );
    }

    #[test]
    fn target_size_is_rounded_and_at_least_one() {
        assert_eq!(rounded_at_least_one(0.2), 1);
        assert_eq!(rounded_at_least_one(0.5), 1);
        assert_eq!(rounded_at_least_one(1.5), 2);
        assert_eq!(rounded_at_least_one(2.4), 2);
        assert_eq!(rounded_at_least_one(1e300), i64::MAX);
    }

    #[test]
    fn namespace_falls_back_to_the_scaled_object() {
        let t = Trigger::parse(
            &object("team-a", &[("service", "web"), ("namespace", "")]),
            MAX,
        )
        .unwrap();
        assert_eq!(t.namespace, "team-a");
        assert_eq!(
            Trigger::parse(&object("", &[("service", "web")]), MAX).unwrap_err(),
            TriggerError::MissingNamespace
        );
        assert_eq!(
            Trigger::parse(&object("", &[("service", "web"), ("namespace", "x")]), MAX)
                .unwrap()
                .namespace,
            "x"
        );
    }

    #[test]
    fn service_is_required_and_checked() {
        assert_eq!(parse(&[]).unwrap_err(), TriggerError::MissingService);
        assert_eq!(
            parse(&[("service", "")]).unwrap_err(),
            TriggerError::MissingService
        );
        assert_eq!(
            error(&[("service", "Web/x")]),
            "scalerMetadata.service = \"Web/x\": not a Kubernetes Service name (lowercase letters, digits and '-', starting with a letter and ending with a letter or digit, at most 63 characters)"
        );
        assert_eq!(
            error(&[("service", "web"), ("namespace", "a%b")]),
            "scalerMetadata.namespace = \"a%b\": not a Kubernetes namespace name (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)"
        );
    }

    #[test]
    fn bad_ports() {
        for bad in ["0", "65536", "-1", "http", "", "80.5", " 80"] {
            assert_eq!(
                error(&[("service", "web"), ("port", bad)]),
                format!("scalerMetadata.port = {bad:?}: must be a Service port number, 1-65535")
            );
        }
    }

    /// #13 item 9: a huge bad value is shown cut short, whole in no message.
    #[test]
    fn a_huge_bad_value_is_cut_short() {
        let huge = "9".repeat(1 << 20);
        let message = error(&[("service", "web"), ("port", &huge)]);
        assert_eq!(
            message,
            format!(
                "scalerMetadata.port = {:?}… (1048576 bytes): must be a Service port number, 1-65535",
                "9".repeat(64)
            )
        );
    }

    #[test]
    fn bad_windows() {
        let cases = [
            ("500ms", "must be at least 1s"),
            ("0s", "must be at least 1s"),
            (
                "1500ms",
                "must be a whole number of seconds (windows count per second)",
            ),
            ("16m", "is longer than this scaler's MAX_WINDOW of 15m"),
            ("1h", "is longer than this scaler's MAX_WINDOW of 15m"),
        ];
        for (bad, problem) in cases {
            assert_eq!(
                error(&[("service", "web"), ("window", bad)]),
                format!("scalerMetadata.window = {bad:?}: {problem}")
            );
        }
        for bad in ["30", "soon", "", "-5s"] {
            let message = error(&[("service", "web"), ("window", bad)]);
            assert!(
                message.starts_with(&format!(
                    "scalerMetadata.window = {bad:?}: not a duration ("
                )),
                "{message}"
            );
            assert!(message.ends_with("; use e.g. 30s or 2m"), "{message}");
        }
    }

    #[test]
    fn bad_target_rates() {
        for bad in ["0", "-1", "NaN", "inf", "-inf", "abc", "", "1e999"] {
            assert_eq!(
                error(&[("service", "web"), ("targetRate", bad)]),
                format!("scalerMetadata.targetRate = {bad:?}: must be a number above 0")
            );
        }
        assert_eq!(
            parse(&[("service", "web"), ("targetRate", "0.01")])
                .unwrap()
                .target_rate,
            0.01
        );
    }

    #[test]
    fn bad_activation_thresholds() {
        for bad in ["-1", "-0.5", "NaN", "inf", "x", ""] {
            assert_eq!(
                error(&[("service", "web"), ("activationThreshold", bad)]),
                format!(
                    "scalerMetadata.activationThreshold = {bad:?}: must be a number, 0 or more"
                )
            );
        }
    }

    #[test]
    fn prewake_is_true_or_false() {
        assert!(
            !parse(&[("service", "web"), ("prewake", "false")])
                .unwrap()
                .prewake
        );
        for bad in ["True", "yes", "1", ""] {
            let status =
                tonic::Status::from(parse(&[("service", "web"), ("prewake", bad)]).unwrap_err());
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_eq!(
                status.message(),
                format!("scalerMetadata.prewake = {bad:?}: must be \"true\" or \"false\"")
            );
        }
    }

    #[test]
    fn errors_are_invalid_argument() {
        let status = tonic::Status::from(parse(&[]).unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "scalerMetadata.service is required: the name of the destination Service"
        );
        assert_eq!(
            Trigger::parse_ref(None, MAX).unwrap_err(),
            TriggerError::MissingRef
        );
    }
}
