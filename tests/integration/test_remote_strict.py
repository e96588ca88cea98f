"""The SMTP client against servers that answer out of turn, idle connections that must close,
and routes that lead back to this host: RemoteTransport over real loopback sockets, with the
scripted sink (tests/support/sink.py) and the loopback DNS server (tests/support/dnsserver.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop

from empath.config.types import Address
from empath.delivery import pool as pool_module
from empath.delivery.remote import OwnAddresses, RemoteTransport
from empath.delivery.state import DEFERRED, DELIVERED, FAILED
from tests.support.mailworld import MESSAGE, MailWorld, deliver, envelope, rcpt
from tests.support.sink import Behaviour, SinkServer

DOMAINS = [f"d{i}.test" for i in range(24)]
ZONE: dict[str, dict[str, Any]] = {
    "example.test": {"MX": [(10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"]},
    "me.test": {"MX": [(10, "mx.me.test")]},
    "mx.me.test": {"A": ["127.0.0.1"]},
    "second.test": {"MX": [(10, "mx2.example.test"), (20, "mx.me.test")]},
    "literal.test": {"MX": [(10, "127.0.0.2.")]},
    "127.0.0.2": {"A": ["127.0.0.3"]},  # the name "127.0.0.2." has an address of its own
    "many.test": {"MX": [(i, f"h{i}.many.test") for i in range(8)]},
    **{f"h{i}.many.test": {"A": ["127.0.0.3"]} for i in range(8)},
    **{d: {"MX": [(10, f"mx.{d}")]} for d in DOMAINS},
    **{f"mx.{d}": {"A": ["127.0.0.2"]} for d in DOMAINS},
}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[MailWorld]:
    with MailWorld(tmp_path, ZONE, hosts=["127.0.0.2", "127.0.0.3"]) as w:
        yield w


def sink_with(world: MailWorld, host: str = "127.0.0.2", **changes: Any) -> SinkServer:
    sink = world.sink(host)
    sink.behaviour = dataclasses.replace(Behaviour(), **changes)
    return sink


def deliver_in_turn(world: MailWorld, cfg: Any, messages: list[tuple[str, bytes]],
                    me: OwnAddresses | None = None) -> list[dict[str, Any]]:
    """Several messages, one after the other, through one transport (so its pool)."""
    async def go() -> list[dict[str, Any]]:
        transport = RemoteTransport(cfg)
        if me is not None:
            transport.me = me
        try:
            results = []
            for n, (domain, data) in enumerate(messages):
                out, _ = await transport.deliver(domain, {**envelope(), "id": f"M{n}"},
                                                 [rcpt(f"u@{domain}")], world.source(data))
                results.append(out)
            return results
        finally:
            await transport.close()

    return uvloop.run(go())


# -- A: strict reply matching through real sockets ---------------------------------------
@pytest.mark.parametrize("pipelining", [True, False])
def test_250_to_data_defers_and_sends_nothing(world: MailWorld, pipelining: bool) -> None:
    sink = sink_with(world, pipelining=pipelining, data_reply=(250, "2.0.0 ok"))
    out, _ = deliver(world.config(), "example.test", [rcpt("u@example.test")],
                     world.source(MESSAGE))
    outcome = out["u@example.test"]
    assert outcome.status == DEFERRED and outcome.enhanced == "4.5.0"
    assert "to DATA" in outcome.text
    assert sink.messages == []


@pytest.mark.parametrize("changes", [
    {"mail_reply": (354, "go ahead")},  # pipelined replies out of order: 354 first
    {"rcpt_default": (354, "go ahead")},  # 3xx to RCPT
])
@pytest.mark.parametrize("pipelining", [True, False])
def test_3xx_to_mail_or_rcpt_defers(world: MailWorld, pipelining: bool,
                                    changes: dict[str, Any]) -> None:
    sink = sink_with(world, pipelining=pipelining, **changes)
    out, _ = deliver(world.config(), "example.test",
                     [rcpt("u@example.test"), rcpt("v@example.test")], world.source(MESSAGE))
    assert {o.status for o in out.values()} == {DEFERRED}
    assert all(o.enhanced == "4.5.0" for o in out.values())
    assert sink.messages == []


def test_a_stray_reply_after_the_dot_never_passes_for_the_next_delivery(
        world: MailWorld) -> None:
    """``250`` twice after the dot, then the connection would be reused: the first message
    is delivered on its own reply. The stray one, sent in a write of its own, either arrives
    while the connection is idle (it is closed; the second message goes over a new one and is
    delivered once its data arrived) or just after the reuse began (every later reply is one
    step behind: a protocol error, so the second message is deferred with no data sent). Which
    of the two is a race; a delivery recorded without its data is never one of them."""
    sink = sink_with(world, after_final=b"250 2.0.0 queued again\r\n")
    cfg = world.config(connection_reuse={"max_idle": "30s", "max_messages": 100})
    first, second = deliver_in_turn(world, cfg, [("example.test", MESSAGE),
                                          ("example.test", MESSAGE + b"second\r\n")])
    assert first["u@example.test"].status == DELIVERED
    outcome = second["u@example.test"]
    if outcome.status == DELIVERED:
        messages = sink.wait_for_messages(2)
        assert [m.data for m in messages] == [MESSAGE, MESSAGE + b"second\r\n"]
        assert len(sink.sessions) == 2  # never reused after the stray reply
        assert "MAIL" not in [c.line[:4] for c in sink.sessions[0].commands[3:]]
    else:
        assert (outcome.status, outcome.enhanced) == (DEFERRED, "4.5.0")
        assert [m.data for m in sink.messages] == [MESSAGE]


def test_a_stray_reply_with_the_final_one_closes_the_connection(world: MailWorld) -> None:
    """Both replies in one segment: same verdicts, and no RSET on that connection."""
    sink = sink_with(world, final_reply=(250, "2.0.0 queued as {n}\r\n250 2.0.0 again"))
    cfg = world.config(connection_reuse={"max_idle": "30s", "max_messages": 100})
    results = deliver_in_turn(world, cfg, [("example.test", MESSAGE), ("example.test", MESSAGE)])
    assert [r["u@example.test"].status for r in results] == [DELIVERED, DELIVERED]
    assert len(sink.wait_for_messages(2)) == 2 and len(sink.sessions) == 2
    assert all("RSET" not in s.verbs() for s in sink.sessions)


# -- B: idle connections close at max_idle -----------------------------------------------
def test_idle_connections_close_even_when_the_timer_fires_early(
        world: MailWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many destinations, each with its pooled connection; the pool's clock runs behind the
    loop's timers (as a timer firing a fraction of a millisecond early looks to it). Every
    connection must still be closed, as the sink counts them."""
    sink = sink_with(world)
    lag = 0.05

    class LateClock:
        @staticmethod
        def monotonic() -> float:
            return time.monotonic() - lag

    monkeypatch.setattr(pool_module, "time", LateClock)
    cfg = world.config(connection_reuse={"max_idle": "2s", "max_messages": 100},
                       max_connections=50)

    async def go() -> tuple[int, int, int]:
        transport = RemoteTransport(cfg)

        async def one(domain: str) -> str:
            out, _ = await transport.deliver(domain, envelope(), [rcpt(f"u@{domain}")],
                                             world.source(MESSAGE))
            return str(out[f"u@{domain}"].status)

        try:
            statuses = await asyncio.gather(*(one(domain) for domain in DOMAINS))
            assert set(statuses) == {DELIVERED}
            pooled = transport.idle_connections()
            # a bounded wait, well past max_idle: the closing is asserted, not the time
            for _ in range(200):
                if sink.active_sessions == 0 and transport.idle_connections() == 0:
                    break
                await asyncio.sleep(0.05)
            return pooled, transport.idle_connections(), sink.active_sessions
        finally:
            await transport.close()

    pooled, left, open_at_sink = uvloop.run(go())
    assert pooled >= len(DOMAINS) // 2  # they were pooled, one per destination
    assert (left, open_at_sink) == (0, 0)
    assert all(s.closed for s in sink.sessions)
    assert len(sink.sessions) == len(DOMAINS)


