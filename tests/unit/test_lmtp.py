"""LMTP delivery (empath/delivery/lmtp.py) and the client core's per-recipient final replies.

The first tests feed replies to the sans-IO Transaction; the rest deliver over loopback to the
test LMTP server (tests/support/lmtpserver.py), which parses LMTP with its own code.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml

from empath.config import load_config
from empath.delivery.client import ProtocolError, Reply, ReplyParser, Transaction
from empath.delivery.dispatch import Dispatcher
from empath.delivery.lmtp import LMTPTransport, server_label
from empath.delivery.state import DEFERRED, DELIVERED, FAILED, RecipientOutcome
from empath.spool import MessageSource
from tests.support.lmtpserver import Behaviour, LMTPServer

MESSAGE = b"Received: from a by b\r\nSubject: test\r\n\r\nHello.\r\n.dot\r\n..two\r\n"
TIMEOUTS = {"connect": "2s", "banner": "2s", "ehlo": "2s", "mail": "2s", "rcpt": "2s",
            "data_init": "2s", "data_block": "2s", "data_termination": "2s", "quit": "1s"}


# -- the sans-IO core ------------------------------------------------------------------------
def reply(text: bytes) -> Reply:
    [r] = ReplyParser().feed(text + b"\r\n")
    return r


def run_envelope(txn: Transaction, replies: list[bytes]) -> None:
    txn.start()
    for raw in replies:
        txn.receive(reply(raw))


def three(pipelining: bool = True) -> Transaction:
    return Transaction(b"MAIL FROM:<s@x>\r\n",
                       [(a, f"RCPT TO:<{a}>\r\n".encode()) for a in ("a@l", "b@l", "c@l")],
                       pipelining=pipelining)


def verdicts(out: dict[str, RecipientOutcome]) -> dict[str, tuple[str, int | None]]:
    return {addr: (o.status, o.code) for addr, o in out.items()}


@pytest.mark.parametrize("pipelining", [True, False])
def test_one_final_reply_per_accepted_recipient_in_rcpt_order(pipelining: bool) -> None:
    txn = three(pipelining)
    run_envelope(txn, [b"250 ok", b"250 ok", b"550 5.1.1 no such user", b"250 ok", b"354 go"])
    assert txn.accepted == ["a@l", "c@l"]
    out = txn.per_recipient_outcomes([reply(b"452 4.2.2 full"), reply(b"250 2.0.0 saved")],
                                     "lmtp")
    assert verdicts(out) == {"a@l": (DEFERRED, 452), "b@l": (FAILED, 550),
                             "c@l": (DELIVERED, 250)}
    assert out["a@l"].enhanced == "4.2.2" and out["a@l"].text == "full"
    assert out["c@l"].server == "lmtp"


def test_missing_final_replies_take_the_stand_in() -> None:
    txn = three()
    run_envelope(txn, [b"250 ok", b"250 ok", b"250 ok", b"250 ok", b"354 go"])
    lost = RecipientOutcome(DEFERRED, 451, "4.4.2", "connection lost", "lmtp")
    out = txn.per_recipient_outcomes([reply(b"250 2.0.0 saved")], "lmtp", missing=lost)
    assert verdicts(out) == {"a@l": (DELIVERED, 250), "b@l": (DEFERRED, 451),
                             "c@l": (DEFERRED, 451)}
    with pytest.raises(ProtocolError):
        txn.per_recipient_outcomes([reply(b"250 2.0.0 saved")], "lmtp")


def test_refusals_before_the_data_decide_as_in_smtp() -> None:
    refused_mail = three(pipelining=False)
    run_envelope(refused_mail, [b"451 4.3.0 try later"])
    assert {o.code for o in refused_mail.per_recipient_outcomes([], "l").values()} == {451}
    refused_data = three()
    run_envelope(refused_data, [b"250 ok", b"250 ok", b"250 ok", b"250 ok", b"554 5.0.0 no"])
    out = refused_data.per_recipient_outcomes([], "l")
    assert verdicts(out) == {a: (FAILED, 554) for a in ("a@l", "b@l", "c@l")}


def test_smtp_outcomes_still_use_one_final_reply() -> None:
    txn = three()
    run_envelope(txn, [b"250 ok", b"250 ok", b"550 5.1.1 no", b"250 ok", b"354 go"])
    out = txn.outcomes(reply(b"250 2.0.0 queued"), "mx")
    assert verdicts(out) == {"a@l": (DELIVERED, 250), "b@l": (FAILED, 550),
                             "c@l": (DELIVERED, 250)}


# -- delivering over loopback ----------------------------------------------------------------
@pytest.fixture
def server() -> Iterator[LMTPServer]:
    with LMTPServer() as s:
        yield s


def config(tmp_path: Path, address: str | None, **delivery: Any) -> Any:
    document = {"base_dir": str(tmp_path), "hostname": "mx.empath.test",
                "local_domains": ["localhost", "example.test"],
                "local_delivery": {"lmtp": address, "maildir_root": str(tmp_path / "mail")},
                "delivery": {"timeouts": TIMEOUTS, **delivery}}
    path = tmp_path / "empath.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_config(str(path))


def source(tmp_path: Path, data: bytes = MESSAGE) -> MessageSource:
    path = tmp_path / "queued"
    path.write_bytes(b"HEAD" + data + b"\n{\"envelope\": true}\n")
    return MessageSource(str(path), 4, len(data))


def envelope(sender: str = "s@client.test", **params: Any) -> dict[str, Any]:
    base = {"body": "7BIT", "smtputf8": False, "size": 0, "ret": None, "envid": None}
    return {"id": "01TESTMESSAGE", "sender": sender, "params": {**base, **params}}


def rcpts(*addresses: str) -> list[dict[str, Any]]:
    return [{"address": a, "orcpt": None, "notify": None} for a in addresses]


def deliver(cfg: Any, addresses: list[str], src: MessageSource,
            env: dict[str, Any] | None = None
            ) -> tuple[dict[str, RecipientOutcome], dict[str, Any]]:
    async def go() -> tuple[dict[str, RecipientOutcome], dict[str, Any]]:
        return await LMTPTransport(cfg).deliver("localhost", env or envelope(),
                                                rcpts(*addresses), src)

    return uvloop.run(go())


def statuses(out: dict[str, RecipientOutcome]) -> dict[str, str]:
    return {addr: o.status for addr, o in out.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize("pipelining", [True, False])
def test_each_recipient_gets_its_own_verdict(tmp_path: Path, server: LMTPServer,
                                             pipelining: bool) -> None:
    server.behaviour = Behaviour(pipelining=pipelining)
    server.verdicts.update({"later@localhost": (452, "4.2.2 mailbox full"),
                            "gone@localhost": (552, "5.2.2 over quota for good")})
    out, info = deliver(config(tmp_path, server.address),
                        ["ok@localhost", "later@localhost", "gone@localhost"], source(tmp_path))
    assert statuses(out) == {"ok@localhost": DELIVERED, "later@localhost": DEFERRED,
                             "gone@localhost": FAILED}
    later = out["later@localhost"]
    assert (later.code, later.enhanced, later.text) == (452, "4.2.2", "mailbox full")
    assert out["gone@localhost"].server == server_label("127.0.0.1", server.port)
    assert info == {"domain": "localhost", "transport": "lmtp", "server": server.address,
                    "duration": info["duration"]}
    [msg] = server.wait_for_messages(1)
    assert msg.data == MESSAGE and msg.mail_from == "s@client.test"
    assert msg.recipients == ["ok@localhost", "later@localhost", "gone@localhost"]
    verbs = [line.split()[0].upper() for line in server.commands()]
    assert verbs == ["LHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "QUIT"]
    assert server.commands()[0] == "LHLO mx.empath.test"


def test_rcpt_refusals_and_final_replies_line_up(tmp_path: Path, server: LMTPServer) -> None:
    server.rcpt_verdicts.update({"a@localhost": (550, "5.1.1 no such user"),
                                 "c@localhost": (450, "4.2.1 try later")})
    server.verdicts.update({"b@localhost": (452, "4.2.2 full")})
    out, _ = deliver(config(tmp_path, server.address),
                     ["a@localhost", "b@localhost", "c@localhost", "d@localhost"],
                     source(tmp_path))
    assert {a: (o.status, o.code) for a, o in out.items()} == {
        "a@localhost": (FAILED, 550), "b@localhost": (DEFERRED, 452),
        "c@localhost": (DEFERRED, 450), "d@localhost": (DELIVERED, 250)}
    [msg] = server.wait_for_messages(1)
    assert msg.recipients == ["b@localhost", "d@localhost"]


@pytest.mark.parametrize("pipelining", [True, False])
def test_nobody_accepted_sends_no_message(tmp_path: Path, server: LMTPServer,
                                          pipelining: bool) -> None:
    server.behaviour = Behaviour(pipelining=pipelining)
    server.rcpt_verdicts.update({"a@localhost": (550, "5.1.1 no"),
                                 "b@localhost": (550, "5.1.1 no")})
    out, _ = deliver(config(tmp_path, server.address), ["a@localhost", "b@localhost"],
                     source(tmp_path))
    assert statuses(out) == {"a@localhost": FAILED, "b@localhost": FAILED}
    assert server.messages == []
    assert server.commands()[-1] == "QUIT"


def test_unreachable_server_defers_everyone(tmp_path: Path) -> None:
    out, _ = deliver(config(tmp_path, f"127.0.0.1:{free_port()}"),
                     ["a@localhost", "b@localhost"], source(tmp_path))
    assert statuses(out) == {"a@localhost": DEFERRED, "b@localhost": DEFERRED}
    assert {(o.code, o.enhanced) for o in out.values()} == {(451, "4.4.1")}


@pytest.mark.parametrize("change", [{"greeting": (554, "5.3.2 not now")},
                                    {"greeting": (421, "4.3.2 shutting down")},
                                    {"lhlo_reply": (500, "5.5.1 what")}])
def test_a_refused_session_defers_even_on_5xx(tmp_path: Path, server: LMTPServer,
                                              change: dict[str, Any]) -> None:
    server.behaviour = Behaviour(**change)
    out, _ = deliver(config(tmp_path, server.address), ["a@localhost"], source(tmp_path))
    assert out["a@localhost"].status == DEFERRED
    assert out["a@localhost"].code == 451 and "session refused" in out["a@localhost"].text


def test_final_reply_timeout_defers(tmp_path: Path, server: LMTPServer) -> None:
    server.behaviour = Behaviour(final_delay=1.5)
    cfg = config(tmp_path, server.address, timeouts={**TIMEOUTS, "data_termination": "0.3s"})
    out, _ = deliver(cfg, ["a@localhost", "b@localhost"], source(tmp_path))
    assert statuses(out) == {"a@localhost": DEFERRED, "b@localhost": DEFERRED}
    assert out["a@localhost"].enhanced == "4.4.2" and "timeout" in out["a@localhost"].text


@pytest.mark.parametrize("replied", [0, 1, 2])
def test_connection_lost_between_final_replies_keeps_those_given(
        tmp_path: Path, server: LMTPServer, replied: int) -> None:
    server.behaviour = Behaviour(close_after_finals=replied)
    addresses = ["a@localhost", "b@localhost", "c@localhost"]
    out, _ = deliver(config(tmp_path, server.address), addresses, source(tmp_path))
    assert statuses(out) == {a: DELIVERED if i < replied else DEFERRED
                             for i, a in enumerate(addresses)}
    assert {out[a].enhanced for a in addresses[replied:]} == {"4.4.2"}


def test_large_message_with_dot_lines_arrives_intact(tmp_path: Path,
                                                     server: LMTPServer) -> None:
    body = b"".join(b".%06d line that starts with a dot\r\n" % i for i in range(40000))
    data = b"Subject: big\r\n\r\n" + body + b"last line without CRLF"
    out, _ = deliver(config(tmp_path, server.address), ["a@localhost"],
                     source(tmp_path, data))
    assert statuses(out) == {"a@localhost": DELIVERED}
    [msg] = server.wait_for_messages(1)
    assert msg.data == data + b"\r\n"  # a message must end with CRLF on the wire


def test_binarymime_goes_in_bdat_chunks_with_one_reply_per_recipient(
        tmp_path: Path, server: LMTPServer) -> None:
    server.behaviour = Behaviour(chunking=True)
    server.verdicts["b@localhost"] = (550, "5.7.1 refused by filter")
    data = b"Subject: bin\r\n\r\n" + bytes(range(256)) * 600  # more than one block
    out, _ = deliver(config(tmp_path, server.address), ["a@localhost", "b@localhost"],
                     source(tmp_path, data), envelope(body="BINARYMIME"))
    assert statuses(out) == {"a@localhost": DELIVERED, "b@localhost": FAILED}
    [msg] = server.wait_for_messages(1)
    assert msg.data == data and "BODY=BINARYMIME" in msg.mail_params
    assert sum(line.startswith("BDAT") for line in server.commands()) == 3


def test_binarymime_without_chunking_fails(tmp_path: Path, server: LMTPServer) -> None:
    out, _ = deliver(config(tmp_path, server.address), ["a@localhost"], source(tmp_path),
                     envelope(body="BINARYMIME"))
    assert (out["a@localhost"].status, out["a@localhost"].code) == (FAILED, 554)
    assert server.messages == []


def test_size_limit_of_the_server_fails_the_message(tmp_path: Path,
                                                     server: LMTPServer) -> None:
    server.behaviour = Behaviour(size=10)
    out, _ = deliver(config(tmp_path, server.address), ["a@localhost"], source(tmp_path))
    assert (out["a@localhost"].status, out["a@localhost"].enhanced) == (FAILED, "5.3.4")


def test_utf8_message_goes_to_a_server_without_smtputf8(tmp_path: Path,
                                                        server: LMTPServer) -> None:
    data = "Subject: Grüße\r\n\r\nHallo\r\n".encode()
    out, _ = deliver(config(tmp_path, server.address), ["a@localhost"],
                     source(tmp_path, data), envelope(smtputf8=True, body="8BITMIME"))
    assert statuses(out) == {"a@localhost": DELIVERED}
    assert server.wait_for_messages(1)[0].data == data


def test_connections_at_once_are_limited(tmp_path: Path, server: LMTPServer) -> None:
    server.behaviour = Behaviour(final_delay=0.1)
    cfg = config(tmp_path, server.address, max_connections=2)
    src = source(tmp_path)

    async def go() -> list[tuple[dict[str, RecipientOutcome], dict[str, Any]]]:
        transport = LMTPTransport(cfg)
        return list(await asyncio.gather(*(
            transport.deliver("localhost", envelope(), rcpts(f"u{i}@localhost"), src)
            for i in range(6))))

    results = uvloop.run(go())
    assert all(out[f"u{i}@localhost"].status == DELIVERED
               for i, (out, _) in enumerate(results))
    assert server.sessions == 6 and server.most_active == 2


def test_dispatcher_sends_local_domains_to_lmtp_when_configured(
        tmp_path: Path, server: LMTPServer) -> None:
    cfg = config(tmp_path, server.address)

    async def go() -> tuple[dict[str, RecipientOutcome], list[dict[str, Any]]]:
        dispatcher = Dispatcher(cfg)
        try:
            return await dispatcher.deliver(envelope(), rcpts("a@localhost", "b@example.test"),
                                            source(tmp_path))
        finally:
            await dispatcher.close()

    out, infos = uvloop.run(go())
    assert statuses(out) == {"a@localhost": DELIVERED, "b@example.test": DELIVERED}
    assert sorted(i["domain"] for i in infos) == ["example.test", "localhost"]
    assert {i["transport"] for i in infos} == {"lmtp"}
    assert not (tmp_path / "mail").exists()
    assert len(server.wait_for_messages(2)) == 2


# -- strict reply matching against a misbehaving LMTP server (issue 23) --------------------
def test_a_3xx_after_the_dot_defers_that_recipient_and_the_rest(tmp_path: Path,
                                                                server: LMTPServer) -> None:
    server.verdicts.update({"b@localhost": (354, "more data please")})
    addresses = ["a@localhost", "b@localhost", "c@localhost"]
    out, _ = deliver(config(tmp_path, server.address), addresses, source(tmp_path))
    # a's reply came in its turn and stands; b's is a protocol error, c's is not trusted
    assert statuses(out) == {"a@localhost": DELIVERED, "b@localhost": DEFERRED,
                             "c@localhost": DEFERRED}
    assert out["b@localhost"].enhanced == "4.5.0" and "end of data" in out["b@localhost"].text


def test_a_3xx_to_rcpt_defers_everyone_without_data(tmp_path: Path,
                                                    server: LMTPServer) -> None:
    server.rcpt_verdicts.update({"b@localhost": (354, "go ahead")})
    out, _ = deliver(config(tmp_path, server.address), ["a@localhost", "b@localhost"],
                     source(tmp_path))
    assert set(statuses(out).values()) == {DEFERRED}
    assert server.messages == []  # DATA never followed


def test_a_stray_final_reply_is_a_protocol_error(tmp_path: Path, server: LMTPServer) -> None:
    server.verdicts.update({"a@localhost": (250, "2.0.0 saved\r\n250 2.0.0 saved again")})
    out, _ = deliver(config(tmp_path, server.address), ["a@localhost"], source(tmp_path))
    assert statuses(out) == {"a@localhost": DELIVERED}  # its own reply came first
    assert "QUIT" not in [line.split()[0].upper() for line in server.commands()]
