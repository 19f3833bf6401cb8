#!/usr/bin/env python3
"""Checks the benchmark reports without running a benchmark: feeds synthetic results to
bench/load.py's, bench/anthropic.py's, bench/shared.py's, bench/affinity.py's, bench/headroom.py's and bench/objects.py's reports and to the section writer the
scripts share, and checks what comes out.

    python3 bench/selftest.py      (run by `make test` through tests/bench_scripts.rs)

A full `make bench` takes a quarter of an hour and needs nginx, HAProxy, wrk and valgrind; a
mistake in the report code would only show at its very end. This catches those in a second.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import LATENCY_TARGETS, PEERS, judge, keep_other_sections, noise_of, render, round_order  # noqa: E402
from scale import write_section  # noqa: E402
import affinity  # noqa: E402
import anthropic  # noqa: E402
import headroom  # noqa: E402
import objects  # noqa: E402
import shared  # noqa: E402

# Requests/s per scenario and target: keygate beats HAProxy on streams only.
RPS = {
    "chat": {"direct": 80000, "keygate": 20000, "pingora": 22000, "nginx2": 23000, "nginx1": 36000, "haproxy": 40000},
    "sse": {"direct": 66000, "keygate": 34000, "pingora": 13000, "nginx2": 14000, "nginx1": 29000, "haproxy": 33000},
    "body16k": {"direct": 32000, "keygate": 19000, "pingora": 14500, "haproxy": 20000},
    "cachehit": {"direct": 80000, "keygate": 60000, "pingora": 22000},
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
        hit_lat=[0.0001 + i * 1e-6 for i in range(100)], hit_err=0,
    )


def with_baseline() -> dict:
    """synthetic() plus keygate @abc1234 in the same three rounds: level on chat POSTs (within a 3 %
    noise), 8 % slower on streams (beyond a 0.6 % noise), 0.05 ms slower at every percentile of the
    fixed-rate test (so keygate is faster), and memory alike."""
    r = synthetic()
    per_round = {  # scenario: (keygate, keygate @abc1234) req/s per round, keygate's medians as above
        "chat": ([20000, 20400, 19600], [20200, 20000, 19800]),
        "sse": ([34000, 34300, 33700], [37000, 37200, 36800]),
        "body16k": ([19000, 19000, 19000], [19000, 19000, 19000]),
    }
    for scenario, runs in per_round.items():
        for t, values in zip(("keygate", "baseline"), runs):
            r["tput"][(scenario, t)] = [{"rps": v, "errors": 0, "p50_us": 1000, "p99_us": 2000} for v in values]
    kg = r["lat"]["keygate"]
    r["lat_rounds"] = {"keygate": [kg] * 3, "baseline": [[x + 0.00005 + j * 1e-6 for x in kg] for j in range(3)]}
    r["rss_rounds"] = {"keygate": [19 * 1024, 20 * 1024, 20 * 1024], "baseline": [18 * 1024, 19 * 1024, 20 * 1024]}
    r["base_rss"] = {"idle": 12.5 * 1024, "peak": 22 * 1024}
    r["baseline"] = {"rev": "HEAD~1", "hash": "abc1234" + "0" * 33, "short": "abc1234", "subject": "a change"}
    return r


def section(md: str, heading: str) -> str:
    """The "## {heading}..." section of `md`, up to the next "## " heading."""
    start = md.index("## " + heading)
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def row(md: str, label: str) -> list[str]:
    """The cells of the first table row starting with `label`."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in:\n{md}")


