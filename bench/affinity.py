#!/usr/bin/env python3
"""Prompt-cache affinity: do repeats of a prompt land on one key, and is the load still spread?

    python3 bench/affinity.py                  # writes a "Prompt-cache affinity" section to BENCHMARKS.md
    python3 bench/affinity.py --prompts 200 --repeats 3 --out /tmp/x.md

One keygate (bench/keygate.yaml, one worker thread) with four keys on `keygate-mock` and
`affinity: prompt` on the upstream, an access log (the key of every request) and the admin API.
The client sends 1 000 distinct prompts (a system prompt over 1 KiB that differs in its first
line, then a question that changes on every request, so only the prompt-prefix hash can pin
them) in rounds, each round every prompt once in a shuffled order, one request at a time so
that the access log's lines follow the requests:

1. all keys ready, `--repeats` rounds: a prompt's home is the key of its first request; the
   share of its later requests (the repeats) that reach that key must be at least 95 %, and the
   busiest key may carry at most 1.3 times the average;
2. key `b` disabled through the admin API, one round: the prompts whose home is another key
   must all stay home, and `b`'s prompts must all move (to the next key in their rendezvous
   order, spread over the other three);
3. `b` enabled again, one round: every prompt must be back home;
4. accounts: a second upstream on the same mock and keys, with `a` and `b` in account `acme` and
   `c` and `d` in account `beta` (models `acct-*` are routed to it). One round finds the homes,
   then `a` is disabled for one round: its prompts must all stay in `acme` (move to `b`, which
   shares the provider's prompt cache with `a`), and every other prompt must stay home.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing load.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402  (bench/load.py: the load benchmark's helpers)
    KEYS,
    ROOT,
    Processes,
    check_config,
    fill,
    free_ports,
    log,
    ok_keys,
    start_mock,
    table,
    wait_ready,
)
from scale import write_section  # noqa: E402

BENCH = ROOT / "bench"
RELEASE = ROOT / "target" / "release"
HEADING = "Prompt-cache affinity"
ADMIN_TOKEN = "bench-admin-token-0123456789"
# A fourth key beside bench/load.py's three.
KEY_D = ("BENCH_KEY_D", "sk-bench-delta-0123456789abcdef")
LEAVING = "b"
# The accounts scenario: the same four keys on a second upstream, two accounts of two keys.
ACCOUNTS_MODEL = "acct-bench"
ACCOUNTS_UPSTREAM = """  acct:
    url: http://127.0.0.1:{mock}
    affinity: prompt
    keys:
      - {{ name: a, env: BENCH_KEY_A, account: acme }}
      - {{ name: b, env: BENCH_KEY_B, account: acme }}
      - {{ name: c, env: BENCH_KEY_C, account: beta }}
      - {{ name: d, env: BENCH_KEY_D, account: beta }}
"""
ACCOUNTS_ROUTE = '  - { name: accounts, models: ["acct-*"], upstreams: [acct] }\n'
# What the issue asks: repeats on the home key while it is ready, and the busiest key's load.
MIN_STICKY = 0.95
MAX_BUSIEST = 1.3


def prompt_body(i: int, question: str, model: str = "gpt-4o-mini") -> bytes:
    """Prompt `i`: a 1.5 KiB system prompt whose first line names it, then `question`."""
    system = f"You are support agent #{i} of the bench. " + "Answer from the handbook, briefly. " * 45
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    }
    return json.dumps(body, separators=(",", ":")).encode()


def analyse(rounds: list[list[tuple[int, str]]], keys: list[str]) -> dict:
    """Phase 1's figures from its rounds of (prompt, key): homes, stickiness and spread."""
    home: dict[int, str] = {}
    repeats = on_home = 0
    load: Counter = Counter()
    for rnd in rounds:
        for prompt, key in rnd:
            load[key] += 1
            if prompt not in home:
                home[prompt] = key
            else:
                repeats += 1
                on_home += key == home[prompt]
    total = sum(load.values())
    average = total / len(keys)
    return {
        "home": home,
        "repeats": repeats,
        "sticky": on_home / repeats if repeats else 1.0,
        "load": {k: load.get(k, 0) for k in keys},
        "busiest": max(load.values(), default=0) / average if average else 0.0,
        "prompts_per_key": {k: sum(1 for h in home.values() if h == k) for k in keys},
    }


def moves(home: dict[int, str], rnd: list[tuple[int, str]], leaving: str | None) -> dict:
    """How a round's keys compare with the homes: stayed, moved (and where), for prompts homed on
    `leaving` (gone during the round) and on the other keys."""
    out = {"others": 0, "others_home": 0, "leaving": 0, "leaving_moved": 0, "to": Counter()}
    for prompt, key in rnd:
        if home[prompt] == leaving:
            out["leaving"] += 1
            out["leaving_moved"] += key != leaving
            out["to"][key] += 1
        else:
            out["others"] += 1
            out["others_home"] += key == home[prompt]
    return out


