"""RemoteTransport against real SMTP sinks on 127.0.0.2/.3 and the loopback DNS server.

Routing, MX order and fallback, DNS verdicts, connection reuse and limits, and message
transfer. TLS policies are in test_remote_tls.py, SMTP extensions in test_remote_smtp.py.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from empath.delivery.remote import RemoteTransport
from empath.delivery.state import DEFERRED, DELIVERED, FAILED
from tests.support.mailworld import MESSAGE, MailWorld, deliver, envelope, rcpt, statuses
from tests.support.sink import PRESETS, Behaviour

ZONE: dict[str, dict[str, Any]] = {
    "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"]},
    "mxdead.example.test": {"A": ["127.0.0.4"]},  # nothing listens there
    "dead.test": {"MX": [(10, "mxdead.example.test"), (20, "mx2.example.test")]},
    "badmx.test": {"MX": [(10, "nohost.example.test"), (20, "mx2.example.test")]},
    "equal.test": {"MX": [(10, "mx1.example.test"), (10, "mx2.example.test")]},
    "implicit.test": {"A": ["127.0.0.3"]},
    "noaddr.test": {"TXT": ["no mail here"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": {"MX": [(10, "mx1.example.test")]},
    "ttl.test": {"MX": [(10, "mx1.example.test")], "ttl": 1},
    # client.test is the configured hostname: an MX pointing at ourselves.
    "loop.test": {"MX": [(10, "client.test"), (20, "mx1.example.test")]},
    "backup.test": {"MX": [(5, "mx2.example.test"), (10, "client.test"),
                           (20, "mx1.example.test")]},
}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[MailWorld]:
    with MailWorld(tmp_path, ZONE) as w:
        yield w


# -- routing and MX order ------------------------------------------------------------------
def test_first_mx_takes_the_message(world: MailWorld) -> None:
    out, info = deliver(world.config(), "example.test", [rcpt("u@example.test")],
                        world.source(MESSAGE))
    assert statuses(out) == {"u@example.test": DELIVERED}
    assert out["u@example.test"].server == "mx1.example.test"
    assert (info["server"], info["ip"], info["port"], info["mx_index"], info["tls"]) == (
        "mx1.example.test", "127.0.0.2", world.port, 0, None)
    assert info["transport"] == "smtp" and info["domain"] == "example.test"
    [msg] = world.sink("127.0.0.2").wait_for_messages(1)
    assert msg.data == MESSAGE and msg.recipients == ["u@example.test"]
    assert msg.mail_from == "s@client.test"
    assert world.sink("127.0.0.3").sessions == []


@pytest.mark.parametrize("preset", ["greet-421", "greet-554", "ehlo-421"])
def test_second_mx_when_the_first_refuses_at_greeting_or_ehlo(world: MailWorld,
                                                              preset: str) -> None:
    world.sink("127.0.0.2").behaviour = PRESETS[preset]
    out, info = deliver(world.config(), "example.test", [rcpt("u@example.test")],
                        world.source(MESSAGE))
    assert statuses(out) == {"u@example.test": DELIVERED}
    assert (info["server"], info["mx_index"]) == ("mx2.example.test", 1)
    assert len(world.sink("127.0.0.2").sessions) == 1
    assert len(world.sink("127.0.0.3").wait_for_messages(1)) == 1


def test_second_mx_when_the_first_refuses_connections(world: MailWorld) -> None:
    out, info = deliver(world.config(), "dead.test", [rcpt("u@dead.test")],
                        world.source(MESSAGE))
    assert statuses(out) == {"u@dead.test": DELIVERED}
    assert (info["ip"], info["mx_index"]) == ("127.0.0.3", 1)


def test_mx_host_without_address_is_skipped(world: MailWorld) -> None:
    out, info = deliver(world.config(), "badmx.test", [rcpt("u@badmx.test")],
                        world.source(MESSAGE))
    assert statuses(out) == {"u@badmx.test": DELIVERED}
    assert info["server"] == "mx2.example.test"


def test_every_mx_failing_defers_with_the_last_error(world: MailWorld) -> None:
    for sink in world.sinks.values():
        sink.behaviour = PRESETS["greet-421"]
    out, _ = deliver(world.config(), "example.test", [rcpt("u@example.test")],
                     world.source(MESSAGE))
    outcome = out["u@example.test"]
    assert (outcome.status, outcome.code) == (DEFERRED, 421)
    assert outcome.server == "mx2.example.test"


def test_every_mx_refusing_permanently_fails(world: MailWorld) -> None:
    for sink in world.sinks.values():
        sink.behaviour = PRESETS["greet-554"]
    out, _ = deliver(world.config(), "example.test", [rcpt("u@example.test")],
                     world.source(MESSAGE))
    assert (out["u@example.test"].status, out["u@example.test"].code) == (FAILED, 554)


def test_mail_refusal_is_final_no_next_mx(world: MailWorld) -> None:
    world.sink("127.0.0.2").behaviour = PRESETS["reject-mail"]
    out, _ = deliver(world.config(), "example.test",
                     [rcpt("a@example.test"), rcpt("b@example.test")], world.source(MESSAGE))
    assert statuses(out) == {"a@example.test": FAILED, "b@example.test": FAILED}
    assert {o.code for o in out.values()} == {550}
    assert world.sink("127.0.0.3").sessions == []


def test_temporary_refusal_of_everything_defers(world: MailWorld) -> None:
    world.sink("127.0.0.2").behaviour = PRESETS["tempfail"]
    out, _ = deliver(world.config(), "example.test",
                     [rcpt("a@example.test"), rcpt("b@example.test")], world.source(MESSAGE))
    assert set(statuses(out).values()) == {DEFERRED}
    assert {o.code for o in out.values()} == {451}
    assert world.sink("127.0.0.3").sessions == []


def test_equal_preference_mx_hosts_share_the_load(world: MailWorld) -> None:
    cfg = world.config(connection_reuse={"max_idle": 0})
    source = world.source(MESSAGE)

    async def go() -> None:
        transport = RemoteTransport(cfg)
        for _ in range(40):
            out, _ = await transport.deliver("equal.test", envelope(),
                                             [rcpt("u@equal.test")], source)
            assert out["u@equal.test"].status == DELIVERED
        await transport.close()

    uvloop.run(go())
    first = len(world.sink("127.0.0.2").messages)
    second = len(world.sink("127.0.0.3").messages)
    assert first + second == 40
    # Binomial(40, 1/2): fewer than 8 on one side happens about once in 50,000 runs.
    assert min(first, second) >= 8
    assert world.dns.count("equal.test", "MX") == 1  # the shuffle is not a re-query


def test_implicit_mx(world: MailWorld) -> None:
    out, info = deliver(world.config(), "implicit.test", [rcpt("u@implicit.test")],
                        world.source(MESSAGE))
    assert statuses(out) == {"u@implicit.test": DELIVERED}
    assert (info["server"], info["ip"]) == ("implicit.test", "127.0.0.3")


def test_implicit_mx_without_address_fails(world: MailWorld) -> None:
    out, _ = deliver(world.config(), "noaddr.test", [rcpt("u@noaddr.test")],
                     world.source(MESSAGE))
    assert (out["u@noaddr.test"].status, out["u@noaddr.test"].enhanced) == (FAILED, "5.1.2")


def test_null_mx_fails_without_any_connection(world: MailWorld) -> None:
    out, info = deliver(world.config(), "nullmx.test", [rcpt("u@nullmx.test")],
                        world.source(MESSAGE))
    outcome = out["u@nullmx.test"]
    assert (outcome.status, outcome.code, outcome.enhanced) == (FAILED, 556, "5.1.10")
    assert info["server"] is None and world.sessions() == 0


def test_nxdomain_fails(world: MailWorld) -> None:
    out, _ = deliver(world.config(), "nowhere.test", [rcpt("u@nowhere.test")],
                     world.source(MESSAGE))
    assert (out["u@nowhere.test"].status, out["u@nowhere.test"].enhanced) == (FAILED, "5.1.2")
    assert world.sessions() == 0


def test_servfail_defers(world: MailWorld) -> None:
    world.dns.servfail.add("broken.test")
    out, _ = deliver(world.config(), "broken.test", [rcpt("u@broken.test")],
                     world.source(MESSAGE))
    assert (out["u@broken.test"].status, out["u@broken.test"].enhanced) == (DEFERRED, "4.4.3")
    assert world.sessions() == 0


def test_mx_answers_expire_with_their_ttl(world: MailWorld) -> None:
    cfg = world.config()
    source = world.source(MESSAGE)

    async def go() -> list[int]:
        transport = RemoteTransport(cfg)
        counts = []
        for pause in (0.0, 0.0, 1.2):
            await asyncio.sleep(pause)
            out, _ = await transport.deliver("ttl.test", envelope(), [rcpt("u@ttl.test")],
                                             source)
            assert out["u@ttl.test"].status == DELIVERED
            counts.append(world.dns.count("ttl.test", "MX"))
        await transport.close()
        return counts

    assert uvloop.run(go()) == [1, 1, 2]  # cached within the 1 s TTL, asked again after


def test_mx_pointing_at_ourselves_is_a_loop(world: MailWorld) -> None:
    out, _ = deliver(world.config(), "loop.test", [rcpt("u@loop.test")], world.source(MESSAGE))
    assert (out["u@loop.test"].status, out["u@loop.test"].enhanced) == (FAILED, "5.4.6")
    assert world.sessions() == 0


def test_as_backup_mx_only_better_hosts_are_tried(world: MailWorld) -> None:
    out, info = deliver(world.config(), "backup.test", [rcpt("u@backup.test")],
                        world.source(MESSAGE))
    assert out["u@backup.test"].status == DELIVERED and info["ip"] == "127.0.0.3"
    world.sink("127.0.0.3").behaviour = PRESETS["greet-421"]
    out, _ = deliver(world.config(), "backup.test", [rcpt("u@backup.test")],
                     world.source(MESSAGE))
    assert out["u@backup.test"].status == DEFERRED
    assert world.sink("127.0.0.2").sessions == []  # preference 20 is behind us: not tried


def test_mx_override_wins_over_dns(world: MailWorld) -> None:
    cfg = world.config(domains={"override.test": {"mx_override": f"127.0.0.3:{world.port}"}})
    out, info = deliver(cfg, "override.test", [rcpt("u@override.test")], world.source(MESSAGE))
    assert statuses(out) == {"u@override.test": DELIVERED}
    assert (info["ip"], info["mx_index"]) == ("127.0.0.3", 0)
    assert world.dns.count("override.test") == 0


def test_smarthost_takes_everything(world: MailWorld) -> None:
    cfg = world.config(smarthost=f"mx1.example.test:{world.port}")
    out, info = deliver(cfg, "example.test", [rcpt("u@example.test")], world.source(MESSAGE))
    assert statuses(out) == {"u@example.test": DELIVERED}
    assert (info["server"], info["ip"]) == ("mx1.example.test", "127.0.0.2")
    assert world.dns.count("example.test", "MX") == 0
    cfg = world.config(smarthost=f"127.0.0.2:{world.port}",
                       domains={"example.test": {"mx_override": f"127.0.0.3:{world.port}"}})
    _, info = deliver(cfg, "example.test", [rcpt("u@example.test")], world.source(MESSAGE))
    assert info["ip"] == "127.0.0.3"  # a domain's override beats the smarthost


# -- connections ---------------------------------------------------------------------------
def deliver_sequence(cfg: Any, count: int, source: Any, pause: float = 0.0) -> list[Any]:
    async def go() -> list[Any]:
        transport = RemoteTransport(cfg)
        results = []
        for _ in range(count):
            out, _ = await transport.deliver("example.test", envelope(),
                                             [rcpt("u@example.test")], source)
            results.append(out["u@example.test"].status)
            await asyncio.sleep(pause)
        await transport.close()
        return results

    return uvloop.run(go())


def test_connection_reused_hot_without_rset_and_with_rset_after_a_pause(
        world: MailWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages back to back go on one connection without RSET between them (the finished
    transaction left the server ready for MAIL); after a pause of HOT_REUSE or more the
    connection must answer RSET before it is reused."""
    from empath.delivery import pool

    assert deliver_sequence(world.config(), 3, world.source(MESSAGE)) == [DELIVERED] * 3
    sink = world.sink("127.0.0.2")
    [session] = sink.sessions
    verbs = session.verbs()
    assert verbs.count("EHLO") == 1 and verbs.count("MAIL") == 3 and "RSET" not in verbs
    assert verbs[-1] == "QUIT"  # QUIT at close()

    monkeypatch.setattr(pool, "HOT_REUSE", 0.05)
    assert deliver_sequence(world.config(), 3, world.source(MESSAGE),
                            pause=0.2) == [DELIVERED] * 3
    [_, paused] = sink.sessions
    verbs = paused.verbs()
    assert verbs.count("EHLO") == 1 and verbs.count("MAIL") == 3 and verbs.count("RSET") == 2
    assert verbs.index("RSET") < verbs.index("MAIL", verbs.index("MAIL") + 1)


