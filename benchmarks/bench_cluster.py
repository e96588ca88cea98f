"""What fleet mode costs end to end: the same Empath node with and without ``cluster.url``.

One run, one machine: a sink (``benchmarks/sink.py``), a private ``redis-server`` on loopback
(``tests/support/redisserver.py``), and one Empath daemon with the benchmark configuration
(``empathd.py``) relaying everything to the sink through a smarthost with
``max_connections: 20`` and ``delivery.rate_limits.global`` set far above what the machine
can do, so that in fleet mode every delivery takes a connection lease and a rate token from
Redis, but no limit ever makes it wait. Runs alternate (single, fleet, single, fleet, ...) so
both see the same machine; each run sends ``--messages`` 1 KiB messages over 20 sessions
(``loadgen.py``) and is timed from the first message sent to the last one at the sink.

    .venv/bin/python benchmarks/bench_cluster.py [--messages 3000] [--rounds 2]

Prints one line per run and the fleet/single ratio of the medians; writes
``benchmarks/results/cluster.json``. Exits 1 if a run lost a message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import empathd  # noqa: E402
from loadgen import run_load  # noqa: E402

from tests.support.daemon import EmpathDaemon  # noqa: E402
from tests.support.redisserver import RedisServer  # noqa: E402

PY = sys.executable


def count_lines(path: str) -> int:
    try:
        with open(path, "rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


def one_run(work: str, n: int, sink_port: int, sink_log: str, redis_url: str | None,
            label: str) -> dict[str, Any]:
    base = os.path.join(work, label)
    overrides = empathd.bench_overrides(os.path.join(base, "spool"), sink_port)
    overrides["delivery"].update(max_connections=20, rate_limits={"global": 10_000_000})
    if redis_url:
        overrides["cluster"] = {"url": redis_url, "node_name": "bench", "key_prefix": label}
    daemon = EmpathDaemon(base, overrides)
    daemon.start(timeout=60)
    try:
        host, port = daemon.address
        before = count_lines(sink_log)
        started = time.monotonic()
        load = asyncio.run(run_load(host, port, messages=n, sessions=20, size=1024))
        deadline = time.monotonic() + 300
        while count_lines(sink_log) - before < load.accepted and time.monotonic() < deadline:
            time.sleep(0.02)
        seconds = time.monotonic() - started
        arrived = count_lines(sink_log) - before
    finally:
        empathd.stop_empath(daemon)
    row = {"mode": "fleet" if redis_url else "single", "messages": n,
           "accepted": load.accepted, "arrived": arrived, "seconds": round(seconds, 3),
           "delivered_per_s": round(arrived / seconds, 1)}
    print(f"{row['mode']:<7} {arrived}/{n} delivered in {seconds:6.2f}s  "
          f"{row['delivered_per_s']:8.1f}/s", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    # SIGTERM unwinds like an error, so every daemon, the sink and Redis are stopped by pid.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = tempfile.mkdtemp(prefix="bench-cluster-", dir=os.path.join(ROOT, "var")
                            if os.path.isdir(os.path.join(ROOT, "var")) else None)
    sink_log = os.path.join(work, "sink.log")
    sink = subprocess.Popen([PY, os.path.join(HERE, "sink.py"), "--out", sink_log],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    rows: list[dict[str, Any]] = []
    try:
        assert sink.stdout is not None
        sink_port = int(sink.stdout.readline())
        with RedisServer(os.path.join(work, "redis")) as redis:
            for r in range(args.rounds):
                for url in (None, redis.url):
                    rows.append(one_run(work, args.messages, sink_port, sink_log, url,
                                        f"{'fleet' if url else 'single'}{r}"))
    finally:
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    single = statistics.median(r["delivered_per_s"] for r in rows if r["mode"] == "single")
    fleet = statistics.median(r["delivered_per_s"] for r in rows if r["mode"] == "fleet")
    print(f"fleet / single: {fleet / single:.2f} ({fleet:.1f}/s against {single:.1f}/s, "
          "medians)")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "cluster.json"), "w") as fh:
        json.dump({"runs": rows, "ratio": round(fleet / single, 3)}, fh, indent=2)
    return 1 if any(r["arrived"] != r["messages"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
