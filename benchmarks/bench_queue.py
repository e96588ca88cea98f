"""A large deferred queue: memory, time to the first delivery after a start, and queue stats.

For each count N (default 0 and 100,000; ``--counts 0,100000,1000000``), a spool is seeded with
N deferred messages exactly as the memory benchmark seeds them (``disk.seed_deferred``: 1 KiB,
one failed attempt, due in a day), then:

1. the daemon is started (benchmark configuration of ``empathd.py``, log level info, smarthost
   a local sink) and, as soon as its listener answers, one new message is sent: the report
   gives the seconds from launching ``empath run`` to its 250 and to its arrival at the sink;
2. ``empathctl queue stats --json`` is timed while the daemon runs and its workers are still
   listing ``deferred/`` (and ``--full`` when N is at most ``--full-max``), and again once they
   are idle: each time first with no ``control/counts`` (so it lists every state directory),
   then again (reusing the counts of the directories that did not change:
   empath/spool/counts.py); each with its wall time and the CPU time (user + system) it took;
3. once both delivery workers have logged the end of their listing of ``deferred/`` (with the
   seconds of work it took) and the processes are idle: RSS, PSS and USS of every process;
4. the cost of listing ``deferred/`` from this process: names only, and names with a stat each.

Seeded spools are kept under ``--cache`` (default /tmp/empath-bench-queue) and reused by later
runs (a million files take minutes to write); a run only adds and delivers its one message.

    .venv/bin/python benchmarks/bench_queue.py [--counts 0,100000] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import smtplib
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import disk  # noqa: E402
import empathd  # noqa: E402

from tests.support.daemon import EmpathDaemon  # noqa: E402
from tests.support.sink import SinkServer  # noqa: E402

EMPATHCTL = os.path.join(empathd.ROOT, ".venv", "bin", "empathctl")
LISTED = re.compile(r"deferred/ listed: (\d+) message\(s\) in ([0-9.]+)s of work")


def seeded_spool(cache: str, count: int) -> str:
    """A spool with ``count`` deferred messages (seeded once, then reused)."""
    spool = os.path.join(cache, f"deferred-{count}", "spool")
    marker = os.path.join(cache, f"deferred-{count}", "seeded")
    if not os.path.exists(marker):
        seconds = disk.seed_deferred(spool, count) if count else 0.0
        if not count:
            os.makedirs(spool, exist_ok=True)
        with open(marker, "w") as fh:
            fh.write(f"{seconds:.1f}\n")
    return spool


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send_when_listening(port: int, started: float, limit: float) -> float:
    """Send one message as soon as the listener answers; seconds from ``started`` to its 250."""
    deadline = time.monotonic() + limit
    while True:
        try:
            client = smtplib.SMTP("127.0.0.1", port, timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon never listened") from None
            time.sleep(0.01)
    with client:
        client.sendmail("bench@client.test", ["first@remote.test"],
                        b"Subject: first after start\r\n\r\nHello.\r\n")
    return time.monotonic() - started


def timed(args: list[str]) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, check=True)
    return time.monotonic() - started, json.loads(r.stdout)


def timed_stats(spool: str, *extra: str, forget: bool = False) -> dict[str, Any]:
    """One ``empathctl queue stats --json`` run: wall and CPU seconds, and its document.
    ``forget``: remove control/counts first, so that every state directory is listed."""
    if forget:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(spool, "control", "counts"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, doc = timed([EMPATHCTL, "queue", "stats", "--json", *extra, "--spool", spool])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "doc": doc}


def wait_listed(daemon: EmpathDaemon, workers: int, count: int, limit: float,
                log_from: int) -> list[float]:
    """Seconds of work of each worker's first complete listing of ``count`` messages (in the
    log from offset ``log_from`` on: this run's part)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        found = [float(m.group(2)) for m in LISTED.finditer(log_since(daemon, log_from))
                 if int(m.group(1)) >= count]
        if len(found) >= workers:
            return found[:workers]
        time.sleep(0.2)
    return []


def log_size(daemon: EmpathDaemon) -> int:
    try:
        return os.path.getsize(daemon.log_path)
    except FileNotFoundError:
        return 0