def within_account(home: dict[int, str], rnd: list[tuple[int, str]], leaving: str, partner: str) -> dict:
    """With `leaving` gone: how many of its prompts went to `partner` (same account), and how many
    other prompts stayed home."""
    m = moves(home, rnd, leaving)
    return {"leaving_count": m["leaving"], "to_partner": m["to"].get(partner, 0),
            "others": m["others"], "others_home": m["others_home"]}


def verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def render(r: dict) -> str:
    """The section's tables from the measured results."""
    a = r["steady"]
    keys = list(a["load"])
    avg = sum(a["load"].values()) / len(keys)
    load_rows = [[k, str(a["prompts_per_key"][k]), f"{a['load'][k]:,}", f"{a['load'][k] / avg:.2f}"] for k in keys]
    spread = table(["key", "prompts homed", "requests", "of the average"], load_rows)
    gone, back, acc = r["gone"], r["back"], r["accounts"]
    moved_to = ", ".join(f"{k} {gone['to'][k]}" for k in keys if gone["to"].get(k)) or "none"
    rows = [
        ["repeats on the prompt's home key, all keys ready",
         f"{a['sticky']:.2%} of {a['repeats']:,}", f"≥ {MIN_STICKY:.0%}", verdict(a["sticky"] >= MIN_STICKY)],
        ["busiest key's requests / average", f"{a['busiest']:.3f}", f"≤ {MAX_BUSIEST}",
         verdict(a["busiest"] <= MAX_BUSIEST)],
        [f"key {r['leaving']} disabled: other keys' prompts still home",
         f"{gone['others_home']:,} of {gone['others']:,}", "all", verdict(gone["others_home"] == gone["others"])],
        [f"key {r['leaving']} disabled: its prompts moved",
         f"{gone['leaving_moved']:,} of {gone['leaving']:,} (to {moved_to})", "all",
         verdict(gone["leaving_moved"] == gone["leaving"])],
        [f"key {r['leaving']} enabled again: prompts back home",
         f"{back['others_home'] + back['leaving'] - back['leaving_moved']:,} of {back['others'] + back['leaving']:,}",
         "all", verdict(back["others_home"] == back["others"] and back["leaving_moved"] == 0)],
        [f"accounts: key {acc['leaving']} disabled: its prompts moved to {acc['partner']} (same account)",
         f"{acc['to_partner']:,} of {acc['leaving_count']:,}", "all", verdict(acc["to_partner"] == acc["leaving_count"])],
        [f"accounts: key {acc['leaving']} disabled: other prompts still home",
         f"{acc['others_home']:,} of {acc['others']:,}", "all", verdict(acc["others_home"] == acc["others"])],
        ["client-side time per request (sequential, keep-alive)", f"{r['ms_per_request']:.3f} ms", "", ""],
    ]
    return table(["measure", "measured", "wanted", ""], rows) + "\n\n" + spread


def passed(r: dict) -> bool:
    a, gone, back, acc = r["steady"], r["gone"], r["back"], r["accounts"]
    return (acc["to_partner"] == acc["leaving_count"] and acc["others_home"] == acc["others"]
            and a["sticky"] >= MIN_STICKY and a["busiest"] <= MAX_BUSIEST
            and gone["others_home"] == gone["others"] and gone["leaving_moved"] == gone["leaving"]
            and back["others_home"] == back["others"] and back["leaving_moved"] == 0)


class Client:
    """One keep-alive connection to keygate."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def chat(self, body: bytes) -> None:
        self.conn.request("POST", "/v1/chat/completions", body=body,
                          headers={"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status}: {data[:300]!r}")


def admin(port: int, path: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, body=b"", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        raise SystemExit(f"admin {path}: HTTP {r.status}")


class AccessLog:
    """The key of each request, read from keygate's access log in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen = 0

    def next_keys(self, n: int, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            if len(lines) >= self.seen + n:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"access log has {len(lines)} lines, wanted {self.seen + n}")
            time.sleep(0.05)
        keys = [json.loads(line)["key"] for line in lines[self.seen:self.seen + n]]
        self.seen += n
        return keys


