//! Real Redis servers for integration tests: a single [`RedisServer`], a [`RedisCluster`] of
//! masters, and a [`LatencyProxy`] that makes either one slow.
//!
//! Every server is a `redis-server` child on a free loopback port with its own temp dir, no
//! persistence, owned by a [`ChildGuard`] so it stops also when an assertion panics. A missing
//! `redis-server` fails the test (`make deps` installs it); nothing is skipped.
//! Commands go over a small RESP client ([`redis_cmd`]), so polling spawns no processes.

use super::{free_port, signal, ChildGuard};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a server gets to answer after it is started.
const READY_LIMIT: Duration = Duration::from_secs(10);
/// How long a cluster gets to report `cluster_state:ok` on every node after its creation.
const CLUSTER_LIMIT: Duration = Duration::from_secs(20);
/// Poll interval of every wait here.
const POLL: Duration = Duration::from_millis(20);
/// How many fresh ports a start tries when another process took the one picked.
const PORT_ATTEMPTS: usize = 5;
/// Connect, read and write limit of one command.
const CMD_TIMEOUT: Duration = Duration::from_secs(5);
/// Hash slots of a Redis Cluster.
const SLOTS: usize = 16384;

/// What to tell whoever lacks the Redis tools.
const INSTALL_HINT: &str =
    "install it with `make deps` (Debian packages redis-server, redis-tools)";

/// Runs one command on the Redis at `127.0.0.1:port` over a fresh connection; the reply as text:
/// a status or bulk string as is, an integer in decimal, an error as `(error) MESSAGE`, a nil as
/// `(nil)`, an array as its elements one per line (nested arrays flattened).
pub fn redis_cmd(port: u16, args: &[&str]) -> std::io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, CMD_TIMEOUT)?;
    stream.set_read_timeout(Some(CMD_TIMEOUT))?;
    stream.set_write_timeout(Some(CMD_TIMEOUT))?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request)?;
    read_reply(&mut BufReader::new(stream))
}

/// Reads one RESP2 reply as text (see [`redis_cmd`]).
fn read_reply(reader: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            ErrorKind::UnexpectedEof,
            "connection closed before a reply",
        ));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let bad = || std::io::Error::new(ErrorKind::InvalidData, format!("bad RESP line {line:?}"));
    let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "-" => Ok(format!("(error) {rest}")),
        "$" => {
            let len: i64 = rest.parse().map_err(|_| bad())?;
            let Ok(len) = usize::try_from(len) else {
                return Ok("(nil)".to_string());
            };
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body)?;
            body.truncate(len);
            Ok(String::from_utf8_lossy(&body).into_owned())
        }
        "*" => {
            let n: i64 = rest.parse().map_err(|_| bad())?;
            let Ok(n) = usize::try_from(n) else {
                return Ok("(nil)".to_string());
            };
            let items = (0..n)
                .map(|_| read_reply(reader))
                .collect::<std::io::Result<Vec<_>>>()?;
            Ok(items.join("\n"))
        }
        _ => Err(bad()),
    }
}

/// Whether a connection to `127.0.0.1:port` is refused (nothing listens there).
pub fn port_refuses(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    matches!(
        TcpStream::connect_timeout(&addr, CMD_TIMEOUT),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

/// How one start attempt on a given port ended.
enum Started {
    Ready(ChildGuard),
    /// Another process had the port; the server exited.
    PortTaken,
}

/// One `redis-server` process with its temp dir; the building block of both server kinds.
struct Node {
    child: Option<ChildGuard>,
    dir: tempfile::TempDir,
    port: u16,
    /// Arguments beyond the common ones (cluster settings).
    extra: Vec<String>,
}

impl Node {
    /// Starts a node on a free port, trying other ports if one is taken meanwhile; `extra`
    /// gives the further arguments of each attempt (fresh ports of their own, if any).
    fn start(extra: impl Fn() -> Vec<String>) -> Node {
        for _ in 0..PORT_ATTEMPTS {
            // A fresh dir: a failed cluster node may have written its nodes.conf.
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let extra = extra();
            if let Started::Ready(child) = spawn_ready(dir.path(), port, &extra) {
                return Node {
                    child: Some(child),
                    dir,
                    port,
                    extra,
                };
            }
        }
        panic!("redis-server found its port taken {PORT_ATTEMPTS} times in a row");
    }

    /// SIGKILLs the server (if running) and waits until its port refuses connections.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            assert!(
                child.wait_exit(READY_LIMIT).is_some(),
                "redis-server on port {} survived SIGKILL for {READY_LIMIT:?}",
                self.port
            );
        }
        let deadline = Instant::now() + READY_LIMIT;
        while !port_refuses(self.port) {
            assert!(
                Instant::now() < deadline,
                "port {} still accepts connections {READY_LIMIT:?} after redis-server was killed",
                self.port
            );
            std::thread::sleep(POLL);
        }
    }

    /// Starts the server again on its port (killing it first if it runs).
    fn restart(&mut self) {
        self.kill9();
        match spawn_ready(self.dir.path(), self.port, &self.extra) {
            Started::Ready(child) => self.child = Some(child),
            Started::PortTaken => panic!(
                "cannot restart redis-server: another process took port {}",
                self.port
            ),
        }
    }

    /// The value given to `flag` in the extra arguments.
    fn arg(&self, flag: &str) -> Option<&str> {
        let at = self.extra.iter().position(|a| a == flag)?;
        self.extra.get(at + 1).map(String::as_str)
    }

    /// [`redis_cmd`] on this node, panicking if the exchange fails.
    fn cmd(&self, args: &[&str]) -> String {
        redis_cmd(self.port, args)
            .unwrap_or_else(|e| panic!("redis {args:?} on port {}: {e}", self.port))
    }
}

