"""Per-destination limits shared by workers, and the circuit breaker, through RemoteTransport
against loopback sinks (tests/support/mailworld.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from empath.delivery.remote import RemoteTransport
from empath.delivery.state import DEFERRED, DELIVERED
from tests.support.mailworld import MESSAGE, MailWorld, envelope, rcpt
from tests.support.sink import PRESETS, Behaviour

ZONE: dict[str, dict[str, Any]] = {
    "example.test": {"MX": [(10, "mx1.example.test")]},
    "dead.test": {"MX": [(10, "mxdead.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mxdead.example.test": {"A": ["127.0.0.9"]},  # nothing listens there: refused
}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[MailWorld]:
    with MailWorld(tmp_path, ZONE, hosts=["127.0.0.2"]) as w:
        yield w


def run_deliveries(transport: RemoteTransport, domain: str, n: int,
                   source: Any) -> Any:
    return asyncio.gather(*(transport.deliver(domain, envelope(), [rcpt(f"u{i}@{domain}")],
                                              source) for i in range(n)))


@pytest.mark.parametrize(("limit", "workers"), [(3, 2), (5, 3), (1, 1)])
def test_worker_shares_hold_the_limit_together(world: MailWorld, limit: int,
                                               workers: int) -> None:
    sink = world.sink("127.0.0.2")
    sink.behaviour = Behaviour(delay=0.03)
    cfg = world.config(domains={"example.test": {"max_connections": limit}})
    source = world.source(MESSAGE)

    async def go() -> list[str]:
        transports = [RemoteTransport(cfg, share=(i, workers)) for i in range(1, workers + 1)]
        results = await asyncio.gather(*(run_deliveries(t, "example.test", 2 * limit, source)
                                         for t in transports))
        for t in transports:
            await t.close()
        return [o.status for batch in results for out, _ in batch for o in out.values()]

    statuses = uvloop.run(go())
    assert statuses == [DELIVERED] * (2 * limit * workers)
    assert sink.max_concurrent_sessions <= limit
    assert sink.max_concurrent_transactions == limit  # every worker used its whole share


def breaker_config(world: MailWorld, **extra: Any) -> Any:
    return world.config(circuit_breaker={"failures": 2, "cooldown": "1s"}, **extra)


def test_breaker_opens_on_a_dead_destination_and_probes_after_the_cooldown(
        world: MailWorld) -> None:
    cfg = breaker_config(world)
    source = world.source(MESSAGE)

    async def one(transport: RemoteTransport) -> tuple[Any, dict[str, Any], float]:
        started = time.monotonic()
        out, info = await transport.deliver("dead.test", envelope(), [rcpt("u@dead.test")],
                                            source)
        return out["u@dead.test"], info, time.monotonic() - started

    async def go() -> None:
        transport = RemoteTransport(cfg)
        try:
            for _ in range(2):
                outcome, info, _ = await one(transport)
                assert (outcome.status, outcome.enhanced) == (DEFERRED, "4.4.1")
                assert "cannot connect" in outcome.text and "breaker" not in info
            assert transport.breakers.state("dead.test") == "open"
            outcome, info, took = await one(transport)
            assert outcome.status == DEFERRED and "circuit breaker" in outcome.text
            assert info["breaker"] == "open" and info["server"] is None and took < 0.05
            await asyncio.sleep(1.05)
            outcome, info, _ = await one(transport)  # the probe, refused again
            assert info["breaker"] == "probe" and "cannot connect" in outcome.text
            outcome, info, _ = await one(transport)
            assert info["breaker"] == "open"  # another cooldown
        finally:
            await transport.close()

    uvloop.run(go())


def test_only_one_probe_and_a_successful_probe_closes_the_breaker(world: MailWorld) -> None:
    sink = world.sink("127.0.0.2")
    sink.behaviour = PRESETS["greet-421"]  # answers, but will not talk: no server reached
    cfg = breaker_config(world)
    source = world.source(MESSAGE)

    async def go() -> None:
        transport = RemoteTransport(cfg)
        try:
            for _ in range(2):
                out, _ = await transport.deliver("example.test", envelope(),
                                                 [rcpt("u@example.test")], source)
                assert out["u@example.test"].code == 421
            await run_deliveries(transport, "example.test", 5, source)
            assert len(sink.sessions) == 2  # open: no connection attempt at all
            sink.behaviour = Behaviour(delay=0.05)  # back in service
            await asyncio.sleep(1.05)
            results = await run_deliveries(transport, "example.test", 5, source)
            kinds = sorted(info.get("breaker", "-") for _, info in results)
            assert kinds == ["open"] * 4 + ["probe"]
            assert len(sink.sessions) == 3  # exactly one probe went out
            assert transport.breakers.state("example.test") == "closed"
            results = await run_deliveries(transport, "example.test", 3, source)
            assert all(o.status == DELIVERED for out, _ in results for o in out.values())
        finally:
            await transport.close()

    uvloop.run(go())


@pytest.mark.parametrize("behaviour", ["recipient", "tls"])
def test_a_server_that_answers_never_trips_the_breaker(world: MailWorld,
                                                       behaviour: str) -> None:
    sink = world.sink("127.0.0.2")
    extra: dict[str, Any] = {"connection_reuse": {"max_idle": 0}}
    if behaviour == "recipient":
        sink.behaviour = Behaviour(rcpt_default=(450, "4.2.1 mailbox busy"))
    else:  # TLS required, no STARTTLS offered: a policy failure, not a dead server
        extra["tls"] = {"default_policy": "required"}
    cfg = breaker_config(world, **extra)
    source = world.source(MESSAGE)

    async def go() -> None:
        transport = RemoteTransport(cfg)
        try:
            for _ in range(4):
                out, info = await transport.deliver("example.test", envelope(),
                                                    [rcpt("u@example.test")], source)
                assert out["u@example.test"].status == DEFERRED and "breaker" not in info
        finally:
            await transport.close()

    uvloop.run(go())
    assert len(sink.sessions) == 4
