//! TLS both ways: HTTPS upstreams verified against a CA, and TLS listeners with h2 by ALPN.
#![allow(clippy::unwrap_used)]

mod utils;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use utils::*;

/// A CA and a server certificate for 127.0.0.1/localhost signed by it, written as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path, tag: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("keygate test CA {tag}"));
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let pki = Pki {
        ca: dir.join(format!("ca-{tag}.pem")),
        cert: dir.join(format!("cert-{tag}.pem")),
        key: dir.join(format!("key-{tag}.pem")),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

fn https_upstream_config(mock: &Mock, ca: &Path) -> String {
    format!(
        "upstreams:\n  secure:\n    url: {}\n    ca_file: {}\n    keys: [ {{ env: K1 }} ]\nroutes:\n  - {{ upstreams: [secure], retries: 0 }}\n",
        mock.url,
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_its_ca_works() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "good");
    let mock = Mock::start(&[
        "--tls-cert",
        pki.cert.to_str().unwrap(),
        "--tls-key",
        pki.key.to_str().unwrap(),
    ]);
    assert!(mock.url.starts_with("https://"));
    let kg = Keygate::start(&https_upstream_config(&mock, &pki.ca), &[("K1", "sk-tls")]);
    let r = kg.post_chat(&chat("gpt-4o")).await;
    assert_eq!(r.status(), 200, "{}", kg.log_text());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_signed_by_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let served = make_pki(dir.path(), "served");
    let trusted = make_pki(dir.path(), "other");
    let mock = Mock::start(&[
        "--tls-cert",
        served.cert.to_str().unwrap(),
        "--tls-key",
        served.key.to_str().unwrap(),
    ]);
    let kg = Keygate::start(
        &https_upstream_config(&mock, &trusted.ca),
        &[("K1", "sk-tls")],
    );
    let r = kg.post_chat(&chat("gpt-4o")).await;
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
    assert_eq!(
        mock.stats_tls(&served.ca).await["total"].as_u64().unwrap(),
        0,
        "no request got through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_speaks_http1_and_h2() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "listener");
    let mock = Mock::start(&[]);
    let port = free_port();
    let yaml = format!(
        "listen:\n  - {{ addr: 127.0.0.1:{port}, tls: {{ cert: {}, key: {} }} }}\nupstreams:\n  mock:\n    url: {}\n    keys: [ {{ env: K1 }} ]\nroutes:\n  - {{ upstreams: [mock] }}\n",
        pki.cert.display(),
        pki.key.display(),
        mock.url
    );
    let (kdir, path, _) = write_config(&yaml);
    let kg = Keygate::start_with(kdir, &path, port, &[("K1", "sk-one")]);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca).unwrap()).unwrap();
    for h2 in [false, true] {
        let mut b = reqwest::Client::builder().add_root_certificate(ca.clone());
        if !h2 {
            b = b.http1_only();
        }
        let r = b
            .build()
            .unwrap()
            .post(format!("https://localhost:{}/v1/chat/completions", kg.port))
            .json(&chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let want = if h2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(r.version(), want);
    }
    assert_eq!(mock.count("sk-one").await, 2);
}

trait TlsStats {
    async fn stats_tls(&self, ca: &Path) -> serde_json::Value;
}

impl TlsStats for Mock {
    /// The stats of a mock that only speaks HTTPS.
    async fn stats_tls(&self, ca: &Path) -> serde_json::Value {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
        reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .unwrap()
            .get(format!("{}/_mock/stats", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}
