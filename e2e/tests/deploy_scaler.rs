//! The scaler Deployment and Services of deploy/, and every example
//! ScaledObject, against the scaler itself: every env var is a setting of
//! `itw-scaler` with a value it accepts, ports and probes are the ones it
//! serves, both Services lead to them, every scalerAddress in the examples
//! resolves to the scaler's ClusterIP Service, the agents' SCALER_ADDR to its
//! headless one, the token Secret the agents send is the one the scaler
//! reads, and every trigger's metadata is keys the scaler's own parser reads
//! (or KEDA's), with values it accepts.
//!
//! Each check returns the problems it found, so the negative tests can feed
//! it a broken copy and see it fail.

mod deploy_support;

use std::{collections::HashMap, path::Path, time::Duration};

use clap::{CommandFactory, Parser};
use deploy_support::*;
use itw_proto::externalscaler::{ScaledObjectRef, external_scaler_server::ExternalScalerServer};
use itw_scaler::{config::Args, keda::KedaService, trigger::Trigger};
use serde_json::{Value, json};
use tonic::server::NamedService;

/// The renders that configure the scaler: the install, with TLS, with relays, with both.
const SCALER_RENDERS: [&str; 4] = [
    "",
    "examples/tls/install",
    "examples/relays",
    "examples/relays/tls",
];

/// Trigger metadata keys KEDA reads itself for external and external-push
/// triggers (kedacore/keda pkg/scalers/external_scaler.go); the scaler sees
/// and ignores them.
const KEDA_EXTERNAL_KEYS: [&str; 3] = ["scalerAddress", "enableTLS", "unsafeSsl"];

/// The keys the scaler's trigger parser reads (design §4).
/// `the_scaler_key_list_is_the_parsers` proves each one is read.
const SCALER_KEYS: [&str; 6] = [
    "service",
    "namespace",
    "port",
    "window",
    "targetRate",
    "activationThreshold",
];

fn parse_scaler(deployment: &Value) -> Result<Args, Vec<String>> {
    let argv = argv_of(&Args::command(), container(deployment, "itw-scaler"))?;
    Args::try_parse_from(&argv).map_err(|e| vec![format!("itw-scaler refuses {argv:?}: {e}")])
}

/// Does the Service lead to the scaler container's `port` (by its target)?
fn service_port_to(service: &Value, deployment: &Value, service_port: u16) -> Option<u16> {
    let c = container(deployment, "itw-scaler");
    let port = service["spec"]["ports"]
        .as_array()?
        .iter()
        .find(|p| p["port"].as_u64() == Some(u64::from(service_port)))?;
    let target = if port["targetPort"].is_null() {
        &port["port"]
    } else {
        &port["targetPort"]
    };
    container_port(c, target)
}

fn selects(service: &Value, workload: &Value) -> bool {
    let labels = &workload["spec"]["template"]["metadata"]["labels"];
    service["spec"]["selector"]
        .as_object()
        .is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| &labels[k] == v))
}