def shared_results() -> dict:
    """bench/shared.py's measurements: redis: costs 15 % of the req/s and adds 0.05 ms to every
    fixed-rate sample (0.5 ms at wrk's p50); a cooldown reaches B in 1 to 10 ms (p99 10 ms) in 200 trials, 100 of them
    needing a second request to reach the 429 key."""
    wrk = lambda rps, p50: [{"rps": rps, "requests": rps * 10, "errors": 0, "p50_us": p50,  # noqa: E731
                             "p99_us": 2 * p50}] * 3
    local = [0.0002 + i * 1e-6 for i in range(100)]
    shared_lat = [x + 0.00005 for x in local]
    return {
        "args": ["--rounds", "3"], "when": "2026-01-01 00:00 UTC", "commit": "abc1234",
        "redis_version": "Redis server v=7.0.15", "nproc": 2, "loadavg": "1.00", "rounds": 3, "seconds": 10,
        "rate": 200, "wrk": {"local": wrk(20000, 3000), "shared": wrk(17000, 3500)},
        "lat": {"local": local, "shared": shared_lat}, "lat_err": {"local": 0, "shared": 0},
        "prop": {"delays": [0.001 + (i % 10) * 0.001 for i in range(200)], "sent": [1, 2] * 100,
                 "statuses": {200: 300}, "applied": 200, "delay_sum": 0.4, "delay_count": 200},
        "cpu": {"local": 3.0, "shared": 3.06, "redis": 1.53}, "script": {"calls": 1000, "usec": 12345},
        "redis_up": 1.0, "redis_errors": 0.0,
    }


def check_shared() -> None:
    md = shared.render(shared_results())
    assert md.startswith("## Shared state (Redis)\n"), md
    assert row(md, "throughput cost of redis:")[2:] == ["15.0%", "NOT met"], row(md, "throughput cost of redis:")
    assert row(md, "added p50 at 200 req/s, ms")[2:] == ["0.050", "met"], row(md, "added p50 at 200 req/s, ms")
    assert row(md, "cooldown propagation p99, ms")[2:] == ["10.000", "met"], row(md, "cooldown propagation p99, ms")
    assert "**Not met in this run: the throughput cost.**" in md, md
    assert row(md, "keygate, no redis:")[1:] == ["20,000", "3.000", "6.000", "0.250", "0.298", "0"], md
    assert row(md, "keygate with redis:")[1:] == ["17,000", "3.500", "7.000", "0.300", "0.348", "0"], md
    assert row(md, "difference")[1:6] == ["-15.0%", "+0.500", "+1.000", "+0.050", "+0.050"], row(md, "difference")
    assert row(md, "A's answer to B's metric, p50, ms")[1] == "6.000", md
    assert row(md, "A's answer to B's metric, max, ms")[1] == "10.000", md
    assert row(md, "B's keygate_shared_key_event_delay_seconds mean, ms")[1] == "2.000 (count 200)", md
    assert row(md, "requests to A per trial (round robin)")[1] == "1.50 mean", md
    assert "Problems seen" not in md, md
    # 3 s over 600 000 requests; 3.06 s and 1.53 s over 510 000; 12 345 µs over 1 000 calls.
    assert row(md, "without redis:")[1:] == ["5.0", "", "5.0"], md
    assert row(md, "with redis:")[1:] == ["6.0", "3.0", "9.0"], md
    assert row(md, "per call of the lease script in Redis (INFO commandstats: evalsha)")[2] == "12.3", md
    # A trial B never saw fails the propagation goal whatever the others' p99, and is listed.
    r = shared_results()
    r["prop"]["delays"][0] = None
    r["wrk"]["shared"] = r["wrk"]["local"]
    md = shared.render(r)
    assert row(md, "cooldown propagation p99, ms")[-1] == "NOT met", md
    assert row(md, "throughput cost of redis:")[2:] == ["0.0%", "met"], md
    assert row(md, "seen by B within 2 s")[1] == "199 (1 missed)", md
    assert "- propagation: 1 trial(s) not seen by B within 2 s" in md, md
    r["redis_errors"] = 3.0
    assert "keygate_redis_up 1 and 3 Redis errors" in shared.render(r), "Redis errors are a problem seen"