/// Spawns `redis-server` on `port` in `dir` and waits until it answers as itself (its
/// `process_id`, not another server that holds the port). Panics if it exits for any other reason
/// than a taken port, or does not answer within [`READY_LIMIT`].
fn spawn_ready(dir: &Path, port: u16, extra: &[String]) -> Started {
    let log_path = dir.join("redis.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut child = ChildGuard::spawn(&mut cmd, &format!("redis-server ({INSTALL_HINT})"));
    let me = format!("process_id:{}", child.id());
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if child.exited() {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("Address already in use") {
                return Started::PortTaken;
            }
            panic!("redis-server on port {port} exited at start:\n{text}");
        }
        if redis_cmd(port, &["INFO", "server"]).is_ok_and(|info| info.contains(&me)) {
            return Started::Ready(child);
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} did not answer within {READY_LIMIT:?}:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(POLL);
    }
}

/// A single `redis-server` on a loopback port, stopped on drop.
pub struct RedisServer {
    node: Node,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    pub fn start() -> RedisServer {
        RedisServer {
            node: Node::start(Vec::new),
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.node.port)
    }

    /// Kills the server with SIGKILL and waits until its port refuses connections.
    pub fn kill9(&mut self) {
        self.node.kill9();
    }

    /// Starts the server again on the same port (killing it first if it runs) and waits until
    /// it answers; its data is gone.
    pub fn restart(&mut self) {
        self.node.restart();
    }

    /// Runs one command; the reply as text (see [`redis_cmd`]). Panics if the server is unreachable.
    pub fn cmd(&self, args: &[&str]) -> String {
        self.node.cmd(args)
    }
}

/// A Redis Cluster of masters only, each a `redis-server` on its own loopback port; all stopped
/// on drop.
pub struct RedisCluster {
    nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts `masters` nodes (at least 3, Redis's minimum), joins them as `redis-cli --cluster
    /// create` would, and waits until every node reports `cluster_state:ok` and knows them all.
    pub fn start(masters: usize) -> RedisCluster {
        assert!(masters >= 3, "a Redis Cluster needs at least 3 masters");
        let nodes: Vec<Node> = (0..masters)
            .map(|_| {
                Node::start(|| {
                    // The bus port defaults to port + 10000, past 65535 for high ephemeral ports.
                    let bus = free_port().to_string();
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                        "--cluster-port",
                        &bus,
                    ]
                    .map(String::from)
                    .to_vec()
                })
            })
            .collect();
        let cluster = RedisCluster { nodes };
        cluster.create();
        cluster.wait_ok();
        cluster
    }

    /// Assigns each node an equal share of the slots and a distinct config epoch, then makes
    /// the first node meet the others (what `redis-cli --cluster create` does, without its
    /// one-second polls for the join).
    fn create(&self) {
        let n = self.nodes.len();
        for (i, node) in self.nodes.iter().enumerate() {
            let first = (SLOTS * i / n).to_string();
            let last = (SLOTS * (i + 1) / n - 1).to_string();
            let reply = node.cmd(&["CLUSTER", "ADDSLOTSRANGE", &first, &last]);
            assert_eq!(reply, "OK", "ADDSLOTSRANGE on port {}", node.port);
            let epoch = (i + 1).to_string();
            let reply = node.cmd(&["CLUSTER", "SET-CONFIG-EPOCH", &epoch]);
            assert_eq!(reply, "OK", "SET-CONFIG-EPOCH on port {}", node.port);
        }
        for node in &self.nodes[1..] {
            let port = node.port.to_string();
            let bus = node.arg("--cluster-port").unwrap();
            let reply = self.nodes[0].cmd(&["CLUSTER", "MEET", "127.0.0.1", &port, bus]);
            assert_eq!(reply, "OK", "CLUSTER MEET of port {port}");
        }
    }

