#!/usr/bin/env python3
"""Shared state through Redis: what a `redis:` section costs a request, and how fast a cooldown spreads.

    python3 bench/shared.py                    # writes a "Shared state (Redis)" section to BENCHMARKS.md
    python3 bench/shared.py --seconds 3 --rounds 1 --trials 50 --out /tmp/x.md

Everything runs on 127.0.0.1 ports picked at start: a `redis-server` started here (no persistence),
`keygate-mock` and keygate (bench/keygate.yaml, one worker thread) with one client whose limit is
`rpm: 100000000`: nothing is refused, but every request is admitted by the limits.

1. Cost: two keygates with the same config, "local" without a `redis:` section and "shared" with
   one, in rounds that alternate which goes first. Each round runs wrk (64 connections, one
   thread; req/s and wrk's p50/p99 at saturation) and then the open-loop client of bench/load.py at
   200 req/s (p50/p99 from the send to the last byte, the latency figures load.py judges too) on
   each. With `redis:` the client (no concurrency limit) is admitted from leases: one Redis round
   trip (the lease script) buys a share of its limits that is spent locally for up to 1 s.
2. Cooldown propagation: two more keygates, A and B, on the same Redis and on a second mock whose
   key "cool" answers 429 with `retry_after=120`. Per trial, a request for a model of its own
   (cooldowns are per key and model) is sent to A until one reaches "cool" (the mock's stats say
   so; round robin alternates the two keys), then B's `keygate_shared_key_events_total{direction=
   "applied"}` is polled (first right after A's answer) until it grows: the time from A's answer
   to the poll that saw it, an upper bound (each poll takes a fraction of a millisecond). A cools
   the key and publishes before it retries on the other key and answers, so B may have applied the
   change before A's answer arrives. B's own `keygate_shared_key_event_delay_seconds` (from the
   change's time at A to its application at B, in whole milliseconds) is reported beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing load.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402  (bench/load.py: the load benchmark's helpers)
    KEYS,
    ROOT,
    Processes,
    chat_body,
    check_config,
    ensure_tools,
    fill,
    fixed_rate,
    free_ports,
    keys_seen,
    log,
    ok_keys,
    pct,
    start_mock,
    table,
    tail,
    wait_ready_plain,
    wrk_result,
)
from scale import write_section  # noqa: E402

BENCH = ROOT / "bench"
RELEASE = ROOT / "target" / "release"
HEADING = "Shared state (Redis)"
# The bench client's gateway token (fake: the gateway stores only its digest).
CLIENT_TOKEN = "kg-bench-client-0123456789abcdef"
CLIENT_ENV = "BENCH_CLIENT_TOKEN"
AUTH = f"Bearer {CLIENT_TOKEN}"
CLIENTS = f"""clients:
  - name: bench
    token_env: {CLIENT_ENV}
    limits: {{ rpm: 100000000 }}
"""
REDIS = 'redis: {{ url: "redis://127.0.0.1:{port}/0", timeout: 50ms, instances: {instances}, prefix: "{prefix}" }}\n'
METRICS = "metrics: {{ addr: 127.0.0.1:{port} }}\n"
# The propagation test's keys on its own mock: one answers every request with 429.
PROP_KEYS = {"ok": "sk-bench-prop-ok-0123456789abcdef", "cool": "sk-bench-prop-cool-0123456789abcdef"}
PROP_UPSTREAM = """  mock:
    url: http://127.0.0.1:{mock}
    auth: bearer
    key_policy: round_robin
    keys:
      - {{ name: ok, env: BENCH_PROP_OK }}
      - {{ name: cool, env: BENCH_PROP_COOL }}