fn check_scaler_workload(objects: &[Value]) -> Vec<String> {
    let deployment = find(objects, "Deployment", "itw-scaler");
    let args = match parse_scaler(deployment) {
        Ok(args) => args,
        Err(problems) => return problems,
    };
    let mut problems = Vec::new();
    let c = container(deployment, "itw-scaler");
    let pod = pod_spec(deployment);
    let (grpc, metrics) = (args.grpc_addr.port(), args.metrics_addr.port());
    for (name, port, setting) in [
        ("grpc", grpc, "GRPC_ADDR"),
        ("metrics", metrics, "METRICS_ADDR"),
    ] {
        if container_port(c, &json!(name)) != Some(port) {
            problems.push(format!(
                "containerPort {name:?} is {:?}; {setting} listens on {port}",
                container_port(c, &json!(name))
            ));
        }
    }
    let tls = args.tls_cert_file.is_some();
    for (probe, service) in [
        ("livenessProbe", None),
        (
            "readinessProbe",
            Some(ExternalScalerServer::<KedaService>::NAME),
        ),
    ] {
        let p = &c[probe];
        if tls {
            // The kubelet's gRPC probe has no TLS: a TLS port is probed by TCP.
            if container_port(c, &p["tcpSocket"]["port"]) != Some(grpc) {
                problems.push(format!(
                    "{probe}: with TLS on the gRPC port it must be a tcpSocket probe of port {grpc}"
                ));
            }
        } else {
            if p["grpc"]["port"].as_u64() != Some(u64::from(grpc)) {
                problems.push(format!(
                    "{probe}: not a grpc probe of GRPC_ADDR's port {grpc} ({p})"
                ));
            }
            let asked = p["grpc"]["service"].as_str();
            if asked != service {
                problems.push(format!(
                    "{probe} asks grpc.health.v1 about {asked:?}; the scaler reports {service:?}"
                ));
            }
        }
    }
    problems.extend(files_not_in_secrets(
        deployment,
        c,
        &[
            (&args.tls_cert_file, "TLS_CERT_FILE"),
            (&args.tls_key_file, "TLS_KEY_FILE"),
            (&args.tls_client_ca_file, "TLS_CLIENT_CA_FILE"),
            (&args.agent_token_file, "AGENT_TOKEN_FILE"),
        ],
    ));
    if args.agent_token_file.is_none() {
        problems.push("AGENT_TOKEN_FILE is not set: any pod could push counts".to_owned());
    }
    let security = &c["securityContext"];
    if pod["securityContext"]["runAsNonRoot"] != true {
        problems.push("runAsNonRoot is not true".to_owned());
    }
    if security["readOnlyRootFilesystem"] != true || security["allowPrivilegeEscalation"] != false {
        problems.push(
            "readOnlyRootFilesystem must be true and allowPrivilegeEscalation false".to_owned(),
        );
    }
    if security["capabilities"]["drop"] != json!(["ALL"])
        || !security["capabilities"]["add"].is_null()
    {
        problems.push("the scaler must drop every capability and add none".to_owned());
    }
    if pod["automountServiceAccountToken"] != false {
        problems.push(
            "automountServiceAccountToken is not false: the scaler never calls the API".to_owned(),
        );
    }
    let account = pod["serviceAccountName"].as_str().unwrap_or("default");
    for binding in objects
        .iter()
        .filter(|o| kind_of(o).ends_with("RoleBinding"))
    {
        if binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == account)
        {
            problems.push(format!(
                "{} {} grants the scaler's ServiceAccount API access",
                kind_of(binding),
                name_of(binding)
            ));
        }
    }
    if deployment["spec"]["replicas"].as_u64() < Some(2) {
        problems.push("fewer than 2 replicas: a restart leaves KEDA without a scaler".to_owned());
    }
    let pdbs: Vec<_> = objects
        .iter()
        .filter(|o| kind_of(o) == "PodDisruptionBudget")
        .filter(|p| {
            let labels = &deployment["spec"]["template"]["metadata"]["labels"];
            p["spec"]["selector"]["matchLabels"]
                .as_object()
                .is_some_and(|m| m.iter().all(|(k, v)| &labels[k] == v))
        })
        .collect();
    if pdbs.is_empty() {
        problems.push("no PodDisruptionBudget selects the scaler's pods".to_owned());
    }

    // The Services: KEDA's ClusterIP one, and the agents' headless one.
    let service = find(objects, "Service", "itw-scaler");
    if service["spec"]["clusterIP"] == "None" || !selects(service, deployment) {
        problems.push(
            "Service itw-scaler must be a ClusterIP Service selecting the scaler's pods".to_owned(),
        );
    }
    for (port, what) in [(grpc, "gRPC"), (metrics, "/metrics")] {
        if service_port_to(service, deployment, port) != Some(port) {
            problems.push(format!(
                "Service itw-scaler port {port} does not lead to the scaler's {what} port {port}"
            ));
        }
    }
    let ingest = find(objects, "Service", "itw-scaler-ingest");
    if ingest["spec"]["clusterIP"] != "None" || !selects(ingest, deployment) {
        problems.push("Service itw-scaler-ingest must be headless and select the scaler's pods, so agents reach every replica".to_owned());
    }

    // The agents' side of the same wire: SCALER_ADDR and the token Secret.
    let daemonset = find(objects, "DaemonSet", "itw-agent");
    let agent = container(daemonset, "itw-agent");
    let agent_env: HashMap<&str, &Value> = agent["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["name"].as_str().unwrap_or_default(), &e["value"]))
        .collect();
    let scaler_addr = agent_env
        .get("SCALER_ADDR")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    match resolve_service(objects, scaler_addr) {
        Err(problem) => problems.push(format!(
            "the agents' SCALER_ADDR {scaler_addr:?}: {problem}"
        )),
        Ok((svc, port)) => {
            if name_of(svc) != "itw-scaler-ingest"
                || service_port_to(svc, deployment, port) != Some(grpc)
            {
                problems.push(format!(
                    "the agents' SCALER_ADDR {scaler_addr:?} is not the headless itw-scaler-ingest Service on the gRPC port {grpc}"
                ));
            }
        }
    }
    let agent_token = agent_env
        .get("SCALER_TOKEN_FILE")
        .and_then(|v| v.as_str())
        .and_then(|f| volume_of_file(daemonset, agent, Path::new(f)));
    let scaler_token = args
        .agent_token_file
        .as_deref()
        .and_then(|f| volume_of_file(deployment, c, f));
    match (agent_token, scaler_token) {
        (Some((a, a_key)), Some((s, s_key))) => {
            let (a_secret, s_secret) = (&a["secret"]["secretName"], &s["secret"]["secretName"]);
            if a_secret.is_null() || a_secret != s_secret || a_key != s_key {
                problems.push(format!(
                    "agents send Secret {a_secret} key {a_key}, the scaler expects Secret {s_secret} key {s_key}"
                ));
            }
        }
        _ => problems.push("the agents' SCALER_TOKEN_FILE and the scaler's AGENT_TOKEN_FILE are not both mounted Secret files".to_owned()),
    }
    problems
}

