"""What the master does to the spool for children that are gone, and how it reports failures
that recur.

A delivery worker's claims (``active/<pid>/``) go back to ``incoming/`` once it is reaped or
found dead (and the workers are woken for them), and half-written ``tmp/`` files of writers
that are gone are removed: the spool functions do the work (``empath/spool/layout.py``), this
module decides when. What it keeps true: a file system error (EROFS, ENOSPC, EIO...) never
stops the master; the claims stay where they are and the sweep runs again within
``FAULT_RETRY`` seconds, with at most one log line a minute per kind of failure
(``LogThrottle``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container
from typing import Any

from empath.spool import Spool, pid_alive
from empath.spool.wake import wake_workers

log = logging.getLogger("empath.master")

ORPHAN_SWEEP_INTERVAL = 10.0
FAULT_RETRY = 2.0  # after a spool operation failed (EROFS, ENOSPC, EIO...), try again this soon
FAULT_LOG_INTERVAL = 60.0  # most one log line a minute per kind of failing operation


class LogThrottle:
    """At most one log line per ``interval`` for each kind of recurring failure; the next
    line says how many were held back. A full or read-only disk must not flood the log."""

    def __init__(self, interval: float = FAULT_LOG_INTERVAL) -> None:
        self.interval = interval
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def error(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -self.interval) < self.interval:
            self.held[kind] = self.held.get(kind, 0) + 1
            return
        held = self.held.pop(kind, 0)
        self.last[kind] = now
        log.error(message + (f" ({held} more like it not logged)" if held else ""), *args)


class SpoolKeeper:
    """Requeues the claims and sweeps the temporary files of children that are gone."""

    def __init__(self, spool: Spool, faults: LogThrottle) -> None:
        self.spool = spool
        self.faults = faults
        self.next_sweep = 0.0

    def child_gone(self, pid: int, delivery: bool) -> None:
        """A reaped child: its claims (a delivery worker's) and its tmp/ files."""
        if delivery:
            # Its claims in active/<pid>/ go back to incoming/ (a clean exit leaves none).
            self.requeue_claims(pid)
            try:  # and a killed worker's wake socket goes
                self.spool.remove_wake_sockets(pid)
            except OSError as exc:
                log.debug("cannot remove the wake socket of worker %d: %s", pid, exc)
        # Its half-written tmp/ files: the pid is reaped, so nothing can rename them now.
        self.sweep_tmp(lambda p: p == pid)

    def sweep_orphans(self, children: Container[int]) -> None:
        """Every ORPHAN_SWEEP_INTERVAL: requeue claims of delivery workers that died outside
        our watch (children of a previous master that were still draining when this one
        started) and remove tmp/ files of writers that died so (a killed empath-sendmail);
        ``children`` are the pids of the master's own, alive until reaped."""
        now = time.monotonic()
        if now < self.next_sweep:
            return
        self.next_sweep = now + ORPHAN_SWEEP_INTERVAL
        try:
            slots = self.spool.active_slots()
        except OSError as exc:
            slots = []
            self._fault("list active/", exc)
        for slot in slots:
            if slot not in children:  # claims whose owner's lock is free
                self.requeue_claims(slot)
        self.sweep_tmp(lambda pid: pid not in children and not pid_alive(pid))

    def requeue_claims(self, slot: int) -> None:
        """Requeue a gone worker's claims and wake the workers for them; on a file system
        error, log (rate-limited) and let the sweep try again soon: the claims stay where
        they are meanwhile."""
        try:
            moved = self.spool.recover_unowned(slot)
        except OSError as exc:
            self._fault(f"requeue the claims of delivery worker {slot}", exc)
            return
        if moved:
            wake_workers(self.spool)  # every worker: the claims are of any share

    def sweep_tmp(self, dead: Callable[[int], bool]) -> None:
        try:
            self.spool.sweep_tmp(dead)
        except OSError as exc:
            self._fault("sweep tmp/", exc)

    def _fault(self, what: str, exc: OSError) -> None:
        self.faults.error(what, "cannot %s: %s; retrying every %gs", what,
                          exc.strerror or exc, FAULT_RETRY)
        self.next_sweep = min(self.next_sweep, time.monotonic() + FAULT_RETRY)