@pytest.mark.parametrize("last_word", [None, (421, "4.4.2 idle too long, closing")])
def test_a_reused_connection_found_closed_delivers_once_on_a_new_one(
        world: MailWorld, last_word: tuple[int, str] | None) -> None:
    """The server drops each connection at its second MAIL, silently or after a 421 (as one
    that closed an idle connection just as it was reused): every message is delivered once,
    on a new connection, none deferred."""
    sink = world.sink("127.0.0.2")
    sink.behaviour = Behaviour(drop_at_mail=2, drop_reply=last_word)
    assert deliver_sequence(world.config(), 3, world.source(MESSAGE)) == [DELIVERED] * 3
    assert len(sink.wait_for_messages(3)) == 3
    assert [s.verbs().count("MAIL") for s in sink.sessions] == [2, 2, 1]
    assert len(sink.messages) == 3


def test_connection_carries_at_most_max_messages(world: MailWorld) -> None:
    cfg = world.config(connection_reuse={"max_messages": 2})
    assert deliver_sequence(cfg, 5, world.source(MESSAGE)) == [DELIVERED] * 5
    sessions = world.sink("127.0.0.2").sessions
    assert [s.verbs().count("MAIL") for s in sessions] == [2, 2, 1]


def test_idle_connection_closed_after_max_idle(world: MailWorld) -> None:
    cfg = world.config(connection_reuse={"max_idle": "0.2s"})
    assert deliver_sequence(cfg, 2, world.source(MESSAGE), pause=0.6) == [DELIVERED] * 2
    sessions = world.sink("127.0.0.2").sessions
    assert len(sessions) == 2
    assert sessions[0].verbs()[-1] == "QUIT"  # closed by the idle timer, politely