def check_affinity() -> None:
    """bench/affinity.py's figures: prompts 0-3 homed on a-d, seen twice more; one repeat of
    prompt 0 strays to c."""
    keys = ["a", "b", "c", "d"]
    first = [(i, keys[i]) for i in range(4)]
    rounds = [first, [(0, "c"), (1, "b"), (2, "c"), (3, "d")], first]
    a = affinity.analyse(rounds, keys)
    assert a["repeats"] == 8 and abs(a["sticky"] - 7 / 8) < 1e-9, a
    assert a["load"] == {"a": 2, "b": 3, "c": 4, "d": 3} and abs(a["busiest"] - 4 / 3) < 1e-9, a
    gone = affinity.moves(a["home"], [(0, "a"), (1, "c"), (2, "c"), (3, "d")], "b")
    assert (gone["others"], gone["others_home"], gone["leaving"], gone["leaving_moved"]) == (3, 3, 1, 1), gone
    back = affinity.moves(a["home"], first, "b")
    acc = affinity.within_account({0: "a", 1: "a", 2: "c"}, [(0, "b"), (1, "d"), (2, "c")], "a", "b")
    assert acc == {"leaving_count": 2, "to_partner": 1, "others": 1, "others_home": 1}, acc
    r = {"steady": a, "gone": gone, "back": back, "leaving": "b", "ms_per_request": 0.5,
         "accounts": {**acc, "leaving": "a", "partner": "b"}}
    md = affinity.render(r)
    assert row(md, "repeats on the prompt's home key, all keys ready")[1:] == ["87.50% of 8", "≥ 95%", "**FAIL**"], md
    assert row(md, "busiest key's requests / average")[1:] == ["1.333", "≤ 1.3", "**FAIL**"], md
    assert not affinity.passed(r), "7/8 and 1.33 miss both goals"
    assert row(md, "key b disabled: its prompts moved")[1:] == ["1 of 1 (to c 1)", "all", "pass"], md
    assert row(md, "key b enabled again: prompts back home")[1:] == ["4 of 4", "all", "pass"], md
    assert row(md, "c")[1:] == ["1", "4", "1.33"], md
    assert row(md, "accounts: key a disabled: its prompts moved to b (same account)")[1:] == ["1 of 2", "all", "**FAIL**"], md
    assert row(md, "accounts: key a disabled: other prompts still home")[1:] == ["1 of 1", "all", "pass"], md
    body = json.loads(affinity.prompt_body(7, "q"))
    assert len(body["messages"][0]["content"]) > 1024 and "#7 " in body["messages"][0]["content"][:60], body
def headroom_results(hr_429: int) -> dict:
    """bench/headroom.py's counts: reactive round_robin meets 100 upstream 429s per case."""
    def run(upstream_429: int, served: int) -> dict:
        return {"sent": 1000, "served": served, "client_errors": 1000 - served, "upstream_429": upstream_429,
                "upstream_200": served, "per_key_429": {"a": upstream_429, "b": 0, "c": 0}}
    return {case: {"round_robin, reactive": run(100, 990), "round_robin": run(20, 990),
                   "headroom": run(hr_429, 995)} for case in headroom.CASES}


def check_headroom() -> None:
    meta = {"date": "2026-01-01", "machine": "2 cores", "scale": 10, "minutes": 5}
    md = headroom.render(headroom_results(5), meta)
    assert md.startswith("## Headroom\n"), md
    assert md.count("**met**: 5.0 %, served 995 vs 990") == 2, md
    assert row(md, "headroom")[1:] == ["1000", "995", "5", "5", "5 / 0 / 0", "995"], row(md, "headroom")
    md = headroom.render(headroom_results(11), meta)
    assert md.count("**NOT met**: 11.0 %") == 2, md
    assert headroom.load_per_minute(headroom.CASES["unequal"]) == 378
    assert abs(headroom.load_per_minute(headroom.CASES["spent outside"]) - 315) < 1e-9