"""
RATE = 200  # req/s of the open-loop latency test, as in bench/load.py
GOAL_COST = 0.10  # issue 12: throughput cost at most 10 %
GOAL_P50_MS = 0.1  # issue 12: added p50 at most 0.1 ms
GOAL_PROP_P99_MS = 100.0  # issue 12: a cooldown reaches every instance within 100 ms
LABELS = {"local": "keygate, no redis:", "shared": "keygate with redis:"}


def wrk(port: int, body_file: Path, seconds: float) -> dict:
    cmd = ["wrk", "-t", "1", "-c", "64", "-d", f"{seconds:g}s", "--timeout", "10s",
           "-s", str(BENCH / "wrk-post.lua"), f"http://127.0.0.1:{port}/v1/chat/completions",
           "--", str(body_file), AUTH]
    return wrk_result(subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def keygate_config(tmp: Path, name: str, port: int, mock: int, metrics: int,
                   redis: dict | None, upstream: str | None = None) -> Path:
    """bench/keygate.yaml with the bench client, a metrics port and, given `redis`, a `redis:`
    section; `upstream` replaces the mock upstream (the propagation test's two keys)."""
    d = tmp / name
    d.mkdir(mode=0o700)  # keygate's upgrade socket is created mode 0666
    conf = fill(BENCH / "keygate.yaml", {"KEYGATE_DIR": d, "KEYGATE_PORT": port, "MOCK_PORT": mock},
                d / "keygate.yaml")
    text = conf.read_text()
    if upstream is not None:
        start = text.index("  mock:\n")
        end = text.index("\nroutes:")
        text = text[:start] + upstream + text[end:]
    text += "\n" + CLIENTS + METRICS.format(port=metrics)
    if redis:
        text += REDIS.format(**redis)
    conf.write_text(text)
    return conf


def metric_values(text: str) -> dict[str, float]:
    """The samples of keygate's shared key event and Redis families in a /metrics page:
    name{labels} -> value."""
    out = {}
    for line in text.splitlines():
        if line.startswith(("keygate_shared_key_event", "keygate_redis_up", "keygate_redis_errors_total")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


APPLIED = 'keygate_shared_key_events_total{direction="applied"}'
DELAY_SUM = "keygate_shared_key_event_delay_seconds_sum"
DELAY_COUNT = "keygate_shared_key_event_delay_seconds_count"


class MetricsPoller:
    """One keep-alive connection to a keygate's metrics port, for polling it quickly."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def read(self) -> dict[str, float]:
        for attempt in (1, 2):
            try:
                self.conn.request("GET", "/metrics")
                r = self.conn.getresponse()
                return metric_values(r.read().decode())
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                if attempt == 2:
                    raise
        return {}

    def close(self) -> None:
        self.conn.close()


def post(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json", "Authorization": AUTH})
    r = conn.getresponse()
    r.read()
    return r.status


def mock_hits(port: int, secret: str) -> int:
    """How many requests the mock saw with `secret`."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", "/_mock/stats")
        return keys_seen(json.loads(c.getresponse().read())).get(secret, 0)
    finally:
        c.close()


def propagation(a_port: int, b_metrics: int, mock_port: int, trials: int, timeout: float = 2.0) -> dict:
    """Per trial, the seconds from A's answer that reached the 429 key to the first poll of B that
    saw its applied count grow (None when it did not within `timeout`), and the requests each
    trial needed; then B's applied count and event delay histogram (sum, count) at the end."""
    poll = MetricsPoller(b_metrics)
    a = http.client.HTTPConnection("127.0.0.1", a_port, timeout=10)
    delays: list[float | None] = []
    sent: list[int] = []
    statuses: dict[int, int] = {}
    try:
        for i in range(trials):
            body = chat_body(100, model=f"bench-prop-{i}")
            before = poll.read().get(APPLIED, 0.0)
            hits = mock_hits(mock_port, PROP_KEYS["cool"])
            for n in range(1, 5):
                status = post(a, body)
                t0 = time.perf_counter()
                statuses[status] = statuses.get(status, 0) + 1
                # B first, so that its first reading is as close to A's answer as it can be.
                seen = poll.read().get(APPLIED, 0.0) > before
                t_seen = time.perf_counter()
                if mock_hits(mock_port, PROP_KEYS["cool"]) > hits:
                    break
            else:
                raise SystemExit(f"propagation trial {i}: 4 requests to A and none reached the 429 key")
            sent.append(n)
            while not seen and time.perf_counter() - t0 < timeout:
                seen = poll.read().get(APPLIED, 0.0) > before
                t_seen = time.perf_counter()
            delays.append(t_seen - t0 if seen else None)
        final = poll.read()
    finally:
        poll.close()
        a.close()
    return {"delays": delays, "sent": sent, "statuses": statuses, "applied": final.get(APPLIED, 0.0),
            "delay_sum": final.get(DELAY_SUM, 0.0), "delay_count": final.get(DELAY_COUNT, 0.0)}


# --------------------------------------------------------------------------------------------
# Report


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def render(r: dict) -> str:
    """The "Shared state (Redis)" section from the measurements in `r` (see main for its fields)."""
    ms = lambda v: f"{v * 1000:.3f}"  # noqa: E731
    med = {t: statistics.median(x["rps"] for x in r["wrk"][t]) for t in LABELS}
    wrk_p = {t: {p: statistics.median(x[f"p{p}_us"] for x in r["wrk"][t]) / 1e6 for p in (50, 99)} for t in LABELS}
    errors = {t: sum(x["errors"] for x in r["wrk"][t]) + r["lat_err"][t] for t in LABELS}
    lat = {t: {p: pct(r["lat"][t], p) for p in (50, 99)} for t in LABELS}
    cost = 1 - med["shared"] / med["local"]
    added = {p: lat["shared"][p] - lat["local"][p] for p in (50, 99)}
    wrk_added = {p: wrk_p["shared"][p] - wrk_p["local"][p] for p in (50, 99)}
    rows = [[LABELS[t], f"{med[t]:,.0f}", ms(wrk_p[t][50]), ms(wrk_p[t][99]), ms(lat[t][50]), ms(lat[t][99]),
             str(errors[t])] for t in LABELS]
    rows.append(["difference", f"{-cost:+.1%}", f"{wrk_added[50] * 1000:+.3f}", f"{wrk_added[99] * 1000:+.3f}",
                 f"{added[50] * 1000:+.3f}", f"{added[99] * 1000:+.3f}", ""])
    reqs = {t: sum(x["requests"] for x in r["wrk"][t]) for t in LABELS}
    us = lambda secs, n: f"{secs / n * 1e6:.1f}" if n else "n/a"  # noqa: E731
    sc = r["script"]
    health = (f"After the runs the keygate with `redis:` showed `keygate_redis_up {r['redis_up']:g}` and "
              f"{r['redis_errors']:g} Redis errors or timeouts; Redis ran the lease script {sc['calls']:,} times "
              f"for the {reqs['shared']:,} requests of the wrk runs and the rest.")
    t_cpu = table(["CPU per request during the wrk runs, µs", "keygate", "redis-server", "together"], [
        ["without redis:", us(r["cpu"]["local"], reqs["local"]), "", us(r["cpu"]["local"], reqs["local"])],
        ["with redis:", us(r["cpu"]["shared"], reqs["shared"]), us(r["cpu"]["redis"], reqs["shared"]),
         us(r["cpu"]["shared"] + r["cpu"]["redis"], reqs["shared"])],
        ["per call of the lease script in Redis (INFO commandstats: evalsha)", "",
         f"{sc['usec'] / sc['calls']:.1f}" if sc["calls"] else "n/a", ""],
    ])
    t1 = table(["200 B chat POST, client with rpm limit", "req/s (wrk)", "wrk p50, ms", "wrk p99, ms",
                f"p50 at {r['rate']:g}/s, ms", f"p99 at {r['rate']:g}/s, ms", "errors"], rows)

    p = r["prop"]
    got = [d for d in p["delays"] if d is not None]
    missed = len(p["delays"]) - len(got)
    mean_delay = p["delay_sum"] / p["delay_count"] if p["delay_count"] else float("nan")
    prop_p99 = pct(got, 99) * 1000 if got else float("nan")
    prop_rows = [
        ["trials (one model each)", str(len(p["delays"]))],
        ["seen by B within 2 s", f"{len(got)}" + (f" ({missed} missed)" if missed else "")],
        ["A's answer to B's metric, p50, ms", ms(pct(got, 50)) if got else "n/a"],
        ["A's answer to B's metric, p99, ms", ms(pct(got, 99)) if got else "n/a"],
        ["A's answer to B's metric, max, ms", ms(max(got)) if got else "n/a"],
        ["B's keygate_shared_key_event_delay_seconds mean, ms",
         "n/a" if mean_delay != mean_delay else f"{mean_delay * 1000:.3f} (count {p['delay_count']:.0f})"],
        ["requests to A per trial (round robin)", f"{statistics.mean(p['sent']):.2f} mean" if p["sent"] else "n/a"],
    ]
    t2 = table(["cooldown on A (429, retry_after=120) reaching B", "value"], prop_rows)

    goals = table(["goal (issue 12)", "goal", "measured", ""], [
        ["throughput cost of redis:", f"≤ {GOAL_COST:.0%}", f"{cost:.1%}", verdict(cost <= GOAL_COST)],
        [f"added p50 at {r['rate']:g} req/s, ms", f"≤ {GOAL_P50_MS}", f"{added[50] * 1000:.3f}",
         verdict(added[50] * 1000 <= GOAL_P50_MS)],
        ["cooldown propagation p99, ms", f"≤ {GOAL_PROP_P99_MS:.0f}",
         "n/a" if prop_p99 != prop_p99 else f"{prop_p99:.3f}",
         verdict(not missed and prop_p99 <= GOAL_PROP_P99_MS)],
    ])
    met = [cost <= GOAL_COST, added[50] * 1000 <= GOAL_P50_MS, not missed and prop_p99 <= GOAL_PROP_P99_MS]
    missed_names = [n for n, ok in zip(("the throughput cost", "the added p50", "the propagation p99"), met)
                    if not ok]
    summary = ("**All three goals are met in this run.**" if all(met) else
               f"**Not met in this run: {', '.join(missed_names)}.**")
    problems = []
    for t in LABELS:
        if errors[t]:
            problems.append(f"{LABELS[t]}: {errors[t]} errors (socket or non-2xx)")
    other = {s: n for s, n in p["statuses"].items() if s != 200}
    if other:
        problems.append(f"propagation: A answered {other} (status: count) besides 200")
    if r["redis_up"] != 1 or r["redis_errors"]:
        problems.append(f"{LABELS['shared']}: keygate_redis_up {r['redis_up']:g} and {r['redis_errors']:g} "
                        "Redis errors or timeouts after the runs (requests then admitted locally)")
    if missed:
        problems.append(f"propagation: {missed} trial(s) not seen by B within 2 s")
    notes = ("\n\nProblems seen:\n" + "\n".join("- " + x for x in problems)) if problems else ""
    return f"""## {HEADING}

Generated by `python3 bench/shared.py{(' ' + ' '.join(r['args'])) if r['args'] else ''}` on {r['when']}, keygate
{r['commit']}, {r['redis_version']}, {r['nproc']} CPUs shared by everything (load average {r['loadavg']} at start).
Both keygates run bench/keygate.yaml (one worker thread) plus one client with `limits: {{ rpm: 100000000 }}`:
nothing is refused, but every request is admitted by the limits; "with redis:" adds
`redis: {{ url: redis://127.0.0.1:PORT/0, timeout: 50ms, instances: 2 }}` on a `redis-server` started
by the script on loopback (`--save "" --appendonly no`). The client has no concurrency limit, so it
is admitted from leases: one Redis round trip (the lease script) buys a 1/80 share of its limits
(1/40 divided by the 2 instances), spent locally for up to 1 s. {r['rounds']} round(s), the two in alternating order: per round
{r['seconds']:g} s of wrk (64 connections, one thread; req/s are medians over the rounds, wrk's
percentiles at saturation medians of the rounds' figures) and {r['seconds']:g} s of bench/load.py's open-loop
client at {r['rate']:g} req/s (percentiles over all rounds' samples; the latency goal is judged on
these, as load.py judges its own).

{goals}

{summary}

{t1}

Where the time goes: the CPU time (/proc) each keygate, and Redis during the shared keygate's runs,
used during the wrk runs, divided by the requests those runs completed; and the time Redis itself
reports per call of the lease script (over every call: warm-up, wrk and fixed-rate runs). On
{r['nproc']} CPUs shared by wrk, the mock, keygate and Redis, CPU that Redis uses is CPU the others lack.

{t_cpu}

{health}

Cooldown propagation: two more keygates, A and B, on the same Redis and on a second mock with two
keys, one answering `429` with `retry_after=120`. Per trial a request with a model of its own (a
cooldown is per key and model) goes to A until the mock's stats show it reached the 429 key (A
cools the key for that model, publishes it and answers from the other key); B's
`keygate_shared_key_events_total{{direction="applied"}}` is then polled over one keep-alive connection,
first right after A's answer: the time is from A's answer to the poll that saw the count grow (an
upper bound; a poll takes a fraction of a millisecond, and B may apply the change before A has
answered). B's own histogram measures from the change's time at A to its application at B, in whole
milliseconds of the wall clock.

{t2}{notes}
"""


# --------------------------------------------------------------------------------------------
# The run


def start_redis(procs: Processes, tmp: Path, port: int):
    """redis-server on loopback, without persistence, ready when it answers PING."""
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(tmp), "--daemonize", "no", "--loglevel", "warning"]
    p = procs.start("redis-server", cmd, tmp / "redis.log")
    wait_ready_plain("redis-server", port, p, tmp / "redis.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True)
        if r.stdout.strip() == "PONG":
            return p
        time.sleep(0.05)
    raise SystemExit(f"redis-server on {port} does not answer PING; its log:\n{tail(tmp / 'redis.log')}")


def start_keygate(procs: Processes, tmp: Path, name: str, conf: Path, port: int, metrics: int, env: dict):
    """keygate with `conf`, ready when its proxy and metrics ports listen (a chat request would
    touch the propagation test's 429 key)."""
    check_config(RELEASE / "keygate", conf, env, name)
    kg = procs.start(f"keygate {name}", [str(RELEASE / "keygate"), "-c", str(conf)], tmp / f"{name}.log",
                     env=env, stop_signal=signal.SIGINT)
    for p in (port, metrics):
        wait_ready_plain(f"keygate {name}", p, kg, tmp / f"{name}.log", timeout=20)
    return kg


def wait_admitted(name: str, port: int, proc, log_path: Path, timeout: float = 20.0) -> None:
    """Waits for a 200 to the bench client (with `redis:`, the limits script is loaded by then)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}; its log:\n{tail(log_path)}")
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            status = post(c, chat_body(100))
            if status == 200:
                return
            last = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as e:
            last = str(e)
        finally:
            c.close()
        time.sleep(0.1)
    raise SystemExit(f"{name} does not admit the bench client ({last}); its log:\n{tail(log_path)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10, help="wrk run and fixed-rate run per target and round")
    ap.add_argument("--trials", type=int, default=200, help="cooldown propagation trials")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="file whose section is written")
    ap.add_argument("--no-build", action="store_true", help="use the binaries already in target/release")
    args = ap.parse_args()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # Installed explicitly: a shell that starts this in the background may have SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if not args.no_build:
        log("cargo build --release --workspace --bins")
        subprocess.run(["cargo", "build", "--release", "--workspace", "--bins"], cwd=ROOT, check=True)
    ensure_tools({"wrk": ["wrk"], "redis-server": ["redis-server"], "redis-cli": ["redis-tools", "redis-server"]})
    for b in ("keygate", "keygate-mock"):
        if not (RELEASE / b).exists():
            raise SystemExit(f"target/release/{b} is missing: run without --no-build")

    tmp = Path(tempfile.mkdtemp(prefix="keygate-shared-"))
    tmp.chmod(0o700)
    names = ["mock", "redis", "local", "shared", "m_local", "m_shared", "mock2", "a", "b", "m_a", "m_b"]
    port = dict(zip(names, free_ports(len(names))))
    env = dict(os.environ, **KEYS, RUST_LOG="warn", **{CLIENT_ENV: CLIENT_TOKEN},
               BENCH_PROP_OK=PROP_KEYS["ok"], BENCH_PROP_COOL=PROP_KEYS["cool"])
    body = tmp / "chat.json"
    body.write_bytes(chat_body(200))
    small = chat_body(200)
    procs = Processes()
    started = time.monotonic()
    loadavg = Path("/proc/loadavg").read_text().split()[0]
    try:
        start_mock(procs, tmp, port["mock"], ok_keys(KEYS))
        redis_proc = start_redis(procs, tmp, port["redis"])
        redis_version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                       text=True).stdout.split(" sha=")[0].strip()
        redis = {"port": port["redis"], "instances": 2, "prefix": "keygate-bench:"}
        pid = {"redis": redis_proc.pid}
        for t in LABELS:
            conf = keygate_config(tmp, t, port[t], port["mock"], port[f"m_{t}"], redis if t == "shared" else None)
            kg = start_keygate(procs, tmp, t, conf, port[t], port[f"m_{t}"], env)
            wait_admitted(LABELS[t], port[t], kg, tmp / f"{t}.log")
            pid[t] = kg.pid

        for t in LABELS:  # warm-up, and a check that the client gets through
            res = wrk(port[t], body, 2)
            if res["errors"] or not res["requests"]:
                raise SystemExit(f"{LABELS[t]}: {res['errors']} errors in the warm-up; see {tmp}")
        runs: dict[str, list[dict]] = {t: [] for t in LABELS}
        lat: dict[str, list[float]] = {t: [] for t in LABELS}
        lat_err = {t: 0 for t in LABELS}
        # CPU seconds used during the wrk runs: each keygate's own, and Redis's during the shared one's.
        cpu = {"local": 0.0, "shared": 0.0, "redis": 0.0}
        order = list(LABELS)
        for rnd in range(args.rounds):
            for t in order if rnd % 2 == 0 else order[::-1]:
                kg0, rd0 = cpu_seconds(pid[t]), cpu_seconds(pid["redis"])
                res = wrk(port[t], body, args.seconds)
                cpu[t] += cpu_seconds(pid[t]) - kg0
                if t == "shared":
                    cpu["redis"] += cpu_seconds(pid["redis"]) - rd0
                runs[t].append(res)
                log(f"round {rnd + 1}/{args.rounds} {LABELS[t]:20} {res['rps']:9.0f} req/s  "
                    f"p50 {res['p50_us'] / 1000:.2f} ms  p99 {res['p99_us'] / 1000:.2f} ms  errors {res['errors']}")
            for t in order if rnd % 2 == 0 else order[::-1]:
                f = asyncio.run(fixed_rate(port[t], AUTH, small, RATE, args.seconds))
                lat[t] += f["latencies"]
                lat_err[t] += f["errors"]
                log(f"round {rnd + 1}/{args.rounds} fixed {RATE}/s {LABELS[t]:20} "
                    f"p50 {pct(f['latencies'], 50) * 1000:.3f} ms  p99 {pct(f['latencies'], 99) * 1000:.3f} ms  "
                    f"errors {f['errors']}")

        shared_metrics = MetricsPoller(port["m_shared"])
        redis_health = shared_metrics.read()
        shared_metrics.close()
        stats = subprocess.run(["redis-cli", "-p", str(port["redis"]), "info", "commandstats"],
                               capture_output=True, text=True).stdout
        evalsha = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+)", stats)
        script = {"calls": int(evalsha[1]), "usec": int(evalsha[2])} if evalsha else {"calls": 0, "usec": 0}

        # Cooldown propagation: a mock with a 429 key, two keygates on one Redis.
        m2 = procs.start("keygate-mock (429 key)",
                         [str(RELEASE / "keygate-mock"), "--listen", f"127.0.0.1:{port['mock2']}", "--threads", "1",
                          "--strict", "--name", "prop", "--key", f"{PROP_KEYS['ok']}=ok",
                          "--key", f"{PROP_KEYS['cool']}=429:retry_after=120"], tmp / "mock2.log")
        wait_ready_plain("keygate-mock (429 key)", port["mock2"], m2, tmp / "mock2.log")
        prop_redis = dict(redis, prefix="keygate-prop:")
        upstream = PROP_UPSTREAM.format(mock=port["mock2"])
        for t in ("a", "b"):
            conf = keygate_config(tmp, t, port[t], port["mock2"], port[f"m_{t}"], prop_redis, upstream)
            start_keygate(procs, tmp, t, conf, port[t], port[f"m_{t}"], env)
        time.sleep(0.5)  # both subscribed before the first trial
        log(f"cooldown propagation: {args.trials} trials")
        prop = propagation(port["a"], port["m_b"], port["mock2"], args.trials)
        got = [d for d in prop["delays"] if d is not None]
        log(f"propagation: seen {len(got)}/{args.trials}, p50 {pct(got, 50) * 1000:.3f} ms, "
            f"p99 {pct(got, 99) * 1000:.3f} ms, max {max(got, default=float('nan')) * 1000:.3f} ms")
    except BaseException:
        procs.stop_all()
        log(f"logs kept in {tmp}")
        raise
    procs.stop_all()
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"measured in {time.monotonic() - started:.0f} s")

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    section = render({
        "args": sys.argv[1:], "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit, "redis_version": redis_version, "nproc": os.cpu_count(), "loadavg": loadavg,
        "rounds": args.rounds, "seconds": args.seconds, "rate": RATE,
        "wrk": runs, "lat": lat, "lat_err": lat_err, "prop": prop, "cpu": cpu, "script": script,
        "redis_up": redis_health.get("keygate_redis_up", 0.0),
        "redis_errors": sum(v for k, v in redis_health.items() if k.startswith("keygate_redis_errors_total")),
    })
    print(section)
    write_section(Path(args.out), section, heading=HEADING)
    log(f"wrote the {HEADING} section of {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
