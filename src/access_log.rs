//! The access log: one JSON line per request, written off the request path.
//!
//! It carries names and numbers only: never prompts, completions or secrets.

use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::Duration;

/// Lines waiting to be written before new ones are dropped (and counted).
const QUEUE: usize = 16 * 1024;

/// One request's entry.
#[derive(Debug, Serialize)]
pub struct AccessEntry<'a> {
    /// RFC 3339 time the request finished.
    pub time: String,
    /// Client name (`-` for an open gateway).
    pub client: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Request path (no query string: it may carry tokens).
    pub path: &'a str,
    /// Matched route.
    pub route: &'a str,
    /// Model asked for.
    pub model: &'a str,
    /// Upstream of the last attempt.
    pub upstream: &'a str,
    /// Key name of the last attempt.
    pub key: &'a str,
    /// Attempts made.
    pub attempts: u32,
    /// Status sent to the client.
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes: usize,
    /// Prompt tokens reported by the upstream.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens reported by the upstream.
    pub completion_tokens: Option<u64>,
    /// Milliseconds to the upstream's response header (last attempt).
    pub ttfb_ms: Option<f64>,
    /// Milliseconds for the whole request.
    pub total_ms: f64,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// A note on anything unusual (e.g. why the request was answered locally).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'a str>,
    /// What the response cache did (`hit`, `miss`, `bypass`); absent on routes without a cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'a str>,
}

/// What the writer thread is sent.
enum Message {
    /// A line to write.
    Line(String),
    /// Write out everything queued before this, then say so.
    Flush(SyncSender<()>),
}

/// Where entries go.
pub struct AccessLog {
    tx: SyncSender<Message>,
    dropped: AtomicU64,
}

/// A handle that waits for the lines already queued to reach the file (or stdout): for the
/// last moments before the process exits, when the writer thread would be cut short.
#[derive(Clone)]
pub struct AccessLogFlusher {
    tx: SyncSender<Message>,
}

impl AccessLogFlusher {
    /// Waits until every line queued before the call is written and flushed, at most `limit`.
    /// Whether it was.
    pub fn flush(&self, limit: Duration) -> bool {
        let (ack, done) = sync_channel(1);
        self.tx.send(Message::Flush(ack)).is_ok() && done.recv_timeout(limit).is_ok()
    }
}

impl AccessLog {
    /// Opens the log: `None` for stdout, or a file (appended, created mode 0640).
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let mut out: Box<dyn Write + Send> = match path {
            None => Box::new(std::io::stdout()),
            Some(p) => {
                let mut opts = std::fs::OpenOptions::new();
                opts.create(true).append(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    opts.mode(0o640);
                }
                Box::new(opts.open(p)?)
            }
        };
        let (tx, rx) = sync_channel::<Message>(QUEUE);
        std::thread::Builder::new()
            .name("keygate-access-log".into())
            .spawn(move || {
                let mut w = std::io::BufWriter::new(&mut out);
                let mut acks = Vec::new();
                while let Ok(first) = rx.recv() {
                    // Drain what is queued, then flush: prompt when idle, batched under load.
                    for message in std::iter::once(first).chain(rx.try_iter()) {
                        match message {
                            Message::Line(line) => {
                                let _ = w.write_all(line.as_bytes());
                            }
                            Message::Flush(ack) => acks.push(ack),
                        }
                    }
                    let _ = w.flush();
                    for ack in acks.drain(..) {
                        let _ = ack.try_send(());
                    }
                }
                let _ = w.flush();
            })?;
        Ok(Self {
            tx,
            dropped: AtomicU64::new(0),
        })
    }

    /// A handle to wait for queued lines to be written (see [`AccessLogFlusher`]).
    pub fn flusher(&self) -> AccessLogFlusher {
        AccessLogFlusher {
            tx: self.tx.clone(),
        }
    }

    /// Queues an entry; drops it (and counts) if the writer cannot keep up.
    pub fn write(&self, entry: &AccessEntry<'_>) {
        let Ok(mut line) = serde_json::to_string(entry) else {
            return;
        };
        line.push('\n');
        match self.tx.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                if self
                    .dropped
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(10_000)
                {
                    log::warn!("access log cannot keep up; dropping lines");
                }
            }
        }
    }
}

/// Now, formatted as RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    rfc3339_millis(jiff::Timestamp::now())
}

/// `t` as RFC 3339 in UTC with exactly three fraction digits (`2024-05-01T12:00:00.120Z`).
fn rfc3339_millis(t: jiff::Timestamp) -> String {
    format!("{t:.3}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A request line for the tests, `attempts` telling the lines apart.
    fn entry(attempts: u32) -> AccessEntry<'static> {
        AccessEntry {
            time: now_rfc3339(),
            client: "-",
            method: "POST",
            path: "/v1/chat/completions",
            route: "r",
            model: "gpt-4o",
            upstream: "u",
            key: "a",
            attempts,
            status: 200,
            bytes: 10,
            prompt_tokens: Some(3),
            completion_tokens: Some(4),
            ttfb_ms: Some(1.5),
            total_ms: 2.0,
            stream: false,
            note: None,
            cache: None,
        }
    }

    #[test]
    fn entries_are_written_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::open(Some(&path)).unwrap();
        for i in 0..3 {
            log.write(&entry(i));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 3 {
                for line in text.lines() {
                    let v: serde_json::Value = serde_json::from_str(line).unwrap();
                    assert_eq!(v["model"], "gpt-4o");
                }
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "lines not written: {text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn a_flush_returns_once_every_queued_line_is_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::open(Some(&path)).unwrap();
        for attempts in 0..500 {
            log.write(&entry(attempts));
        }
        assert!(log.flusher().flush(Duration::from_secs(30)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 500, "no line is still queued");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_exactly_three_fraction_digits() {
        let t = jiff::Timestamp::new(1_714_564_800, 120_999_999).unwrap();
        assert_eq!(rfc3339_millis(t), "2024-05-01T12:00:00.120Z");
        assert_eq!(
            rfc3339_millis(jiff::Timestamp::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        // The same text as humantime's, which wrote these lines before.
        for (secs, nanos) in [
            (0, 0),
            (951_868_799, 999_999_999),
            (4_107_542_400, 5_000_000),
        ] {
            let t = jiff::Timestamp::new(secs, nanos).unwrap();
            let expected = humantime::format_rfc3339_millis(std::time::SystemTime::from(t));
            assert_eq!(rfc3339_millis(t), expected.to_string());
        }
    }
}
