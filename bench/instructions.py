#!/usr/bin/env python3
"""CPU instructions per proxied request, counted by callgrind: keygate beside the bare Pingora floor.

    python3 bench/instructions.py              # adds an "Instructions per request" section to BENCHMARKS.md
    python3 bench/instructions.py --requests 500 --out /tmp/x.md
    python3 bench/instructions.py --baseline HEAD~1   # also counts keygate as built at HEAD~1

Requests per second on a shared 2-core machine drift by 10-20 % from one run to the next, which
hides the effect of most single changes. The number of instructions a request costs does not
drift: valgrind's callgrind counts them exactly (user space only; the kernel's share, the same for
both, is left out). That makes this the figure to compare before and after a change to the
request path, and it shows how far keygate's own work is above what Pingora itself needs.

How: the mock (`--strict`, three keys) and, in turn, examples/bare_passthrough.rs and keygate
(bench/keygate.yaml, one worker thread) run under `valgrind --tool=callgrind --instr-atstart=no`;
after 500 warm-up requests (h2load, 8 keep-alive connections) counting is switched on, N small chat
POSTs are sent, counting is switched off and the profile dumped. Instructions per request = all
instructions counted / N. The callgrind files are kept with --keep-tmp for `callgrind_annotate`.

With `--baseline REV`, keygate as built at REV (bench/load.py's build_baseline: a release build in a
temporary git worktree, kept in target/bench-baseline/) is counted the same way with the current
bench/keygate.yaml, and the section gives both counts and their difference.

Needs: the release binaries (`make bench` builds them), valgrind and h2load (nghttp2-client), which
it installs with apt-get when they are missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing load.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402  (bench/load.py: the load benchmark's helpers)
    CHAT_PATH,
    KEYS,
    ROOT,
    Processes,
    build_baseline,
    chat_body,
    check_config,
    ensure_tools,
    fill,
    free_ports,
    log,
    table,
    wait_ready,
    wait_ready_plain,
)
from scale import write_section  # noqa: E402

RELEASE = ROOT / "target" / "release"
WARMUP = 500


def h2load(port: int, body_file: Path, n: int) -> None:
    cmd = ["h2load", "--h1", "-n", str(n), "-c", "8", "-d", str(body_file),
           "-H", "content-type: application/json", f"http://127.0.0.1:{port}{CHAT_PATH}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"status codes: (\d+) 2xx", out)
    if not m or int(m.group(1)) != n:
        raise SystemExit(f"not every request got a 2xx:\n{out}")


def count(name: str, cmd: list[str], port: int, tmp: Path, body_file: Path, n: int, env: dict) -> int:
    """Instructions per request of `cmd` (a proxy listening on `port`), counted over `n` requests."""
    out = tmp / f"callgrind.{name}"
    procs = Processes()
    try:
        p = procs.start(name, ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                               f"--callgrind-out-file={out}", *cmd],
                        tmp / f"{name}.log", env=env, stop_signal=signal.SIGKILL)
        wait_ready(name, port, p, tmp / f"{name}.log", timeout=120)
        h2load(port, body_file, WARMUP)
        subprocess.run(["callgrind_control", "-i", "on", str(p.pid)], check=True, capture_output=True)
        h2load(port, body_file, n)
        subprocess.run(["callgrind_control", "-i", "off", str(p.pid)], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True)
        time.sleep(1)
    finally:
        procs.stop_all()
    dumps = sorted(tmp.glob(f"callgrind.{name}*"), key=lambda f: f.stat().st_size, reverse=True)
    for f in dumps:
        totals = re.search(r"^totals:\s*(\d+)", f.read_text(errors="replace"), re.M)
        if totals and int(totals.group(1)) > 0:
            return int(totals.group(1)) // n
    raise SystemExit(f"{name}: callgrind wrote no counts ({', '.join(str(d) for d in dumps)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000, help="requests counted per target (default 3000)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="file whose section is written")
    ap.add_argument("--body-bytes", type=int, default=200,
                    help="size of the chat body sent (default 200; another size is printed, not written to the report)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (callgrind files, logs)")
    ap.add_argument("--baseline", metavar="REV", default="",
                    help="also count keygate as built at this git revision (empty: none)")
    args = ap.parse_args()
    ensure_tools({"valgrind": ["valgrind"], "callgrind_control": ["valgrind"], "h2load": ["nghttp2-client"]})
    for b in ("keygate", "keygate-mock", "examples/bare_passthrough"):
        if not (RELEASE / b).exists():
            raise SystemExit(f"target/release/{b} is missing: cargo build --release --workspace --bins --example bare_passthrough")
    baseline, base = build_baseline(args.baseline) if args.baseline else (None, None)

    tmp = Path(tempfile.mkdtemp(prefix="keygate-instr-"))
    tmp.chmod(0o700)  # keygate's upgrade socket is created mode 0666
    port = dict(zip(["mock", "keygate", "pingora", "baseline"], free_ports(4)))
    body_file = tmp / "body.json"
    body_file.write_bytes(chat_body(args.body_bytes))
    env = dict(os.environ, **KEYS, RUST_LOG="warn")
    mock = Processes()
    try:
        m = mock.start("keygate-mock", [str(RELEASE / "keygate-mock"), "--listen", f"127.0.0.1:{port['mock']}",
                                        "--threads", "1", "--strict", "--name", "bench",
                                        *(a for k in KEYS.values() for a in ("--key", f"{k}=ok"))],
                       tmp / "mock.log")
        wait_ready_plain("keygate-mock", port["mock"], m, tmp / "mock.log")
        conf = fill(ROOT / "bench" / "keygate.yaml",
                    {"KEYGATE_DIR": tmp, "KEYGATE_PORT": port["keygate"], "MOCK_PORT": port["mock"]},
                    tmp / "keygate.yaml")
        floor = count("pingora", [str(RELEASE / "examples" / "bare_passthrough"), f"127.0.0.1:{port['pingora']}",
                                  f"127.0.0.1:{port['mock']}", *KEYS.values()],
                      port["pingora"], tmp, body_file, args.requests, env)
        keygate = count("keygate", [str(RELEASE / "keygate"), "-c", str(conf)],
                        port["keygate"], tmp, body_file, args.requests, env)
        if baseline:
            # Its own directory (pid file, upgrade socket) and port, with the same config.
            (tmp / "baseline").mkdir(mode=0o700)
            base_conf = fill(ROOT / "bench" / "keygate.yaml",
                             {"KEYGATE_DIR": tmp / "baseline", "KEYGATE_PORT": port["baseline"],
                              "MOCK_PORT": port["mock"]},
                             tmp / "baseline" / "keygate.yaml")
            check_config(baseline, base_conf, env, f"keygate @{base['short']}", baseline=True)
            base_count = count("baseline", [str(baseline), "-c", str(base_conf)],
                               port["baseline"], tmp, body_file, args.requests, env)
    finally:
        mock.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = [
        ["Pingora floor (examples/bare_passthrough.rs)", f"{floor:,}", "100%"],
        ["keygate (bench/keygate.yaml)", f"{keygate:,}", f"{keygate / floor:.0%}"],
    ]
    against = ""
    if base:
        rows.append([f"keygate @{base['short']} (bench/keygate.yaml)", f"{base_count:,}", f"{base_count / floor:.0%}"])
        diff = keygate - base_count
        same = base["rev"] == base["short"]
        heading = f"{base['rev']} ({base['subject']})" if same else f"{base['rev']} ({base['short']}, {base['subject']})"
        # Section and terminal say the same: the two counts and what changed between them.
        against = f"""
