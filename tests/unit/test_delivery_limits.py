"""Per-destination limits across workers (limits.py) and the circuit breaker (breaker.py), with
a fake clock; no sockets."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from empath.config import load_config
from empath.delivery import breaker as breaker_mod
from empath.delivery.breaker import (
    CLOSED,
    OPEN,
    PROBE,
    REACHED,
    UNKNOWN,
    UNREACHABLE,
    CircuitBreakers,
    CircuitOpen,
)
from empath.delivery.limits import DestinationLimits, RateLimiter, share_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def config(tmp_path: Path, **delivery: Any) -> Any:
    path = tmp_path / "empath.yaml"
    path.write_text(yaml.safe_dump({"base_dir": str(tmp_path), "hostname": "t.test",
                                    "delivery": delivery}))
    return load_config(str(path))


# -- shares ---------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("total", [1, 2, 3, 5, 20, 21, 100])
def test_connection_shares_add_up_to_the_limit_and_are_never_zero(total: int,
                                                                  workers: int) -> None:
    for domain in ("example.test", "a.test", "b.test", ""):
        parts = [share_of(total, i, workers, domain) for i in range(1, workers + 1)]
        assert min(parts) >= 1
        assert max(parts) - min(parts) <= 1
        assert sum(parts) == max(total, workers)


def test_the_spare_slots_of_different_domains_go_to_different_workers() -> None:
    # 5 over 2: one worker gets 3; which one depends on the domain, so that one worker does
    # not get every domain's extra slot.
    bigger = {next(i for i in (1, 2) if share_of(5, i, 2, f"d{n}.test") == 3)
              for n in range(20)}
    assert bigger == {1, 2}


def test_limits_use_the_domain_setting_then_the_default(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_connections=10,
                 domains={"small.test": {"max_connections": 3}})
    first = DestinationLimits(cfg.delivery, (1, 2))
    second = DestinationLimits(cfg.delivery, (2, 2))
    assert first.connections("small.test") + second.connections("small.test") == 3
    assert first.connections("other.test") == second.connections("other.test") == 5
    assert DestinationLimits(cfg.delivery).connections("small.test") == 3
    assert DestinationLimits(cfg.delivery, (1, 4)).undivided() == ["small.test"]
    assert DestinationLimits(cfg.delivery, (1, 20)).undivided() == ["*", "small.test"]


def test_slots_hold_the_share_and_are_forgotten_when_unused(tmp_path: Path) -> None:
    cfg = config(tmp_path, domains={"small.test": {"max_connections": 3}})
    limits = DestinationLimits(cfg.delivery, (1, 2))
    share = limits.connections("small.test")
    peak = 0
    active = 0

    async def one() -> None:
        nonlocal peak, active
        async with limits.slot("small.test"):
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.01)
            active -= 1

    async def go() -> None:
        await asyncio.gather(*(one() for _ in range(10)))

    asyncio.run(go())
    assert peak == share
    assert limits._slots == {} and limits._users == {}


def test_a_ticket_counts_deliveries_that_wait_for_a_destination_slot(tmp_path: Path) -> None:
    """A message whose only running destination delivery waits for a connection slot is
    blocked; it is not while it holds the slot, nor while another of its groups runs."""
    from empath.delivery import limits as limits_module

    cfg = config(tmp_path, domains={"one.test": {"max_connections": 1}})
    limits = DestinationLimits(cfg.delivery)
    seen: list[tuple[str, bool]] = []

    async def message(name: str, ticket: limits_module.Ticket, hold: asyncio.Event) -> None:
        limits_module.track(ticket)
        with ticket.run():
            async with limits.slot("one.test"):
                seen.append((name, ticket.blocked))
                await hold.wait()

    async def go() -> None:
        first, second = limits_module.Ticket(), limits_module.Ticket()
        hold = asyncio.Event()
        a = asyncio.ensure_future(message("first", first, hold))
        b = asyncio.ensure_future(message("second", second, hold))
        await asyncio.sleep(0.01)
        assert (first.blocked, second.blocked) == (False, True)
        with second.run():  # another group of the second message runs: not blocked
            assert not second.blocked
        assert second.blocked
        hold.set()
        await asyncio.gather(a, b)
        assert (first.running, first.waiting, second.running, second.waiting) == (0, 0, 0, 0)

    asyncio.run(go())
    assert seen == [("first", False), ("second", False)]


# -- rate limiter ---------------------------------------------------------------------------
def test_token_bucket_bursts_to_its_capacity_then_refills_at_the_rate() -> None:
    clock = Clock()
    bucket = RateLimiter(60, capacity=5, clock=clock)  # one a second
    for _ in range(5):
        assert bucket.tokens >= 1
        bucket.tokens -= 1
    assert not bucket.is_full()
    clock.now += 2.5
    bucket._refill()
    assert bucket.tokens == pytest.approx(2.5)
    clock.now += 100
    assert bucket.is_full() and bucket.tokens == 5


def test_a_rate_below_one_per_worker_still_lets_one_message_through() -> None:
    bucket = RateLimiter(0.5, capacity=0.5)  # rate_limit 1 over 2 workers
    assert bucket.capacity == 1.0 and bucket.tokens == 1.0


def test_pace_divides_the_rate_among_workers(tmp_path: Path) -> None:
    cfg = config(tmp_path, rate_limits={"default": 120})
    limits = DestinationLimits(cfg.delivery, (2, 3))

    async def go() -> None:
        await limits.pace("example.test")

    asyncio.run(go())
    bucket = limits._rates["example.test"]
    assert bucket.rate == pytest.approx(40 / 60) and bucket.capacity == pytest.approx(40)
    assert DestinationLimits(config(tmp_path).delivery)._rates == {}


def test_waiting_for_a_rate_token_blocks_the_ticket(tmp_path: Path) -> None:
    from empath.delivery import limits as limits_module

    cfg = config(tmp_path, rate_limits={"default": 1})  # one a minute: the second waits
    limits = DestinationLimits(cfg.delivery)
    ticket = limits_module.Ticket()
    states: list[bool] = []
    ticket.on_change = lambda: states.append(ticket.blocked)

    async def go() -> None:
        limits_module.track(ticket)
        with ticket.run():
            await limits.pace("slow.test")  # the bucket's one token: no wait
            assert not ticket.blocked
            waiter = asyncio.ensure_future(limits.pace("slow.test"))
            await asyncio.sleep(0.01)
            assert ticket.blocked and ticket.waiting == 1
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            assert not ticket.blocked and ticket.waiting == 0

    asyncio.run(go())
    assert states == [False, True, False, False]


# -- circuit breaker -------------------------------------------------------------------------
def breakers(tmp_path: Path, clock: Clock, **cb: Any) -> CircuitBreakers:
    cfg = config(tmp_path, circuit_breaker=cb or {"failures": 2, "cooldown": "10s"},
                 domains={"tough.test": {"circuit_breaker": {"failures": 4}},
                          "off.test": {"circuit_breaker": {"failures": 0}}})
    return CircuitBreakers(cfg.delivery, clock=clock)


def fail(b: CircuitBreakers, domain: str, times: int) -> None:
    for _ in range(times):
        b.record(domain, UNREACHABLE, b.admit(domain))


def test_breaker_opens_after_consecutive_failures_and_defers_at_once(tmp_path: Path) -> None:
    clock = Clock()
    b = breakers(tmp_path, clock)
    fail(b, "dead.test", 1)
    assert b.state("dead.test") == CLOSED
    b.check("dead.test")
    fail(b, "dead.test", 1)
    assert b.state("dead.test") == OPEN and b.open_count() == 1
    with pytest.raises(CircuitOpen) as caught:
        b.check("dead.test")
    err = caught.value
    assert (err.code, err.enhanced) == (451, "4.4.1")
    assert "circuit breaker" in err.text and "dead.test" in err.text and "2 deliveries" in err.text
    with pytest.raises(CircuitOpen):
        b.admit("dead.test")
    assert b.state("other.test") == CLOSED  # per domain


def test_open_count_and_openings_follow_every_transition(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    b = breakers(tmp_path, clock)
    fail(b, "a.test", 2)
    fail(b, "b.test", 2)
    assert (b.open_count(), b.openings) == (2, 2)
    clock.now += 10.0
    b.record("a.test", UNREACHABLE, b.admit("a.test"))  # failed probe: open again
    assert (b.open_count(), b.openings) == (2, 2)
    clock.now += 10.0
    b.record("a.test", REACHED, b.admit("a.test"))  # probe reached: closed
    assert (b.open_count(), b.openings) == (1, 2)
    monkeypatch.setattr(breaker_mod, "ENTRIES_KEPT", 1)
    fail(b, "c.test", 1)  # the table overflows: the open b.test entry is dropped
    assert b.state("b.test") == CLOSED
    assert b.open_count() == sum(b.state(d) != CLOSED for d in ("a.test", "b.test", "c.test"))


def test_after_the_cooldown_exactly_one_probe_goes(tmp_path: Path) -> None:
    clock = Clock()
    b = breakers(tmp_path, clock)
    fail(b, "dead.test", 2)
    clock.now += 10.0
    assert b.state("dead.test") == PROBE
    b.check("dead.test")  # the probe may go ahead and wait for its slot
    assert b.admit("dead.test") is True
    with pytest.raises(CircuitOpen) as caught:
        b.admit("dead.test")  # a second one while the probe is out
    assert "probe" in caught.value.text
    b.record("dead.test", UNREACHABLE, probe=True)  # the probe failed: another cooldown
    assert b.state("dead.test") == OPEN
    clock.now += 9.9
    assert b.state("dead.test") == OPEN
    clock.now += 0.2
    assert b.admit("dead.test") is True
    b.record("dead.test", REACHED, probe=True)
    assert b.state("dead.test") == CLOSED and b._states == {}


def test_an_inconclusive_probe_lets_the_next_delivery_probe(tmp_path: Path) -> None:
    clock = Clock()
    b = breakers(tmp_path, clock)
    fail(b, "dead.test", 2)
    clock.now += 11
    assert b.admit("dead.test")
    b.record("dead.test", UNKNOWN, probe=True)  # e.g. DNS failed: nothing learnt
    assert b.admit("dead.test")


def test_a_reached_server_resets_the_count(tmp_path: Path) -> None:
    clock = Clock()
    b = breakers(tmp_path, clock)
    fail(b, "flaky.test", 1)
    b.record("flaky.test", REACHED)
    fail(b, "flaky.test", 1)
    assert b.state("flaky.test") == CLOSED
    b.record("flaky.test", UNKNOWN)
    fail(b, "flaky.test", 1)
    assert b.state("flaky.test") == OPEN  # UNKNOWN neither counts nor resets


def test_per_domain_settings_and_off(tmp_path: Path) -> None:
    clock = Clock()
    b = breakers(tmp_path, clock)
    assert b.settings("tough.test") == (4, 10.0)
    fail(b, "tough.test", 3)
    assert b.state("tough.test") == CLOSED
    fail(b, "tough.test", 1)
    assert b.state("tough.test") == OPEN
    fail(b, "off.test", 50)
    assert b.state("off.test") == CLOSED


def test_the_table_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(breaker_mod, "ENTRIES_KEPT", 10)
    clock = Clock()
    b = breakers(tmp_path, clock)
    fail(b, "dead.test", 2)
    for n in range(30):
        fail(b, f"d{n}.test", 1)
    assert len(b._states) == 10 and b.state("dead.test") == OPEN  # open ones stay longest


class Recorder:
    """Stands for a metrics instrument: counts ``inc`` per label values."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, ...], float] = {}
        self._labels: tuple[str, ...] = ()

    def labels(self, *values: str) -> Recorder:
        self._labels = values
        return self

    def inc(self, amount: float = 1.0) -> None:
        self.counts[self._labels] = self.counts.get(self._labels, 0.0) + amount


def test_waiting_for_the_rate_limit_is_counted(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from empath.observe import metrics

    waits = Recorder()
    instruments = metrics.Instruments(False)  # every other instrument a no-op
    instruments.rate_limit_waits = waits
    monkeypatch.setattr(metrics, "_current", instruments)
    limits = DestinationLimits(config(tmp_path, rate_limits={"default": 600}).delivery)
    limits._rates["example.test"] = RateLimiter(600, capacity=1)  # 10 a second, no burst

    async def go() -> float:
        started = asyncio.get_running_loop().time()
        for _ in range(3):
            await limits.pace("example.test")
        return asyncio.get_running_loop().time() - started

    assert 0.15 <= asyncio.run(go()) < 1.0
    assert waits.counts == {(): 2.0}
