#!/usr/bin/env python3
"""Load benchmark of keygate on loopback, against the mock upstream direct and three peers.

    python3 bench/load.py            # full run (about 10 minutes), writes BENCHMARKS.md
    python3 bench/load.py --quick    # smoke run (about a minute), writes BENCHMARKS.md too
    python3 bench/load.py --baseline HEAD~1   # also measures keygate as built at HEAD~1

What runs, all on 127.0.0.1 ports picked at start, all with one worker thread:
- `keygate-mock --threads 1 --strict` with three keys: a request carrying no key or a wrong
  one gets 401, so a peer that fails to inject a key shows up as errors, not as speed;
- keygate (`bench/keygate.yaml`): three keys from environment variables, one catch-all route;
- nginx two-hop (`bench/nginx-two-hop.conf`): the usual set-up, one server per key;
- nginx tuned (`bench/nginx-tuned.conf`): one hop, key header chosen by `split_clients`;
- HAProxy (`bench/haproxy.cfg`): one hop, strict round-robin over (server, key) pairs.

What is measured, in rounds that alternate the targets so that drift (other processes, thermal
state) affects all of them alike; each figure is the median over the rounds:
1. requests/s at 64 connections (wrk) for a small chat POST, for every target;
2. the same for a streamed reply (`"stream":true`, the mock sends 5 chunks without delay);
3. requests/s with a 16 KiB body vs a 200-byte one: direct, keygate, the Pingora floor and HAProxy;
4. latency at a fixed 200 req/s (an open-loop client in this file, keep-alive connections),
   direct and through keygate: p50/p90/p99 and what keygate adds;
5. a stream of 10 chunks 20 ms apart: time to the first chunk and to the end, direct and
   through keygate;
6. keygate's resident memory: idle after start, after the load, and its peak (VmHWM);
7. the response cache: requests/s and latency of a cache hit (keygate only: a route with `cache:`
   added to its config) beside the direct mock, the Pingora floor and keygate without a cache.

With `--baseline REV` (any git revision; `make bench` passes BASELINE, HEAD~1 unless set), keygate
as built at REV runs as one more target, "keygate @REV", with the current bench/keygate.yaml: in
every test keygate runs, in the same rounds, right beside keygate (after it in one round, before it
in the next), so that both see the same load and drift. The report gets an "Against REV" section for
1, 2, 3 (16 KiB), 4 (p50/p90/p99) and 6: each figure beside REV's, their difference and a verdict
against the noise (the spread of the per-round ratios keygate / keygate @REV). REV is built in release mode in a detached `git worktree` under the
system temp dir, removed afterwards, with CARGO_TARGET_DIR=target/bench-baseline/target; the
binary is kept as target/bench-baseline/bin/keygate-<commit>, so a later run against the same
commit builds nothing (`rm -r target/bench-baseline` forces a rebuild).

Needs: a Rust toolchain, python3 (3.8+, standard library only), and wrk, nginx and haproxy,
which it installs with apt-get when they are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# Fake credentials: the mock accepts exactly these (it runs with --strict).
KEYS = {
    "BENCH_KEY_A": "sk-bench-alpha-0123456789abcdef",
    "BENCH_KEY_B": "sk-bench-bravo-0123456789abcdef",
    "BENCH_KEY_C": "sk-bench-charlie-0123456789abcdef",
}

CHAT_PATH = "/v1/chat/completions"
TARGET_LABELS = {
    "direct": "direct (mock)",
    "keygate": "keygate",
    "nginx2": "nginx two-hop",
    "nginx1": "nginx tuned",
    "haproxy": "HAProxy",
    "pingora": "Pingora floor",
    # keygate built from --baseline REV; main() puts REV's short hash in the label.
    "baseline": "keygate @REV",
}
# "pingora" is examples/bare_passthrough.rs: Pingora with nothing but key injection, the floor
# any Pingora-based gateway stands on.
PEERS = ["direct", "keygate", "pingora", "nginx2", "nginx1", "haproxy"]
# Measured for latency and stream timings as well.
LATENCY_TARGETS = ["direct", "keygate", "pingora"]
# The model of the cache-hit scenario: keygate (not keygate @REV, whose config stays as it was)
# gets a cached route for it; every other target passes it to the mock like any model.
CACHED_MODEL = "bench-cached"
CACHED_ROUTE = f"  - {{ name: cached, models: [{CACHED_MODEL}], upstreams: [mock], cache: {{ ttl: 1h }} }}\n"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Request bodies


def chat_body(size: int, stream: bool = False, mock: dict | None = None, model: str = "gpt-4o-mini") -> bytes:
    """A chat request of about `size` bytes (at least the minimal one)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": ""}],
    }
    if stream:
        body["stream"] = True
    if mock:
        body["mock"] = mock
    base = len(json.dumps(body, separators=(",", ":")))
    filler = "Summarise the following notes in three bullet points. " * (size // 50 + 1)
    body["messages"][0]["content"] = filler[: max(2, size - base)]
    return json.dumps(body, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------
# Processes


class Processes:
    """Everything started here, stopped in reverse order however the script ends."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen, int]] = []

    def start(self, name: str, cmd: list[str], log_path: Path, env=None, stop_signal=signal.SIGTERM):
        log(f"starting {name}: {' '.join(cmd)}")
        out = open(log_path, "wb")
        # Own session: a Ctrl-C in the terminal reaches only this script, which then stops
        # everything in order.
        p = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        out.close()
        self.procs.append((name, p, stop_signal))
        return p

    def stop_all(self) -> None:
        for name, p, sig in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for name, p, _ in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop in time: killing it")
                p.kill()
                p.wait()
        self.procs.clear()


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def fill(template: Path, values: dict[str, object], dest: Path) -> Path:
    text = template.read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", str(v))
    left = re.findall(r"\{\{[A-Z_]+\}\}", text)
    if left:
        raise SystemExit(f"{template}: unfilled placeholders {sorted(set(left))}")
    dest.write_text(text)
    return dest


def auth_for(target: str) -> str:
    """The client's Authorization: only direct requests carry a key; the proxies inject one."""
    return "Bearer " + KEYS["BENCH_KEY_A"] if target == "direct" else ""


def http_post(port: int, body: bytes, timeout: float = 5.0, auth: str = "") -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = auth
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{CHAT_PATH}", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(name: str, port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    body = chat_body(100)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}; its log:\n{tail(log_path)}")
        try:
            status, text = http_post(port, body, timeout=2)
            if status == 200:
                return
            last = f"HTTP {status}: {text[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise SystemExit(f"{name} not ready on port {port} after {timeout:.0f}s ({last}); its log:\n{tail(log_path)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM in KiB of one process."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def tree_pids(pid: int) -> list[int]:
    """A process and its descendants (nginx master and workers)."""
    pids = [pid]
    for p in pids:
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                pids.extend(int(c) for c in children)
        except OSError:
            pass
    return pids


def tree_memory(pid: int) -> dict[str, int]:
    total = {"VmRSS": 0, "VmHWM": 0}
    for p in tree_pids(pid):
        st = proc_status(p)
        for k in total:
            total[k] += st.get(k, 0)
    return total


# --------------------------------------------------------------------------------------------
# Setup: build, install, start


def sudo() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo"]


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None
    )


def ensure_tools(wanted: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Finds each tool, installing it with apt-get (trying its packages in turn) when missing.
    The default is what this benchmark needs: wrk, nginx and HAProxy."""
    if wanted is None:
        wanted = {"wrk": ["wrk"], "nginx": ["nginx-light", "nginx"], "haproxy": ["haproxy"]}
    missing = [t for t in wanted if not find_tool(t)]
    if missing:
        if not shutil.which("apt-get"):
            raise SystemExit(f"missing {', '.join(missing)} and no apt-get: install them and retry")
        log(f"installing {', '.join(missing)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(sudo() + ["apt-get", "update", "-qq"], check=True, env=env)
        for tool in missing:
            for pkg in wanted[tool]:
                r = subprocess.run(sudo() + ["apt-get", "install", "-y", "-qq", pkg], env=env)
                if r.returncode == 0 and find_tool(tool):
                    break
            else:
                raise SystemExit(f"could not install {tool} (tried {', '.join(wanted[tool])})")
        # Debian starts nginx/haproxy services on install; they do not matter here (other
        # ports), so they are left alone.
    tools = {t: find_tool(t) for t in wanted}
    return {k: v for k, v in tools.items() if v}


def build(skip: bool) -> None:
    if skip:
        log("skipping the release build (--no-build)")
    else:
        log("cargo build --release --workspace --bins")
        subprocess.run(["cargo", "build", "--release", "--workspace", "--bins"], cwd=ROOT, check=True)
        subprocess.run(["cargo", "build", "--release", "--example", "bare_passthrough"], cwd=ROOT, check=True)
    for b in ("keygate", "keygate-mock", "examples/bare_passthrough"):
        if not (ROOT / "target" / "release" / b).exists():
            raise SystemExit(f"target/release/{b} is missing: run without --no-build")


# --------------------------------------------------------------------------------------------
# The baseline: keygate built from another revision, measured beside the working tree's

BASELINE_DIR = ROOT / "target" / "bench-baseline"


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def resolve_rev(rev: str) -> dict[str, str]:
    """{"rev", "hash", "short", "subject"} of a revision, or a clear exit if git does not know it."""
    found = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if found.returncode != 0:
        raise SystemExit(f"--baseline {rev}: not a commit git knows in {ROOT}")
    full = found.stdout.strip()
    short, _, subject = git("log", "-1", "--format=%h %s", full).stdout.strip().partition(" ")
    return {"rev": rev, "hash": full, "short": short, "subject": subject}


def build_baseline(rev: str) -> tuple[Path, dict[str, str]]:
    """keygate built in release mode at `rev`: its binary and resolve_rev's description of `rev`."""
    base = resolve_rev(rev)
    binary = BASELINE_DIR / "bin" / f"keygate-{base['hash']}"
    if binary.exists():
        log(f"keygate @{base['short']}: reusing {binary.relative_to(ROOT)}")
        return binary, base
    # Outside the repository: cargo looks upwards for a workspace, and a revision from before the
    # workspace, checked out under this one, would be taken for a stray member of it.
    src = Path(tempfile.mkdtemp(prefix="keygate-baseline-"))
    try:
        added = git("worktree", "add", "--detach", str(src), base["hash"])
        if added.returncode != 0:
            raise SystemExit(f"git worktree add {base['short']} failed:\n{added.stderr}")
        target = BASELINE_DIR / "target"
        log(f"building keygate @{base['short']} ({base['subject']}) in {src}, CARGO_TARGET_DIR={target}")
        # `--bin keygate` from the package root builds the gateway whether or not REV has a workspace.
        built = run_group(["cargo", "build", "--release", "--bin", "keygate"], cwd=src,
                          env=dict(os.environ, CARGO_TARGET_DIR=str(target)))
        if built != 0:
            raise SystemExit(f"cargo build --release --bin keygate failed at {rev} ({base['short']})")
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_name(binary.name + ".partial")
        shutil.copy2(target / "release" / "keygate", partial)
        partial.replace(binary)  # a run stopped mid-copy leaves no binary that looks complete
    finally:
        remove_worktree(src)
    return binary, base


def run_group(cmd: list[str], cwd: Path, env: dict) -> int:
    """Runs `cmd` in a process group of its own and returns its exit code; if this script is stopped
    meanwhile, the whole group is stopped first (cargo's rustc jobs would outlive cargo alone)."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True)
    try:
        return p.wait()
    except BaseException:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait()
        raise


def remove_worktree(path: Path) -> None:
    """Removes a worktree build_baseline added, or whatever is left of one that failed half-way."""
    if git("worktree", "remove", "--force", str(path)).returncode != 0:
        shutil.rmtree(path, ignore_errors=True)
        git("worktree", "prune")


def check_config(binary: Path, conf: Path, env: dict, label: str, baseline: bool = False) -> None:
    """Exits with keygate's own words if `binary` rejects `conf` (keygate -t)."""
    check = subprocess.run([str(binary), "-t", "-c", str(conf)], env=env, capture_output=True, text=True)
    if check.returncode == 0:
        return
    hint = ""
    if baseline:
        hint = ("\nEvery keygate is measured with the current bench/keygate.yaml, so that both run the "
                "same config; this older one does not accept it. Compare against a later revision "
                "(--baseline, or BASELINE= for make bench), or none.")
    raise SystemExit(f"{label} (keygate -t) rejected the bench config:\n{check.stdout}{check.stderr}{hint}")


class Stack:
    """The mock, keygate and the peers, on loopback; with a baseline binary, keygate @REV too."""

    def __init__(self, procs: Processes, tools: dict[str, str], tmp: Path, baseline: Path | None = None) -> None:
        self.procs = procs
        self.tools = tools
        self.tmp = tmp
        self.baseline = baseline
        # What the throughput rounds measure: the peers, and keygate @REV when there is one.
        self.targets = PEERS + (["baseline"] if baseline else [])
        names = ["mock", "keygate", "baseline", "pingora", "nginx2", "nginx1", "haproxy", "key_a", "key_b", "key_c"]
        self.port = dict(zip(names, free_ports(len(names))))
        self.port["direct"] = self.port["mock"]
        self.pid: dict[str, int] = {}

    def start_keygate(self, target: str, binary: Path) -> None:
        """keygate (or keygate @REV) with bench/keygate.yaml, on its own port and directory."""
        label = TARGET_LABELS[target]
        # keygate's upgrade socket is created mode 0666, so it lives in a 0700 directory.
        kg_dir = self.tmp / target
        kg_dir.mkdir(mode=0o700)
        conf = fill(BENCH / "keygate.yaml",
                    {"KEYGATE_DIR": kg_dir, "KEYGATE_PORT": self.port[target], "MOCK_PORT": self.port["mock"]},
                    kg_dir / "keygate.yaml")
        if target == "keygate":
            # First match wins: the cached route goes before the catch-all.
            conf.write_text(conf.read_text().replace("routes:\n", "routes:\n" + CACHED_ROUTE, 1))
        env = dict(os.environ, **KEYS)
        # Warnings only: nginx and HAProxy run without access logs too.
        env["RUST_LOG"] = os.environ.get("BENCH_RUST_LOG", "warn")
        check_config(binary, conf, env, label, baseline=target == "baseline")
        kg = self.procs.start(label, [str(binary), "-c", str(conf)],
                              self.tmp / f"{target}.log", env=env, stop_signal=signal.SIGINT)
        self.pid[target] = kg.pid
        wait_ready(label, self.port[target], kg, self.tmp / f"{target}.log")

    def start(self) -> None:
        tmp, port = self.tmp, self.port
        release = ROOT / "target" / "release"
        keyvals = {"KEY_A": KEYS["BENCH_KEY_A"], "KEY_B": KEYS["BENCH_KEY_B"], "KEY_C": KEYS["BENCH_KEY_C"]}

        mock_cmd = [str(release / "keygate-mock"), "--listen", f"127.0.0.1:{port['mock']}",
                    "--threads", "1", "--strict", "--name", "bench"]
        for secret in KEYS.values():
            mock_cmd += ["--key", f"{secret}=ok"]
        mock = self.procs.start("keygate-mock", mock_cmd, tmp / "mock.log")
        self.pid["mock"] = mock.pid
        wait_ready_plain("keygate-mock", port["mock"], mock, tmp / "mock.log")

        self.start_keygate("keygate", release / "keygate")
        if self.baseline:
            self.start_keygate("baseline", self.baseline)

        bare = self.procs.start(
            "Pingora floor",
            [str(release / "examples" / "bare_passthrough"), f"127.0.0.1:{port['pingora']}",
             f"127.0.0.1:{port['mock']}", *KEYS.values()],
            tmp / "pingora.log", stop_signal=signal.SIGINT)
        self.pid["pingora"] = bare.pid
        wait_ready("Pingora floor", port["pingora"], bare, tmp / "pingora.log")

        # nginx's workers may run as `nobody` when started as root: give them a directory they
        # can use for temp files.
        for name, template, extra in (
            ("nginx2", "nginx-two-hop.conf",
             {"KEY_PORT_A": port["key_a"], "KEY_PORT_B": port["key_b"], "KEY_PORT_C": port["key_c"]}),
            ("nginx1", "nginx-tuned.conf", {}),
        ):
            d = tmp / name
            d.mkdir()
            d.chmod(0o777)
            conf = fill(BENCH / template,
                        {"DIR": d, "PORT": port[name], "MOCK_PORT": port["mock"], **keyvals, **extra},
                        d / "nginx.conf")
            check = subprocess.run([self.tools["nginx"], "-t", "-q", "-p", str(d), "-c", str(conf)],
                                   capture_output=True, text=True)
            if check.returncode != 0:
                raise SystemExit(f"nginx -t rejected {template}:\n{check.stderr}")
            p = self.procs.start(TARGET_LABELS[name],
                                 [self.tools["nginx"], "-p", str(d), "-c", str(conf)], d / "stdout.log")
            self.pid[name] = p.pid
            wait_ready(TARGET_LABELS[name], port[name], p, d / "error.log")

        d = tmp / "haproxy"
        d.mkdir()
        conf = fill(BENCH / "haproxy.cfg", {"DIR": d, "PORT": port["haproxy"], "MOCK_PORT": port["mock"], **keyvals},
                    d / "haproxy.cfg")
        check = subprocess.run([self.tools["haproxy"], "-c", "-q", "-f", str(conf)], capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"haproxy -c rejected haproxy.cfg:\n{check.stdout}{check.stderr}")
        p = self.procs.start("HAProxy", [self.tools["haproxy"], "-db", "-f", str(conf)], d / "haproxy.log")
        self.pid["haproxy"] = p.pid
        wait_ready("HAProxy", port["haproxy"], p, d / "haproxy.log")

    def mock_stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port['mock']}/_mock/stats", timeout=5) as r:
            return json.load(r)

    def mock_reset(self) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port['mock']}/_mock/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()

    def verify(self) -> dict[str, dict[str, int]]:
        """Every target answers 200 and spreads requests over the three keys."""
        names = {v: k for k, v in KEYS.items()}
        spread = {}
        body = chat_body(200)
        status, text = http_post(self.port["direct"], body, auth=auth_for("direct"))
        if status != 200:
            raise SystemExit(f"the mock answered {status}: {text[:300]!r}")
        for target in self.targets:
            if target == "direct":
                continue
            self.mock_reset()
            for _ in range(30):
                status, text = http_post(self.port[target], body)
                if status != 200:
                    raise SystemExit(f"{TARGET_LABELS[target]} answered {status}: {text[:300]!r}")
            seen = keys_seen(self.mock_stats())
            unknown = [k for k in seen if k not in names]
            if unknown or sum(seen.values()) != 30:
                raise SystemExit(f"{TARGET_LABELS[target]}: the mock saw keys {seen} for 30 requests")
            spread[target] = {names[k][-1].lower(): n for k, n in sorted(seen.items())}
            if len(seen) != 3:
                raise SystemExit(f"{TARGET_LABELS[target]} used only {len(seen)} of 3 keys: {spread[target]}")
        self.mock_reset()
        return spread