    /// Waits until every node reports `cluster_state:ok`, every slot served and every node known.
    /// A master turns ok at least 2 s after its start (Redis's writable delay), so this takes
    /// about that long.
    fn wait_ok(&self) {
        let deadline = Instant::now() + CLUSTER_LIMIT;
        let want = [
            "cluster_state:ok".to_string(),
            format!("cluster_slots_ok:{SLOTS}"),
            format!("cluster_known_nodes:{}", self.nodes.len()),
        ];
        for node in &self.nodes {
            loop {
                let info = node.cmd(&["CLUSTER", "INFO"]);
                if want.iter().all(|w| info.lines().any(|l| l == w)) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node on port {} not ok {CLUSTER_LIMIT:?} after cluster create:\n{info}",
                    node.port
                );
                std::thread::sleep(POLL);
            }
        }
    }

    /// `redis://127.0.0.1:PORT` of every node, in start order.
    pub fn urls(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The nodes' ports, in start order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Runs one command on node `node` (an index into [`RedisCluster::ports`]); the reply as text
    /// (a key on another node's slot answers `(error) MOVED ...`).
    pub fn cmd(&self, node: usize, args: &[&str]) -> String {
        self.nodes[node].cmd(args)
    }
}

/// A loopback TCP proxy to a local port that delays every chunk from client to server by a
/// settable time (replies pass at once), so a round trip through it takes that much longer.
/// Each chunk is held until its arrival time plus the delay set when it arrived, so a pipelined
/// client sees latency, not a throughput cap. Runs on threads of its own (works from sync code
/// and from inside a tokio runtime); dropping it closes every connection and joins the threads.
pub struct LatencyProxy {
    port: u16,
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
}

/// What the proxy's threads share.
struct ProxyShared {
    delay_micros: AtomicU64,
    stopping: AtomicBool,
    /// Both ends of every open connection by its number, to shut them down on drop.
    streams: Mutex<HashMap<u64, [TcpStream; 2]>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl ProxyShared {
    fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_micros.load(Ordering::Relaxed))
    }
}

impl LatencyProxy {
    /// Starts a proxy on a free loopback port to `127.0.0.1:target_port`, delaying by `delay`.
    pub fn start(target_port: u16, delay: Duration) -> LatencyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(ProxyShared {
            delay_micros: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            streams: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let proxy_shared = Arc::clone(&shared);
        let accept = std::thread::spawn(move || accept_loop(&listener, target_port, &proxy_shared));
        let proxy = LatencyProxy {
            port,
            shared,
            accept: Some(accept),
        };
        proxy.set_delay(delay);
        proxy
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0` through the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Changes the delay for every chunk that arrives from now on.
    pub fn set_delay(&self, delay: Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.shared.delay_micros.store(micros, Ordering::Relaxed);
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for ends in self.shared.streams.lock().unwrap().values() {
            for end in ends {
                let _ = end.shutdown(Shutdown::Both);
            }
        }
        let threads: Vec<_> = self.shared.threads.lock().unwrap().drain(..).collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Accepts clients until the proxy stops, giving each a connection to the target.
fn accept_loop(listener: &TcpListener, target_port: u16, shared: &Arc<ProxyShared>) {
    for (id, client) in (0u64..).zip(listener.incoming()) {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        // Target down (a killed Redis): the client sees its connection closed.
        let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let clones = || Some([client.try_clone().ok()?, server.try_clone().ok()?]);
        let (Some([client2, server2]), Some(ends)) = (clones(), clones()) else {
            continue;
        };
        shared.streams.lock().unwrap().insert(id, ends);
        let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        let reader_shared = Arc::clone(shared);
        let copier_shared = Arc::clone(shared);
        let handles = [
            std::thread::spawn(move || read_requests(client, &tx, &reader_shared)),
            std::thread::spawn(move || write_requests(server, &rx)),
            std::thread::spawn(move || copy_replies(server2, client2, id, &copier_shared)),
        ];
        let mut threads = shared.threads.lock().unwrap();
        // Finished connections' handles go (a long test may open many).
        threads.retain(|t| !t.is_finished());
        threads.extend(handles);
    }
}

/// Reads the client's bytes, stamping each chunk with when it is due at the server.
fn read_requests(
    mut client: TcpStream,
    tx: &mpsc::Sender<(Instant, Vec<u8>)>,
    shared: &ProxyShared,
) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n @ 1..) = client.read(&mut buf) {
        if tx
            .send((Instant::now() + shared.delay(), buf[..n].to_vec()))
            .is_err()
        {
            return;
        }
    }
}

/// Writes each chunk to the server once it is due; closes the server's write side at the end.
fn write_requests(mut server: TcpStream, rx: &mpsc::Receiver<(Instant, Vec<u8>)>) {
    for (due, chunk) in rx {
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if server.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Write);
}

/// Copies the server's replies to the client at once. When the server closes (or dies), the
/// connection ends on both sides, as it would without the proxy.
fn copy_replies(mut server: TcpStream, mut client: TcpStream, id: u64, shared: &ProxyShared) {
    let _ = std::io::copy(&mut server, &mut client);
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
    shared.streams.lock().unwrap().remove(&id);
}