def run_round(client: Client, logf: AccessLog, prompts: int, rng: random.Random, tag: str,
              model: str = "gpt-4o-mini") -> tuple[list[tuple[int, str]], float]:
    order = list(range(prompts))
    rng.shuffle(order)
    start = time.monotonic()
    for i in order:
        client.chat(prompt_body(i, f"question {tag} for prompt {i}: {rng.random()}", model))
    elapsed = time.monotonic() - start
    return list(zip(order, logf.next_keys(len(order)))), elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5, help="rounds with every key ready")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="file whose section is written")
    args = ap.parse_args()
    for b in ("keygate", "keygate-mock"):
        if not (RELEASE / b).exists():
            raise SystemExit(f"target/release/{b} is missing: cargo build --release --workspace --bins")
    tmp = Path(tempfile.mkdtemp(prefix="keygate-affinity-"))
    tmp.chmod(0o700)  # keygate's upgrade socket is created mode 0666
    port = dict(zip(["mock", "keygate", "admin"], free_ports(3)))
    keys = {**KEYS, KEY_D[0]: KEY_D[1]}
    env = dict(os.environ, **keys, BENCH_ADMIN=ADMIN_TOKEN, RUST_LOG="warn")
    rng = random.Random(args.seed)
    procs = Processes()
    try:
        start_mock(procs, tmp, port["mock"], ok_keys(keys))
        conf = fill(BENCH / "keygate.yaml",
                    {"KEYGATE_DIR": tmp, "KEYGATE_PORT": port["keygate"], "MOCK_PORT": port["mock"]},
                    tmp / "keygate.yaml")
        text = conf.read_text()
        text = text.replace("    key_policy: round_robin\n", "    key_policy: round_robin\n    affinity: prompt\n", 1)
        text = text.replace("      - { name: c, env: BENCH_KEY_C }\n",
                            "      - { name: c, env: BENCH_KEY_C }\n      - { name: d, env: BENCH_KEY_D }\n", 1)
        text = text.replace("upstreams:\n", "upstreams:\n" + ACCOUNTS_UPSTREAM.format(mock=port["mock"]), 1)
        text = text.replace("routes:\n", "routes:\n" + ACCOUNTS_ROUTE, 1)
        access = tmp / "access.log"
        text += (f"\naccess_log: {{ path: {access} }}\n"
                 f"admin: {{ addr: \"127.0.0.1:{port['admin']}\", token_env: BENCH_ADMIN }}\n")
        if "affinity: prompt" not in text or "BENCH_KEY_D" not in text:
            raise SystemExit("bench/keygate.yaml changed: this script's edits no longer apply")
        conf.write_text(text)
        check_config(RELEASE / "keygate", conf, env, "keygate")
        kg = procs.start("keygate", [str(RELEASE / "keygate"), "-c", str(conf)], tmp / "keygate.log", env=env,
                         stop_signal=signal.SIGINT)
        wait_ready("keygate", port["keygate"], kg, tmp / "keygate.log")
        logf = AccessLog(access)
        logf.next_keys(len(logf.path.read_text().splitlines()) if access.exists() else 0)  # wait_ready's requests
        client = Client(port["keygate"])

        steady, seconds = [], 0.0
        for rnd in range(args.repeats):
            got, took = run_round(client, logf, args.prompts, rng, f"r{rnd}")
            steady.append(got)
            seconds += took
            log(f"round {rnd + 1}/{args.repeats}: {args.prompts} prompts in {took:.1f} s")
        a = analyse(steady, ["a", "b", "c", "d"])
        admin(port["admin"], f"/admin/v1/keys/mock/{LEAVING}/disable")
        gone_round, _ = run_round(client, logf, args.prompts, rng, "gone")
        admin(port["admin"], f"/admin/v1/keys/mock/{LEAVING}/enable")
        back_round, _ = run_round(client, logf, args.prompts, rng, "back")
        acct_home = dict(run_round(client, logf, args.prompts, rng, "acct", ACCOUNTS_MODEL)[0])
        admin(port["admin"], "/admin/v1/keys/acct/a/disable")
        acct_gone, _ = run_round(client, logf, args.prompts, rng, "acct-gone", ACCOUNTS_MODEL)
    finally:
        procs.stop_all()
    results = {
        "steady": a,
        "gone": moves(a["home"], gone_round, LEAVING),
        "back": moves(a["home"], back_round, LEAVING),
        "leaving": LEAVING,
        "accounts": {**within_account(acct_home, acct_gone, "a", "b"), "leaving": "a", "partner": "b"},
        "ms_per_request": seconds * 1000 / (args.repeats * args.prompts),
    }
    t = render(results)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    section = f"""## {HEADING}

Generated by `python3 bench/affinity.py` on {when}, keygate {commit}: one keygate (one worker
thread) with four keys of equal weight on the mock and `affinity: prompt` on the upstream.
{args.prompts:,} distinct prompts (a 1.5 KiB system prompt that differs in its first line, then a
question that changes on every request, so only the prompt-prefix hash can pin them), sent one at
a time in {args.repeats} shuffled rounds with every key ready; then a round with key `{LEAVING}`
disabled through the admin API, and a round after it is enabled again. Then the accounts case: the
same keys on a second upstream, `a` and `b` in account `acme`, `c` and `d` in `beta`; one round
finds each prompt's home, then `a` is disabled for a round. A prompt's home is the key of its first
request; each request's key is read from the access log.

{t}
"""
    print(t)
    write_section(Path(args.out), section, heading=HEADING)
    log(f"wrote the {HEADING} section of {args.out}")
    return 0 if passed(results) else 1


if __name__ == "__main__":
    sys.exit(main())