def keys_seen(stats: dict) -> dict[str, int]:
    """{secret: requests} from the mock's /_mock/stats, whatever its exact layout."""
    for field in ("keys", "by_key", "per_key"):
        per_key = stats.get(field)
        if isinstance(per_key, dict):
            return {k: (v.get("requests", 0) if isinstance(v, dict) else int(v)) for k, v in per_key.items() if k}
    raise SystemExit(f"unexpected /_mock/stats layout: {json.dumps(stats)[:300]}")


def start_mock(procs: "Processes", tmp: Path, port: int, args: list[str]) -> subprocess.Popen:
    """The release keygate-mock on 127.0.0.1:`port` with one worker thread and `args`, logging to
    `tmp`/mock.log; returns once it answers."""
    m = procs.start("keygate-mock", [str(ROOT / "target" / "release" / "keygate-mock"), "--listen",
                                     f"127.0.0.1:{port}", "--threads", "1", *args], tmp / "mock.log")
    wait_ready_plain("keygate-mock", port, m, tmp / "mock.log")
    return m


def ok_keys(keys: dict) -> list[str]:
    """The mock's `--key SECRET=ok` arguments for `keys` (name: secret), in strict mode."""
    return ["--strict", "--name", "bench", *(a for k in keys.values() for a in ("--key", f"{k}=ok"))]