def check_objects() -> None:
    """bench/objects.py's table: counts and shares per workflow; passing needs no 404 through keygate."""
    r = {"through": {"requests": 1400, "ok": 1400, "not_found": 0, "ms": 0.4},
         "restart": {"requests": 200, "ok": 200, "not_found": 0},
         "direct": {"requests": 1400, "ok": 700, "not_found": 700}}
    md = objects.render(r)
    assert row(md, "through keygate")[1:] == ["1,400", "1,400", "0", "0.0%"], md
    assert row(md, "straight to the mock, keys in turn (no tracking)")[1:] == ["1,400", "700", "700", "50.0%"], md
    assert objects.passed(r)
    r["restart"]["not_found"] = 1
    assert not objects.passed(r), "a 404 after the restart fails"


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
    assert row(md, "req/s")[1:] == ["80,000", "60,000", "20,000", "22,000"], row(md, "req/s")
    assert row(md, "response cache (200 B chat)")[1:] == ["direct (mock)", "keygate hit", "keygate uncached", "Pingora floor"]
    assert row(md, "latency p50 at 200 req/s, ms")[1:3] == ["0.250", "0.150"], row(md, "latency p50 at 200 req/s, ms")
    assert "## Against" not in md, "no baseline, no comparison"

    # keygate @REV runs right beside keygate, after it then before it; the others rotate as before.
    assert round_order(["direct", "keygate", "pingora"], 0) == ["direct", "keygate", "pingora"]
    assert round_order(["direct", "keygate", "pingora"], 0, baseline=True) == ["direct", "keygate", "baseline", "pingora"]
    assert round_order(["direct", "keygate", "pingora"], 1, baseline=True) == ["baseline", "keygate", "pingora", "direct"]
    assert round_order(["direct", "keygate", "pingora"], 2, baseline=True) == ["pingora", "direct", "keygate", "baseline"]

    # The verdict: within noise up to the spread of the per-round ratios (inclusive), else the
    # direction in which keygate moved; no verdict from one round.
    assert abs(noise_of([100, 90, 95], [100, 100, 100]) - 0.1) < 1e-9
    assert noise_of([100], [90]) != noise_of([100], [90])  # NaN: one round has no spread
    assert judge(-0.02, 0.02, higher_is_better=True) == "within noise"
    assert judge(-0.021, 0.02, higher_is_better=True) == "slower"
    assert judge(0.021, 0.02, higher_is_better=True) == "faster"
    assert judge(0.05, 0.01, higher_is_better=False) == "slower"  # latency up
    assert judge(-0.05, 0.01, higher_is_better=False, words=("smaller", "larger")) == "smaller"
    assert judge(0.3, float("nan"), higher_is_better=True).startswith("no verdict")

    md = render(**with_baseline())["markdown"]
    assert row(md, "chat req/s vs HAProxy")[2:] == ["50%", "55%", "not met"], "the baseline leaves the goals alone"
    vs = section(md, "Against HEAD~1 (abc1234, a change)")
    assert md.index("## Against") < md.index("## Method"), md
    assert row(vs, "figure")[1:] == ["keygate", "keygate @abc1234", "difference", "noise"], row(vs, "figure")
    # Medians 20 000 and 20 000; per-round ratios 0.990, 1.020, 0.990: noise 3.0 %.
    assert row(vs, "chat POST, req/s")[1:] == ["20,000", "20,000", "+0.0%", "3.0%"], row(vs, "chat POST, req/s")
    assert "- chat POST, req/s: within noise" in vs, vs
    # 34 000 / 37 000 - 1 = -8.1 %, against per-round ratios 0.919, 0.922, 0.916: noise 0.6 %.
    assert row(vs, "stream, 5 chunks, req/s")[1:] == ["34,000", "37,000", "-8.1%", "0.6%"], row(vs, "stream, 5 chunks, req/s")
    assert "- stream, 5 chunks, req/s: slower (-8.1%, noise 0.6%)" in vs, vs
    assert row(vs, "16 KiB body, req/s")[1:] == ["19,000", "19,000", "+0.0%", "0.0%"], row(vs, "16 KiB body, req/s")
    assert "- 16 KiB body, req/s: within noise" in vs, vs
    assert row(vs, "latency p50 at 200 req/s, ms")[1:3] == ["0.350", "0.401"], row(vs, "latency p50 at 200 req/s, ms")
    assert row(vs, "latency p50 at 200 req/s, ms")[3].endswith("(-0.051 ms)"), row(vs, "latency p50 at 200 req/s, ms")
    assert "- latency p99 at 200 req/s, ms: faster" in vs, vs
    # Medians 20 and 19 MiB: +5.3 %, against per-round ratios 1.056, 1.053, 1.000: noise 5.6 %.
    assert row(vs, "RSS after load, MiB")[1:] == ["20.0", "19.0", "+5.3%", "5.6%"], row(vs, "RSS after load, MiB")
    assert "- RSS idle, MiB: within noise" in vs and "- peak RSS (VmHWM), MiB: within noise" in vs, vs
    assert "**Worse than keygate @abc1234 beyond noise:** stream, 5 chunks, req/s." in vs, vs

    one = with_baseline()
    one["rounds"] = 1
    for key in ("chat", "sse", "body16k"):
        for t in ("keygate", "baseline"):
            one["tput"][(key, t)] = one["tput"][(key, t)][:1]
    one["lat_rounds"] = {t: runs[:1] for t, runs in one["lat_rounds"].items()}
    one["rss_rounds"] = {t: runs[:1] for t, runs in one["rss_rounds"].items()}
    vs = section(render(**one)["markdown"], "Against")
    assert "- chat POST, req/s: no verdict (one round" in vs and "**No verdict:**" in vs, vs

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "BENCHMARKS.md"
        f.write_text("# report\n\n## Results\n\nold\n\n## Scale\n\nscale text\n")
        write_section(f, "## Instructions per request\n\nfirst\n", heading="Instructions per request")
        write_section(f, "## Instructions per request\n\nsecond\n", heading="Instructions per request")
        write_section(f, "## Scale\n\nnew scale\n")
        text = f.read_text()
        assert text.count("## Instructions per request") == 1 and "second" in text and "first" not in text, text
        assert "new scale" in text and "scale text" not in text and "## Results\n\nold" in text, text
        # A heading ending in a bracket is found again (not appended twice).
        write_section(f, "## Shared state (Redis)\n\none\n", heading="Shared state (Redis)")
        write_section(f, "## Shared state (Redis)\n\ntwo\n", heading="Shared state (Redis)")
        text = f.read_text()
        assert text.count("## Shared state (Redis)") == 1 and "two" in text, text
        # load.py's report replaces its own sections and keeps the other scripts' ones.
        merged = keep_other_sections(text, "# keygate load benchmark\n\n## Machine\n\nnew\n\n## Results\n\nnew\n")
        assert merged.count("## Results") == 1 and "## Results\n\nnew" in merged, merged
        assert "## Scale\n\nnew scale" in merged and "## Shared state (Redis)\n\ntwo" in merged, merged
        assert "## Instructions per request\n\nsecond" in merged and "old" not in merged, merged
    t = anthropic.render_table({"direct": 40000, "native": 10000, "translated": 8000, "plain": 10500},
                               {"direct": 0, "native": 0, "translated": 2, "plain": 0})
    assert "| keygate translated route, POST /v1/chat/completions |  8,000 |       20% |       80% |      2 |" in t, t
    body = json.loads(anthropic.messages_body(200))
    assert body["model"] == anthropic.CLAUDE and body["max_tokens"] > 0, body
    check_shared()
    check_affinity()
    check_headroom()
    check_objects()
    print("bench reports: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
