//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol through a pipe
//! (`--remote-debugging-pipe`: commands on the browser's fd 3, answers and events on its fd 4,
//! each message JSON ended by a NUL byte), so no port, no WebSocket and no crate that downloads a
//! browser. One [`Browser`] has one page; dropping it stops the browser's whole process group and
//! removes its temporary profile, also when a test fails.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// Where Debian's package installs the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long one protocol command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A running headless Chromium with one page attached.
pub struct Browser {
    child: Child,
    to_browser: File,
    from_browser: Receiver<Value>,
    next_id: u64,
    session: String,
    /// The temporary directory with the profile and the browser's log; removed on drop.
    dir: tempfile::TempDir,
}

/// A pipe's (read end, write end), both close-on-exec.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fresh descriptors into the array, which we then own.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Browser {
    /// Starts headless Chromium with a fresh profile and a `width`×`height` page. Panics with
    /// a clear message when Chromium is not installed: the browser test must never be skipped.
    pub fn start(width: u32, height: u32) -> Browser {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} not found: the admin page's browser test needs Debian's `chromium` \
             package (`make deps` installs it, or `apt-get install chromium`)"
        );
        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("profile");
        let log = File::create(dir.path().join("chromium.log")).unwrap();
        let (cmd_read, cmd_write) = pipe();
        let (event_read, event_write) = pipe();
        let (child_in, child_out) = (cmd_read.as_raw_fd(), event_write.as_raw_fd());
        let mut cmd = Command::new(CHROMIUM);
        cmd.args([
            "--headless=new",
            "--disable-gpu",
            "--remote-debugging-pipe",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            &format!("--window-size={width},{height}"),
            &format!("--user-data-dir={}", profile.display()),
        ]);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Chromium refuses to run as root with its sandbox on.
            cmd.arg("--no-sandbox");
        }
        cmd.arg("about:blank")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own process group, so that drop stops its helper processes too.
            .process_group(0);
        // SAFETY: between fork and exec this only calls async-signal-safe fcntl/dup2/close.
        unsafe {
            cmd.pre_exec(move || {
                // Moved above 4 first, so that placing one cannot overwrite the other.
                let input = libc::fcntl(child_in, libc::F_DUPFD, 10);
                let output = libc::fcntl(child_out, libc::F_DUPFD, 10);
                if input < 0 || output < 0 || libc::dup2(input, 3) < 0 || libc::dup2(output, 4) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(input);
                libc::close(output);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}"));
        // The browser's ends, closed here so that its exit reads as the end of the pipe.
        drop((cmd_read, event_write));
        let (tx, rx) = mpsc::channel();
        let mut reader = BufReader::new(File::from(event_read));
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if buf.last() == Some(&0) {
                            buf.pop();
                        }
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        let mut browser = Browser {
            child,
            to_browser: File::from(cmd_write),
            from_browser: rx,
            next_id: 0,
            session: String::new(),
            dir,
        };
        let target = browser.call_browser("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = browser.call_browser(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        browser.call("Page.enable", json!({}));
        browser.call("Runtime.enable", json!({}));
        browser
    }

    /// What the browser wrote to its stdout and stderr so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromium.log")).unwrap_or_default()
    }

    /// The browser's temporary directory (profile and log).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Sends a browser-level command and returns its result.
    fn call_browser(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None)
    }

    /// Sends a command to the page and returns its result.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(method, params, Some(&session))
    }

    fn send(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        if let Err(e) = self.to_browser.write_all(&bytes) {
            panic!(
                "{method}: cannot write to chromium ({e}): {}",
                self.log_text()
            );
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from_browser.recv_timeout(left) {
                Ok(v) if v["id"] == json!(id) => {
                    if let Some(err) = v.get("error") {
                        panic!("{method} failed: {err}");
                    }
                    return v["result"].clone();
                }
                Ok(_) => {} // an event or an answer nobody waits for
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{method}: no answer from chromium in {COMMAND_TIMEOUT:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("{method}: chromium closed the pipe: {}", self.log_text())
                }
            }
        }
    }

    /// Opens `url` in the page and waits until its document has loaded.
    pub fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url}));
        assert!(r.get("errorText").is_none(), "navigate to {url}: {r}");
        self.wait_for("document.readyState === 'complete'", "the page to load");
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value; panics
    /// with the exception when it throws.
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression} threw: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `condition` (a JavaScript expression) until it is true; panics after a generous
    /// deadline with `what` and the page's visible text.
    pub fn wait_for(&mut self, condition: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.eval(condition) == json!(true) {
                return;
            }
            if Instant::now() > deadline {
                let text = self.eval("document.body ? document.body.innerText : ''");
                panic!("timed out waiting for {what} ({condition}); the page shows:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG screenshot of the page.
    pub fn screenshot_png(&mut self) -> Vec<u8> {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap()
    }
}

impl Browser {
    /// Whether the browser process exits (and is reaped) within `limit`.
    fn exits_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let Ok(group) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // Asked to close, the browser stops its helpers and reaps them before it exits; a
        // signal first would leave them to exit after it, as orphans.
        let close = format!(
            "{{\"id\":{},\"method\":\"Browser.close\"}}\0",
            self.next_id + 1
        );
        let asked = self.to_browser.write_all(close.as_bytes()).is_ok();
        if !asked || !self.exits_within(Duration::from_secs(10)) {
            // SAFETY: kill(2) only sends signals, here to the process group the browser leads.
            unsafe {
                libc::kill(-group, libc::SIGTERM);
            }
            self.exits_within(Duration::from_secs(5));
        }
        // Whatever of the group is left (helpers, or the browser itself) is killed outright.
        // SAFETY: as above.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
        let _ = self.child.wait();
        // `dir` (the profile) is removed when the fields drop, after the browser is gone.
    }
}