def test_a_connection_the_server_closes_while_idle_leaves_the_pool(world: MailWorld) -> None:
    sink = sink_with(world, after_final=b"")
    cfg = world.config(connection_reuse={"max_idle": "60s", "max_messages": 100})

    async def go() -> int:
        transport = RemoteTransport(cfg)
        try:
            await transport.deliver("example.test", envelope(), [rcpt("u@example.test")],
                                    world.source(MESSAGE))
            assert transport.idle_connections() == 1
            sink.stop()  # the server goes away: its side of the connection is closed
            for _ in range(100):
                if transport.idle_connections() == 0:
                    break
                await asyncio.sleep(0.05)
            return transport.idle_connections()
        finally:
            await transport.close()

    assert uvloop.run(go()) == 0


# -- D: loops, address-like MX names, limits per attempt ---------------------------------
def test_an_mx_that_is_this_host_fails_with_a_loop_verdict(world: MailWorld) -> None:
    me = OwnAddresses([SimpleNamespace(address=Address("127.0.0.1", world.port))])
    [out] = deliver_in_turn(world, world.config(), [("me.test", MESSAGE)], me=me)
    outcome = out["u@me.test"]
    assert (outcome.status, outcome.code, outcome.enhanced) == (FAILED, 554, "5.4.6")
    assert outcome.text == "mail for me.test loops back to myself"


