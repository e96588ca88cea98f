"""Pipeline benchmark: Empath against Postfix on this machine, receive-only and end to end.

Scenarios (each a fixed message count; see benchmarks/README.md for exactly what runs):

- ceiling: the disk's durable write rate (create, write, fdatasync, rename, fsync dir) from 1
  and 20 writer threads, the limit for any MTA that answers 250 only after fsync;
- receive: Empath (delivery frozen) and Postfix (no queue manager) take mail into their queues
  while a deleter removes it again (steady state), driven by loadgen.py (pipelining) and by
  Postfix's smtp-source, at 1, 20 and 100 sessions with 1 KiB and 100 KiB messages;
- e2e: both relay everything to a sink on loopback (benchmarks/sink.py, one per MTA); reports
  accepted and delivered messages/second, accept latency (DATA's final dot → 250) and delivery
  latency (250 → arrival at the sink, matched by the X-Loadgen-Token header);
- memory: RSS, PSS and USS of all Empath processes idling with 10k and 100k deferred messages.

Empath and Postfix run each scenario in ``--pairs`` pairs (default 3) in alternating order (E P,
P E, E P): on a shared machine drift lands on both alike. The summary gives, per scenario, the
median of the pair ratios and their range, and the median p95 accept latency of each MTA.

Prints the tables, then the Empath/Postfix ratios, and writes benchmarks/results/pipeline.json.

    .venv/bin/python benchmarks/pipeline.py [--quick] [--only receive,e2e,memory,ceiling]
                                            [--no-postfix] [--pairs N] [--sizes 1,100]
                                            [--sessions 1,20,100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

import disk  # noqa: E402
import empathd  # noqa: E402
import loadgen  # noqa: E402
import postfix  # noqa: E402
import psutil  # noqa: E402

from empath.spool import Spool  # noqa: E402

PY = sys.executable
RESULTS = os.path.join(HERE, "results")
SIZES = (1024, 100 * 1024)
SESSIONS = (1, 20, 100)
SENDER, RCPT = "loadgen@example.org", "sink@example.net"


def interleaved(items: list[Any], pair: int) -> list[Any]:
    """The order of the MTAs in pair ``pair``: E P, then P E, then E P ... so that drift on a
    shared machine (other work starting or stopping) lands on both sides alike."""
    return items if pair % 2 == 0 else list(reversed(items))


def median(values: list[float]) -> float:
    data = sorted(values)
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2


def pair_ratios(rows: list[dict[str, Any]], key: str, **match: Any) -> dict[str, Any] | None:
    """Empath/Postfix ratios of ``key`` pair by pair for one scenario: the median and range."""
    ratios = []
    for pair in sorted({r.get("pair", 0) for r in rows}):
        e = _pick(rows, mta="empath", pair=pair, **match)
        p = _pick(rows, mta="postfix", pair=pair, **match)
        if e and p and e.get(key) and p.get(key) and e.get("ok", True) and p.get("ok", True):
            ratios.append(e[key] / p[key])
    if not ratios:
        return None
    return {"median": round(median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3), "pairs": len(ratios),
            "ratios": [round(x, 3) for x in ratios]}


def message_count(size: int, sessions: int, quick: bool) -> int:
    """Messages per run: enough for a few seconds at the rates seen on 2 cores."""
    base = {(1024, 1): 1500, (1024, 20): 6000, (1024, 100): 8000,
            (102400, 1): 500, (102400, 20): 1500, (102400, 100): 2000}[(size, sessions)]
    return max(sessions * 2, base // 5) if quick else base


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0}
    data = sorted(values)

    def at(p: float) -> float:
        return round(data[min(len(data) - 1, int(len(data) * p))] * 1000, 2)

    return {"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- helper processes (each started here and stopped by its own pid) ---------------------------
class Helpers:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, args: list[str], read_port: bool = False) -> tuple[subprocess.Popen[str], int]:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, text=True, cwd=ROOT)
        self.procs.append(proc)
        port = int(proc.stdout.readline()) if read_port and proc.stdout else 0
        return proc, port

    def stop(self, proc: subprocess.Popen[str]) -> str:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)
        return out or ""

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


class SinkLog:
    """Arrivals recorded by one benchmarks/sink.py process, read incrementally."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.total = 0

    def read_new(self) -> list[tuple[str, float]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            token, _, at = line.partition(b" ")
            out.append((token.decode(), float(at)))
        self.total += len(out)
        return out


# -- one run --------------------------------------------------------------------------------
def run_loadgen(port: int, messages: int, sessions: int, size: int) -> loadgen.LoadResult:
    async def go() -> loadgen.LoadResult:
        return await asyncio.wait_for(
            loadgen.run_load("127.0.0.1", port, messages=messages, sessions=sessions,
                             size=size, rcpt=RCPT, pipelining=True, timeout=60), 600)

    return asyncio.run(go())


def run_smtp_source(port: int, messages: int, sessions: int, size: int) -> dict[str, Any]:
    """Postfix's smtp-source, one connection per session reused (-d), no pipelining."""
    args = ["smtp-source", "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", SENDER, "-t", RCPT, "-M", "source.bench.test", f"127.0.0.1:{port}"]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    ok = done.returncode == 0
    return {"client": "smtp-source", "messages": messages, "ok": ok,
            "error": "" if ok else (done.stderr or done.stdout).strip()[-300:],
            "seconds": round(seconds, 3), "msg_per_s": round(messages / seconds, 1) if ok else 0.0}


def loadgen_row(result: loadgen.LoadResult) -> dict[str, Any]:
    row: dict[str, Any] = {"client": "loadgen", **result.summary()}
    row["ok"] = result.errors == 0 and result.rejected == 0
    row["error"] = result.first_error
    return row


def cpu_per_message(before: float, after: float, messages: int) -> float:
    return round((after - before) / messages * 1000, 3) if messages else 0.0


# -- the MTAs under test ------------------------------------------------------------------------
class MTA:
    """Port, process tree and queue of one MTA under test."""

    def __init__(self, name: str, port: int, master_pid: int, queued: Any) -> None:
        self.name, self.port, self.master_pid, self.queued = name, port, master_pid, queued

    def cpu(self) -> float:
        return empathd.cpu_seconds([self.master_pid])

    def wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queued() == 0:
                return True
            time.sleep(0.1)
        return False


def empath_queued(spool_path: str) -> Any:
    spool = Spool(spool_path)

    def count() -> int:
        return sum(len(spool.list_ids(s)) for s in ("incoming", "deferred")) + len(
            spool.list_active())

    return count


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.with_postfix = not args.no_postfix and postfix.available()
        self.work = os.path.join(ROOT, "var", f"bench-{os.getpid()}")
        self.helpers = Helpers()
        self.results: dict[str, Any] = {}
        self.cleanup: list[Any] = []
        # Each scenario runs in this many Empath/Postfix pairs, alternating who goes first.
        self.pairs: int = args.pairs if self.with_postfix else 1
        self.sizes = tuple(int(x) * 1024 for x in args.sizes.split(",")) if args.sizes \
            else SIZES
        self.sessions = tuple(int(x) for x in args.sessions.split(",")) if args.sessions \
            else SESSIONS

    def scenarios(self) -> list[tuple[int, int]]:
        return [(size, sessions) for size in self.sizes for sessions in self.sessions]

    def log(self, text: str) -> None:
        print(text, flush=True)

    # -- ceiling -----------------------------------------------------------------------------
    def ceiling(self) -> None:
        self.log("\n== disk ceiling: create + write + fdatasync + rename + fsync(dir) ==")
        base = os.path.join(self.work, "ceiling")
        deleter, _ = self.helpers.start([PY, os.path.join(HERE, "deleter.py"),
                                         os.path.join(base, "incoming")])
        rows = []
        try:
            for size in SIZES:
                for writers in (1, 20):
                    r = disk.durable_ceiling(base, writers, 2.0 if self.quick else 5.0, size)
                    rows.append(r)
                    self.log(f"  {size // 1024:>4} KiB  {writers:>3} writers  "
                             f"{r['per_s']:>8.0f} /s")
        finally:
            self.helpers.stop(deleter)
        self.results["ceiling"] = rows

    # -- receive-only --------------------------------------------------------------------------
    def start_receivers(self) -> list[MTA]:
        mtas = []
        base = os.path.join(self.work, "empath-receive")
        daemon = empathd.start_empath(base, frozen=True, sync=self.args.sync)
        self.cleanup.append(lambda: empathd.stop_empath(daemon))
        spool = str(daemon.spool_path)
        proc, _ = self.helpers.start([PY, os.path.join(HERE, "deleter.py"),
                                      Spool(spool).state_dir("incoming"), "--spool", spool])
        mtas.append(MTA("empath", daemon.port, daemon.master_pid, lambda: 0))
        if self.with_postfix:
            pf = postfix.PostfixInstance(os.path.join(self.work, "postfix-receive"),
                                         free_port(), None, deliver=False)
            self.cleanup.append(pf.stop)
            pf.start()
            self.helpers.start([PY, os.path.join(HERE, "deleter.py"),
                                pf.queue_state_dir("incoming"), "--complete-mode", "0o100"])
            mtas.append(MTA("postfix", pf.port, pf.master_pid() or 0, lambda: 0))
        del proc
        return mtas

    def receive(self) -> None:
        self.log("\n== receive only (into the queue; a deleter empties it) ==")
        mtas = self.start_receivers()
        for mta in mtas:  # warm-up: steady state of the filesystem, processes started
            run_loadgen(mta.port, 600 if self.quick else 2000, 20, 1024)
        rows = []
        for size, sessions in self.scenarios():
            n = message_count(size, sessions, self.quick)
            for client in ("loadgen", "smtp-source"):
                if client == "smtp-source" and not shutil.which("smtp-source"):
                    continue
                for pair in range(self.pairs):
                    for mta in interleaved(mtas, pair):
                        before = mta.cpu()
                        if client == "loadgen":
                            row = loadgen_row(run_loadgen(mta.port, n, sessions, size))
                        else:
                            row = run_smtp_source(mta.port, n, sessions, size)
                        row["cpu_ms_per_msg"] = cpu_per_message(before, mta.cpu(), n)
                        row.update(mta=mta.name, size=size, sessions=sessions, messages=n,
                                   pair=pair, loadavg_1m=round(os.getloadavg()[0], 2))
                        rows.append(row)
                        self.log(self.format_run(row))
        self.results["receive"] = rows
        self.stop_everything()

    # -- end to end ----------------------------------------------------------------------------
    def start_relays(self) -> list[tuple[MTA, SinkLog]]:
        out = []
        sink_path = os.path.join(self.work, "sink-empath.log")
        _, sink_port = self.helpers.start([PY, os.path.join(HERE, "sink.py"), "--out",
                                           sink_path], read_port=True)
        base = os.path.join(self.work, "empath-e2e")
        daemon = empathd.start_empath(base, smarthost_port=sink_port, sync=self.args.sync)
        self.cleanup.append(lambda: empathd.stop_empath(daemon))
        out.append((MTA("empath", daemon.port, daemon.master_pid,
                        empath_queued(str(daemon.spool_path))), SinkLog(sink_path)))
        if self.with_postfix:
            sink_path = os.path.join(self.work, "sink-postfix.log")
            _, sink_port = self.helpers.start([PY, os.path.join(HERE, "sink.py"), "--out",
                                               sink_path], read_port=True)
            pf = postfix.PostfixInstance(os.path.join(self.work, "postfix-e2e"), free_port(),
                                         sink_port, deliver=True)
            self.cleanup.append(pf.stop)
            pf.start()
            out.append((MTA("postfix", pf.port, pf.master_pid() or 0, pf.queued),
                        SinkLog(sink_path)))
        return out

    def e2e_run(self, mta: MTA, sink: SinkLog, client: str, n: int, sessions: int,
                size: int) -> dict[str, Any]:
        sink.read_new()
        before = mta.cpu()
        started = time.time()
        if client == "loadgen":
            result = run_loadgen(mta.port, n, sessions, size)
            row = loadgen_row(result)
            expected = result.accepted
            # (time of the 250, time the final dot was sent), by token
            accepted_at = {tok: (at, at - lat) for tok, at, lat in zip(
                result.accepted_tokens, result.accepted_at, result.latencies, strict=True)}
        else:
            row = run_smtp_source(mta.port, n, sessions, size)
            expected = n if row["ok"] else 0
            accepted_at = {}
        arrivals: list[tuple[str, float]] = []
        deadline = time.monotonic() + 120
        quiet_since = time.monotonic()
        while len(arrivals) < expected and time.monotonic() < deadline:
            new = sink.read_new()
            if new:
                arrivals += new
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 30:
                break
            time.sleep(0.05)
        mta.wait_drained(30)
        row["cpu_ms_per_msg"] = cpu_per_message(before, mta.cpu(), n)
        delivered = len(arrivals)
        last = max((t for _, t in arrivals), default=started)
        # 250 -> arrival can be negative: the sink may have the message before the load
        # generator, busy on the same two cores, has read its 250. Dot -> arrival cannot.
        lat = [t - accepted_at[tok][0] for tok, t in arrivals if tok in accepted_at]
        total = [t - accepted_at[tok][1] for tok, t in arrivals if tok in accepted_at]
        row.update(delivered=delivered,
                   delivered_per_s=round(delivered / (last - started), 1) if delivered else 0.0,
                   delivery=percentiles(lat), dot_to_sink=percentiles(total), matched=len(lat))
        if delivered < expected:
            row["ok"] = False
            row["error"] = (row.get("error") or "") + f" only {delivered}/{expected} delivered"
        return row

    def e2e(self) -> None:
        self.log("\n== end to end (relay to a sink on loopback) ==")
        pairs = self.start_relays()
        for mta, sink in pairs:
            self.e2e_run(mta, sink, "loadgen", 600 if self.quick else 2000, 20, 1024)
        rows = []
        for size, sessions in self.scenarios():
            n = message_count(size, sessions, self.quick)
            clients = ["loadgen"]
            if sessions == 20 and shutil.which("smtp-source"):
                clients.append("smtp-source")
            for client in clients:
                for pair in range(self.pairs):
                    for mta, sink in interleaved(pairs, pair):
                        row = self.e2e_run(mta, sink, client, n, sessions, size)
                        row.update(mta=mta.name, size=size, sessions=sessions, messages=n,
                                   pair=pair, loadavg_1m=round(os.getloadavg()[0], 2))
                        rows.append(row)
                        self.log(self.format_run(row))
        self.results["e2e"] = rows
        self.stop_everything()

    # -- memory --------------------------------------------------------------------------------
    def memory(self) -> None:
        self.log("\n== memory: all Empath processes, idle, with a deferred queue ==")
        rows = []
        for count in (0, 10_000) if self.quick else (0, 10_000, 100_000):
            base = os.path.join(self.work, f"memory-{count}")
            spool = os.path.join(base, "spool")
            seeded = disk.seed_deferred(spool, count) if count else 0.0
            daemon = empathd.start_empath(base, smarthost_port=9)
            try:
                # Both workers have listed deferred/ at start; wait past one more scan
                # (queue_scan_interval 10 s) and until the processes are idle.
                time.sleep(12)
                empathd.wait_idle(daemon.master_pid, 30)
                mem = empathd.memory(daemon.master_pid)
            finally:
                empathd.stop_empath(daemon)
            shutil.rmtree(base, ignore_errors=True)
            row = {"deferred": count, "seed_seconds": round(seeded, 1), **mem}
            rows.append(row)
            self.log(f"  {count:>7} deferred  RSS {mem['rss_mib']:7.1f} MiB  "
                     f"PSS {mem['pss_mib']:7.1f} MiB  USS {mem['uss_mib']:7.1f} MiB  "
                     f"({len(mem['processes'])} processes)")
        self.results["memory"] = rows

    # -- plumbing ------------------------------------------------------------------------------
    def stop_everything(self) -> None:
        for fn in reversed(self.cleanup):
            with contextlib.suppress(Exception):
                fn()
        self.cleanup.clear()
        self.helpers.stop_all()

    def format_run(self, r: dict[str, Any]) -> str:
        text = (f"  {r['mta']:<8} {r['client']:<11} {r['size'] // 1024:>4} KiB "
                f"{r['sessions']:>4} sess  {r['msg_per_s']:>8.1f} msg/s")
        if "p50_ms" in r:
            text += f"  accept p50 {r['p50_ms']:6.2f} p95 {r['p95_ms']:6.2f} p99 {r['p99_ms']:7.2f}"
        if "delivered" in r and not r["matched"]:
            text += f"  delivered {r['delivered_per_s']:8.1f}/s"
        elif "delivered" in r:
            d = r["delivery"]
            t = r["dot_to_sink"]
            text += (f"  delivered {r['delivered_per_s']:8.1f}/s  250->sink p50 {d['p50_ms']:6.1f}"
                     f" p95 {d['p95_ms']:6.1f} p99 {d['p99_ms']:6.1f}  dot->sink p50"
                     f" {t['p50_ms']:6.1f} p99 {t['p99_ms']:6.1f}")
        text += f"  cpu {r['cpu_ms_per_msg']:.2f} ms/msg"
        if not r.get("ok", True):
            text += f"  !! {r.get('error', '')}"
        return text

    def wait_quiet(self, limit: float, minutes: float) -> None:
        """Wait (at most ``minutes``) until the 1-minute load average is under ``limit``."""
        deadline = time.monotonic() + minutes * 60
        while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
            self.log(f"load average {os.getloadavg()[0]:.2f} >= {limit}: waiting")
            time.sleep(20)

    def run(self) -> int:
        if self.args.wait_quiet:
            self.wait_quiet(self.args.wait_quiet, self.args.wait_minutes)
        os.makedirs(self.work, exist_ok=True)
        only = set((self.args.only or "ceiling,receive,e2e,memory").split(","))
        self.results["machine"] = machine(self.with_postfix)
        self.results["empath_spool_sync"] = self.args.sync
        self.results["quick"] = self.quick
        self.results["pairs"] = self.pairs
        started = time.monotonic()
        try:
            if "ceiling" in only:
                self.ceiling()
            if "receive" in only:
                self.receive()
            if "e2e" in only:
                self.e2e()
            if "memory" in only:
                self.memory()
        finally:
            self.stop_everything()
            shutil.rmtree(self.work, ignore_errors=True)
        self.results["seconds"] = round(time.monotonic() - started, 1)
        self.results["ratios"] = summary_ratios(self.results)
        self.results["machine"]["loadavg_after"] = os.getloadavg()
        os.makedirs(RESULTS, exist_ok=True)
        out = os.path.join(RESULTS, "pipeline.json")
        with open(out, "w") as fh:
            json.dump(self.results, fh, indent=2)
            fh.write("\n")
        print_summary(self.results)
        self.log(f"\nwritten to {os.path.relpath(out, ROOT)} ({self.results['seconds']} s)")
        failed = [r for k in ("receive", "e2e") for r in self.results.get(k, [])
                  if not r.get("ok", True)]
        return 1 if failed else 0


# -- machine and summary ------------------------------------------------------------------------
def machine(with_postfix: bool) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    var = os.path.join(ROOT, "var")
    fs = ""
    best = ""
    with contextlib.suppress(OSError), open("/proc/mounts") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 4 and var.startswith(parts[1]) and len(parts[1]) > len(best):
                best, fs = parts[1], f"{parts[2]} ({parts[3]}) on {parts[1]}"
    return {"nproc": os.cpu_count(), "cpu": model,
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "filesystem": fs, "kernel": platform.release(),
            "python": platform.python_version(),
            "postfix": postfix.version() if with_postfix else "",
            "loadavg_before": os.getloadavg()}


def _pick(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}x" if a and b else "    -"


def print_summary(res: dict[str, Any]) -> None:
    print("\n================ summary ================")
    m = res["machine"]
    print(f"{m['nproc']} x {m['cpu']}, {m['ram_gib']} GiB, {m['filesystem']}, "
          f"Postfix {m['postfix'] or 'absent'}, load {m['loadavg_before'][0]:.2f}, "
          f"Empath spool.sync: {res.get('empath_spool_sync', 'file')}")
    for c in res.get("ceiling", []):
        print(f"disk ceiling {c['size'] // 1024:>3} KiB, {c['writers']:>2} writers: "
              f"{c['per_s']:8.0f} /s")
    speed = os.path.join(RESULTS, "speedups.json")
    with contextlib.suppress(OSError, ValueError):
        with open(speed) as fh:
            cases = json.load(fh)["cases"]
        print("hot paths (Cython / Python): " + ", ".join(
            f"{c['case']} {c['ratio']}x" for c in cases))
    for r in res.get("ratios", []):
        rng = f"{r['min']:.2f}-{r['max']:.2f}"
        p95 = ""
        if r.get("p95_ms"):
            p95 = (f"  accept p95 ms (median of runs) E {r['p95_ms']['empath']:.1f}"
                   f" P {r['p95_ms']['postfix']:.1f}")
        print(f"{r['kind']:<8} {r['size'] // 1024:>3} KiB {r['sessions']:>4} sess "
              f"{r['client']:<11} E {r['empath']:>7.0f}  P {r['postfix']:>7.0f} msg/s  "
              f"E/P {r['median']:.2f}x ({rng}, {r['pairs']} pairs){p95}")
    for r in res.get("memory", []):
        print(f"memory: {r['deferred']:>7} deferred: RSS {r['rss_mib']:.0f} MiB, "
              f"PSS {r.get('pss_mib', 0):.0f} MiB, USS {r['uss_mib']:.0f} MiB over "
              f"{len(r['processes'])} processes")


def summary_ratios(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per scenario and client: median Empath and Postfix rates, the median pair ratio with
    its range, and the median p95 accept latency of each (loadgen runs)."""
    out = []
    for kind, key in (("receive", "msg_per_s"), ("e2e", "delivered_per_s")):
        rows = res.get(kind, [])
        seen = []
        for r in rows:
            k = (r["size"], r["sessions"], r["client"])
            if k not in seen:
                seen.append(k)
        for size, sessions, client in seen:
            ratios = pair_ratios(rows, key, size=size, sessions=sessions, client=client)
            if ratios is None:
                continue
            entry: dict[str, Any] = {"kind": kind, "size": size, "sessions": sessions,
                                     "client": client, **ratios}
            for mta in ("empath", "postfix"):
                runs = [r for r in rows if r["mta"] == mta and r["size"] == size
                        and r["sessions"] == sessions and r["client"] == client]
                entry[mta] = median([r[key] for r in runs])
                if all("p95_ms" in r for r in runs):
                    entry.setdefault("p95_ms", {})[mta] = median([r["p95_ms"] for r in runs])
            out.append(entry)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages; memory at 10k only")
    ap.add_argument("--only", help="comma-separated: ceiling,receive,e2e,memory")
    ap.add_argument("--no-postfix", action="store_true", help="Empath only")
    ap.add_argument("--pairs", type=int, default=3,
                    help="Empath/Postfix pairs per scenario, alternating E P / P E (default 3)")
    ap.add_argument("--sizes", help="message sizes in KiB, comma-separated (default 1,100)")
    ap.add_argument("--sessions", help="sessions, comma-separated (default 1,20,100)")
    ap.add_argument("--sync", choices=("file", "filesystem"), default="file",
                    help="Empath's spool.sync (default: file, the configuration default)")
    ap.add_argument("--wait-quiet", type=float, metavar="LOAD",
                    help="first wait until the 1-minute load average is below LOAD")
    ap.add_argument("--wait-minutes", type=float, default=30,
                    help="longest wait for --wait-quiet (default 30)")
    args = ap.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
