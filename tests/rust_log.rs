//! No `RUST_LOG` value makes keygate write any part of an upstream key to its log: Pingora's
//! TRACE (the request as written, credential included) and DEBUG (upstream bodies) stay off
//! whatever the spelling.
#![allow(clippy::unwrap_used)]

mod utils;
use rand::distr::{Alphanumeric, SampleString};
use utils::*;

/// Spellings of "TRACE (or DEBUG) for Pingora" that `env_logger` accepts, each with a line it
/// must still write (proof that the directives were honoured for keygate's own output).
const SPELLINGS: &[(&str, &str)] = &[
    (
        "info,pingora_core::protocols=trace",
        " INFO  keygate::server",
    ),
    (
        "debug,pingora_core::protocols::http::v1=TRACE",
        " DEBUG keygate::proxy",
    ),
    (
        "pingora=trace,pingora_proxy=Trace,pingora_core=trace,keygate=info",
        " INFO  keygate::server",
    ),
    ("TRACE", " DEBUG keygate::proxy"),
    // A regex filter: only messages matching it.
    ("trace/ready", "keygate ready"),
];

/// A key no other test uses: `sk-canary-` and 24 random characters.
fn canary() -> String {
    format!(
        "sk-canary-{}",
        Alphanumeric.sample_string(&mut rand::rng(), 24)
    )
}

/// Every run of 8 characters of `secret` that `text` contains.
fn leaked_runs<'a>(text: &str, secret: &'a str) -> Vec<&'a str> {
    (0..=secret.len().saturating_sub(8))
        .map(|i| &secret[i..i + 8])
        .filter(|run| text.contains(run))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_rust_log_spelling_writes_any_part_of_a_key() {
    let key = canary();
    let mock = Mock::start(&["--strict", "--key", &format!("{key}=ok")]);
    let yaml = format!(
        "upstreams:\n  mock:\n    url: {}\n    keys:\n      - {{ name: a, env: KA }}\nroutes:\n  - {{ upstreams: [mock] }}\n",
        mock.url
    );
    for (spec, shown) in SPELLINGS {
        let mut kg = Keygate::start(&yaml, &[("KA", key.as_str()), ("RUST_LOG", spec)]);
        let r = kg.post_chat(&chat("gpt-4o")).await;
        assert_eq!(r.status(), 200, "RUST_LOG={spec}");
        r.bytes().await.unwrap();
        let mut stream = chat("gpt-4o");
        stream["stream"] = true.into();
        let r = kg.post_chat(&stream).await;
        assert_eq!(r.status(), 200, "RUST_LOG={spec}");
        r.bytes().await.unwrap();
        // Stopped, so everything it would ever write about these requests is in the file.
        assert!(
            kg.stop(libc::SIGINT, std::time::Duration::from_secs(10)),
            "RUST_LOG={spec}"
        );
        let log = kg.log_text();
        assert!(
            log.contains(shown),
            "RUST_LOG={spec} writes {shown:?}: {log}"
        );
        let leaked = leaked_runs(&log, &key);
        assert!(leaked.is_empty(), "RUST_LOG={spec} leaks {leaked:?}");
    }
    assert!(mock.count(&key).await >= 2 * SPELLINGS.len() as u64);
}