def wait_ready_plain(name: str, port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}; its log:\n{tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{name} not listening on {port} after {timeout:.0f}s")


# --------------------------------------------------------------------------------------------
# Measurements: wrk (closed loop, throughput)


def run_wrk(wrk: str, stack: "Stack", target: str, body_file: Path, seconds: float, conns: int, threads: int) -> dict:
    cmd = [wrk, "-t", str(threads), "-c", str(conns), "-d", f"{seconds:g}s", "--timeout", "10s",
           "-s", str(BENCH / "wrk-post.lua"), f"http://127.0.0.1:{stack.port[target]}{CHAT_PATH}",
           "--", str(body_file), auth_for(target)]
    return wrk_result(subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60))


def wrk_result(r: subprocess.CompletedProcess) -> dict:
    """The figures wrk-post.lua printed, with req/s and the sum of errors added."""
    for line in r.stdout.splitlines():
        if line.startswith("WRKJSON "):
            res = json.loads(line[len("WRKJSON "):])
            res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
            res["errors"] = sum(res[k] for k in ("connect", "read", "write", "status", "timeout"))
            return res
    raise SystemExit(f"wrk failed ({r.returncode}): {r.stdout}{r.stderr}")


# --------------------------------------------------------------------------------------------
# Measurements: a small HTTP/1.1 client (open loop at a fixed rate; stream timings)


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer


