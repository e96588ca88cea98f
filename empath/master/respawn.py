"""The master's record of each child, and when a dead one may be started again.

``Child`` is what the arbiter knows of a forked child (pid, role, slot, generation, heartbeat,
stop deadline). ``RespawnPolicy`` decides, per slot (kind, index), when its next child may
start: at once after a stable run; after an exponentially growing delay while it keeps dying
young, so a crash loop cannot spin the CPU (Postfix's master throttles the same way); and never
again (the master halts) once children of one kind fail to boot several times in a row.

Pure bookkeeping: nothing here forks, signals or logs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from empath.master.child import Heartbeat

KINDS = ("receiver", "delivery", "admin")
BOOT_FAILURES_TO_HALT = 3  # consecutive exit-3 children of one kind before the master halts
STABLE_AFTER = 10.0  # a child that ran this long resets its slot's backoff
FIRST_DELAY = 0.25  # after the second quick death; doubles with each further one
MAX_DELAY = 30.0

Slot = tuple[str, int]


@dataclass
class Child:
    pid: int
    kind: str
    index: int
    count: int
    generation: int
    heartbeat: Heartbeat
    started: float = field(default_factory=time.monotonic)
    last_change_ns: int = 0  # the heartbeat file's ctime when last seen to change
    last_change: float = field(default_factory=time.monotonic)
    booted: bool = False  # has beaten at least once: its role is imported, its loop runs
    retiring: bool = False  # sent SIGTERM (or SIGQUIT) on purpose
    kill_at: float | None = None
    killed: bool = False

    @property
    def name(self) -> str:
        return f"{self.kind} {self.index}/{self.count} (pid {self.pid})"

    @property
    def slot(self) -> Slot:
        return (self.kind, self.index)


class RespawnPolicy:
    def __init__(self) -> None:
        self.failures: dict[Slot, int] = {}  # quick deaths in a row, per slot
        self.not_before: dict[Slot, float] = {}  # monotonic time a slot may start again
        self.boot_failures = dict.fromkeys(KINDS, 0)

    def may_start(self, slot: Slot, now: float) -> bool:
        if now < self.not_before.get(slot, 0.0):
            return False
        self.not_before.pop(slot, None)
        return True

    def next_start(self) -> float | None:
        """The earliest time a delayed slot may start, if any is waiting."""
        return min(self.not_before.values(), default=None)

    def delay(self, slot: Slot, seconds: float) -> None:
        self.not_before[slot] = time.monotonic() + seconds

    def booted(self, kind: str) -> None:
        self.boot_failures[kind] = 0

    def boot_failed(self, kind: str) -> bool:
        """Count a child that could not start; True when the master should give up."""
        self.boot_failures[kind] += 1
        return self.boot_failures[kind] >= BOOT_FAILURES_TO_HALT

    def died(self, rec: Child, now: float) -> tuple[float, int]:
        """An unexpected death: (delay before the slot's next start, quick deaths in a row)."""
        quick = now - rec.started < STABLE_AFTER
        failures = self.failures.get(rec.slot, 0) + 1 if quick else 1
        self.failures[rec.slot] = failures
        delay = 0.0 if failures == 1 else min(FIRST_DELAY * 2 ** (failures - 2), MAX_DELAY)
        self.not_before[rec.slot] = now + delay
        return delay, failures

    def reset(self) -> None:
        """A new generation starts with a clean slate."""
        self.failures.clear()
        self.not_before.clear()
        self.boot_failures = dict.fromkeys(KINDS, 0)
