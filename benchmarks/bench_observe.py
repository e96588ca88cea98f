"""What metrics, the audit log and tracing cost, per message.

Three measurements:

1. In-process: the instrument updates one message causes on the receiver's hot path
   (connection accepted/active, replies counted from each Send, message counted, size
   observed, spool write and commit latencies), timed with the instruments off (``NOOP``)
   and on (prometheus_client in multiprocess mode, files in a temporary directory), plus one
   audit record.
2. Tracing off, in-process: the tracing calls one message causes with ``tracing.enabled``
   false (the receiver's session and message calls; a delivery's attempt, route, connection
   and transaction wrappers, a DNS lookup and ten reply events), against the same work
   without them, in one run; the difference is also given as a share of the receiver's CPU
   time per message measured end to end with everything off
   (``tracing_off_receive_share``).
3. End to end: a receive-only daemon (delivery frozen) takes ``--messages`` messages from
   ``loadgen.py`` with metrics off, with metrics on, with metrics and the audit log on, and
   with tracing on (spans exported to an OTLP/HTTP receiver on loopback); reported are
   messages per second and the receivers' CPU time per message (psutil), the modes
   alternated ``--rounds`` times.

    .venv/bin/python benchmarks/bench_observe.py [--messages 4000] [--sessions 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import timeit
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from empathd import bench_overrides, cpu_seconds  # noqa: E402
from loadgen import run_load  # noqa: E402

from empath.observe import multiproc  # noqa: E402
from empath.observe.multiproc import ENV  # noqa: E402
from empath.spool import Spool  # noqa: E402
from tests.support.daemon import EmpathDaemon  # noqa: E402

MODES = ("off", "metrics", "metrics+audit", "tracing")
REPLIES = [b"220 host ESMTP\r\n", b"250-host\r\n250-PIPELINING\r\n250 SIZE 1000\r\n",
           b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n", b"250 2.0.0 OK queued\r\n",
           b"221 2.0.0 bye\r\n"]


def hot_path_cost(enabled: bool, n: int = 20000) -> float:
    """Microseconds of instrument updates per message."""
    from empath.observe.metrics import Instruments

    m = Instruments(enabled)

    def one_message() -> None:
        m.connections_accepted.inc()
        m.connections_active.inc()
        for data in REPLIES:
            m.count_replies(data)
        m.messages_received.inc()
        m.received_bytes.inc(1024)
        m.message_size.observe(1024)
        m.spool_write.observe(0.002)
        m.spool_commit.observe(0.004)
        m.connections_active.dec()

    return timeit.timeit(one_message, number=n) / n * 1e6


def audit_cost(n: int = 20000) -> float:
    from empath.observe.audit import AuditLog

    with tempfile.TemporaryDirectory() as tmp:
        log = AuditLog(os.path.join(tmp, "audit.jsonl"))
        seconds = timeit.timeit(lambda: log.write(
            "received", "01KB3X6Y5Q7ZPR0E2CQ8W4H2N9", sender="alice@example.org",
            recipients=["bob@example.net"], size=1024, client_ip="127.0.0.1", client_port=40000,
            helo="client.example.org", tls=None, listener="127.0.0.1:2525"), number=n)
        log.close()
    return seconds / n * 1e6


def tracing_off_cost(n: int = 20000) -> dict[str, float]:
    """Microseconds per message with the tracing-off calls and without them, for the
    receiver's calls and the delivery's, one run (best of three, interleaved)."""
    from types import SimpleNamespace

    from empath.observe import tracing

    assert not tracing.enabled()
    listener = SimpleNamespace(address="127.0.0.1:25")
    envelope: dict[str, Any] = {"id": "01KB3X6Y5Q7ZPR0E2CQ8W4H2N9", "recipients": [{}]}

    async def work(*args: Any, **kwargs: Any) -> int:
        return 1

    # The delivery side: the same coroutine chain, decorated and plain.
    attempt, route = tracing.delivery_attempt(work), tracing.route(work)
    connect, txn = tracing.connect(work), tracing.transaction(work)
    dns = tracing.dns_lookup(work)

    async def traced_delivery() -> None:
        await attempt(None, "id", "path", envelope, None)
        await route(None, "example.net", envelope, [], None)
        await dns(None, "example.net", "MX")
        await connect(server="mx", ip="127.0.0.1", port=25)
        await txn(None, envelope, [], None)
        for _ in range(10):
            tracing.event("smtp.reply", "rcpt", 250, "2.1.5")

    async def plain_delivery() -> None:  # the same calls, undecorated, without events
        await work(None, "id", "path", envelope, None)
        await work(None, "example.net", envelope, [], None)
        await work(None, "example.net", "MX")
        await work(server="mx", ip="127.0.0.1", port=25)
        await work(None, envelope, [], None)

    def receive(traced: bool) -> None:
        if traced:
            t = tracing.session("127.0.0.1", 40000, listener)
            t.message_started("01KB3X6Y5Q7ZPR0E2CQ8W4H2N9")
            record = {"id": "x", **t.envelope_keys()}
            t.message_done(1024, None)
            t.close()
        else:
            record = {"id": "x"}
        assert record

    async def run_receive(traced: bool) -> float:
        started = time.perf_counter()
        for _ in range(n):
            receive(traced)
        return (time.perf_counter() - started) / n * 1e6

    async def run_delivery(traced: bool) -> float:
        delivery = traced_delivery if traced else plain_delivery
        started = time.perf_counter()
        for _ in range(n):
            await delivery()
        return (time.perf_counter() - started) / n * 1e6

    async def all_four() -> dict[str, float]:
        times: dict[str, list[float]] = {}
        for _ in range(3):
            for side, run in (("receive", run_receive), ("delivery", run_delivery)):
                for traced in (True, False):
                    key = f"{side}_{'calls' if traced else 'absent'}_us"
                    times.setdefault(key, []).append(await run(traced))
        return {k: round(min(v), 3) for k, v in times.items()}

    return asyncio.run(all_four())


def end_to_end(base: str, mode: str, messages: int, sessions: int) -> dict[str, Any]:
    work = os.path.join(base, f"{mode}-{time.monotonic_ns()}")
    spool = os.path.join(work, "spool")
    tree = Spool(spool)
    tree.create_tree()
    tree.set_frozen(True)
    overrides = bench_overrides(spool, None)
    if mode != "off":
        overrides["metrics"] = {"listen_addr": "127.0.0.1:0"}
    if mode == "metrics+audit":
        overrides["audit"] = {"log_path": os.path.join(work, "audit.jsonl")}
    otlp = None
    if mode == "tracing":
        from tests.support.otlpserver import OTLPReceiver

        otlp = OTLPReceiver().start()
        overrides.pop("metrics", None)
        overrides["tracing"] = {"enabled": True, "endpoint": otlp.endpoint}
    daemon = EmpathDaemon(work, overrides)
    try:
        daemon.start(timeout=60)
        host, port = daemon.address
        asyncio.run(run_load(host, port, messages=500, sessions=sessions))  # warm-up
        receivers = daemon.child_pids("receiver")
        before = cpu_seconds(receivers)
        result = asyncio.run(run_load(host, port, messages=messages, sessions=sessions))
        cpu = cpu_seconds(receivers) - before
    finally:
        if otlp is not None:
            otlp.stop()
        daemon.kill()  # killed: its tmpfs metrics directory is left for us to remove
        multiproc.remove(multiproc.default_dir(spool, tree.control))
        shutil.rmtree(work, ignore_errors=True)
    return {"mode": mode, "accepted": result.accepted, "msg_per_s": round(result.rate, 1),
            "receiver_cpu_us_per_msg": round(cpu / max(result.accepted, 1) * 1e6, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    out: dict[str, Any] = {}
    out["hot_path_us_off"] = round(hot_path_cost(False), 3)
    tmp = tempfile.mkdtemp(prefix="empath-bench-metrics-")
    os.environ[ENV] = tmp
    try:
        out["hot_path_us_on"] = round(hot_path_cost(True), 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["audit_record_us"] = round(audit_cost(), 3)
    costs = tracing_off_cost()
    out.update({f"tracing_off_{k}": v for k, v in costs.items()})
    out["tracing_off_receive_added_us"] = round(
        costs["receive_calls_us"] - costs["receive_absent_us"], 3)
    out["tracing_off_delivery_added_us"] = round(
        costs["delivery_calls_us"] - costs["delivery_absent_us"], 3)
    print(json.dumps(out), flush=True)
    base = os.path.join(ROOT, "var", f"bench-observe-{os.getpid()}")
    os.makedirs(base, exist_ok=True)
    runs = []
    try:
        for _ in range(args.rounds):
            for mode in MODES:
                row = end_to_end(base, mode, args.messages, args.sessions)
                print(json.dumps(row), flush=True)
                runs.append(row)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for mode in MODES:
        rows = [r for r in runs if r["mode"] == mode]
        if not rows:  # --rounds 0: the in-process figures only
            continue
        print(f"{mode:>14}: {sum(r['msg_per_s'] for r in rows) / len(rows):8.1f} msg/s, "
              f"receiver CPU {sum(r['receiver_cpu_us_per_msg'] for r in rows) / len(rows):7.1f}"
              " us/msg")
    off = [r["receiver_cpu_us_per_msg"] for r in runs if r["mode"] == "off"]
    if off:
        share = out["tracing_off_receive_added_us"] / (sum(off) / len(off))
        print(json.dumps({"tracing_off_receive_share": round(share, 5)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
