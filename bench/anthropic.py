#!/usr/bin/env python3
"""Anthropic routes: requests/s of a native route and of a translated one, beside the mock direct.

    python3 bench/anthropic.py                 # writes an "Anthropic routes" section to BENCHMARKS.md
    python3 bench/anthropic.py --seconds 3 --rounds 1 --out /tmp/x.md

One keygate (bench/keygate.yaml with an `api: anthropic` upstream on the same mock) serves:
- native: `POST /v1/messages` passed through (keys in `x-api-key`, Anthropic's status rules);
- translated: `POST /v1/chat/completions` on a `translate: openai` route, turned into a Messages
  request and its answer back into a chat completion;
- plain: the OpenAI chat POST of bench/load.py, for reference.
The mock answers the Messages requests directly too (with a key), the floor of both. Each is run
with wrk (64 connections, one thread), in rounds that rotate the order; figures are medians.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
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
    free_ports,
    log,
    ok_keys,
    start_mock,
    table,
    wait_ready,
    wrk_result,
)
from scale import write_section  # noqa: E402

BENCH = ROOT / "bench"
RELEASE = ROOT / "target" / "release"
CLAUDE = "claude-bench"
ANTHROPIC_UPSTREAM = """  claude:
    url: http://127.0.0.1:{mock}
    api: anthropic
    keys:
      - {{ name: ca, env: BENCH_KEY_A }}
      - {{ name: cb, env: BENCH_KEY_B }}
      - {{ name: cc, env: BENCH_KEY_C }}
"""
ANTHROPIC_ROUTES = f"""  - {{ name: messages, path_prefix: /v1/messages, upstreams: [claude] }}
  - {{ name: translated, models: [{CLAUDE}], upstreams: [claude], translate: openai }}
"""


def messages_body(size: int) -> bytes:
    """An Anthropic Messages request of about `size` bytes."""
    body = {"model": CLAUDE, "max_tokens": 64, "messages": [{"role": "user", "content": ""}]}
    base = len(json.dumps(body, separators=(",", ":")))
    filler = "Summarise the following notes in three bullet points. " * (size // 50 + 1)
    body["messages"][0]["content"] = filler[: max(2, size - base)]
    return json.dumps(body, separators=(",", ":")).encode()


def wrk(port: int, path: str, body_file: Path, seconds: float, headers: list[str]) -> dict:
    cmd = ["wrk", "-t", "1", "-c", "64", "-d", f"{seconds:g}s", "--timeout", "10s",
           "-s", str(BENCH / "wrk-post.lua"), f"http://127.0.0.1:{port}{path}",
           "--", str(body_file), "", *headers]
    return wrk_result(subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60))


LABELS = {
    "direct": "mock direct, POST /v1/messages",
    "native": "keygate native route, POST /v1/messages",
    "translated": "keygate translated route, POST /v1/chat/completions",
    "plain": "keygate OpenAI route, POST /v1/chat/completions",
}


def render_table(med: dict[str, float], errors: dict[str, int]) -> str:
    """The report's table: each case's median req/s, as a share of direct and of native."""
    rows = [[LABELS[k], f"{med[k]:,.0f}", f"{med[k] / med['direct']:.0%}", f"{med[k] / med['native']:.0%}",
             str(errors[k])] for k in LABELS]
    return table(["200 B request, 64 connections", "req/s", "of direct", "of native", "errors"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="file whose section is written")
    args = ap.parse_args()
    ensure_tools({"wrk": ["wrk"]})
    for b in ("keygate", "keygate-mock"):
        if not (RELEASE / b).exists():
            raise SystemExit(f"target/release/{b} is missing: cargo build --release --workspace --bins")

    tmp = Path(tempfile.mkdtemp(prefix="keygate-anthropic-"))
    tmp.chmod(0o700)  # keygate's upgrade socket is created mode 0666
    port = dict(zip(["mock", "keygate"], free_ports(2)))
    env = dict(os.environ, **KEYS, RUST_LOG="warn")
    files = {"messages": tmp / "messages.json", "chat": tmp / "chat.json", "translated": tmp / "translated.json"}
    files["messages"].write_bytes(messages_body(200))
    files["chat"].write_bytes(chat_body(200))
    files["translated"].write_bytes(chat_body(200, model=CLAUDE))
    procs = Processes()
    try:
        start_mock(procs, tmp, port["mock"], ok_keys(KEYS))
        conf = fill(BENCH / "keygate.yaml",
                    {"KEYGATE_DIR": tmp, "KEYGATE_PORT": port["keygate"], "MOCK_PORT": port["mock"]},
                    tmp / "keygate.yaml")
        text = conf.read_text()
        text = text.replace("upstreams:\n", "upstreams:\n" + ANTHROPIC_UPSTREAM.format(mock=port["mock"]), 1)
        text = text.replace("routes:\n", "routes:\n" + ANTHROPIC_ROUTES, 1)
        conf.write_text(text)
        check_config(RELEASE / "keygate", conf, env, "keygate")
        kg = procs.start("keygate", [str(RELEASE / "keygate"), "-c", str(conf)], tmp / "keygate.log", env=env,
                         stop_signal=signal.SIGINT)
        wait_ready("keygate", port["keygate"], kg, tmp / "keygate.log")

        key = KEYS["BENCH_KEY_A"]
        cases = {
            "direct": (port["mock"], "/v1/messages", "messages",
                       [f"x-api-key: {key}", "anthropic-version: 2023-06-01"]),
            "native": (port["keygate"], "/v1/messages", "messages", []),
            "translated": (port["keygate"], "/v1/chat/completions", "translated", []),
            "plain": (port["keygate"], "/v1/chat/completions", "chat", []),
        }
        for name, (p, path, body, headers) in cases.items():
            res = wrk(p, path, files[body], 2, headers)
            if res["errors"] or not res["requests"]:
                raise SystemExit(f"{name}: {res['errors']} errors in the warm-up; see {tmp}")
        rps: dict[str, list[float]] = {k: [] for k in cases}
        errors = {k: 0 for k in cases}
        order = list(cases)
        for rnd in range(args.rounds):
            for name in order[rnd % len(order):] + order[: rnd % len(order)]:
                p, path, body, headers = cases[name]
                res = wrk(p, path, files[body], args.seconds, headers)
                rps[name].append(res["rps"])
                errors[name] += res["errors"]
                log(f"round {rnd + 1}/{args.rounds} {name:10} {res['rps']:9.0f} req/s  errors {res['errors']}")
    finally:
        procs.stop_all()

    t = render_table({k: statistics.median(v) for k, v in rps.items()}, errors)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    section = f"""## Anthropic routes

Generated by `python3 bench/anthropic.py` on {when}, keygate {commit}: wrk, 64 connections, one
thread, {args.rounds} round(s) of {args.seconds:g} s in rotating order, medians. One keygate (one worker
thread) serves an `api: anthropic` upstream on the mock both natively and through `translate: openai`;
the translated route rewrites each request into a Messages request and each answer back into a chat
completion, so its cost over the native route is the translation's.

{t}
"""
    print(t)
    write_section(Path(args.out), section, heading="Anthropic routes")
    log(f"wrote the Anthropic routes section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
