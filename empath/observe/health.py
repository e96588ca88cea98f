"""The health checks behind ``/health/live``, ``/health/ready`` and ``/health/detailed``.

- live: the master's loop turns. The master bumps its own heartbeat file on every pass
  (at least once a second); ``MasterWatch`` notices when it last changed.
- ready: the SMTP listeners are bound (the master's status file lists every configured one),
  the spool takes a new file (one is created, written and removed in tmp/) and its
  filesystem has more free space than ``health.min_free_space`` (default
  ``spool.min_free_space``), at least one receiver and one delivery worker are alive and
  booted, and the messages waiting for delivery (pending, active, deferred) do not exceed
  ``health.max_queue``.

Each check is a ``Check`` (name, ok, detail); the HTTP layer (admin.py) turns them into 200 or
503 with a small JSON body. The functions block (file system, /proc): call them from a thread.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import empath
from empath import cluster
from empath._speedups import IMPLEMENTATION
from empath.master.daemon import StatusFile
from empath.spool import Spool, pid_alive
from empath.spool.queue import state_counts

WAITING = ("pending", "active", "deferred")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


class MasterWatch:
    """When the master's heartbeat last changed (sampled by the admin's loop)."""

    def __init__(self, heartbeat: Any, timeout: float) -> None:
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.master_pid = os.getppid()  # the admin process is the master's child
        self.last_ns = -1
        self.last_change = time.monotonic()

    def sample(self) -> None:
        if self.heartbeat is None:
            return
        try:
            ns = self.heartbeat.change_ns()
        except OSError:
            return
        if ns != self.last_ns:
            self.last_ns, self.last_change = ns, time.monotonic()

    def check(self) -> Check:
        if os.getppid() != self.master_pid:
            return Check("master", False, f"the master ({self.master_pid}) is gone")
        if self.heartbeat is None:
            return Check("master", True, f"master {self.master_pid} running")
        silent = time.monotonic() - self.last_change
        if silent > self.timeout:
            return Check("master", False, f"the master's loop has not turned for {silent:.0f}s")
        return Check("master", True, f"master {self.master_pid}: loop turned {silent:.1f}s ago")


def _live(pid: int) -> bool:
    return pid > 0 and pid_alive(pid)


def ready_checks(cfg: Any, spool: Spool, status: dict[str, Any] | None,
                 counts: dict[str, int]) -> list[Check]:
    checks = []
    bound = (status or {}).get("listeners") or []
    want = len(cfg.listeners)
    if status is None:
        checks.append(Check("listeners", False, "no status from the master"))
    elif status.get("state") != "running":
        checks.append(Check("listeners", False, f"master is {status.get('state')}"))
    elif len(bound) < want:
        checks.append(Check("listeners", False, f"{len(bound)} of {want} listeners bound"))
    else:
        checks.append(Check("listeners", True, "listening on " + ", ".join(bound)))
    checks.append(_spool_check(cfg, spool))
    children = (status or {}).get("children", [])
    for kind, label in (("receiver", "receivers"), ("delivery", "delivery")):
        alive = [c for c in children
                 if c.get("kind") == kind and c.get("booted") and _live(int(c.get("pid", 0)))]
        checks.append(Check(label, bool(alive), f"{len(alive)} {kind} process(es) alive"))
    waiting = sum(counts.get(s, 0) for s in WAITING)
    limit = cfg.health.max_queue
    if limit is not None and waiting > limit:
        checks.append(Check("queue", False, f"{waiting} messages waiting (maximum {limit})"))
    else:
        checks.append(Check("queue", True, f"{waiting} messages waiting"
                            + (f" (maximum {limit})" if limit is not None else "")))
    return checks


def _spool_check(cfg: Any, spool: Spool) -> Check:
    try:
        spool.probe_writable()
    except OSError as exc:
        return Check("spool", False, f"spool not writable: {exc.strerror or exc}")
    try:
        free = spool.free_bytes()
    except OSError as exc:
        return Check("spool", False, f"spool free space unknown: {exc.strerror or exc}")
    floor = cfg.health.min_free_space
    if floor is None:
        floor = cfg.spool.min_free_space
    if free < floor:
        return Check("spool", False, f"spool free space {free} bytes, below {floor}")
    return Check("spool", True, f"writable, {free} bytes free")


def ready(cfg: Any, spool: Spool, status_file: str | None) -> tuple[bool, dict[str, Any]]:
    """(ready?, JSON body) for /health/ready."""
    status = StatusFile.read(status_file) if status_file else None
    counts, _ = state_counts(spool)
    checks = ready_checks(cfg, spool, status, counts)
    failed = [c.name for c in checks if not c.ok]
    return not failed, {"status": "fail" if failed else "ok", "failed": failed,
                        "checks": {c.name: c.as_json() for c in checks}}


def detailed(cfg: Any, spool: Spool, status_file: str | None,
             master: Check) -> dict[str, Any]:
    """/health/detailed: the checks plus per-process state, queue counts, uptime, version."""
    status = StatusFile.read(status_file) if status_file else None
    counts, oldest = state_counts(spool)
    checks = [master, *ready_checks(cfg, spool, status, counts)]
    if cluster.enabled(cfg):
        checks.append(_cluster_check(cfg))
    failed = [c.name for c in checks if not c.ok]
    started = float((status or {}).get("started_at", time.time()))
    return {
        "status": "fail" if failed else "ok",
        "failed": failed,
        "checks": {c.name: c.as_json() for c in checks},
        "version": empath.__version__,
        "speedups": IMPLEMENTATION,
        "uptime": round(time.time() - started, 3),
        "started_at": started,
        "master": {"pid": (status or {}).get("pid"),
                   "generation": (status or {}).get("generation"),
                   "state": (status or {}).get("state"),
                   "config_file": (status or {}).get("config_file"),
                   "listeners": (status or {}).get("listeners", []),
                   "admin_listeners": (status or {}).get("admin_listeners", {})},
        "processes": [_process(c) for c in (status or {}).get("children", [])],
        "queue": counts,
        "oldest": oldest,
        "frozen": spool.is_frozen(),
    }


_redis: dict[str, Any] = {}  # fleet mode: the admin process's Redis client, made once


def _cluster_check(cfg: Any) -> Check:
    """Fleet mode: Redis answers (not part of readiness: without it the nodes go on at their
    shares of the limits)."""
    from empath.cluster import view

    client = _redis.get(cfg.cluster.url)
    if client is None:
        client = _redis[cfg.cluster.url] = view.client(cfg)
    ok, detail = view.redis_check(cfg, client)
    return Check("cluster", ok, detail)


def _process(child: dict[str, Any]) -> dict[str, Any]:
    out = {k: child.get(k) for k in ("pid", "kind", "index", "count", "generation", "booted",
                                     "retiring")}
    pid = int(child.get("pid", 0))
    out["alive"] = _live(pid)
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]

        proc = psutil.Process(pid)
        with proc.oneshot():
            cpu = proc.cpu_times()
            out.update(rss=proc.memory_info().rss, cpu_seconds=round(cpu.user + cpu.system, 3),
                       uptime=round(time.time() - proc.create_time(), 3),
                       threads=proc.num_threads())
    except Exception:  # gone meanwhile, or not ours to inspect
        pass
    return out