async def open_conn(port: int) -> Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Conn(reader, writer)


def request_bytes(port: int, body: bytes, auth: str) -> bytes:
    extra = f"Authorization: {auth}\r\n" if auth else ""
    return (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def read_head(r: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """A response's status and headers (names and values lower-cased)."""
    head = await r.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip().lower()
    return status, headers


async def read_body(r: asyncio.StreamReader, headers: dict[str, str],
                    events: list[float] | None = None) -> tuple[bytes, bool, float | None]:
    """The body after read_head: (body, keep-alive, time its first bytes arrived). With `events`,
    the arrival time of each SSE event (each `data:`) of a chunked body is appended to it."""
    keep = headers.get("connection") != "close"
    parts: list[bytes] = []
    first = None
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await r.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            parts.append((await r.readexactly(size + 2))[:-2])
            now = time.perf_counter()
            if first is None:
                first = now
            if events is not None:
                events.extend([now] * parts[-1].count(b"data:"))
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            parts.append(await r.readexactly(n))
        first = time.perf_counter()
    else:
        parts.append(await r.read())
        first, keep = time.perf_counter(), False
    return b"".join(parts), keep, first


async def read_response(conn: Conn, events: list[float] | None = None) -> tuple[int, float | None, bool]:
    """Reads one response; returns (status, time the first body bytes arrived, keep-alive)."""
    status, headers = await read_head(conn.reader)
    _, keep, first = await read_body(conn.reader, headers, events)
    return status, first, keep


async def fixed_rate(port: int, auth: str, body: bytes, rate: float, seconds: float) -> dict:
    """Open loop: request i is sent at t0 + i/rate on an idle keep-alive connection (a new one
    when all are busy), whatever the earlier ones are doing. Latency runs from the send to the
    last byte of the response."""
    idle: collections.deque[Conn] = collections.deque([await open_conn(port) for _ in range(8)])
    payload = request_bytes(port, body, auth)
    latencies: list[float] = []
    errors = 0
    what: list[str] = []  # the first few errors, for the report

    async def one() -> None:
        nonlocal errors
        # Oldest first, so every connection is used every few requests. Taking the newest would
        # leave the others unused, and keygate closes a new connection that sends nothing within
        # its header timeout (10 s), as nginx does: a late burst would then meet closed sockets.
        conn = idle.popleft() if idle else await open_conn(port)
        t = time.perf_counter()
        try:
            conn.writer.write(payload)
            status, _, keep = await read_response(conn)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            errors += 1
            what.append(type(e).__name__)
            conn.writer.close()
            return
        latencies.append(time.perf_counter() - t)
        if status != 200:
            errors += 1
            what.append(f"HTTP {status}")
        if keep:
            idle.append(conn)
        else:
            conn.writer.close()

    n = int(rate * seconds)
    tasks = []
    t0 = time.perf_counter() + 0.05
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    for c in idle:
        c.writer.close()
    return {"latencies": latencies, "errors": errors, "sent": n, "what": what[:3]}


async def stream_timings(port: int, auth: str, body: bytes, count: int) -> dict:
    """One stream at a time on one keep-alive connection: time to the first chunk, to each
    event, to the end."""
    conn = await open_conn(port)
    payload = request_bytes(port, body, auth)
    first, last, events, errors = [], [], [], 0
    for _ in range(count):
        t = time.perf_counter()
        conn.writer.write(payload)
        arrivals: list[float] = []
        status, t_first, keep = await read_response(conn, arrivals)
        t_end = time.perf_counter()
        if status != 200 or t_first is None:
            errors += 1
        else:
            first.append(t_first - t)
            last.append(t_end - t)
            events.append([a - t for a in arrivals])
        if not keep:
            conn.writer.close()
            conn = await open_conn(port)
    conn.writer.close()
    return {"first": first, "last": last, "events": events, "errors": errors}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


# --------------------------------------------------------------------------------------------
# The run


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass

    def version(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "cpus": str(os.cpu_count()),
        "nproc": version(["nproc"]),
        "cpu": model,
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "rustc": version(["rustc", "-V"]),
        "nginx": version([find_tool("nginx") or "nginx", "-v"]),
        "haproxy": version([find_tool("haproxy") or "haproxy", "-v"]),
        "wrk": version([find_tool("wrk") or "wrk", "-v"]),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "loadavg": Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?",
    }


def round_order(targets: list[str], rnd: int, baseline: bool = False) -> list[str]:
    """The order of round `rnd`: `targets` rotated, so that no target always runs first or last;
    with a baseline, keygate @REV right beside keygate, after it in even rounds and before it in
    odd ones, so that both meet the same drift and neither always goes first."""
    k = rnd % len(targets)
    order = targets[k:] + targets[:k]
    if baseline and "keygate" in order:
        order.insert(order.index("keygate") + (rnd + 1) % 2, "baseline")
    return order


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run (one round of 3 s runs)")
    ap.add_argument("--rounds", type=int, help="rounds of the throughput runs (default 3; quick 1)")
    ap.add_argument("--seconds", type=float, help="length of each wrk run (default 10; quick 3)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1: the machine is shared)")
    ap.add_argument("--rate", type=float, default=200, help="fixed request rate of the latency test (default 200/s)")
    ap.add_argument("--latency-seconds", type=float, help="length of each fixed-rate run (default 15; quick 3)")
    ap.add_argument("--streams", type=int, help="streams per target in the stream-timing test (default 50; quick 10)")
    ap.add_argument("--no-build", action="store_true", help="use the binaries already in target/release")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="where to write the report")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--baseline", metavar="REV", default="",
                    help="also measure keygate as built at this git revision, in the same rounds (empty: none)")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (3 if args.quick else 10)
    lat_seconds = args.latency_seconds or (3 if args.quick else 15)
    streams = args.streams or (10 if args.quick else 50)
    warmup = 1 if args.quick else 2

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # Installed explicitly: a shell that starts this in the background may have SIGINT ignored.
    # Before the builds, so that a stopped baseline build still removes its worktree.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    build(args.no_build)
    baseline, base = build_baseline(args.baseline) if args.baseline else (None, None)
    if base:
        TARGET_LABELS["baseline"] = f"keygate @{base['short']}"
    tools = ensure_tools()
    info = machine()

    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="keygate-bench-"))
    tmp.chmod(0o755)  # nginx workers (nobody) must reach their own subdirectory
    try:
        stack = Stack(procs, tools, tmp, baseline)
        stack.start()
        spread = stack.verify()
        log("all targets answer 200 with the three keys: " +
            ", ".join(f"{TARGET_LABELS[t]} {s}" for t, s in spread.items()))
        kg_pid = stack.pid["keygate"]
        idle_rss = proc_status(kg_pid).get("VmRSS", 0)
        base_idle_rss = proc_status(stack.pid["baseline"]).get("VmRSS", 0) if baseline else 0
        # keygate's and keygate @REV's RSS after each round's load, for the baseline comparison.
        compared = ["keygate", "baseline"] if baseline else []
        rss_rounds: dict[str, list[int]] = {t: [] for t in compared}
        with_base = baseline is not None

        bodies = {
            "small": chat_body(200),
            "sse": chat_body(200, stream=True),
            "16k": chat_body(16 * 1024),
            "cached": chat_body(200, model=CACHED_MODEL),
        }
        files = {}
        for k, b in bodies.items():
            files[k] = tmp / f"body-{k}.json"
            files[k].write_bytes(b)

        # (scenario, targets): the throughput matrix.
        matrix = [
            ("chat", "small", PEERS),
            ("sse", "sse", PEERS),
            ("body16k", "16k", ["direct", "keygate", "pingora", "haproxy"]),
            # keygate answers every request after the first from its cache.
            ("cachehit", "cached", ["direct", "keygate", "pingora"]),
        ]
        wrk = tools["wrk"]
        log(f"warm-up: {warmup:g} s per target")
        for _, body, targets in matrix:
            for t in round_order(targets, 0, with_base):
                run_wrk(wrk, stack, t, files[body], warmup, args.connections, args.wrk_threads)

        tput: dict[tuple[str, str], list[dict]] = {}
        for rnd in range(rounds):
            for scenario, body, targets in matrix:
                for t in round_order(targets, rnd, with_base):
                    res = run_wrk(wrk, stack, t, files[body], seconds, args.connections, args.wrk_threads)
                    tput.setdefault((scenario, t), []).append(res)
                    log(f"round {rnd + 1}/{rounds} {scenario:8} {TARGET_LABELS[t]:16} "
                        f"{res['rps']:9.0f} req/s  p50 {res['p50_us'] / 1000:.2f} ms  "
                        f"p99 {res['p99_us'] / 1000:.2f} ms  errors {res['errors']}")
            for t in compared:
                rss_rounds[t].append(proc_status(stack.pid[t]).get("VmRSS", 0))
        loaded_rss = proc_status(kg_pid).get("VmRSS", 0)

        # Latency at a fixed rate, and stream timings: direct, keygate and the bare Pingora floor
        # (and keygate @REV), in rotating order.
        lat_targets = LATENCY_TARGETS + compared[1:]
        lat: dict[str, list[float]] = {t: [] for t in lat_targets}
        lat_rounds: dict[str, list[list[float]]] = {t: [] for t in lat_targets}
        lat_err = {t: 0 for t in lat_targets}
        lat_what: dict[str, list[str]] = {t: [] for t in lat_targets}
        sse_t: dict[str, dict[str, list]] = {t: {"first": [], "last": [], "events": []} for t in lat}
        sse_err = {t: 0 for t in lat_targets}
        slow = chat_body(200, stream=True, mock={"chunks": 10, "interval_ms": 20})
        hit_lat: list[float] = []
        hit_err = 0
        for rnd in range(rounds):
            order = round_order(LATENCY_TARGETS, rnd, with_base)
            for t in order:
                r = asyncio.run(fixed_rate(stack.port[t], auth_for(t), bodies["small"], args.rate, lat_seconds))
                lat[t] += r["latencies"]
                lat_rounds[t].append(r["latencies"])
                lat_err[t] += r["errors"]
                lat_what[t] += r["what"]
                log(f"round {rnd + 1}/{rounds} fixed {args.rate:g}/s {TARGET_LABELS[t]:16} "
                    f"p50 {pct(r['latencies'], 50) * 1000:.3f} ms  p99 {pct(r['latencies'], 99) * 1000:.3f} ms  "
                    f"errors {r['errors']}")
            r = asyncio.run(fixed_rate(stack.port["keygate"], auth_for("keygate"), bodies["cached"],
                                       args.rate, lat_seconds))
            hit_lat += r["latencies"]
            hit_err += r["errors"]
            log(f"round {rnd + 1}/{rounds} fixed {args.rate:g}/s keygate cache hit "
                f"p50 {pct(r['latencies'], 50) * 1000:.3f} ms  p99 {pct(r['latencies'], 99) * 1000:.3f} ms  "
                f"errors {r['errors']}")
            for t in order:
                r = asyncio.run(stream_timings(stack.port[t], auth_for(t), slow, max(1, streams // rounds)))
                sse_t[t]["first"] += r["first"]
                sse_t[t]["last"] += r["last"]
                sse_t[t]["events"] += r["events"]
                sse_err[t] += r["errors"]
                log(f"round {rnd + 1}/{rounds} stream 10x20ms {TARGET_LABELS[t]:16} "
                    f"first {pct(r['first'], 50) * 1000:.2f} ms  last {pct(r['last'], 50) * 1000:.2f} ms  "
                    f"errors {r['errors']}")

        mem = proc_status(kg_pid)
        base_mem = proc_status(stack.pid["baseline"]) if baseline else {}
        peers_mem = {t: tree_memory(stack.pid[t]) for t in ("nginx2", "nginx1", "haproxy")}
        mock_mem = proc_status(stack.pid["mock"])
    finally:
        procs.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    report = render(
        args=sys.argv[1:], quick=args.quick, info=info, rounds=rounds, seconds=seconds,
        conns=args.connections, rate=args.rate, lat_seconds=lat_seconds, streams=streams,
        tput=tput, lat=lat, lat_err=lat_err, lat_what=lat_what, sse_t=sse_t, sse_err=sse_err, spread=spread,
        rss={"idle": idle_rss, "loaded": loaded_rss, "end": mem.get("VmRSS", 0), "peak": mem.get("VmHWM", 0)},
        peers_mem=peers_mem, mock_mem=mock_mem, wrk_threads=args.wrk_threads,
        baseline=base, lat_rounds=lat_rounds, rss_rounds=rss_rounds,
        base_rss={"idle": base_idle_rss, "peak": base_mem.get("VmHWM", 0)},
        hit_lat=hit_lat, hit_err=hit_err,
    )
    print(report["terminal"])
    out = Path(args.out)
    out.write_text(keep_other_sections(out.read_text() if out.exists() else "", report["markdown"]))
    log(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# Report

# The "## " sections of BENCHMARKS.md that load.py writes; the others belong to bench/scale.py,
# instructions.py, anthropic.py and shared.py and are kept as they are.
OWN_SECTIONS = ("Machine", "Results", "Method", "Against ")


def keep_other_sections(old: str, new: str) -> str:
    """`new` (load.py's report) followed by the sections of `old` that other scripts wrote."""
    kept, keep = [], False
    for line in old.splitlines(keepends=True):
        if line.startswith("## "):
            keep = not line[3:].startswith(OWN_SECTIONS)
        elif line.startswith("# "):
            keep = False
        if keep:
            kept.append(line)
    rest = "".join(kept).strip("\n")
    return new.rstrip("\n") + "\n\n" + rest + "\n" if rest else new


def cache_table(r: dict, rps, errs) -> str:
    """The response cache: a hit beside the direct mock, the Pingora floor and keygate without a
    cache (the plain chat scenario, the same body size); empty when the run has no cache figures."""
    if ("cachehit", "keygate") not in r["tput"]:
        return ""
    direct = rps("cachehit", "direct")
    cells = {
        "direct": rps("cachehit", "direct"),
        "hit": rps("cachehit", "keygate"),
        "miss": rps("chat", "keygate"),
        "floor": rps("cachehit", "pingora"),
    }
    mark = lambda t: " (!)" if errs("cachehit", t) else ""  # noqa: E731
    rows = [
        ["req/s", f"{cells['direct']:,.0f}{mark('direct')}", f"{cells['hit']:,.0f}{mark('keygate')}",
         f"{cells['miss']:,.0f}", f"{cells['floor']:,.0f}{mark('pingora')}"],
        ["  of direct", *(f"{cells[k] / direct:.0%}" for k in ("direct", "hit", "miss", "floor"))],
    ]
    hit, lat = r.get("hit_lat") or [], r["lat"]
    if hit:
        ms = lambda v: f"{v * 1000:.3f}"  # noqa: E731
        for p in (50, 99):
            rows.append([f"latency p{p} at {r['rate']:g} req/s, ms", ms(pct(lat["direct"], p)), ms(pct(hit, p)),
                         ms(pct(lat["keygate"], p)), ms(pct(lat["pingora"], p))])
    return table(["response cache (200 B chat)", "direct (mock)", "keygate hit", "keygate uncached",
                  "Pingora floor"], rows)


def render(**r) -> dict[str, str]:
    tput = r["tput"]

    def rps(scenario: str, t: str) -> float:
        return median([x["rps"] for x in tput.get((scenario, t), [])])

    def errs(scenario: str, t: str) -> int:
        return sum(x["errors"] for x in tput.get((scenario, t), []))

    def p99(scenario: str, t: str) -> float:
        return median([x["p99_us"] for x in tput.get((scenario, t), [])]) / 1000

    def event_added(t: str, p: float) -> float:
        """Over the events of a stream, the largest p-th percentile delay added to an event's arrival."""
        d, k = r["sse_t"]["direct"]["events"], r["sse_t"][t]["events"]
        n = min((len(x) for x in d + k), default=0)
        if not d or not k or n == 0:
            return float("nan")
        return max(pct([s[j] for s in k], p) - pct([s[j] for s in d], p) for j in range(n))

    rows: list[list[str]] = []
    header = ["", *(TARGET_LABELS[t] for t in PEERS)]
    for scenario, label in (("chat", "chat POST, req/s"), ("sse", "stream, 5 chunks, req/s")):
        base = rps(scenario, "direct")
        rows.append([label, *(f"{rps(scenario, t):,.0f}" + (" (!)" if errs(scenario, t) else "") for t in PEERS)])
        rows.append(["  of direct", *(f"{rps(scenario, t) / base:.0%}" for t in PEERS)])
        rows.append(["  wrk p99, ms", *(f"{p99(scenario, t):.2f}" for t in PEERS)])
    t1 = table(header, rows)

    # The body cost, next to what the same 16 KiB costs the mock itself, the bare Pingora floor
    # and HAProxy.
    body_targets = ["direct", "keygate", "pingora", "haproxy"]

    def big(t: str) -> str:
        return f"{rps('body16k', t):,.0f}" + (" (!)" if errs("body16k", t) else "")

    t2 = table(
        ["request body", *(f"{TARGET_LABELS[t]} req/s" for t in body_targets)],
        [
            ["200 B", *(f"{rps('chat', t):,.0f}" for t in body_targets)],
            ["16 KiB", *(big(t) for t in body_targets)],
            ["16 KiB / 200 B", *(f"{rps('body16k', t) / rps('chat', t):.0%}" for t in body_targets)],
        ],
    )

    lat, sse_t = r["lat"], r["sse_t"]
    ms = lambda v: f"{v * 1000:.3f}"  # noqa: E731
    lat_rows = []
    for p in (50, 90, 99):
        d, k, f = pct(lat["direct"], p), pct(lat["keygate"], p), pct(lat["pingora"], p)
        lat_rows.append([f"p{p}", ms(d), ms(k), ms(k - d), ms(f), ms(f - d)])
    t3 = table(["latency at %g req/s, ms" % r["rate"], "direct", "keygate", "added",
                "Pingora floor", "floor added"], lat_rows)

    sse_rows = []
    for key, label in (("first", "first chunk"), ("last", "last byte")):
        for p in (50, 99):
            d, k = pct(sse_t["direct"][key], p), pct(sse_t["keygate"][key], p)
            f = pct(sse_t["pingora"][key], p)
            sse_rows.append([f"{label} p{p}", ms(d), ms(k), ms(k - d), ms(f), ms(f - d)])
    for p in (50, 90):
        k, f = event_added("keygate", p), event_added("pingora", p)
        sse_rows.append([f"slowest event, p{p} added", "", "", ms(k), "", ms(f)])
    t4 = table(["stream, 10 chunks 20 ms apart, ms", "direct", "keygate", "added",
                "Pingora floor", "floor added"], sse_rows)

    rss, pm = r["rss"], r["peers_mem"]
    mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731
    t5 = table(
        ["memory, MiB", "RSS idle", "RSS after load", "RSS at end", "peak (VmHWM)"],
        [["keygate", mib(rss["idle"]), mib(rss["loaded"]), mib(rss["end"]), mib(rss["peak"])],
         *([TARGET_LABELS[t] + " (all processes)", "", "", mib(pm[t]["VmRSS"]), mib(pm[t]["VmHWM"])] for t in pm),
         ["keygate-mock", "", "", mib(r["mock_mem"].get("VmRSS", 0)), mib(r["mock_mem"].get("VmHWM", 0))]],
    )

    # Each target of the benchmark issue, met or not, beside what the Pingora floor reaches.
    def ratio(scenario: str, t: str, peer: str) -> float:
        return rps(scenario, t) / rps(scenario, peer)

    def body_cost(t: str) -> float:
        return 1 - rps("body16k", t) / rps("chat", t)

    def added(t: str, p: int) -> float:
        return (pct(r["lat"][t], p) - pct(r["lat"]["direct"], p)) * 1000

    def verdict(ok: bool) -> str:
        return "met" if ok else "not met"

    kg_idle = r["rss"]["idle"] / 1024
    goal_rows = []
    for scenario, label in (("chat", "chat req/s vs HAProxy"), ("sse", "stream req/s vs HAProxy")):
        k, f = ratio(scenario, "keygate", "haproxy"), ratio(scenario, "pingora", "haproxy")
        goal_rows.append([label, "≥ 100%", f"{k:.0%}", f"{f:.0%}", verdict(k >= 1)])
    k, f = body_cost("keygate"), body_cost("pingora")
    goal_rows.append(["throughput lost to a 16 KiB body", "≤ 10%", f"{k:.0%}", f"{f:.0%}", verdict(k <= 0.10)])
    for p, limit in ((50, 0.15), (99, 0.3)):
        k, f = added("keygate", p), added("pingora", p)
        goal_rows.append([f"added latency p{p}, ms", f"≤ {limit}", f"{k:.3f}", f"{f:.3f}", verdict(k <= limit)])
    k, f = event_added("keygate", 50) * 1000, event_added("pingora", 50) * 1000
    goal_rows.append(["each SSE event passed on within, ms", "≤ 1", f"{k:.3f}", f"{f:.3f}", verdict(k <= 1)])
    goal_rows.append(["idle RSS, MiB", "≤ 16", f"{kg_idle:.1f}", "", verdict(kg_idle <= 16)])
    t0 = table(["target (benchmark issue)", "goal", "keygate", "Pingora floor", ""], goal_rows)

    problems = []
    for (scenario, t), runs in sorted(tput.items()):
        e = sum(x["errors"] for x in runs)
        if e:
            problems.append(f"{scenario} via {TARGET_LABELS[t]}: {e} errors (socket or non-2xx)")
    for t in r["lat_err"]:
        if r["lat_err"][t]:
            seen = ", ".join(r.get("lat_what", {}).get(t, [])[:3])
            problems.append(f"fixed-rate via {TARGET_LABELS[t]}: {r['lat_err'][t]} errors"
                            + (f" (first: {seen})" if seen else ""))
    for t in r["sse_err"]:
        if r["sse_err"][t]:
            problems.append(f"stream timing via {TARGET_LABELS[t]}: {r['sse_err'][t]} errors")

    info = r["info"]
    cmd = "python3 bench/load.py" + ("" if not r["args"] else " " + " ".join(r["args"]))
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    spread = ", ".join(f"{TARGET_LABELS[t]} {'/'.join(str(n) for n in s.values())}" for t, s in r["spread"].items())
    floor_note = (
        "The Pingora floor is `examples/bare_passthrough.rs`: Pingora with nothing but key injection "
        "(no body reading,\nrouting, retries or metrics), on the same mock. A goal the floor misses too is out "
        "of reach for any\ngateway on Pingora, keygate's fixed base, on this machine; the gap between keygate "
        "and the floor is\nkeygate's own work (see \"Instructions per request\" below). A 16 KiB body costs "
        "keygate more\ninstructions than it costs the floor because keygate must read the body before routing "
        "and Pingora 0.9\ncan only replay such a body from its retry buffer: three more copies of it (into the "
        "buffer, out of it\nper attempt, and keygate's own copy). The goal of ≤ 20 KiB per idle connection "
        "is in the Scale\nsection; key selection time (flat from 10 to 100 000 keys) in "
        "`cargo bench --bench hot_paths`."
    )
    t6 = cache_table(r, rps, errs)
    if r.get("hit_err"):
        problems.append(f"fixed-rate cache hits via keygate: {r['hit_err']} errors")
    tables = "\n\n".join([t0, floor_note, t1, t2, t3, t4, t5] + ([t6] if t6 else []))
    against_md = against(r)
    method = f"""\
- {r['rounds']} round(s); in each, every target in turn (order rotated per round) for {r['seconds']:g} s with
  wrk, {r['conns']} connections, {r['wrk_threads']} wrk thread(s); figures are medians over rounds. `(!)` marks a
  figure with errors (listed below).
- keygate, nginx (each config), HAProxy and the mock each run with one worker thread; wrk and the Python
  client share the same {info['nproc']} CPUs, so everything competes for the same cores.
- Latency: an open-loop client (bench/load.py) sends {r['rate']:g} req/s for {r['lat_seconds']:g} s per round on
  keep-alive connections; latency is from the send to the last byte. Python adds its own ~0.1 ms to both sides.
- Streams: {r['streams']} streams per target, one at a time; "first chunk" is when the first SSE chunk's bytes are in.
- The mock runs with `--strict`: a request without a valid key gets 401 and counts as an error. Before
  measuring, 30 requests through each proxy reached the mock with all three keys ({spread} per key a/b/c).
- keygate runs with `RUST_LOG=warn`; nginx and HAProxy without access logs."""

    quick_note = (
        "\n\nThis is a `--quick` smoke run (one short round): it shows the script works, not how fast\n"
        "anything is. Run `make bench` on a quiet machine for figures worth quoting."
        if r["quick"] else ""
    )
    md = f"""# keygate load benchmark{' (quick smoke run — not representative)' if r['quick'] else ''}

Generated by `{cmd}` (what `make bench` runs after the criterion micro-benchmarks) on {when}.
Everything runs on one machine, over loopback, against the bundled `keygate-mock`.{quick_note}

**Ratios within one run are what matter** (e.g. keygate vs nginx, keygate vs direct): absolute numbers
depend on the machine and on whatever else it was doing, and all processes here share its cores.

## Machine

| | |
| --- | --- |
| CPUs (`nproc`) | {info['nproc']} |
| CPU | {info['cpu']} |
| memory | {info['memory']} |
| kernel | {info['kernel']} |
| load average at start | {info['loadavg']} |
| keygate | {info['commit']}, {info['rustc']} |
| peers | {info['nginx']}; {info['haproxy'].split(' - ')[0]}; {info['wrk'].split(' [')[0]} |

## Results

{tables}

{"Problems seen:" + chr(10) + chr(10).join("- " + p for p in problems) if problems else "No errors: every request got a 200."}
{against_md}
## Method

{method}

The peers: **nginx two-hop** is the set-up commonly used today (one `server` per key on its own port
injecting `Authorization`, a round-robin `upstream` over those servers in front; every request crosses
nginx twice); **nginx tuned** is one hop, the key chosen by `split_clients` on `$request_id`, `keepalive 64`;
**HAProxy** is one hop, a stick-table counter picks the key and the matching `server` line. Their
configs are `bench/nginx-two-hop.conf`, `bench/nginx-tuned.conf`, `bench/haproxy.cfg`; keygate's is
`bench/keygate.yaml`. The peers only rotate keys: none of them cools a key on 429, retries elsewhere,
or reads the body; keygate does all of that on every request.
"""
    term = (f"\n{tables}\n\n" + ("\n".join("! " + p for p in problems) + "\n" if problems else "no errors\n")
            + against_md)
    return {"markdown": md, "terminal": term}


def noise_of(kg_rounds: list[float], base_rounds: list[float]) -> float:
    """The noise of a comparison: max - min over the rounds of the per-round ratio keygate / baseline
    (NaN with fewer than two rounds: one round has no spread)."""
    ratios = [k / b for k, b in zip(kg_rounds, base_rounds) if b]
    return max(ratios) - min(ratios) if len(ratios) >= 2 else float("nan")


def judge(diff: float, noise: float, higher_is_better: bool, words: tuple[str, str] = ("faster", "slower")) -> str:
    """The verdict on a relative difference (keygate / baseline - 1): "within noise" when it is no
    larger than the noise, else words[0] if keygate is better, words[1] if worse."""
    if math.isnan(diff):
        return "no verdict (no figure)"
    if math.isnan(noise):
        return "no verdict (one round: no spread to judge against)"
    if abs(diff) <= noise:
        return "within noise"
    return words[0] if (diff > 0) == higher_is_better else words[1]


def against(r: dict) -> str:
    """The "Against REV" section of the report: keygate beside keygate @REV, measured in the same
    rounds; empty without a baseline."""
    base = r.get("baseline")
    if not base:
        return ""
    other = f"keygate @{base['short']}"
    tput, lat, rss = r["tput"], r["lat_rounds"], r["rss_rounds"]
    pc = lambda v: "n/a" if math.isnan(v) else f"{v:.1%}"  # noqa: E731
    # (figure, keygate, baseline, difference cell, noise cell, verdict line)
    figures: list[tuple[str, str, str, str, str, str]] = []

    def add(label: str, k: float, b: float, noise: float, higher_is_better: bool, cell,
            words=("faster", "slower"), extra: str = "") -> None:
        diff = k / b - 1 if b else float("nan")
        shown = "n/a" if math.isnan(diff) else f"{diff:+.1%}{extra}"
        verdict = judge(diff, noise, higher_is_better, words)
        if not verdict.startswith("no verdict"):
            verdict += f" ({diff:+.1%}, noise {noise:.1%})"
        figures.append((label, cell(k), cell(b), shown, pc(noise), verdict))

    for scenario, label in (("chat", "chat POST, req/s"), ("sse", "stream, 5 chunks, req/s"),
                            ("body16k", "16 KiB body, req/s")):
        k_runs = [x["rps"] for x in tput.get((scenario, "keygate"), [])]
        b_runs = [x["rps"] for x in tput.get((scenario, "baseline"), [])]
        add(label, median(k_runs), median(b_runs), noise_of(k_runs, b_runs), True, lambda v: f"{v:,.0f}")
    for p in (50, 90, 99):
        k = pct([x for run in lat["keygate"] for x in run], p)
        b = pct([x for run in lat["baseline"] for x in run], p)
        k_runs = [pct(run, p) for run in lat["keygate"]]
        b_runs = [pct(run, p) for run in lat["baseline"]]
        add(f"latency p{p} at {r['rate']:g} req/s, ms", k, b, noise_of(k_runs, b_runs), False,
            lambda v: f"{v * 1000:.3f}", extra=f" ({(k - b) * 1000:+.3f} ms)")
    mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731
    words = ("smaller", "larger")
    loaded_noise = noise_of(rss["keygate"], rss["baseline"])
    add("RSS idle, MiB", r["rss"]["idle"], r["base_rss"]["idle"], loaded_noise, False, mib, words)
    add("RSS after load, MiB", median(rss["keygate"]), median(rss["baseline"]), loaded_noise, False, mib, words)
    add("peak RSS (VmHWM), MiB", r["rss"]["peak"], r["base_rss"]["peak"], loaded_noise, False, mib, words)

    t = table(["figure", "keygate", other, "difference", "noise"], [list(f[:5]) for f in figures])
    verdicts = "\n".join(f"- {label}: {v}" for label, _, _, _, _, v in figures)
    worse = [label for label, *_, v in figures if v.startswith(("slower", "larger"))]
    if worse:
        summary = f"**Worse than {other} beyond noise:** {', '.join(worse)}."
    elif all(v.startswith("no verdict") for *_, v in figures):
        summary = "**No verdict:** one round has no spread between rounds; run two or more (three by default)."
    else:
        summary = f"**No loss beyond noise against {other}.**"
    same = base["rev"] == base["short"]
    rev = base["rev"] if same else f"{base['rev']} = {base['short']}"
    heading = f"{base['rev']} ({base['subject']})" if same else f"{base['rev']} ({base['short']}, {base['subject']})"
    return f"""
## Against {heading}

{other} is keygate built in release mode from {rev}, run with the current
`bench/keygate.yaml` on its own port through every test keygate runs, in the same rounds, right
beside keygate (after it in one round, before it in the next), so that both meet the same load and
drift. Figures: medians over the rounds for req/s; the percentile over all of a target's fixed-rate
samples for latency; for memory, single readings idle and at the peak, and the median of the
readings taken after each round's load.

- **Difference**: keygate / {other} − 1 on the figures shown (for latency, in brackets: the latency
  keygate adds over {other}).
- **Noise**: the spread between rounds, max − min over the {r['rounds']} round(s) of the per-round ratio
  keygate / {other} (for latency, of the round's percentiles; for memory, of the RSS after each
  round's load, a spread that stands for the idle and peak readings too).
- **Verdict**: "within noise" when the difference is no larger than the noise; otherwise keygate is
  "faster" or "slower" (memory: "smaller" or "larger"). One round has no spread, hence no verdict. With
  three rounds the bar is low: two equal builds still land outside it for about one figure in ten
  (simulated with independent noise); `--rounds 5` makes it firmer.

{t}

{verdicts}

{summary}
"""


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    def line(cells):  # noqa: E306
        return "| " + " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "| " + " | ".join(("-" * w) if i == 0 else ("-" * (w - 1) + ":") for i, w in enumerate(widths)) + " |"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
