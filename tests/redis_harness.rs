//! The Redis harness (tests/utils/redis.rs) works: a server answers and can be killed and
//! restarted on its port, a cluster of three masters forms, and the latency proxy adds its delay
//! and drops it when told.
#![allow(clippy::unwrap_used)]

mod utils;
use std::time::{Duration, Instant};
use utils::redis::{port_refuses, redis_cmd, LatencyProxy, RedisCluster, RedisServer};

#[test]
fn a_server_answers_ping_and_keeps_a_value() {
    let redis = RedisServer::start();
    assert_eq!(redis.cmd(&["PING"]), "PONG");
    assert_eq!(redis.cmd(&["SET", "k", "v"]), "OK");
    assert_eq!(redis.cmd(&["GET", "k"]), "v");
    assert_eq!(redis.cmd(&["GET", "missing"]), "(nil)");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/0", redis.port()));
}

#[test]
fn a_killed_server_refuses_then_answers_again_on_its_port_after_restart() {
    let mut redis = RedisServer::start();
    let port = redis.port();
    assert_eq!(redis.cmd(&["SET", "k", "v"]), "OK");
    redis.kill9();
    assert!(port_refuses(port), "port {port} still open after kill9");
    redis.restart();
    assert_eq!(redis.port(), port);
    assert_eq!(redis.cmd(&["PING"]), "PONG");
    // No persistence: a restart starts empty.
    assert_eq!(redis.cmd(&["GET", "k"]), "(nil)");
}

#[test]
fn three_masters_form_a_cluster_with_every_node_ok() {
    let cluster = RedisCluster::start(3);
    assert_eq!(cluster.ports().len(), 3);
    assert_eq!(cluster.urls().len(), 3);
    for node in 0..3 {
        let info = cluster.cmd(node, &["CLUSTER", "INFO"]);
        assert!(info.contains("cluster_state:ok"), "node {node}:\n{info}");
        assert!(
            info.contains("cluster_known_nodes:3"),
            "node {node}:\n{info}"
        );
    }
    // Every slot has one owner: exactly one node takes the key, the others redirect.
    let replies: Vec<String> = (0..3).map(|n| cluster.cmd(n, &["SET", "k", "v"])).collect();
    assert_eq!(
        replies.iter().filter(|r| *r == "OK").count(),
        1,
        "{replies:?}"
    );
    assert_eq!(
        replies
            .iter()
            .filter(|r| r.starts_with("(error) MOVED"))
            .count(),
        2,
        "{replies:?}"
    );
}

/// How long one SET through `port` takes, on a blocking thread.
async fn timed_set(port: u16) -> Duration {
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        assert_eq!(redis_cmd(port, &["SET", "k", "v"]).unwrap(), "OK");
        start.elapsed()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_latency_proxy_delays_commands_until_its_delay_is_set_to_zero() {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let proxy = LatencyProxy::start(redis.port(), Duration::from_millis(200));
    assert_eq!(proxy.url(), format!("redis://127.0.0.1:{}/0", proxy.port()));
    let slow = timed_set(proxy.port()).await;
    assert!(slow >= Duration::from_millis(150), "slow SET took {slow:?}");
    proxy.set_delay(Duration::ZERO);
    let fast = timed_set(proxy.port()).await;
    assert!(fast < Duration::from_millis(150), "fast SET took {fast:?}");
    assert_eq!(redis.cmd(&["GET", "k"]), "v");
}

#[test]
fn dropping_the_latency_proxy_closes_its_open_connections() {
    use std::io::{Read, Write};
    let redis = RedisServer::start();
    let proxy = LatencyProxy::start(redis.port(), Duration::ZERO);
    let mut client = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    client.write_all(b"PING\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = client.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"+PONG\r\n");
    let start = Instant::now();
    drop(proxy);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "drop took {:?}",
        start.elapsed()
    );
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Closed: end of stream or a reset, never a timeout.
    match client.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0, "read {:?} after the drop", &buf[..n]),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}
