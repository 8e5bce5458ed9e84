//! The relay Deployment and Service of deploy/examples/relays (the install
//! for large clusters) and deploy/examples/relays/tls (the same with TLS)
//! against the relay itself:
//! every env var is a setting of `itw-relay` with a value it accepts, the
//! ports and probes are the ones it serves, its Service leads to them, its
//! SCALER_ADDR is the scaler's headless Service (so it reaches every
//! replica), the token it checks and presents is the Secret the scaler
//! expects, the agents' RELAY_ADDR is the relay Service, and TLS agrees on
//! both of the relay's hops (agents -> relay, relay -> replicas).
//!
//! Each check returns the problems it found, so the negative test can feed
//! it a broken copy and see it fail.

mod deploy_support;

use std::path::Path;

use clap::{CommandFactory, Parser};
use deploy_support::*;
use itw_relay::config::Args;
use serde_json::{Value, json};

/// The overlay that installs the relays, under deploy/.
const RELAYS: &str = "examples/relays";

/// The overlays that install the relays: plain and with TLS.
const RELAY_RENDERS: [&str; 2] = [RELAYS, "examples/relays/tls"];

fn parse_relay(deployment: &Value) -> Result<Args, Vec<String>> {
    let argv = argv_of(&Args::command(), container(deployment, "itw-relay"))?;
    Args::try_parse_from(&argv).map_err(|e| vec![format!("itw-relay refuses {argv:?}: {e}")])
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

fn check_relay(objects: &[Value]) -> Vec<String> {
    let deployment = find(objects, "Deployment", "itw-relay");
    let args = match parse_relay(deployment) {
        Ok(args) => args,
        Err(problems) => return problems,
    };
    let mut problems = Vec::new();
    let c = container(deployment, "itw-relay");
    let pod = pod_spec(deployment);
    let (grpc, metrics) = (args.listen_addr.port(), args.metrics_addr.port());
    for (name, port, setting) in [
        ("grpc", grpc, "LISTEN_ADDR"),
        ("metrics", metrics, "METRICS_ADDR"),
    ] {
        if container_port(c, &json!(name)) != Some(port) {
            problems.push(format!(
                "containerPort {name:?} does not match {setting}'s port {port}"
            ));
        }
    }
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let p = &c[probe]["httpGet"];
        if p["path"] != path || container_port(c, &p["port"]) != Some(metrics) {
            problems.push(format!(
                "{probe} is not GET {path} on METRICS_ADDR's port {metrics}"
            ));
        }
    }
    match args.token_file.as_deref() {
        None => problems.push("TOKEN_FILE is not set: any pod could relay counts".to_owned()),
        Some(file) => {
            let relay_secret = volume_of_file(deployment, c, file)
                .map(|(v, key)| (v["secret"]["secretName"].clone(), key.to_owned()));
            let scaler = find(objects, "Deployment", "itw-scaler");
            let scaler_c = container(scaler, "itw-scaler");
            let scaler_secret = env_value(scaler_c, "AGENT_TOKEN_FILE")
                .and_then(|f| volume_of_file(scaler, scaler_c, Path::new(f)))
                .map(|(v, key)| (v["secret"]["secretName"].clone(), key.to_owned()));
            if relay_secret.is_none() || relay_secret != scaler_secret {
                problems.push(format!(
                    "the relay's TOKEN_FILE is Secret {relay_secret:?}, the scaler's AGENT_TOKEN_FILE {scaler_secret:?}: they must be the same Secret key"
                ));
            }
        }
    }
    let scalers: Vec<String> = args.scaler_addr.0.iter().map(ToString::to_string).collect();
    if scalers != ["itw-scaler-ingest.itw-system.svc:9090"] {
        problems.push(format!(
            "SCALER_ADDR is {scalers:?}, not the headless itw-scaler-ingest Service (every replica)"
        ));
    }
    let security = &c["securityContext"];
    if pod["securityContext"]["runAsNonRoot"] != true
        || security["readOnlyRootFilesystem"] != true
        || security["allowPrivilegeEscalation"] != false
        || security["capabilities"]["drop"] != json!(["ALL"])
        || !security["capabilities"]["add"].is_null()
    {
        problems.push("the relay must run as non-root, read-only, without privilege escalation or any capability".to_owned());
    }
    if pod["automountServiceAccountToken"] != false {
        problems.push(
            "automountServiceAccountToken is not false: the relay never calls the API".to_owned(),
        );
    }
    let service = find(objects, "Service", "itw-relay");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selects = service["spec"]["selector"]
        .as_object()
        .is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| &labels[k] == v));
    let leads = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| {
            p["port"].as_u64() == Some(u64::from(grpc))
                && container_port(c, &p["targetPort"]) == Some(grpc)
        });
    if service["spec"]["clusterIP"] == "None" || !selects || !leads {
        problems.push(format!(
            "Service itw-relay must be a ClusterIP Service selecting the relay's pods, port {grpc} to its gRPC port"
        ));
    }
    let namespace = service["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    let expected = format!("itw-relay.{namespace}.svc:{grpc}");
    let agent = find(objects, "DaemonSet", "itw-agent");
    let relay_addr = env_value(container(agent, "itw-agent"), "RELAY_ADDR");
    if relay_addr != Some(expected.as_str()) {
        problems.push(format!(
            "the agents' RELAY_ADDR is {relay_addr:?}, not the relay Service {expected:?}"
        ));
    }
    problems.extend(check_relay_tls(objects, &args));
    problems
}

