//! The agent's side of TLS to the scaler, with the real binaries: the agent
//! verifies the scaler with `SCALER_CA_FILE` and presents
//! `SCALER_CERT_FILE`/`SCALER_KEY_FILE` to a scaler that asks for client
//! certificates (`TLS_CLIENT_CA_FILE`); without its certificate, or without
//! TLS at all, no stream comes up and nothing is counted at the scaler.
//! Root only (CI); addresses 127.101.7.x.

use std::{net::SocketAddr, time::Duration};

use itw_e2e::system::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

const NS: &str = "tls";

/// A CA, a server certificate for 127.0.0.1, and a client certificate for
/// the agent, as PEM files in a fresh directory.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = TempDir::new(name);
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "itw e2e CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let server_key = KeyPair::generate().expect("server key");
        let server = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("server params")
            .signed_by(&server_key, &ca)
            .expect("server certificate");
        let agent_key = KeyPair::generate().expect("agent key");
        let mut agent_params =
            CertificateParams::new(vec!["itw-agent".to_owned()]).expect("agent params");
        agent_params
            .distinguished_name
            .push(DnType::CommonName, "itw-agent");
        let agent = agent_params
            .signed_by(&agent_key, &ca)
            .expect("agent certificate");
        for (file, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server.pem()),
            ("server.key", server_key.serialize_pem()),
            ("agent.pem", agent.pem()),
            ("agent.key", agent_key.serialize_pem()),
        ] {
            std::fs::write(dir.path().join(file), pem).expect("writing a PEM file");
        }
        Self { dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// A scaler serving TLS and asking every client for a certificate.
    async fn mutual_tls_scaler(&self, name: &str) -> Scaler {
        Scaler::start_on(
            name,
            loopback(free_port()),
            loopback(free_port()),
            &[
                ("TLS_CERT_FILE", self.file("server.pem")),
                ("TLS_KEY_FILE", self.file("server.key")),
                ("TLS_CLIENT_CA_FILE", self.file("ca.pem")),
            ],
        )
        .await
    }
}

fn map(service: &str, cluster_ip: &str) -> String {
    static_map(NS, service, cluster_ip, 8080)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_streams_over_mutual_tls_with_its_certificate() {
    if !bpf_available("the_agent_streams_over_mutual_tls_with_its_certificate") {
        return;
    }
    let pki = Pki::new("tls-mutual");
    let scaler = pki.mutual_tls_scaler("scaler-mtls").await;
    // Returns once its one stream is up (itw_agent_scaler_streams_up 1).
    let _agent = Agent::start(
        "agent-mtls",
        &map("mtls", "127.101.7.1"),
        &[scaler.grpc],
        &[
            ("SCALER_CA_FILE", pki.file("ca.pem")),
            ("SCALER_CERT_FILE", pki.file("agent.pem")),
            ("SCALER_KEY_FILE", pki.file("agent.key")),
        ],
    )
    .await;
    for _ in 0..3 {
        connect_refused(addr("127.101.7.1:8080"));
    }
    eventually(
        "3 attempts at the scaler over TLS",
        Duration::from_secs(10),
        || async { (scaler.attempts(NS, "mtls").await == 3.0).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(scaler.attempts(NS, "mtls").await, 3.0);
}

/// An agent the scaler cannot accept: its stream never comes up, and its
/// attempts stay on the node.
async fn refused(
    name: &str,
    service: &str,
    cluster_ip: &str,
    scaler: &Scaler,
    env: &[(&str, String)],
) {
    let scaler_addr: SocketAddr = scaler.grpc;
    let mut all = vec![("SCALER_ADDR", scaler_addr.to_string())];
    all.extend(env.iter().cloned());
    // No scalers given: start() does not wait for a stream.
    let agent = Agent::start(name, &map(service, cluster_ip), &[], &all).await;
    for _ in 0..3 {
        connect_refused(addr(&format!("{cluster_ip}:8080")));
    }
    eventually(
        &format!("{name} to count 3 attempts"),
        Duration::from_secs(10),
        || async { (agent.attempts(NS, service).await == 3.0).then_some(()) },
    )
    .await;
    // Several reconnects' worth (the first backoff is well under this).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        exact(
            &scrape(agent.metrics).await,
            "itw_agent_scaler_streams_up",
            &[]
        ),
        Some(0.0),
        "{name}: no stream is up"
    );
    assert_eq!(
        scaler.attempts(NS, service).await,
        0.0,
        "{name}: nothing counted at the scaler"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_certificate_or_without_tls_the_agent_is_refused() {
    if !bpf_available("without_its_certificate_or_without_tls_the_agent_is_refused") {
        return;
    }
    let pki = Pki::new("tls-refused");
    let scaler = pki.mutual_tls_scaler("scaler-refusing").await;
    refused(
        "agent-no-cert",
        "nocert",
        "127.101.7.2",
        &scaler,
        &[("SCALER_CA_FILE", pki.file("ca.pem"))],
    )
    .await;
    refused("agent-plaintext", "plain", "127.101.7.3", &scaler, &[]).await;
}
