#!/usr/bin/env python3
"""Checks the benchmark reports without running a benchmark: feeds synthetic results to
bench/load.py's report and to the section writer the scripts share, and checks what comes out.

    python3 bench/selftest.py      (run by `make test` through tests/bench_scripts.rs)

A full `make bench` takes a quarter of an hour and needs nginx, HAProxy, wrk and valgrind; a
mistake in the report code would only show at its very end. This catches those in a second.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import LATENCY_TARGETS, PEERS, render  # noqa: E402
from scale import write_section  # noqa: E402

# Requests/s per scenario and target: keygate beats HAProxy on streams only.
RPS = {
    "chat": {"direct": 80000, "keygate": 20000, "pingora": 22000, "nginx2": 23000, "nginx1": 36000, "haproxy": 40000},
    "sse": {"direct": 66000, "keygate": 34000, "pingora": 13000, "nginx2": 14000, "nginx1": 29000, "haproxy": 33000},
    "body16k": {"direct": 32000, "keygate": 19000, "pingora": 14500, "haproxy": 20000},
}
# Per target, latency samples (s) and stream timings: keygate adds 0.1 ms, the floor 0.2 ms.
ADDED = {"direct": 0.0, "keygate": 0.0001, "pingora": 0.0002}


def synthetic() -> dict:
    tput = {(s, t): [{"rps": v, "errors": 0, "p50_us": 1000, "p99_us": 2000}] * 3
            for s, per in RPS.items() for t, v in per.items()}
    lat = {t: [0.0002 + ADDED[t] + i * 1e-6 for i in range(100)] for t in LATENCY_TARGETS}
    sse_t = {t: {"first": [0.0003 + ADDED[t]] * 10,
                 "last": [0.19 + ADDED[t]] * 10,
                 "events": [[0.0003 + 0.02 * j + ADDED[t] for j in range(11)] for _ in range(10)]}
             for t in LATENCY_TARGETS}
    info = {k: "test" for k in ("cpus", "nproc", "cpu", "memory", "kernel", "loadavg", "commit", "rustc",
                                 "nginx", "haproxy", "wrk")}
    return dict(
        args=[], quick=False, info=info, rounds=3, seconds=10, conns=64, rate=200, lat_seconds=15,
        streams=30, tput=tput, lat=lat, lat_err={t: 0 for t in LATENCY_TARGETS},
        sse_t=sse_t, sse_err={t: 0 for t in LATENCY_TARGETS},
        spread={t: {"a": 10, "b": 10, "c": 10} for t in PEERS if t != "direct"},
        rss={"idle": 13 * 1024, "loaded": 20 * 1024, "end": 17 * 1024, "peak": 22 * 1024},
        peers_mem={t: {"VmRSS": 14 * 1024, "VmHWM": 15 * 1024} for t in ("nginx2", "nginx1", "haproxy")},
        mock_mem={"VmRSS": 15 * 1024, "VmHWM": 16 * 1024}, wrk_threads=1,
    )


def row(md: str, label: str) -> list[str]:
    """The cells of the first table row starting with `label`."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in:\n{md}")


def main() -> int:
    md = render(**synthetic())["markdown"]
    assert row(md, "chat req/s vs HAProxy")[2:] == ["50%", "55%", "not met"], row(md, "chat req/s vs HAProxy")
    assert row(md, "stream req/s vs HAProxy")[2:] == ["103%", "39%", "met"], row(md, "stream req/s vs HAProxy")
    # 1 - 19 000 / 20 000 and 1 - 14 500 / 22 000.
    assert row(md, "throughput lost to a 16 KiB body")[2:] == ["5%", "34%", "met"]
    assert row(md, "added latency p50, ms")[2:] == ["0.100", "0.200", "met"], row(md, "added latency p50, ms")
    assert row(md, "each SSE event passed on within, ms")[2:] == ["0.100", "0.200", "met"]
    assert row(md, "idle RSS, MiB")[-1] == "met"
    assert row(md, "16 KiB / 200 B")[1:] == ["40%", "95%", "66%", "50%"], row(md, "16 KiB / 200 B")
    assert row(md, "slowest event, p50 added")[3] == "0.100"
    assert "No errors" in md

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "BENCHMARKS.md"
        f.write_text("# report\n\n## Results\n\nold\n\n## Scale\n\nscale text\n")
        write_section(f, "## Instructions per request\n\nfirst\n", heading="Instructions per request")
        write_section(f, "## Instructions per request\n\nsecond\n", heading="Instructions per request")
        write_section(f, "## Scale\n\nnew scale\n")
        text = f.read_text()
        assert text.count("## Instructions per request") == 1 and "second" in text and "first" not in text, text
        assert "new scale" in text and "scale text" not in text and "## Results\n\nold" in text, text
    print("bench reports: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