/// `name.namespace.svc[.cluster.local]:port` -> the Service in the render and
/// the port. A bare name, another domain or a missing Service is an error.
fn resolve_service<'a>(objects: &'a [Value], address: &str) -> Result<(&'a Value, u16), String> {
    let (host, port) = address.rsplit_once(':').ok_or("not host:port")?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port {port:?} is not a number"))?;
    let labels: Vec<&str> = host.split('.').collect();
    let (name, namespace) = match labels.as_slice() {
        [name, namespace, "svc"] | [name, namespace, "svc", "cluster", "local"] => {
            (*name, *namespace)
        }
        _ => {
            return Err(format!(
                "{host} is not <service>.<namespace>.svc[.cluster.local]"
            ));
        }
    };
    let service = objects
        .iter()
        .find(|o| kind_of(o) == "Service" && name_of(o) == name && namespace_of(o) == namespace)
        .ok_or_else(|| format!("no Service {namespace}/{name} in deploy/"))?;
    if !service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["port"].as_u64() == Some(u64::from(port)))
    {
        return Err(format!("Service {namespace}/{name} has no port {port}"));
    }
    Ok((service, port))
}

/// The example triggers of type external and external-push against the
/// install: their scalerAddress is the scaler's ClusterIP Service on the gRPC
/// port, and their metadata is what the scaler parses.
fn check_triggers(install: &[Value], example: &[Value], max_window: Duration) -> Vec<String> {
    let mut problems = Vec::new();
    let deployment = find(install, "Deployment", "itw-scaler");
    let grpc = match parse_scaler(deployment) {
        Ok(args) => args.grpc_addr.port(),
        Err(p) => return p,
    };
    for so in example.iter().filter(|o| kind_of(o) == "ScaledObject") {
        for trigger in so["spec"]["triggers"].as_array().into_iter().flatten() {
            if !matches!(trigger["type"].as_str(), Some("external" | "external-push")) {
                continue;
            }
            let at = format!("ScaledObject {}/{}", namespace_of(so), name_of(so));
            let meta: HashMap<String, String> = trigger["metadata"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect();
            let address = meta
                .get("scalerAddress")
                .map(String::as_str)
                .unwrap_or_default();
            match resolve_service(install, address) {
                Err(problem) => {
                    problems.push(format!("{at}: scalerAddress {address:?}: {problem}"))
                }
                Ok((service, port)) => {
                    if service["spec"]["clusterIP"] == "None" {
                        problems.push(format!("{at}: scalerAddress {address:?} is the headless Service; KEDA's is itw-scaler"));
                    }
                    if service_port_to(service, deployment, port) != Some(grpc) {
                        problems.push(format!("{at}: scalerAddress {address:?} does not lead to the scaler's gRPC port {grpc}"));
                    }
                }
            }
            for key in meta.keys() {
                let base = key.strip_suffix("FromEnv").unwrap_or(key);
                if !KEDA_EXTERNAL_KEYS.contains(&key.as_str()) && !SCALER_KEYS.contains(&base) {
                    problems.push(format!(
                        "{at}: metadata key {key:?} is read by neither KEDA nor the scaler"
                    ));
                }
            }
            let object = ScaledObjectRef {
                name: name_of(so).to_owned(),
                namespace: namespace_of(so).to_owned(),
                scaler_metadata: meta.clone(),
            };
            if let Err(e) = Trigger::parse(&object, max_window) {
                problems.push(format!("{at}: the scaler refuses the trigger: {e}"));
            }
        }
    }
    problems
}

#[test]
fn the_scaler_manifests_match_the_binary() {
    for dir in SCALER_RENDERS {
        let Some(objects) = render("scaler manifests", dir) else {
            return;
        };
        let problems = check_scaler_workload(&objects);
        assert!(
            problems.is_empty(),
            "deploy/{dir}:\n  {}",
            problems.join("\n  ")
        );
    }
}

#[test]
fn every_example_trigger_reaches_the_scaler_and_parses() {
    let Some(install) = render("example triggers", "") else {
        return;
    };
    let max_window = parse_scaler(find(&install, "Deployment", "itw-scaler"))
        .expect("the scaler's settings")
        .max_window;
    let mut seen = 0;
    for dir in example_dirs() {
        let Some(example) = render("example triggers", &dir) else {
            return;
        };
        seen += example
            .iter()
            .filter(|o| kind_of(o) == "ScaledObject")
            .flat_map(|so| {
                so["spec"]["triggers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|t| matches!(t["type"].as_str(), Some("external" | "external-push")))
            .count();
        let problems = check_triggers(&install, &example, max_window);
        assert!(
            problems.is_empty(),
            "deploy/{dir}:\n  {}",
            problems.join("\n  ")
        );
    }
    assert!(
        seen >= 3,
        "expected the external, external-push and TLS examples, saw {seen} triggers"
    );
}

/// SCALER_KEYS is what the parser reads: each key with a value no parser
/// accepts is refused, naming that key.
#[test]
fn the_scaler_key_list_is_the_parsers() {
    for key in SCALER_KEYS {
        let mut meta: HashMap<String, String> = [("service".to_owned(), "web".to_owned())].into();
        meta.insert(key.to_owned(), "%%".to_owned());
        let object = ScaledObjectRef {
            name: "so".into(),
            namespace: "apps".into(),
            scaler_metadata: meta,
        };
        let error = Trigger::parse(&object, Duration::from_secs(900))
            .expect_err(key)
            .to_string();
        assert!(
            error.contains(&format!("scalerMetadata.{key}")),
            "{key}: {error}"
        );
    }
}

#[test]
fn broken_scaler_manifests_fail_the_checks() {
    let Some(objects) = render("broken scaler manifests", "") else {
        return;
    };
    let with = |kind: &str, name: &str, change: &dyn Fn(&mut Value)| {
        let mut copy = objects.clone();
        let target = copy
            .iter_mut()
            .find(|o| kind_of(o) == kind && name_of(o) == name)
            .expect("object to break");
        change(target);
        copy
    };
    let fails = |broken: &[Value], expected: &str| {
        let problems = check_scaler_workload(broken);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "expected a problem containing {expected:?}, got {problems:?}"
        );
    };
    let env = |name: &'static str, value: &'static str| {
        move |d: &mut Value| *d = with_env(d, "itw-scaler", name, value)
    };
    fails(
        &with(
            "Deployment",
            "itw-scaler",
            &env("GRPC_ADRR", "0.0.0.0:9090"),
        ),
        "env GRPC_ADRR is not a setting of itw-scaler",
    );
    fails(
        &with("Deployment", "itw-scaler", &env("MAX_WINDOW", "2h")),
        "itw-scaler refuses",
    );
    fails(
        &with(
            "Deployment",
            "itw-scaler",
            &env("GRPC_ADDR", "0.0.0.0:9091"),
        ),
        "containerPort \"grpc\" is Some(9090)",
    );
    fails(
        &with("Deployment", "itw-scaler", &|d| {
            d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["service"] =
                json!("externalscaler.Scaler")
        }),
        "readinessProbe asks grpc.health.v1 about Some(\"externalscaler.Scaler\")",
    );
    fails(
        &with("Service", "itw-scaler", &|s| {
            s["spec"]["ports"][0]["targetPort"] = json!(9091)
        }),
        "Service itw-scaler port 9090 does not lead",
    );
    fails(
        &with("Service", "itw-scaler-ingest", &|s| {
            s["spec"]["clusterIP"] = json!("")
        }),
        "must be headless",
    );
    fails(
        &with("DaemonSet", "itw-agent", &|d| {
            *d = with_env(
                d,
                "itw-agent",
                "SCALER_ADDR",
                "itw-scaler.itw-system.svc:9090",
            )
        }),
        "is not the headless itw-scaler-ingest Service",
    );
    fails(
        &with("DaemonSet", "itw-agent", &|d| {
            let volumes = d["spec"]["template"]["spec"]["volumes"]
                .as_array_mut()
                .expect("the DaemonSet's volumes");
            let token = volumes
                .iter_mut()
                .find(|v| v["secret"].is_object())
                .expect("the DaemonSet mounts the token Secret");
            token["secret"]["secretName"] = json!("another-token")
        }),
        "agents send Secret \"another-token\"",
    );

    // Triggers: a scalerAddress that is not the scaler, a misspelt key, a
    // value the scaler refuses.
    let Some(example) = render("broken scaler manifests", "examples/external-push") else {
        return;
    };
    let trigger_fails = |change: &dyn Fn(&mut Value), expected: &str| {
        let mut copy = example.clone();
        let so = copy
            .iter_mut()
            .find(|o| kind_of(o) == "ScaledObject")
            .expect("ScaledObject");
        change(&mut so["spec"]["triggers"][0]["metadata"]);
        let problems = check_triggers(&objects, &copy, Duration::from_secs(900));
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "expected a problem containing {expected:?}, got {problems:?}"
        );
    };
    trigger_fails(
        &|m| m["scalerAddress"] = json!("itw-scaler.itw-sytem.svc.cluster.local:9090"),
        "no Service itw-sytem/itw-scaler",
    );
    trigger_fails(
        &|m| m["scalerAddress"] = json!("itw-scaler:9090"),
        "is not <service>.<namespace>.svc",
    );
    trigger_fails(
        &|m| m["scalerAddress"] = json!("itw-scaler-ingest.itw-system.svc.cluster.local:9090"),
        "is the headless Service",
    );
    trigger_fails(
        &|m| m["scalerAddress"] = json!("itw-scaler.itw-system.svc.cluster.local:9102"),
        "does not lead to the scaler's gRPC port",
    );
    trigger_fails(
        &|m| m["targetrate"] = json!("5"),
        "metadata key \"targetrate\" is read by neither",
    );
    trigger_fails(
        &|m| m["window"] = json!("30"),
        "the scaler refuses the trigger: scalerMetadata.window",
    );
}
