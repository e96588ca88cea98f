"""RespawnPolicy on a fake clock: the backoff of a crash loop, its reset after a stable run, and
the boot-failure count that halts the master. Every time is passed in, so no test sleeps."""

from __future__ import annotations

import pytest

from empath.master.child import Heartbeat
from empath.master.respawn import (
    BOOT_FAILURES_TO_HALT,
    FIRST_DELAY,
    MAX_DELAY,
    STABLE_AFTER,
    Child,
    RespawnPolicy,
)


def child(started: float, kind: str = "receiver", index: int = 1) -> Child:
    return Child(pid=100, kind=kind, index=index, count=2, generation=1,
                 heartbeat=Heartbeat.__new__(Heartbeat), started=started)


def test_first_death_restarts_at_once_then_backoff_doubles_up_to_the_cap() -> None:
    policy = RespawnPolicy()
    now = 1000.0
    delays = []
    for _ in range(12):
        delay, _failures = policy.died(child(started=now - 1.0), now)
        delays.append(delay)
        assert not policy.may_start(("receiver", 1), now + delay - 0.001) or delay == 0.0
        assert policy.may_start(("receiver", 1), now + delay)
        now += delay + 1.0
    assert delays[:4] == [0.0, FIRST_DELAY, FIRST_DELAY * 2, FIRST_DELAY * 4]
    assert max(delays) == MAX_DELAY
    assert delays[-1] == MAX_DELAY


def test_a_stable_run_resets_the_backoff() -> None:
    policy = RespawnPolicy()
    now = 50.0
    for _ in range(5):
        policy.died(child(started=now - 0.5), now)
        now += 60.0
    delay, failures = policy.died(child(started=now - STABLE_AFTER - 1.0), now)
    assert (delay, failures) == (0.0, 1)


def test_slots_back_off_independently() -> None:
    policy = RespawnPolicy()
    for _ in range(3):
        policy.died(child(started=9.0, index=1), 10.0)
    assert not policy.may_start(("receiver", 1), 10.0)
    assert policy.may_start(("receiver", 2), 10.0)
    assert policy.next_start() == pytest.approx(10.0 + FIRST_DELAY * 2)


@pytest.mark.parametrize("kind", ["receiver", "delivery", "admin"])
def test_boot_failures_halt_only_when_consecutive(kind: str) -> None:
    policy = RespawnPolicy()
    for _ in range(BOOT_FAILURES_TO_HALT - 1):
        assert policy.boot_failed(kind) is False
    policy.booted(kind)
    for _ in range(BOOT_FAILURES_TO_HALT - 1):
        assert policy.boot_failed(kind) is False
    assert policy.boot_failed(kind) is True


def test_reset_clears_every_slot() -> None:
    policy = RespawnPolicy()
    policy.died(child(started=0.0), 1.0)
    policy.died(child(started=1.0), 2.0)
    policy.boot_failed("delivery")
    policy.reset()
    assert policy.next_start() is None
    assert policy.may_start(("receiver", 1), 2.0)
    assert policy.boot_failures["delivery"] == 0
