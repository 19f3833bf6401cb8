#!/usr/bin/env python3
"""Account-scoped objects: does a workflow over files stay on the account that owns them?

    python3 bench/objects.py              # writes an "Account-scoped objects" section to BENCHMARKS.md
    python3 bench/objects.py --files 50 --out /tmp/x.md

One keygate (release build) over three keys on `keygate-mock`: `a1` and `a2` in account `org1`,
`b1` in account `org2`, round robin, a state file. The mock keeps files and batches per account,
as OpenAI does: another account's key gets 404 for them. For each of `--files` files the client
uploads it through keygate, then sends the workflow that names it: `GET /v1/files/{id}`, a batch
on it (`POST /v1/batches`, then `GET` of the batch) and three chat completions with the file in
their content. Then keygate is restarted and every file is read once more. The same workflow is
also sent straight to the mock with the three keys in turn, as a gateway without keygate's
tracking would, to show what is at stake. Figures: the requests the mock answered 404 in each case.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing load.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import ROOT, Processes, check_config, free_ports, log, start_mock, table, wait_ready_plain  # noqa: E402
from scale import write_section  # noqa: E402

RELEASE = ROOT / "target" / "release"
HEADING = "Account-scoped objects"
KEYS = {"OBJ_KEY_A1": "sk-obj-a1-0123456789", "OBJ_KEY_A2": "sk-obj-a2-0123456789",
        "OBJ_KEY_B1": "sk-obj-b1-0123456789"}
ACCOUNTS = {"sk-obj-a1-0123456789": "org1", "sk-obj-a2-0123456789": "org1", "sk-obj-b1-0123456789": "org2"}
CONFIG = """server:
  threads: 1
  pid_file: {dir}/keygate.pid
  upgrade_sock: {dir}/run/upgrade.sock
listen:
  - addr: 127.0.0.1:{port}
state_file: {dir}/state/keys.json
upstreams:
  mock:
    url: http://127.0.0.1:{mock}
    health: {{ enabled: false }}
    keys:
      - {{ name: a1, env: OBJ_KEY_A1, account: org1 }}
      - {{ name: b1, env: OBJ_KEY_B1, account: org2 }}
      - {{ name: a2, env: OBJ_KEY_A2, account: org1 }}
routes:
  - {{ upstreams: [mock] }}
"""


class Http:
    """One keep-alive connection; `key` adds a bearer token (for the mock)."""

    def __init__(self, port: int, key: str | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.key = key

    def send(self, method: str, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if key or self.key:
            headers["Authorization"] = f"Bearer {key or self.key}"
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=data, headers=headers)
        r = self.conn.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, {}


def workflow(send, file_id: str) -> list[int]:
    """The requests that name one file; their statuses."""
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": file_id}}, {"type": "text", "text": "summarise"}]}]}
    statuses = [send("GET", f"/v1/files/{file_id}", None)[0]]
    status, batch = send("POST", "/v1/batches", {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                  "completion_window": "24h"})
    statuses.append(status)
    if status == 200:
        statuses.append(send("GET", f"/v1/batches/{batch['id']}", None)[0])
    statuses += [send("POST", "/v1/chat/completions", chat)[0] for _ in range(3)]
    return statuses


def run(files: int, tmp: Path) -> dict:
    port = dict(zip(["mock", "keygate"], free_ports(2)))
    env = dict(os.environ, **KEYS, RUST_LOG="warn")
    procs = Processes()
    out: dict = {}
    try:
        accounts = [a for key, acct in ACCOUNTS.items() for a in ("--account", f"{key}={acct}")]
        start_mock(procs, tmp, port["mock"], accounts)
        conf = tmp / "keygate.yaml"
        conf.write_text(CONFIG.format(dir=tmp, port=port["keygate"], mock=port["mock"]))
        check_config(RELEASE / "keygate", conf, env, "keygate")

        def start_keygate():
            kg = procs.start("keygate", [str(RELEASE / "keygate"), "-c", str(conf)], tmp / "keygate.log",
                             env=env, stop_signal=signal.SIGTERM)
            wait_ready_plain("keygate", port["keygate"], kg, tmp / "keygate.log")
            return kg

        kg = start_keygate()
        client = Http(port["keygate"])
        ids, statuses, started = [], [], time.monotonic()
        for _ in range(files):
            status, f = client.send("POST", "/v1/files", {"purpose": "batch"})
            statuses.append(status)
            ids.append(f["id"])
            statuses += workflow(client.send, f["id"])
        out["through"] = {"requests": len(statuses), "not_found": statuses.count(404),
                          "ok": statuses.count(200), "ms": (time.monotonic() - started) * 1000 / len(statuses)}
        kg.send_signal(signal.SIGTERM)
        kg.wait(timeout=30)
        start_keygate()
        client = Http(port["keygate"])
        after = [client.send("GET", f"/v1/files/{i}", None)[0] for i in ids]
        out["restart"] = {"requests": len(after), "not_found": after.count(404), "ok": after.count(200)}

        # The same workflow straight to the mock, the keys taken in turn.
        keys = list(ACCOUNTS)
        direct = Http(port["mock"])
        turn = [0]

        def rotating(method, path, body):
            key = keys[turn[0] % len(keys)]
            turn[0] += 1
            return direct.send(method, path, body, key=key)

        statuses = []
        for _ in range(files):
            status, f = rotating("POST", "/v1/files", {"purpose": "batch"})
            statuses.append(status)
            statuses += workflow(rotating, f["id"])
        out["direct"] = {"requests": len(statuses), "not_found": statuses.count(404), "ok": statuses.count(200)}
    finally:
        procs.stop_all()
    return out


def render(r: dict) -> str:
    rows = []
    for label, k in [("through keygate", "through"), ("through keygate, after a restart (GET each file)", "restart"),
                     ("straight to the mock, keys in turn (no tracking)", "direct")]:
        x = r[k]
        rows.append([label, f"{x['requests']:,}", f"{x['ok']:,}", f"{x['not_found']:,}",
                     f"{x['not_found'] / x['requests']:.1%}"])
    return table(["workflow", "requests", "200", "404 (wrong account)", "share 404"], rows)


def passed(r: dict) -> bool:
    return r["through"]["not_found"] == 0 and r["restart"]["not_found"] == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="file whose section is written")
    args = ap.parse_args()
    for b in ("keygate", "keygate-mock"):
        if not (RELEASE / b).exists():
            raise SystemExit(f"target/release/{b} is missing: cargo build --release --workspace --bins")
    tmp = Path(tempfile.mkdtemp(prefix="keygate-objects-"))
    tmp.chmod(0o700)  # keygate's upgrade socket is created mode 0666
    r = run(args.files, tmp)
    t = render(r)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    section = f"""## {HEADING}

Generated by `python3 bench/objects.py` on {when}, keygate {commit}: three keys on the mock, `a1`
and `a2` in account `org1`, `b1` in `org2`, round robin. For each of {args.files:,} files: the upload
through keygate, then `GET` of the file, a batch on it and its `GET`, and three chat completions
with the file in their content. The mock keeps files and batches per account as OpenAI does
(another account's key gets 404). After a restart (state file) each file is read again. The last
row sends the same workflow straight to the mock with the keys in turn: what a gateway without
keygate's tracking would meet. Client-side time per request through keygate (sequential,
keep-alive): {r['through']['ms']:.3f} ms.

{t}
"""
    print(t)
    write_section(Path(args.out), section, heading=HEADING)
    log(f"wrote the {HEADING} section of {args.out}")
    return 0 if passed(r) else 1


if __name__ == "__main__":
    sys.exit(main())
