"""Empath as the benchmark runs it: a real ``empath run`` master with its own configuration.

Built on the integration tests' launcher (``tests/support/daemon.py``: writes the YAML, starts
the master in its own process group, waits until every child runs its event loop, stops it by
pid). The benchmark configuration differs from the shipped one only where a benchmark needs it:

- one listener on 127.0.0.1, an ephemeral port read back from the status file;
- ``processes: {receivers: 2, delivery: 2}`` (the defaults, one receiver per core here);
- ``log.level: warning`` (nothing is logged per message);
- ``spool.min_free_space: 0`` and ``smtp.max_connections_per_ip: 1000``: every session of the
  load generator comes from 127.0.0.1, and the default 50 per receiver process would refuse
  part of the 100-session runs when the kernel hands one receiver more than half of them;
- end to end: ``delivery.smarthost`` is the sink, with STARTTLS off;
- receive only: the spool is frozen (``control/freeze``) before start, so delivery workers
  claim nothing and ``incoming/`` is emptied by the benchmark's deleter instead.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from empath.spool import Spool  # noqa: E402
from tests.support.daemon import EmpathDaemon  # noqa: E402


def bench_overrides(spool: str, smarthost_port: int | None,
                    sync: str = "file") -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "hostname": "empath.bench.test",
        "shutdown_timeout": "10s",
        "log": {"level": "warning"},
        "processes": {"receivers": 2, "delivery": 2},
        "spool": {"path": spool, "min_free_space": 0, "sync": sync},
        "smtp": {"max_connections_per_ip": 1000},
    }
    if smarthost_port is not None:
        overrides["delivery"] = {"smarthost": f"127.0.0.1:{smarthost_port}",
                                 "tls": {"default_policy": "disabled"}}
    return overrides


def start_empath(base: str, *, smarthost_port: int | None = None,
                 frozen: bool = False, spool: str | None = None,
                 timeout: float = 60.0, sync: str = "file") -> EmpathDaemon:
    """Start a daemon whose files live under ``base``; ``spool`` defaults to base/spool."""
    spool = spool or os.path.join(base, "spool")
    if frozen:
        tree = Spool(spool)
        tree.create_tree()
        tree.set_frozen(True)
    daemon = EmpathDaemon(base, bench_overrides(spool, smarthost_port, sync))
    try:
        daemon.start(timeout=timeout)
    except BaseException:
        daemon.kill()
        raise
    return daemon


def stop_empath(daemon: EmpathDaemon) -> None:
    try:
        daemon.stop(timeout=30)
    except Exception:
        daemon.kill()


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        master = psutil.Process(pid)
        return [master, *master.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def memory(pid: int) -> dict[str, Any]:
    """RSS, PSS (shared pages divided among the processes mapping them: the sum is what the
    tree costs the machine) and USS (memory only this process maps) of a master and all its
    children, in MiB."""
    rows = []
    for proc in process_tree(pid):
        try:
            info = proc.memory_full_info()
            rows.append({"pid": proc.pid, "name": proc.name(), "rss_mib": info.rss / 2**20,
                         "pss_mib": getattr(info, "pss", 0) / 2**20,
                         "uss_mib": info.uss / 2**20})
        except psutil.NoSuchProcess:
            continue
    return {"processes": rows, "rss_mib": round(sum(r["rss_mib"] for r in rows), 1),
            "pss_mib": round(sum(r["pss_mib"] for r in rows), 1),
            "uss_mib": round(sum(r["uss_mib"] for r in rows), 1)}


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of the process trees under ``pids``, including children they have reaped.

    Counting reaped children keeps the difference of two readings right when processes come
    and go in between (Postfix's smtpd and cleanup processes exit after an idle time): a
    process's time moves from the living sum to its parent's ``children_*`` when it is reaped.
    """
    total = 0.0
    for pid in pids:
        for proc in process_tree(pid):
            try:
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                continue
    return total


def wait_idle(pid: int, limit: float) -> None:
    """Until the process tree under ``pid`` uses under 20 ms of CPU in a second (or ``limit``
    seconds pass): start-up work done before a measurement."""
    deadline = time.monotonic() + limit
    last = cpu_seconds([pid])
    while time.monotonic() < deadline:
        time.sleep(1)
        now = cpu_seconds([pid])
        if now - last < 0.02:
            return
        last = now
