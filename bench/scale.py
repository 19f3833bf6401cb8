#!/usr/bin/env python3
"""Scale benchmark of keygate on loopback: many idle connections, many slow streams, many keys.

    python3 bench/scale.py            # full run (about 2 minutes), adds a "Scale" section to BENCHMARKS.md
    python3 bench/scale.py --quick    # smoke run (1 000 connections, 200 streams, 10 000 keys)

It uses the release binaries already in target/release (`make bench` builds them first, in
bench/load.py); it never builds. What runs, all on 127.0.0.1 ports picked at start:
- `keygate-mock --threads 1` (not strict: the 100 000-key part sends keys the mock was not told
  about; which keys arrived is checked through `/_mock/stats` instead);
- keygate, one worker thread, a fresh process for each part, its config generated into a 0700
  temp dir (the upgrade socket is created mode 0666): one upstream, one catch-all route,
  `guards: { idle_timeout: 10m }` so that idle connections stay open while they are measured.

What is measured (RSS is keygate's VmRSS from /proc/PID/status: one process, all its threads):
1. idle keep-alive connections: RSS idle, then N connections (10 000; quick 1 000) each send one
   small keep-alive POST, read the whole response and stay open; RSS again; per connection =
   (after - before) / N. Then every connection is checked to be still open and usable;
2. slow streams: M concurrent streams (2 000; quick 200), each on its own connection, 20 chunks
   500 ms apart (about 10 s); keygate's peak RSS and its CPU time (utime + stime from
   /proc/PID/stat) over the streaming period; every stream must end with `data: [DONE]`;
3. many keys: a keys_file of K keys (100 000; quick 10 000): time of `keygate -t` (config load and
   validation), time from process start to the listener accepting connections and to the first
   200, RSS after start; then 1 000 requests, which must reach the mock with many different keys.

The process' own RLIMIT_NOFILE (inherited by the children) is raised to the hard limit first.
Needs: python3 (3.8+, standard library only) and the release binaries.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing load.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402  (bench/load.py: the load benchmark's helpers)
    CHAT_PATH,
    KEYS,
    ROOT,
    Processes,
    chat_body,
    free_ports,
    keys_seen,
    open_conn,
    proc_status,
    read_body,
    read_head,
    request_bytes,
    table,
    tail,
    wait_ready,
    wait_ready_plain,
)

RELEASE = ROOT / "target" / "release"
STREAM_BODY = b'{"model":"gpt-4o","stream":true,"mock":{"chunks":20,"interval_ms":500}}'
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Processes and /proc


class Procs(Processes):
    """load.py's process list, plus stopping one process (keygate is restarted per part)."""

    def stop(self, proc: subprocess.Popen) -> None:
        for i, (name, p, sig) in enumerate(self.procs):
            if p is proc:
                if p.poll() is None:
                    try:
                        p.send_signal(sig)
                    except ProcessLookupError:
                        pass
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    log(f"{name} did not stop in time: killing it")
                    p.kill()
                    p.wait()
                del self.procs[i]
                return


def rss_kib(pid: int) -> int:
    return proc_status(pid).get("VmRSS", 0)


def hwm_kib(pid: int) -> int:
    return proc_status(pid).get("VmHWM", 0)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    # After "pid (comm)": field 3 (state) is fields[0], so utime (14) and stime (15) are 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def raise_nofile(need: int) -> tuple[int, int]:
    """Raises the soft RLIMIT_NOFILE to the hard limit (children inherit it); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = max(soft, need)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log(f"could not raise RLIMIT_NOFILE from {soft} to {target}: {e}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


# --------------------------------------------------------------------------------------------
# keygate


def keygate_conf(d: Path, port: int, mock_port: int, keys_file: Path | None = None) -> Path:
    """One upstream (the mock), one catch-all route, idle connections kept for 10 minutes."""
    if keys_file is None:
        keys = "    keys:\n" + "".join(
            f"      - {{ name: {var[-1].lower()}, env: {var} }}\n" for var in KEYS
        )
    else:
        keys = f"    keys_file: {keys_file}\n"
    text = f"""\
# generated by bench/scale.py
server:
  threads: 1
  pid_file: {d}/keygate.pid
  upgrade_sock: {d}/upgrade.sock
  grace_period_seconds: 0
  graceful_shutdown_timeout_seconds: 1