/// TLS on the relay's two hops. Agents speak to RELAY_ADDR with the TLS
/// settings they would use for SCALER_ADDR, so the relay must serve TLS
/// exactly when they use it, and check the client certificate they present;
/// towards the replicas it must speak TLS exactly when the scaler serves it,
/// and present a certificate when the scaler asks for one.
fn check_relay_tls(objects: &[Value], args: &Args) -> Vec<String> {
    let mut problems = Vec::new();
    let agent = container(find(objects, "DaemonSet", "itw-agent"), "itw-agent");
    let scaler = container(find(objects, "Deployment", "itw-scaler"), "itw-scaler");
    let agents_tls = env_value(agent, "SCALER_CA_FILE").is_some();
    let agents_cert = env_value(agent, "SCALER_CERT_FILE").is_some();
    if agents_tls != args.tls_cert_file.is_some() {
        problems.push(format!(
            "the agents {} TLS to RELAY_ADDR (SCALER_CA_FILE) but the relay {} (TLS_CERT_FILE)",
            if agents_tls { "speak" } else { "do not speak" },
            if agents_tls {
                "does not serve it"
            } else {
                "serves it"
            },
        ));
    }
    if agents_cert != args.tls_client_ca_file.is_some() {
        problems.push(format!(
            "the agents {} a client certificate (SCALER_CERT_FILE) but the relay {} (TLS_CLIENT_CA_FILE)",
            if agents_cert { "present" } else { "present no" },
            if agents_cert { "does not check it" } else { "asks for one" },
        ));
    }
    let replicas_tls = env_value(scaler, "TLS_CERT_FILE").is_some();
    if replicas_tls != args.scaler_ca_file.is_some() {
        problems.push(format!(
            "the scaler {} TLS (TLS_CERT_FILE) but the relay {} (SCALER_CA_FILE)",
            if replicas_tls {
                "serves"
            } else {
                "does not serve"
            },
            if replicas_tls {
                "does not speak it to the replicas"
            } else {
                "speaks it to the replicas"
            },
        ));
    }
    if env_value(scaler, "TLS_CLIENT_CA_FILE").is_some() && args.scaler_cert_file.is_none() {
        problems.push(
            "the scaler asks for a client certificate (TLS_CLIENT_CA_FILE) and the relay presents none (SCALER_CERT_FILE)".to_owned(),
        );
    }
    let deployment = find(objects, "Deployment", "itw-relay");
    let c = container(deployment, "itw-relay");
    problems.extend(files_not_in_secrets(
        deployment,
        c,
        &[
            (&args.tls_cert_file, "TLS_CERT_FILE"),
            (&args.tls_key_file, "TLS_KEY_FILE"),
            (&args.tls_client_ca_file, "TLS_CLIENT_CA_FILE"),
            (&args.scaler_ca_file, "SCALER_CA_FILE"),
            (&args.scaler_cert_file, "SCALER_CERT_FILE"),
            (&args.scaler_key_file, "SCALER_KEY_FILE"),
        ],
    ));
    problems
}

#[test]
fn the_relay_deployment_matches_the_relay() {
    for dir in RELAY_RENDERS {
        let Some(objects) = render("the_relay_deployment_matches_the_relay", dir) else {
            return;
        };
        assert_eq!(check_relay(&objects), Vec::<String>::new(), "deploy/{dir}");
    }
}

/// The TLS render sets TLS up on both hops; the plain one on neither.
#[test]
fn the_tls_relays_speak_tls_both_ways() {
    for (dir, tls) in [(RELAYS, false), ("examples/relays/tls", true)] {
        let Some(objects) = render("the_tls_relays_speak_tls_both_ways", dir) else {
            return;
        };
        let args = parse_relay(find(&objects, "Deployment", "itw-relay")).expect("relay settings");
        assert_eq!(
            [
                args.tls_cert_file.is_some(),
                args.tls_client_ca_file.is_some(),
                args.scaler_ca_file.is_some(),
                args.scaler_cert_file.is_some(),
            ],
            [tls; 4],
            "deploy/{dir}"
        );
    }
}

