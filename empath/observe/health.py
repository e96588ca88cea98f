"""The health checks behind ``/health/live``, ``/health/ready`` and ``/health/detailed``.

- live: the master's loop turns. The master bumps its own heartbeat file on every pass
  (at least once a second); ``MasterWatch`` notices when it last changed.
- ready: the SMTP listeners are bound (the master's status file lists every configured one),
  the spool takes a new file (one is created, written and removed in tmp/) and its
  filesystem has more free space than ``health.min_free_space`` (default
  ``spool.min_free_space``), at least one receiver and one delivery worker are alive and
  booted, and the messages waiting for delivery (pending, active, deferred) do not exceed
  ``health.max_queue``; with ``health.min_delivery_success_rate`` set, the share of delivery
  attempts that delivered over ``health.delivery_window`` is at least that (``Deliveries``,
  from the workers' counters, sampled by the admin's loop); with ``health.dns_probe_name``
  set, the delivery resolver answered the last probe (``DNSProbe``, run by the admin's loop
  every ``health.dns_probe_interval``).

Each check is a ``Check`` (name, ok, detail); the HTTP layer (admin.py) turns them into 200 or
503 with a small JSON body. The functions block (file system, /proc): call them from a thread.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import empath
from empath import cluster
from empath._speedups import IMPLEMENTATION
from empath.config.typed import Config
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


class Deliveries:
    """Delivery attempts over a sliding window, from samples of the cumulative counters
    (delivered, and everything else: deferred, failed, expired)."""

    def __init__(self, window: float, min_attempts: int, threshold: float | None) -> None:
        self.window = window
        self.min_attempts = min_attempts
        self.threshold = threshold
        self.samples: deque[tuple[float, float, float]] = deque()

    def add(self, now: float, delivered: float, other: float) -> None:
        if self.samples and (delivered < self.samples[-1][1] or other < self.samples[-1][2]):
            self.samples.clear()  # the counters started again (a new master)
        self.samples.append((now, delivered, other))
        # Keep one sample at or before the window's start: the base of the differences.
        while len(self.samples) >= 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()

    def figures(self) -> tuple[float, float]:
        """(delivered, not delivered) within the window."""
        if len(self.samples) < 2:
            return 0.0, 0.0
        first, last = self.samples[0], self.samples[-1]
        return last[1] - first[1], last[2] - first[2]

    def check(self) -> Check:
        delivered, other = self.figures()
        total = delivered + other
        window = f"{total:.0f} attempts in the last {self.window:g}s"
        if total < self.min_attempts:
            return Check("delivery_rate", True, f"{window}, too few to judge")
        rate = delivered / total
        text = f"{rate:.1%} delivered ({delivered:.0f} of {window})"
        if self.threshold is not None and rate < self.threshold:
            return Check("delivery_rate", False, f"{text}, below {self.threshold:.1%}")
        return Check("delivery_rate", True, text)


def attempt_counts(path: str) -> tuple[float, float]:
    """(delivered, other) summed over the per-process counter files in ``path``."""
    from prometheus_client.multiprocess import MultiProcessCollector

    delivered = other = 0.0
    for metric in MultiProcessCollector(None, path).collect():  # type: ignore[no-untyped-call]
        if metric.name != "empath_delivery_attempts":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                if sample.labels.get("result") == "delivered":
                    delivered += sample.value
                else:
                    other += sample.value
    return delivered, other


class DNSProbe:
    """Whether the delivery resolver answers: a lookup of ``name`` (type A) now and then."""

    def __init__(self, cfg: Config) -> None:
        from empath.delivery.dns import build_resolver

        assert cfg.health.dns_probe_name is not None  # made only when a probe is configured
        self.name = cfg.health.dns_probe_name
        self.timeout = float(cfg.health.dns_probe_timeout)
        self.resolver = build_resolver(cfg.delivery.dns)
        self.resolver.timeout = self.resolver.lifetime = self.timeout
        self.last = Check("dns", True, "no probe yet")

    async def probe(self) -> Check:
        import dns.exception
        import dns.resolver

        started = time.monotonic()
        try:
            await self.resolver.resolve(self.name, "A", search=False, lifetime=self.timeout,
                                        raise_on_no_answer=False)
            verdict = None
        except dns.resolver.NXDOMAIN:
            verdict = None  # an answer all the same
        except dns.exception.Timeout:
            verdict = f"no answer within {self.timeout:g}s"
        except dns.resolver.NoNameservers:
            verdict = "the resolver failed (SERVFAIL or refused)"
        except (dns.exception.DNSException, OSError) as exc:
            verdict = str(exc) or type(exc).__name__
        took = time.monotonic() - started
        if verdict is None:
            self.last = Check("dns", True, f"resolver answered {self.name} in "
                              f"{took * 1000:.0f} ms")
        else:
            self.last = Check("dns", False, f"resolver probe for {self.name}: {verdict}")
        return self.last

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end the probing
                self.last = Check("dns", False, f"probe failed: {exc!r}")
            await asyncio.sleep(interval)


def _live(pid: int) -> bool:
    return pid > 0 and pid_alive(pid)


def ready_checks(cfg: Config, spool: Spool, status: dict[str, Any] | None,
                 counts: dict[str, int], extra: tuple[Check, ...] = ()) -> list[Check]:
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
    checks.extend(extra)
    return checks


def _spool_check(cfg: Config, spool: Spool) -> Check:
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


def ready(cfg: Config, spool: Spool, status_file: str | None,
          extra: tuple[Check, ...] = ()) -> tuple[bool, dict[str, Any]]:
    """(ready?, JSON body) for /health/ready; ``extra``: the delivery and DNS checks."""
    status = StatusFile.read(status_file) if status_file else None
    counts, _ = state_counts(spool)
    checks = ready_checks(cfg, spool, status, counts, extra)
    failed = [c.name for c in checks if not c.ok]
    return not failed, {"status": "fail" if failed else "ok", "failed": failed,
                        "checks": {c.name: c.as_json() for c in checks}}


def detailed(cfg: Config, spool: Spool, status_file: str | None,
             master: Check, extra: tuple[Check, ...] = (),
             figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """/health/detailed: the checks plus per-process state, queue counts, uptime, version,
    and the figures behind the delivery check (``figures``)."""
    status = StatusFile.read(status_file) if status_file else None
    counts, oldest = state_counts(spool)
    checks = [master, *ready_checks(cfg, spool, status, counts, extra)]
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
                   "admin_listeners": (status or {}).get("admin_listeners", {}),
                   "last_reload": (status or {}).get("last_reload")},
        "processes": [_process(c) for c in (status or {}).get("children", [])],
        "queue": counts,
        "oldest": oldest,
        "frozen": spool.is_frozen(),
        **(figures or {}),
    }


_redis: dict[str, Any] = {}  # fleet mode: the admin process's Redis client, made once


def _cluster_check(cfg: Config) -> Check:
    """Fleet mode: Redis answers (not part of readiness: without it the nodes go on at their
    shares of the limits)."""
    from empath.cluster import view

    url = cfg.cluster.url
    assert url is not None  # checked only in fleet mode
    client = _redis.get(url)
    if client is None:
        client = _redis[url] = view.client(cfg)
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