listen:
  - addr: 127.0.0.1:{port}

guards: {{ idle_timeout: 10m }}

upstreams:
  mock:
    url: http://127.0.0.1:{mock_port}
    auth: bearer
    key_policy: round_robin
{keys}
routes:
  - {{ name: all, upstreams: [mock] }}
"""
    path = d / "keygate.yaml"
    path.write_text(text)
    return path


def keygate_env() -> dict[str, str]:
    env = dict(os.environ, **KEYS)
    env["RUST_LOG"] = os.environ.get("BENCH_RUST_LOG", "warn")
    return env


def time_check(conf: Path, runs: int) -> list[float]:
    """Wall time of `keygate -t -c conf` (load and validate the config, then exit)."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        r = subprocess.run([str(RELEASE / "keygate"), "-t", "-c", str(conf)], env=keygate_env(),
                           capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"keygate -t rejected {conf}:\n{r.stdout}{r.stderr}")
    return times


class Keygate:
    """A keygate process started and timed: to a connectable listener, to the first 200."""

    def __init__(self, procs: Procs, name: str, conf: Path, port: int, log_path: Path) -> None:
        self.procs, self.port, self.log_path = procs, port, log_path
        t0 = time.perf_counter()
        self.proc = procs.start(name, [str(RELEASE / "keygate"), "-c", str(conf)], log_path,
                                env=keygate_env(), stop_signal=signal.SIGINT)
        self.pid = self.proc.pid
        deadline = t0 + 60
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited with {self.proc.returncode}; its log:\n{tail(log_path)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.perf_counter() > deadline:
                    raise SystemExit(f"{name} not listening on {port} after 60 s; its log:\n{tail(log_path)}")
                time.sleep(0.002)
        self.t_listen = time.perf_counter() - t0
        wait_ready(name, port, self.proc, log_path, timeout=60)
        self.t_ready = time.perf_counter() - t0

    def stop(self) -> None:
        self.procs.stop(self.proc)


def mock_get(port: int, path: str, method: str = "GET") -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def mock_stats(port: int) -> dict:
    return json.loads(mock_get(port, "/_mock/stats"))


def mock_reset(port: int) -> None:
    mock_get(port, "/_mock/reset", method="POST")


# --------------------------------------------------------------------------------------------
# A small HTTP/1.1 client on load.py's response readers


async def read_full(r: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One response: (status, body, keep-alive)."""
    status, headers = await read_head(r)
    body, keep, _ = await read_body(r, headers)
    return status, body, keep


CLIENT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError)


def why(e: BaseException) -> str:
    return type(e).__name__ if not str(e) else f"{type(e).__name__}: {str(e)[:80]}"


async def close_all(conns: list) -> None:
    for c in conns:
        c.writer.close()

    async def wait(c):
        try:
            await asyncio.wait_for(c.writer.wait_closed(), 5)
        except (*CLIENT_ERRORS, asyncio.CancelledError):
            pass

    await asyncio.gather(*(wait(c) for c in conns))


# --------------------------------------------------------------------------------------------
# 1. idle keep-alive connections


async def idle_connections(kg: Keygate, n: int, settle: float) -> dict:
    port, pid = kg.port, kg.pid
    payload = request_bytes(port, chat_body(200), "")
    sem = asyncio.Semaphore(200)  # connections being opened at once (the accept backlog is finite)
    conns = []
    failures: Counter = Counter()

    await asyncio.sleep(settle)
    before = rss_kib(pid)
    t0 = time.perf_counter()

    async def one() -> None:
        async with sem:
            try:
                c = await asyncio.wait_for(open_conn(port), 30)
            except CLIENT_ERRORS as e:
                failures["connect: " + why(e)] += 1
                return
            try:
                c.writer.write(payload)
                status, _, keep = await asyncio.wait_for(read_full(c.reader), 30)
            except CLIENT_ERRORS as e:
                failures["request: " + why(e)] += 1
                c.writer.close()
                return
            if status != 200:
                failures[f"HTTP {status}"] += 1
            if not keep:
                failures["not keep-alive"] += 1
                c.writer.close()
                return
            conns.append(c)

    await asyncio.gather(*(one() for _ in range(n)))
    t_open = time.perf_counter() - t0
    log(f"{len(conns)} connections open and idle after {t_open:.1f} s; settling {settle:g} s")
    await asyncio.sleep(settle)
    after = rss_kib(pid)
    hwm = hwm_kib(pid)
    cpu_idle0 = cpu_seconds(pid)
    await asyncio.sleep(settle)
    cpu_idle = cpu_seconds(pid) - cpu_idle0  # what holding them idle costs
    closed = sum(1 for c in conns if c.reader.at_eof())

    # Still usable? A second request on every connection that is still open.
    reused_ok = 0

    async def again(c) -> None:
        nonlocal reused_ok
        async with sem:
            try:
                c.writer.write(payload)
                status, _, _ = await asyncio.wait_for(read_full(c.reader), 30)
                reused_ok += status == 200
            except CLIENT_ERRORS:
                pass

    await asyncio.gather(*(again(c) for c in conns if not c.reader.at_eof()))
    await close_all(conns)
    await asyncio.sleep(settle)
    return {
        "n": n, "open": len(conns), "failures": dict(failures), "before": before, "after": after,
        "hwm": hwm, "after_close": rss_kib(pid), "closed_by_server": closed, "reused_ok": reused_ok,
        "t_open": t_open, "cpu_idle": cpu_idle, "settle": settle,
    }


# --------------------------------------------------------------------------------------------
# 2. concurrent slow streams


async def slow_streams(kg: Keygate, mock_pid: int, n: int, settle: float) -> dict:
    port, pid = kg.port, kg.pid
    payload = request_bytes(port, STREAM_BODY, "")
    sem = asyncio.Semaphore(500)  # connections being opened at once
    failures: Counter = Counter()
    ok = 0
    active = max_active = 0
    done = asyncio.Event()
    samples: list[tuple[float, int]] = []
    durations: list[float] = []

    await asyncio.sleep(settle)
    before = rss_kib(pid)

    async def sampler() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), rss_kib(pid)))
            try:
                await asyncio.wait_for(done.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    async def one() -> None:
        nonlocal ok, active, max_active
        t = time.perf_counter()
        c = None
        try:
            async with sem:
                c = await asyncio.wait_for(open_conn(port), 30)
                c.writer.write(payload)
                # The status line and headers: the stream has started.
                status, headers = await asyncio.wait_for(read_head(c.reader), 60)
        except CLIENT_ERRORS as e:
            failures["start: " + why(e)] += 1
            if c:
                c.writer.close()
            return
        active += 1
        max_active = max(max_active, active)
        try:
            body, _, _ = await asyncio.wait_for(read_body(c.reader, headers), 120)
        except CLIENT_ERRORS as e:
            failures["stream: " + why(e)] += 1
            return
        finally:
            active -= 1
            c.writer.close()
        durations.append(time.perf_counter() - t)
        if status != 200:
            failures[f"HTTP {status}"] += 1
        elif body.rstrip().endswith(b"data: [DONE]"):
            ok += 1
        else:
            failures["no [DONE] at the end"] += 1

    cpu0, mcpu0, t0 = cpu_seconds(pid), cpu_seconds(mock_pid), time.perf_counter()
    sampling = asyncio.ensure_future(sampler())
    await asyncio.gather(*(one() for _ in range(n)))
    wall = time.perf_counter() - t0
    cpu, mcpu = cpu_seconds(pid) - cpu0, cpu_seconds(mock_pid) - mcpu0
    done.set()
    await sampling
    peak = max((r for _, r in samples), default=0)
    await asyncio.sleep(settle)
    return {
        "n": n, "ok": ok, "failures": dict(failures), "before": before, "peak": peak,
        "hwm": hwm_kib(pid), "after": rss_kib(pid), "cpu": cpu, "mock_cpu": mcpu, "wall": wall,
        "max_active": max_active, "samples": len(samples),
        "dur_p50": statistics.median(durations) if durations else float("nan"),
        "dur_max": max(durations, default=float("nan")),
    }


# --------------------------------------------------------------------------------------------
# 3. many keys


def write_keys_file(path: Path, n: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"sk-scale-{i} name=k{i}\n" for i in range(n)))
    os.chmod(path, 0o600)


async def spread_requests(port: int, n: int, conns: int) -> dict:
    payload = request_bytes(port, chat_body(200), "")
    statuses: Counter = Counter()
    left = n

    async def worker() -> None:
        nonlocal left
        c = await open_conn(port)
        try:
            while left > 0:
                left -= 1
                try:
                    c.writer.write(payload)
                    status, _, keep = await asyncio.wait_for(read_full(c.reader), 30)
                except CLIENT_ERRORS as e:
                    statuses[why(e)] += 1
                    c.writer.close()
                    c = await open_conn(port)
                    continue
                statuses[status] += 1
                if not keep:
                    c.writer.close()
                    c = await open_conn(port)
        finally:
            c.writer.close()

    await asyncio.gather(*(worker() for _ in range(conns)))
    return dict(statuses)


# --------------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, str]:
    def first(path: str, prefix: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "unknown"

    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    mem = first("/proc/meminfo", "MemTotal")
    try:
        mem = f"{int(mem.split()[0]) / 1024 / 1024:.1f} GiB"
    except (ValueError, IndexError):
        pass
    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "unknown"
    if run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]):
        commit += " (with uncommitted changes)"
    try:
        loadavg = Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        loadavg = "?"
    return {
        "nproc": run(["nproc"]) or str(os.cpu_count()),
        "cpu": first("/proc/cpuinfo", "model name"),
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "commit": commit,
        "loadavg": loadavg,
    }


def fmt_failures(f: dict) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(f.items(), key=lambda kv: -kv[1]))


def render(r: dict) -> dict[str, str]:
    mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731
    info, idle, st, ks = r["info"], r["idle"], r["streams"], r["keys"]
    problems: list[str] = list(r["problems"])

    t1 = t2 = t3 = ""
    if idle:
        per = (idle["after"] - idle["before"]) / idle["n"]
        t1 = table(
            [f"{idle['n']:,} idle keep-alive connections", "value"],
            [["keygate RSS idle, MiB", mib(idle["before"])],
             [f"RSS with {idle['open']:,} connections open, MiB", mib(idle["after"])],
             ["  difference, MiB", mib(idle["after"] - idle["before"])],
             ["  per connection, KiB", f"{per:.1f}"],
             ["peak RSS (VmHWM), MiB", mib(idle["hwm"])],
             ["RSS after closing them all, MiB", mib(idle["after_close"])],
             ["time to open them (one request each), s", f"{idle['t_open']:.1f}"],
             [f"keygate CPU while they sat idle {idle['settle']:g} s, s", f"{idle['cpu_idle']:.2f}"],
             ["closed by keygate while idle", f"{idle['closed_by_server']:,}"],
             ["answered a second request afterwards", f"{idle['reused_ok']:,}"]],
        )
        if idle["failures"]:
            problems.append(f"idle connections: {sum(idle['failures'].values())} of {idle['n']} failed "
                            f"({fmt_failures(idle['failures'])})")
        if idle["closed_by_server"]:
            problems.append(f"idle connections: keygate closed {idle['closed_by_server']} of them while idle")
        if idle["reused_ok"] != idle["open"] - idle["closed_by_server"]:
            problems.append(f"idle connections: only {idle['reused_ok']} of {idle['open']} answered a second request")
    if st:
        per = (st["peak"] - st["before"]) / st["n"]
        t2 = table(
            [f"{st['n']:,} concurrent streams (20 chunks, 500 ms apart)", "value"],
            [["keygate RSS before, MiB", mib(st["before"])],
             ["peak RSS while streaming (sampled every 0.1 s), MiB", mib(st["peak"])],
             ["  per stream, KiB", f"{per:.1f}"],
             ["RSS after they ended, MiB", mib(st["after"])],
             ["streams open at once (most)", f"{st['max_active']:,}"],
             ["streaming period (first connect to last end), s", f"{st['wall']:.1f}"],
             ["stream duration p50 / max, s", f"{st['dur_p50']:.2f} / {st['dur_max']:.2f}"],
             ["keygate CPU over the period, s", f"{st['cpu']:.2f}"],
             ["  % of one core", f"{st['cpu'] / st['wall'] * 100:.1f}"],
             ["keygate-mock CPU over the period, s", f"{st['mock_cpu']:.2f}"],
             ["ended with data: [DONE]", f"{st['ok']:,} of {st['n']:,}"],
             ["failures", f"{st['n'] - st['ok']:,}"]],
        )
        if st["ok"] != st["n"]:
            problems.append(f"streams: {st['n'] - st['ok']} of {st['n']} failed ({fmt_failures(st['failures'])})")
    if ks:
        base = r["base"]
        per_key = (ks["rss"] - base["rss"]) * 1024 / ks["n"]
        t3 = table(
            ["keys in the keys_file", "3 (env, baseline)", f"{ks['n']:,}"],
            [["`keygate -t` (load + validate), median, ms", f"{base['check_ms']:.0f}", f"{ks['check_ms']:.0f}"],
             ["start to listener accepting, ms", f"{base['t_listen'] * 1000:.0f}", f"{ks['t_listen'] * 1000:.0f}"],
             ["start to first 200, ms", f"{base['t_ready'] * 1000:.0f}", f"{ks['t_ready'] * 1000:.0f}"],
             ["RSS after start, MiB", mib(base["rss"]), mib(ks["rss"])],
             ["  per key (vs baseline), bytes", "", f"{per_key:.0f}"],
             [f"{ks['requests']:,} requests: answered 200", "", f"{ks['statuses'].get(200, 0):,}"],
             ["  distinct keys the mock saw", "", f"{ks['distinct']:,}"],
             ["  most requests on one key", "", f"{ks['max_per_key']:,}"]],
        )
        bad = {k: v for k, v in ks["statuses"].items() if k != 200}
        if bad:
            problems.append(f"many keys: {sum(bad.values())} of {ks['requests']} requests failed ({fmt_failures(bad)})")
        if ks["foreign"]:
            problems.append(f"many keys: the mock saw {ks['foreign']} requests with keys not from the keys file")
        if ks["distinct"] < 0.9 * min(ks["requests"], ks["n"]):
            problems.append(f"many keys: {ks['requests']} requests used only {ks['distinct']} distinct keys")

    info_line = (f"{info['nproc']} CPUs (`nproc`), {info['cpu']}, {info['memory']}, {info['kernel']}; "
                 f"load average {info['loadavg']} at start; keygate {info['commit']}")
    cmd = "python3 bench/scale.py" + ("" if not r["args"] else " " + " ".join(r["args"]))
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    quick = r["quick"]
    quick_note = ("\n\nThis is a `--quick` smoke run (smaller counts): it shows the script works; the\n"
                  "per-connection and per-stream figures are noisier than in a full run." if quick else "")
    parts = [t for t in (t1, t2, t3) if t]
    problem_text = ("Problems seen:\n\n" + "\n".join("- " + p for p in problems)) if problems else \
        "No problems: every connection, stream and request succeeded."
    nofile = r["nofile"]
    md = f"""## Scale{' (quick smoke run)' if quick else ''}

Generated by `{cmd}` (what `make bench` runs after bench/load.py) on {when}.
Machine: {info_line}.{quick_note}

{chr(10).join(p + chr(10) for p in parts)}
{problem_text}

How: on loopback, `keygate-mock --threads 1` and keygate with one worker thread, a fresh keygate
process for each table (config: one upstream, one catch-all route, `guards: {{ idle_timeout: 10m }}`,
`RUST_LOG=warn`); RLIMIT_NOFILE {nofile[0]:,} (soft, raised to the hard limit {nofile[1]:,}) for the
script and both servers. RSS is keygate's VmRSS (one process, all its threads).
- Idle connections: {r['n_conns']:,} connections from one asyncio client (at most 200 being opened at
  once), each sends one 200-byte keep-alive POST {CHAT_PATH}, reads the whole response and stays open;
  RSS is read {r['settle']:g} s after the last one is open; per connection = (with - idle) / {r['n_conns']:,}.
- Streams: {r['n_streams']:,} requests `"stream":true` with the mock's knob `{{"chunks":20,"interval_ms":500}}`
  (about 9.5 s each), each on its own connection, all started at once; RSS sampled every 0.1 s,
  per stream = (peak - before) / {r['n_streams']:,}; CPU is utime + stime from /proc/PID/stat over
  the period; a stream counts as good only if its last event is `data: [DONE]`. The Python client
  shares the same cores.
- Keys: a keys_file (mode 0600) of {r['n_keys']:,} lines `sk-scale-<n> name=k<n>`, `key_policy: round_robin`;
  `keygate -t` timed {r['check_runs']} times (median); start times are from `Popen` to the first successful
  TCP connect (polled every 2 ms) and to the first 200; RSS 1 s after that first 200; the baseline
  column is the 3-key keygate of the idle-connection table. The requests run on 16 keep-alive connections;
  the keys come from the mock's `/_mock/stats`.
"""
    term = "\n" + "\n\n".join(parts) + "\n\n" + (
        "\n".join("! " + p for p in problems) + "\n" if problems else "no problems\n")
    return {"markdown": md, "terminal": term}


def write_section(path: Path, section: str, heading: str = "Scale") -> None:
    """Replaces the "## {heading}" section of `path` (up to the next # or ## heading), or appends one."""
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines(keepends=True)
    # The heading ends at the end of the line or a space: `\b` would never match after `)`.
    start = next((i for i, l in enumerate(lines) if re.match(rf"## {re.escape(heading)}(?=\s|$)", l)), None)
    section = section.rstrip("\n") + "\n"
    if start is None:
        new = (text.rstrip("\n") + "\n\n" + section) if text.strip() else section
    else:
        end = next((j for j in range(start + 1, len(lines)) if re.match(r"#{1,2} ", lines[j])), len(lines))
        head = "".join(lines[:start])
        rest = "".join(lines[end:])
        new = head + section + ("\n" + rest if rest else "")
    path.write_text(new)


# --------------------------------------------------------------------------------------------
# The run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 000 connections, 200 streams, 10 000 keys")
    ap.add_argument("--connections", type=int, help="idle keep-alive connections (default 10 000; quick 1 000)")
    ap.add_argument("--streams", type=int, help="concurrent slow streams (default 2 000; quick 200)")
    ap.add_argument("--keys", type=int, help="keys in the keys file (default 100 000; quick 10 000)")
    ap.add_argument("--requests", type=int, default=1000, help="requests sent with the many keys (default 1 000)")
    ap.add_argument("--only", choices=["idle", "streams", "keys"], action="append",
                    help="run only this part (repeatable)")
    ap.add_argument("--no-build", action="store_true", help="accepted for symmetry with load.py: this script never builds")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="file whose \"## Scale\" section is written")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    n_conns = args.connections or (1000 if args.quick else 10000)
    n_streams = args.streams or (200 if args.quick else 2000)
    n_keys = args.keys or (10000 if args.quick else 100000)
    parts = set(args.only or ["idle", "streams", "keys"])
    settle = 1.0 if args.quick else 2.0
    check_runs = 3

    for b in ("keygate", "keygate-mock"):
        if not (RELEASE / b).exists():
            raise SystemExit(f"target/release/{b} is missing: run `cargo build --release --workspace --bins` (or `make bench`)")

    problems: list[str] = []
    # Each side of a connection is one descriptor in one process: the client holds n, keygate n
    # plus its upstream connections (one per concurrent stream), the mock one per stream.
    need = max(n_conns, 2 * n_streams) + 512
    nofile = raise_nofile(need)
    log(f"RLIMIT_NOFILE: soft {nofile[0]}, hard {nofile[1]} (need about {need})")
    if nofile[0] < need:
        problems.append(f"RLIMIT_NOFILE is {nofile[0]} (hard {nofile[1]}): too low for {n_conns:,} connections "
                        f"and {n_streams:,} streams (about {need:,} descriptors per process); raise the hard limit "
                        "(ulimit -Hn, /etc/security/limits.conf or systemd's LimitNOFILE)")
        n_conns = min(n_conns, max(100, nofile[0] - 512))
        n_streams = min(n_streams, max(10, (nofile[0] - 512) // 2))
        log(f"too few file descriptors: measuring {n_conns} connections and {n_streams} streams instead")
    info = machine()

    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="keygate-scale-"))
    tmp.chmod(0o700)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    idle = streams = keys = base = None
    try:
        port = dict(zip(["mock", "kg1", "kg2", "kg3"], free_ports(4)))
        mock_cmd = [str(RELEASE / "keygate-mock"), "--listen", f"127.0.0.1:{port['mock']}",
                    "--threads", "1", "--name", "scale"]
        for secret in KEYS.values():
            mock_cmd += ["--key", f"{secret}=ok"]
        mock = procs.start("keygate-mock", mock_cmd, tmp / "mock.log")
        wait_ready_plain("keygate-mock", port["mock"], mock, tmp / "mock.log")

        def keygate_dir(name: str) -> Path:
            d = tmp / name
            d.mkdir(mode=0o700)
            return d

        # 1. idle keep-alive connections (also the 3-key baseline of part 3)
        d = keygate_dir("keygate-idle")
        conf3 = keygate_conf(d, port["kg1"], port["mock"])
        base_check = time_check(conf3, check_runs)
        kg = Keygate(procs, "keygate (3 keys)", conf3, port["kg1"], d / "keygate.log")
        time.sleep(1)
        base = {"check_ms": statistics.median(base_check) * 1000, "t_listen": kg.t_listen,
                "t_ready": kg.t_ready, "rss": rss_kib(kg.pid)}
        if "idle" in parts:
            log(f"part 1: {n_conns} idle keep-alive connections")
            mock_reset(port["mock"])
            idle = asyncio.run(idle_connections(kg, n_conns, settle))
            seen = keys_seen(mock_stats(port["mock"]))
            if set(seen) - set(KEYS.values()):
                problems.append(f"idle connections: the mock saw unexpected keys {sorted(set(seen) - set(KEYS.values()))[:5]}")
            log(f"RSS {idle['before']} KiB idle, {idle['after']} KiB with {idle['open']} connections "
                f"({(idle['after'] - idle['before']) / n_conns:.1f} KiB each); failures {idle['failures'] or 'none'}")
        kg.stop()

        # 2. concurrent slow streams, on a fresh keygate
        if "streams" in parts:
            d = keygate_dir("keygate-streams")
            conf = keygate_conf(d, port["kg2"], port["mock"])
            kg = Keygate(procs, "keygate (streams)", conf, port["kg2"], d / "keygate.log")
            log(f"part 2: {n_streams} concurrent streams of 20 chunks 500 ms apart")
            streams = asyncio.run(slow_streams(kg, mock.pid, n_streams, settle))
            log(f"RSS {streams['before']} KiB before, peak {streams['peak']} KiB; CPU {streams['cpu']:.2f} s "
                f"over {streams['wall']:.1f} s; {streams['ok']}/{n_streams} ended with [DONE]")
            kg.stop()

        # 3. many keys
        if "keys" in parts:
            d = keygate_dir("keygate-keys")
            kf = d / "scale.keys"
            write_keys_file(kf, n_keys)
            conf = keygate_conf(d, port["kg3"], port["mock"], keys_file=kf)
            log(f"part 3: {n_keys} keys: timing keygate -t ({check_runs} runs)")
            check = time_check(conf, check_runs)
            kg = Keygate(procs, f"keygate ({n_keys} keys)", conf, port["kg3"], d / "keygate.log")
            time.sleep(1)
            rss = rss_kib(kg.pid)
            mock_reset(port["mock"])
            statuses = asyncio.run(spread_requests(kg.port, args.requests, 16))
            seen = keys_seen(mock_stats(port["mock"]))
            ours = {k: v for k, v in seen.items() if k.startswith("sk-scale-")}
            keys = {
                "n": n_keys, "check_ms": statistics.median(check) * 1000, "t_listen": kg.t_listen,
                "t_ready": kg.t_ready, "rss": rss, "requests": args.requests, "statuses": statuses,
                "distinct": len(ours), "max_per_key": max(ours.values(), default=0),
                "foreign": sum(v for k, v in seen.items() if k not in ours),
            }
            log(f"keygate -t {keys['check_ms']:.0f} ms, listening after {kg.t_listen * 1000:.0f} ms, RSS {rss} KiB; "
                f"{args.requests} requests over {len(ours)} keys")
            kg.stop()
    finally:
        procs.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    report = render({
        "args": sys.argv[1:], "quick": args.quick, "info": info, "idle": idle, "streams": streams,
        "keys": keys, "base": base, "problems": problems, "nofile": nofile, "n_conns": n_conns,
        "n_streams": n_streams, "n_keys": n_keys, "settle": settle, "check_runs": check_runs,
    })
    print(report["terminal"])
    write_section(Path(args.out), report["markdown"])
    log(f"wrote the Scale section of {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
