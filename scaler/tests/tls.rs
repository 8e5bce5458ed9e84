//! TLS and mutual TLS on the gRPC port, with certificates made here by rcgen,
//! configured the way KEDA's caCert/tlsClientCert/tlsClientKey use them.

mod common;

use std::path::{Path, PathBuf};

use common::{Agent, TestScaler, count, loopback, object, series, within};
use itw_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use itw_scaler::config::{Config, TlsFiles};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client
/// certificate, as PEM files in a fresh directory.
struct Pki {
    dir: PathBuf,
    ca: String,
    client_cert: String,
    client_key: String,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("itw-scaler-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "itw test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(vec!["keda-operator".to_string()]).unwrap();
        client_params
            .distinguished_name
            .push(DnType::CommonName, "keda-operator");
        let client = client_params.signed_by(&client_key, &ca).unwrap();

        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
        Self {
            dir,
            ca: ca.pem(),
            client_cert: client.pem(),
            client_key: client_key.serialize_pem(),
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn config(&self, mutual: bool) -> Config {
        Config {
            tls: Some(TlsFiles {
                cert: self.path("server.pem"),
                key: self.path("server.key"),
                client_ca: mutual.then(|| self.path("ca.pem")),
            }),
            ..loopback()
        }
    }

    fn client_tls(&self, with_identity: bool) -> ClientTlsConfig {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name("localhost");
        if with_identity {
            tls.identity(Identity::from_pem(&self.client_cert, &self.client_key))
        } else {
            tls
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn tls_channel(
    scaler: &TestScaler,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("https://{}", scaler.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    within("a TLS connection", endpoint.connect()).await
}

async fn is_active(channel: Channel) -> Result<bool, tonic::Status> {
    let mut keda = ExternalScalerClient::new(channel);
    Ok(keda
        .is_active(object(&[("service", "web")]))
        .await?
        .into_inner()
        .result)
}

#[tokio::test]
async fn serves_keda_and_agents_over_tls() {
    let pki = Pki::new("server");
    let scaler = TestScaler::start(pki.config(false)).await;
    let channel = tls_channel(&scaler, pki.client_tls(false))
        .await
        .expect("TLS handshake");
    let mut agent = Agent::open(channel.clone(), None).await.unwrap();
    agent.hello("node-1", "a").await;
    agent.snapshot(0, vec![], vec![]).await;
    agent
        .batch(1, vec![count(series("web", 80, "", "curl"), 1)])
        .await;
    assert!(is_active(channel).await.expect("IsActive over TLS"));

    // A plaintext client gets nothing.
    let plain = Endpoint::from_shared(format!("http://{}", scaler.grpc))
        .unwrap()
        .connect_lazy();
    assert!(is_active(plain).await.is_err());
    scaler.stop().await;
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::new("mutual");
    let scaler = TestScaler::start(pki.config(true)).await;
    let channel = tls_channel(&scaler, pki.client_tls(true))
        .await
        .expect("mutual TLS handshake");
    assert!(
        !is_active(channel.clone())
            .await
            .expect("IsActive over mutual TLS")
    );
    let mut agent = Agent::open(channel, None).await.unwrap();
    assert_eq!(agent.hello("node-1", "a").await.applied_sequence, 0);

    // No client certificate: the handshake or the first call fails.
    let refused = match tls_channel(&scaler, pki.client_tls(false)).await {
        Err(_) => true,
        Ok(channel) => is_active(channel).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");

    // A certificate from another CA is refused too.
    let stranger = Pki::new("stranger");
    let foreign = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost")
        .identity(Identity::from_pem(
            &stranger.client_cert,
            &stranger.client_key,
        ));
    let refused = match tls_channel(&scaler, foreign).await {
        Err(_) => true,
        Ok(channel) => is_active(channel).await.is_err(),
    };
    assert!(refused, "a client certificate from another CA was accepted");
    scaler.stop().await;
}

#[tokio::test]
async fn bad_tls_files_fail_the_start_naming_the_setting() {
    let pki = Pki::new("bad");
    let mut config = pki.config(true);
    let missing: &Path = &pki.path("missing.pem");
    if let Some(tls) = &mut config.tls {
        tls.client_ca = Some(missing.to_owned());
    }
    let error = itw_scaler::Scaler::bind(config)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        error.to_string(),
        format!(
            "TLS_CLIENT_CA_FILE {}: No such file or directory (os error 2)",
            missing.display()
        )
    );

    let mut config = pki.config(false);
    if let Some(tls) = &mut config.tls {
        tls.key = pki.path("ca.pem");
    }
    let error = itw_scaler::Scaler::bind(config)
        .await
        .err()
        .expect("refused");
    assert!(
        error
            .to_string()
            .starts_with("TLS_CERT_FILE/TLS_KEY_FILE/TLS_CLIENT_CA_FILE: "),
        "{error}"
    );
}
