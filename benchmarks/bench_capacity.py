"""Connection capacity: 10,000 idle sessions, and what they cost the senders beside them.

Starts Empath with ``processes.receivers: 4`` (receive only: the spool is frozen), then:

1. 20 sessions send ``--messages`` messages (1 KiB, pipelining): the throughput without idle
   sessions;
2. ``--idle`` sessions (default 10,000) from ``--addresses`` loopback source addresses (default
   250: 127.0.1.1 onwards, 40 sessions each, under the default ``max_connections_per_ip`` of 50)
   connect, read the greeting, say EHLO and then stay idle;
3. a new client from an address of its own sends one message (it must get 250);
4. the same 20-session load again, with every idle session still open.

Prints how many idle sessions were greeted and refused, how the receivers shared them, the
memory per idle session (the receivers' RSS and USS before and after, divided by the sessions),
and both throughputs with their ratio, measured in the same run. JSON with ``--json FILE``.

    .venv/bin/python benchmarks/bench_capacity.py [--idle 10000] [--addresses 250]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import smtplib
import sys
import tempfile
import time
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from empathd import stop_empath  # noqa: E402
from loadgen import run_load  # noqa: E402

from empath.spool import Spool  # noqa: E402
from tests.support.daemon import EmpathDaemon  # noqa: E402


def source_address(n: int) -> str:
    return f"127.0.{1 + n // 250}.{1 + n % 250}"


async def idle_session(host: str, port: int, source: str,
                       out: list[asyncio.StreamWriter]) -> str:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=(source, 0)), 120)
        greeting = await asyncio.wait_for(reader.readline(), 120)
        if not greeting.startswith(b"220"):
            writer.close()
            return greeting[:3].decode(errors="replace") or "closed"
        writer.write(b"EHLO idle.bench.test\r\n")
        while True:
            line = await asyncio.wait_for(reader.readline(), 120)
            if not line or line[3:4] != b"-":
                break
        out.append(writer)
        return "greeted" if line.startswith(b"250") else "ehlo-refused"
    except (OSError, TimeoutError) as exc:
        return type(exc).__name__


def receiver_memory(pids: list[int]) -> tuple[float, float]:
    rss = uss = 0.0
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        rss += info.rss
        uss += info.uss
    return rss, uss


def connections_per_receiver(pids: list[int], port: int) -> list[int]:
    counts = []
    for pid in pids:
        conns = psutil.Process(pid).net_connections(kind="tcp")
        counts.append(sum(1 for c in conns if c.laddr and c.laddr.port == port
                          and c.status == "ESTABLISHED"))
    return counts


async def scenario(args: argparse.Namespace, daemon: EmpathDaemon) -> dict[str, Any]:
    host, port = daemon.address
    receivers = daemon.child_pids("receiver")
    before = await run_load(host, port, messages=args.messages, sessions=20, size=1024)
    rss0, uss0 = receiver_memory(receivers)

    writers: list[asyncio.StreamWriter] = []
    started = time.perf_counter()
    outcomes: dict[str, int] = {}
    batch = 500  # connect in waves so the bench itself does not overflow the accept queue
    for first in range(0, args.idle, batch):
        results = await asyncio.gather(*(
            idle_session(host, port, source_address(n % args.addresses), writers)
            for n in range(first, min(first + batch, args.idle))))
        for r in results:
            outcomes[r] = outcomes.get(r, 0) + 1
    open_seconds = time.perf_counter() - started
    await asyncio.sleep(2)  # let the receivers settle (metrics flush, sweeps)
    rss1, uss1 = receiver_memory(receivers)
    spread = connections_per_receiver(receivers, port)

    def one_message() -> str:
        with smtplib.SMTP(host, port, timeout=60,
                          source_address=("127.0.200.1", 0)) as s:
            refused = s.sendmail("new@bench.test", ["sink@example.net"],
                                 b"Subject: new client\r\n\r\nhello\r\n")
            return "250" if not refused else f"refused {refused}"

    new_client = await asyncio.to_thread(one_message)
    during = await run_load(host, port, messages=args.messages, sessions=20, size=1024)
    greeted = outcomes.get("greeted", 0)
    for w in writers:
        w.close()
    return {
        "idle_sessions": args.idle, "addresses": args.addresses, "outcomes": outcomes,
        "greeted": greeted, "seconds_to_open": round(open_seconds, 1),
        "connections_per_receiver": spread, "new_client": new_client,
        "rss_per_idle_kib": round((rss1 - rss0) / max(greeted, 1) / 1024, 2),
        "uss_per_idle_kib": round((uss1 - uss0) / max(greeted, 1) / 1024, 2),
        "receivers_rss_mib": [round(rss0 / 2**20, 1), round(rss1 / 2**20, 1)],
        "rate_without_idle": round(before.rate), "rate_with_idle": round(during.rate),
        "ratio": round(during.rate / before.rate, 2) if before.rate else None,
        "errors": [before.errors, during.errors],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--addresses", type=int, default=250)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--receivers", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.idle + 4096
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    with tempfile.TemporaryDirectory(prefix="empath-capacity-") as base:
        spool = os.path.join(base, "spool")
        tree = Spool(spool)
        tree.create_tree()
        tree.set_frozen(True)
        daemon = EmpathDaemon(base, {
            "hostname": "empath.bench.test", "shutdown_timeout": "10s",
            "log": {"level": "warning"},
            "processes": {"receivers": args.receivers, "delivery": 1},
            "spool": {"path": spool, "min_free_space": 0},
            "smtp": {"max_connections": args.idle + 1000},
        })
        daemon.start(timeout=60)
        try:
            result = asyncio.run(scenario(args, daemon))
        finally:
            stop_empath(daemon)
    print(f"idle sessions greeted: {result['greeted']:,} of {args.idle:,} "
          f"from {args.addresses} addresses ({result['outcomes']}), opened in "
          f"{result['seconds_to_open']} s; per receiver: {result['connections_per_receiver']}")
    print(f"new client's message: {result['new_client']}")
    print(f"memory per idle session: {result['rss_per_idle_kib']} KiB RSS, "
          f"{result['uss_per_idle_kib']} KiB USS (receivers {result['receivers_rss_mib'][0]} "
          f"-> {result['receivers_rss_mib'][1]} MiB RSS)")
    print(f"20 senders: {result['rate_without_idle']:,} msg/s without the idle sessions, "
          f"{result['rate_with_idle']:,} msg/s with them ({result['ratio']}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    ok = result["greeted"] == args.idle and result["new_client"] == "250"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