def log_since(daemon: EmpathDaemon, offset: int) -> str:
    try:
        with open(daemon.log_path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def listing_cost(spool: str) -> dict[str, float]:
    path = os.path.join(spool, "deferred")
    started = time.monotonic()
    n = len(os.listdir(path))
    names = time.monotonic() - started
    started = time.monotonic()
    with os.scandir(path) as it:
        for entry in it:
            entry.stat()
    stats = time.monotonic() - started
    return {"files": n, "names_s": round(names, 3), "names_and_stat_s": round(stats, 3)}


def run_one(count: int, cache: str, full_max: int) -> dict[str, Any]:
    spool = seeded_spool(cache, count)
    base = os.path.join(cache, f"deferred-{count}")
    port = free_port()
    with SinkServer() as sink:
        overrides = empathd.bench_overrides(spool, sink.port)
        overrides["log"] = {"level": "info"}
        overrides["listeners"] = [{"address": f"127.0.0.1:{port}"}]
        daemon = EmpathDaemon(os.path.join(base, "daemon"), overrides)
        log_from = log_size(daemon)
        started = time.monotonic()
        daemon.start(wait=False)
        try:
            accepted = send_when_listening(port, started, 60)
            sink.wait_for_messages(1, timeout=120)
            arrivals = [t for t, what, _ in sink.journal if what == "stored"]
            delivered = arrivals[0] - started if arrivals else None
            daemon.wait_settled(60)
            listing = timed_stats(spool, forget=True)
            listing_reused = timed_stats(spool)
            full_s = None
            if count <= full_max:
                full_s = timed_stats(spool, "--full")["wall_s"]
            workers = daemon.child_pids("delivery")
            # A listing of one slice is logged at debug level only: nothing to wait for.
            listed = wait_listed(daemon, len(workers), count, 600, log_from) if count > 2000 else []
            empathd.wait_idle(daemon.master_pid, 60)
            mem = empathd.memory(daemon.master_pid)
            idle = timed_stats(spool, forget=True)
            reused = timed_stats(spool)
            kinds = {c["pid"]: c["kind"] for c in daemon.children()}
            for row in mem["processes"]:
                row["kind"] = kinds.get(row["pid"], "master")
        finally:
            empathd.stop_empath(daemon)
    return {"deferred": count, "accepted_s": round(accepted, 3),
            "delivered_s": None if delivered is None else round(delivered, 3),
            "stats_s": listing["wall_s"], "stats_cpu_s": listing["cpu_s"],
            "stats_listing_reused_s": listing_reused["wall_s"],
            "stats_listing_reused_cpu_s": listing_reused["cpu_s"],
            "stats_idle_s": idle["wall_s"], "stats_idle_cpu_s": idle["cpu_s"],
            "stats_reused_s": reused["wall_s"], "stats_reused_cpu_s": reused["cpu_s"],
            "stats_detail": listing["doc"]["detail"],
            "stats_deferred": [d["doc"]["states"]["deferred"]["messages"]
                               for d in (listing, listing_reused, idle, reused)],
            "stats_full_s": None if full_s is None else round(full_s, 3),
            "worker_listing_s": listed, "listing": listing_cost(spool), **mem}


def report(rows: list[dict[str, Any]]) -> None:
    base = rows[0] if rows and rows[0]["deferred"] == 0 else None
    for r in rows:
        print(f"\n{r['deferred']:,} deferred: 250 at {r['accepted_s']:.2f}s, delivered at "
              f"{r['delivered_s']}s after launch; queue stats while the workers list "
              f"{r['stats_s']:.2f}s ({r['stats_cpu_s']:.2f}s CPU) listing and "
              f"{r['stats_listing_reused_s']:.2f}s ({r['stats_listing_reused_cpu_s']:.2f}s CPU) "
              "reusing control/counts, idle "
              f"{r['stats_idle_s']:.2f}s ({r['stats_idle_cpu_s']:.2f}s CPU) listing and "
              f"{r['stats_reused_s']:.2f}s ({r['stats_reused_cpu_s']:.2f}s CPU) reusing "
              f"control/counts ({r['stats_detail']}, deferred counted: "
              f"{', '.join(f'{n:,}' for n in r['stats_deferred'])})"
              + (f", --full {r['stats_full_s']:.2f}s" if r["stats_full_s"] is not None else ""))
        print(f"  workers' listing of deferred/: {r['worker_listing_s']} s of work; from here: "
              f"names {r['listing']['names_s']}s, names+stat {r['listing']['names_and_stat_s']}s")
        print(f"  all processes: RSS {r['rss_mib']:.1f} MiB, PSS {r['pss_mib']:.1f} MiB, "
              f"USS {r['uss_mib']:.1f} MiB")
        for p in sorted(r["processes"], key=lambda p: (p["kind"], p["pid"])):
            print(f"    {p['kind']:<9} RSS {p['rss_mib']:6.1f}  PSS {p['pss_mib']:6.1f}  "
                  f"USS {p['uss_mib']:6.1f} MiB")
        if base is not None and r is not base and r["deferred"]:
            def worker_uss(row: dict[str, Any]) -> float:
                return sum(p["uss_mib"] for p in row["processes"] if p["kind"] == "delivery")
            extra = (worker_uss(r) - worker_uss(base)) * 2**20
            print(f"  more than an empty queue: RSS {r['rss_mib'] - base['rss_mib']:+.1f} MiB, "
                  f"PSS {r['pss_mib'] - base['pss_mib']:+.1f} MiB; delivery workers' USS "
                  f"{extra / 2**20:+.1f} MiB = {extra / r['deferred'] / 2:.0f} bytes per "
                  "deferred message per worker")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="0,100000",
                    help="deferred counts to measure, comma-separated (default 0,100000)")
    ap.add_argument("--cache", default="/tmp/empath-bench-queue",
                    help="where seeded spools are kept between runs")
    ap.add_argument("--full-max", type=int, default=100_000,
                    help="time `queue stats --full` up to this many messages")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    rows = [run_one(int(c), args.cache, args.full_max) for c in args.counts.split(",")]
    report(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