def test_a_wildcard_listener_means_every_local_address(world: MailWorld) -> None:
    me = OwnAddresses([SimpleNamespace(address=Address("0.0.0.0", world.port))])
    [out] = deliver_in_turn(world, world.config(), [("me.test", MESSAGE)], me=me)
    assert out["u@me.test"].enhanced == "5.4.6"
    assert me.is_me("127.0.0.1", world.port) and me.is_me("127.9.9.9", world.port)
    assert not me.is_me("127.0.0.1", world.port + 1)  # another port is another server
    assert not me.is_me("192.0.2.1", world.port)  # TEST-NET-1: not an address of ours
    assert not OwnAddresses([SimpleNamespace(address=Address("127.0.0.1", 0))]).endpoints


def test_a_loop_behind_a_failing_preferred_mx_is_a_deferral(world: MailWorld) -> None:
    sink = sink_with(world, "127.0.0.3", greeting=(421, "4.3.2 busy"))
    me = OwnAddresses([SimpleNamespace(address=Address("127.0.0.1", world.port))])
    [out] = deliver_in_turn(world, world.config(), [("second.test", MESSAGE)], me=me)
    assert out["u@second.test"].status == DEFERRED
    assert len(sink.sessions) == 1


def test_an_mx_spelled_like_an_address_is_a_name(world: MailWorld) -> None:
    named = sink_with(world, "127.0.0.3")
    literal = sink_with(world, "127.0.0.2")
    out, info = deliver(world.config(), "literal.test", [rcpt("u@literal.test")],
                        world.source(MESSAGE))
    assert out["u@literal.test"].status == DELIVERED
    assert info["ip"] == "127.0.0.3" and len(named.wait_for_messages(1)) == 1
    assert literal.sessions == []  # 127.0.0.2 as an address was never connected to
    assert world.dns.count("127.0.0.2", "A") == 1  # looked up as the name it is


def test_sessions_per_attempt_are_limited(world: MailWorld) -> None:
    sink = sink_with(world, "127.0.0.3", greeting=(421, "4.3.2 busy"))
    out, _ = deliver(world.config(), "many.test", [rcpt("u@many.test")],
                     world.source(MESSAGE))
    assert out["u@many.test"].status == DEFERRED
    assert len(sink.sessions) == 2  # delivery.mx_session_limit


def test_addresses_per_attempt_are_limited(world: MailWorld) -> None:
    sink = sink_with(world, "127.0.0.3", greeting=(421, "4.3.2 busy"))
    out, _ = deliver(world.config(mx_session_limit=100, mx_address_limit=3), "many.test",
                     [rcpt("u@many.test")], world.source(MESSAGE))
    assert out["u@many.test"].status == DEFERRED
    assert len(sink.sessions) == 3
    looked_up = sum(world.dns.count(f"h{i}.many.test", "A") for i in range(8))
    assert looked_up == 3