def test_dead_idle_connection_is_replaced(world: MailWorld,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection idle for HOT_REUSE or more answers RSET with 421: a new one is used."""
    from empath.delivery import pool

    monkeypatch.setattr(pool, "HOT_REUSE", 0.0)
    cfg = world.config()
    source = world.source(MESSAGE)
    sink = world.sink("127.0.0.2")

    async def go() -> list[str]:
        transport = RemoteTransport(cfg)
        first, _ = await transport.deliver("example.test", envelope(),
                                           [rcpt("u@example.test")], source)
        sink.behaviour = Behaviour(rset_reply=(421, "4.3.2 going away"))
        second, _ = await transport.deliver("example.test", envelope(),
                                            [rcpt("u@example.test")], source)
        await transport.close()
        return [first["u@example.test"].status, second["u@example.test"].status]

    assert uvloop.run(go()) == [DELIVERED, DELIVERED]
    assert len(sink.sessions) == 2 and len(sink.messages) == 2


@pytest.mark.parametrize("limit", [1, 2])
def test_max_connections_per_destination(world: MailWorld, limit: int) -> None:
    sink = world.sink("127.0.0.2")
    sink.behaviour = Behaviour(delay=0.05)
    cfg = world.config(domains={"example.test": {"max_connections": limit}})
    source = world.source(MESSAGE)

    async def go() -> list[str]:
        transport = RemoteTransport(cfg)
        results = await asyncio.gather(*(
            transport.deliver("example.test", envelope(), [rcpt(f"u{i}@example.test")],
                              source) for i in range(6)))
        await transport.close()
        return [o.status for out, _ in results for o in out.values()]

    assert uvloop.run(go()) == [DELIVERED] * 6
    assert sink.max_concurrent_transactions == limit
    assert 1 <= len(sink.sessions) <= limit


def test_without_a_domain_limit_deliveries_run_in_parallel(world: MailWorld) -> None:
    sink = world.sink("127.0.0.2")
    sink.behaviour = Behaviour(delay=0.05)
    cfg = world.config(max_connections=20)
    source = world.source(MESSAGE)

    async def go() -> None:
        transport = RemoteTransport(cfg)
        await asyncio.gather(*(transport.deliver("example.test", envelope(),
                                                 [rcpt(f"u{i}@example.test")], source)
                               for i in range(6)))
        await transport.close()

    uvloop.run(go())
    assert sink.max_concurrent_transactions > 2  # so the limit test above measures something


def test_rate_limit_spaces_messages(world: MailWorld) -> None:
    cfg = world.config(domains={"example.test": {"rate_limit": 120}})  # two a second
    started = time.monotonic()
    # The bucket starts full (a burst of 120), so 122 messages would wait about 1 s; three
    # messages pass at once: this checks the limiter lets traffic through, not its maths.
    assert deliver_sequence(cfg, 3, world.source(MESSAGE)) == [DELIVERED] * 3
    assert time.monotonic() - started < 5


# -- message transfer ----------------------------------------------------------------------
BLOCK = 65536  # the client reads the message in blocks of this size from its start


def big_message(size: int, dot_lines_at: tuple[int, ...] = (), seed: int = 1) -> bytes:
    """~``size`` bytes of CRLF lines, many starting with ".", some long, some a lone dot;
    plus a line starting with "." at each offset of ``dot_lines_at``."""
    rng = random.Random(seed)

    def random_line() -> bytes:
        kind = rng.random()
        if kind < 0.2:
            line = b"." * rng.randint(1, 3) + b"x" * rng.randint(0, 80)
        elif kind < 0.22:
            line = b"."
        elif kind < 0.25:
            line = bytes(rng.choice(b"abc.") for _ in range(rng.randint(900, 5000)))
        else:
            line = b"y" * rng.randint(0, 120)
        return line + b"\r\n"

    out = bytearray(b"Received: from test\r\nSubject: big\r\n\r\n")
    for target in [*sorted(dot_lines_at), None]:
        limit = size if target is None else target
        while len(out) + 5100 < limit:
            out += random_line()
        if target is not None:
            out += b"f" * (target - len(out) - 2) + b"\r\n"
            out += b".line at %d\r\n" % target
    return bytes(out)


def test_big_message_streamed_with_dot_stuffing(world: MailWorld) -> None:
    # Dot lines starting exactly at a block start, as the last byte of a block, and right
    # after a CRLF split across two blocks: where stuffing state must cross the boundary.
    data = big_message(20 * 1024 * 1024, (BLOCK, 2 * BLOCK - 1, 3 * BLOCK + 1))
    assert data[BLOCK - 2:BLOCK + 1] == b"\r\n." and data[2 * BLOCK - 1:2 * BLOCK] == b"."
    assert data[3 * BLOCK - 1:3 * BLOCK + 2] == b"\r\n."
    source = world.source(data)
    started = time.monotonic()
    out, _ = deliver(world.config(), "example.test", [rcpt("u@example.test")], source)
    assert statuses(out) == {"u@example.test": DELIVERED}
    [msg] = world.sink("127.0.0.2").wait_for_messages(1)
    assert len(msg.data) == len(data) and msg.data == data
    assert time.monotonic() - started < 60


def test_disconnect_mid_data_defers(world: MailWorld) -> None:
    world.sink("127.0.0.2").behaviour = PRESETS["disconnect-data"]
    out, _ = deliver(world.config(), "example.test", [rcpt("u@example.test")],
                     world.source(MESSAGE * 2000))
    assert (out["u@example.test"].status, out["u@example.test"].enhanced) == (DEFERRED,
                                                                              "4.4.2")
    assert world.sink("127.0.0.2").messages == []


def test_slow_server_times_out_and_defers(world: MailWorld) -> None:
    world.sink("127.0.0.2").behaviour = Behaviour(delay=1.0)
    cfg = world.config(timeouts={"mail": "0.3s"})
    started = time.monotonic()
    out, _ = deliver(cfg, "example.test", [rcpt("u@example.test")], world.source(MESSAGE))
    outcome = out["u@example.test"]
    assert outcome.status == DEFERRED and "timeout" in outcome.text and "mail" in outcome.text
    assert time.monotonic() - started < 5