/// Each half-configured hop is named.
#[test]
fn a_relay_tls_mismatch_is_caught() {
    let Some(plain) = render("a_relay_tls_mismatch_is_caught", RELAYS) else {
        return;
    };
    let Some(tls) = render("a_relay_tls_mismatch_is_caught", "examples/relays/tls") else {
        return;
    };
    let edit = |objects: &[Value], kind: &str, name: &str, env: &str, value: &str| -> Vec<Value> {
        objects
            .iter()
            .map(|o| {
                if kind_of(o) == kind && name_of(o) == name {
                    with_env(o, name, env, value)
                } else {
                    o.clone()
                }
            })
            .collect()
    };
    let agents_tls = edit(
        &plain,
        "DaemonSet",
        "itw-agent",
        "SCALER_CA_FILE",
        "/etc/ca.crt",
    );
    assert_eq!(
        check_relay(&agents_tls),
        [
            "the agents speak TLS to RELAY_ADDR (SCALER_CA_FILE) but the relay does not serve it (TLS_CERT_FILE)"
        ]
    );
    let scaler_tls = edit(
        &plain,
        "Deployment",
        "itw-scaler",
        "TLS_CERT_FILE",
        "/etc/tls.crt",
    );
    assert_eq!(
        check_relay(&scaler_tls),
        [
            "the scaler serves TLS (TLS_CERT_FILE) but the relay does not speak it to the replicas (SCALER_CA_FILE)"
        ]
    );
    let unmounted = edit(
        &tls,
        "Deployment",
        "itw-relay",
        "SCALER_CA_FILE",
        "/etc/elsewhere/ca.crt",
    );
    assert_eq!(
        check_relay(&unmounted),
        ["SCALER_CA_FILE /etc/elsewhere/ca.crt is not a file of a mounted Secret"]
    );
    let scaler_mtls = edit(
        &scaler_tls,
        "Deployment",
        "itw-scaler",
        "TLS_CLIENT_CA_FILE",
        "/etc/ca.crt",
    );
    let relay_to_tls = edit(
        &scaler_mtls,
        "Deployment",
        "itw-relay",
        "SCALER_CA_FILE",
        "/etc/itw/agent-token/token",
    );
    assert_eq!(
        check_relay(&relay_to_tls),
        [
            "the scaler asks for a client certificate (TLS_CLIENT_CA_FILE) and the relay presents none (SCALER_CERT_FILE)"
        ]
    );
}

#[test]
fn a_broken_relay_deployment_is_caught() {
    let Some(objects) = render("a_broken_relay_deployment_is_caught", RELAYS) else {
        return;
    };
    let broken = |name: &str, value: &str| -> Vec<Value> {
        objects
            .iter()
            .map(|o| {
                if kind_of(o) == "Deployment" && name_of(o) == "itw-relay" {
                    with_env(o, "itw-relay", name, value)
                } else {
                    o.clone()
                }
            })
            .collect()
    };
    let problems = check_relay(&broken("MAX_AGENT_STREAMS", "0"));
    assert!(problems[0].starts_with("itw-relay refuses"), "{problems:?}");
    let problems = check_relay(&broken("SCALER_ADDR", "itw-scaler.itw-system.svc:9090"));
    assert_eq!(
        problems,
        [
            "SCALER_ADDR is [\"itw-scaler.itw-system.svc:9090\"], not the headless itw-scaler-ingest Service (every replica)"
        ]
    );
    let problems = check_relay(&broken("METRICS_ADDR", "0.0.0.0:9103"));
    assert_eq!(problems.len(), 3, "{problems:?}");

    let agents_elsewhere: Vec<Value> = objects
        .iter()
        .map(|o| {
            if kind_of(o) == "DaemonSet" && name_of(o) == "itw-agent" {
                with_env(o, "itw-agent", "RELAY_ADDR", "itw-relay.default.svc:9090")
            } else {
                o.clone()
            }
        })
        .collect();
    assert_eq!(
        check_relay(&agents_elsewhere),
        [
            "the agents' RELAY_ADDR is Some(\"itw-relay.default.svc:9090\"), not the relay Service \"itw-relay.itw-system.svc:9090\""
        ]
    );
}

/// The base install runs no relay: below about 1,000 nodes agents connect
/// to the replicas themselves.
#[test]
fn the_base_install_has_no_relay() {
    let Some(objects) = render("the_base_install_has_no_relay", "") else {
        return;
    };
    assert!(
        objects.iter().all(|o| !name_of(o).contains("relay")),
        "{:?}",
        objects.iter().map(name_of).collect::<Vec<_>>()
    );
    let agent = find(&objects, "DaemonSet", "itw-agent");
    assert_eq!(env_value(container(agent, "itw-agent"), "RELAY_ADDR"), None);
}