### Against {heading}

keygate @{base['short']} is keygate built in release mode from {base['rev']}, counted the same way, with the
current bench/keygate.yaml. callgrind counts exactly; only how the requests batch on the connections
varies between runs (repeated 500-request runs differed by a few tenths of a percent, the floor by up
to 1 %), so a difference smaller than that says nothing either way.

- keygate @{base['short']}: {base_count:,} instructions per request
- keygate {commit}: {keygate:,} instructions per request
- difference: {diff:+,} instructions per request ({diff / base_count:+.1%})
"""
    t = table(["instructions per request (user space)", "count", "of the floor"], rows)
    cmd = "python3 bench/instructions.py" + (f" --baseline {base['rev']}" if base else "")
    section = f"""## Instructions per request

Generated by `{cmd}` on {when}, keygate {commit}: callgrind's exact count
of the user-space instructions one small chat POST costs (mean over {args.requests:,} requests on 8
keep-alive connections, after {WARMUP} warm-up requests). Unlike requests/s it does not drift with
the machine's load, so it is the figure to compare before and after a change.

{t}
{against}"""
    print(t + ("\n" + against if against else ""))
    if args.body_bytes != 200:
        log(f"a {args.body_bytes}-byte body: printed only, BENCHMARKS.md keeps the 200-byte section")
        return 0
    write_section(Path(args.out), section, heading="Instructions per request")
    log(f"wrote the Instructions per request section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
