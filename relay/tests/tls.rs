//! TLS on both sides of the relay: agents verify the relay's certificate,
//! and the relay verifies the replica's and presents its own (mutual TLS)
//! from SCALER_CA_FILE, SCALER_CERT_FILE and SCALER_KEY_FILE.

mod support;

use itw_relay::config::{ClientTlsFiles, Limits, ServerTlsFiles};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use support::{Agent, FakeReplica, RelayUnderTest, hello};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

#[tokio::test]
async fn agents_reach_a_mutual_tls_replica_through_a_tls_relay() {
    let dir = std::env::temp_dir().join(format!("itw-relay-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["itw-relay".to_owned()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();
    let file = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca_pem = file("ca.pem", ca.pem());
    let server_pem = file("server.pem", server.pem());
    let server_key_pem = file("server.key", server_key.serialize_pem());
    let client_pem = file("client.pem", client.pem());
    let client_key_pem = file("client.key", client_key.serialize_pem());

    // The replica insists on a client certificate signed by the CA.
    let mut replica = FakeReplica::start_with(
        "127.0.0.1:0".parse().unwrap(),
        Some(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(server.pem(), server_key.serialize_pem()))
                .client_ca_root(Certificate::from_pem(ca.pem())),
        ),
    );
    let relay = RelayUnderTest::start_with(replica.addr, None, Limits::default(), |config| {
        config.tls = Some(ServerTlsFiles {
            cert: server_pem.clone(),
            key: server_key_pem.clone(),
            client_ca: None,
        });
        config.scaler_tls = Some(ClientTlsFiles {
            ca: ca_pem.clone(),
            client: Some((client_pem.clone(), client_key_pem.clone())),
        });
    })
    .await;
    let mut call = replica.call().await;
    let header = replica.addr.to_string();
    let agent = Agent::connect_tls(relay.grpc, &header, ca.pem().as_bytes())
        .await
        .unwrap();
    agent.send(hello("node-tls")).await;
    let request = call.next().await;
    assert_eq!(request.stream, 1);
    relay.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
