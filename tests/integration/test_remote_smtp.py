"""RemoteTransport and SMTP extensions: per-recipient verdicts, PIPELINING, SIZE, 8BITMIME,
SMTPUTF8, DSN, CHUNKING/BINARYMIME and the HELO fallback, against a recording sink."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from empath.delivery.dispatch import Dispatcher
from empath.delivery.state import DEFERRED, DELIVERED, FAILED
from tests.support.mailworld import MESSAGE, MailWorld, deliver, envelope, rcpt, statuses
from tests.support.sink import PRESETS, Behaviour

ZONE: dict[str, dict[str, Any]] = {
    "example.test": {"MX": [(10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[MailWorld]:
    with MailWorld(tmp_path, ZONE, hosts=["127.0.0.2"]) as w:
        yield w


def sink_with(world: MailWorld, **changes: Any) -> Any:
    sink = world.sink("127.0.0.2")
    sink.behaviour = dataclasses.replace(Behaviour(), **changes)
    return sink


def commands(sink: Any, verb: str) -> list[str]:
    return [line for line in sink.commands() if line.upper().startswith(verb)]


@pytest.mark.parametrize("pipelining", [True, False])
def test_partial_recipient_failure_in_one_transaction(world: MailWorld,
                                                      pipelining: bool) -> None:
    sink = sink_with(world, pipelining=pipelining, rcpt_replies={
        "bad@example.test": (550, "5.1.1 no such user"),
        "later@example.test": (452, "4.2.2 mailbox full")})
    rcpts = [rcpt("good@example.test"), rcpt("bad@example.test"), rcpt("later@example.test")]
    out, _ = deliver(world.config(), "example.test", rcpts, world.source(MESSAGE))
    assert statuses(out) == {"good@example.test": DELIVERED, "bad@example.test": FAILED,
                             "later@example.test": DEFERRED}
    assert (out["bad@example.test"].code, out["bad@example.test"].enhanced) == (550, "5.1.1")
    assert out["later@example.test"].text == "mailbox full"
    [msg] = sink.wait_for_messages(1)
    assert msg.recipients == ["good@example.test"] and msg.data == MESSAGE
    assert len(commands(sink, "MAIL")) == 1


def test_pipelining_sends_the_envelope_in_one_write(world: MailWorld) -> None:
    sink = sink_with(world, pipelining=True)
    deliver(world.config(), "example.test", [rcpt("a@example.test"), rcpt("b@example.test")],
            world.source(MESSAGE))
    [session] = sink.sessions
    batch = next(b for b in session.batches() if b[0].startswith("MAIL"))
    assert [line.split(":")[0].split(" ")[0] for line in batch] == ["MAIL", "RCPT", "RCPT",
                                                                     "DATA"]


def test_without_pipelining_each_command_waits(world: MailWorld) -> None:
    sink = sink_with(world, pipelining=False)
    deliver(world.config(), "example.test", [rcpt("a@example.test"), rcpt("b@example.test")],
            world.source(MESSAGE))
    [session] = sink.sessions
    envelope_batches = [b for b in session.batches()
                        if b[0].split(" ")[0] in ("MAIL", "RCPT", "DATA")]
    assert [len(b) for b in envelope_batches] == [1, 1, 1, 1]
    assert len(sink.wait_for_messages(1)) == 1


def test_rejection_after_data_fails_every_accepted_recipient(world: MailWorld) -> None:
    sink_with(world, final_reply=(554, "5.7.1 message refused"),
              rcpt_replies={"b@example.test": (551, "5.1.6 moved")})
    out, _ = deliver(world.config(), "example.test",
                     [rcpt("a@example.test"), rcpt("b@example.test"), rcpt("c@example.test")],
                     world.source(MESSAGE))
    assert {a: (o.status, o.code) for a, o in out.items()} == {
        "a@example.test": (FAILED, 554), "b@example.test": (FAILED, 551),
        "c@example.test": (FAILED, 554)}


def test_size_limit_exceeded_fails_without_sending(world: MailWorld) -> None:
    sink = sink_with(world, size=100)
    out, _ = deliver(world.config(), "example.test", [rcpt("u@example.test")],
                     world.source(MESSAGE * 10))
    outcome = out["u@example.test"]
    assert (outcome.status, outcome.code, outcome.enhanced) == (FAILED, 552, "5.3.4")
    assert commands(sink, "MAIL") == [] and sink.messages == []


def test_declared_size_and_body_type(world: MailWorld) -> None:
    sink = sink_with(world, size=1_000_000)
    env = envelope(body="8BITMIME")
    out, _ = deliver(world.config(), "example.test", [rcpt("u@example.test")],
                     world.source(MESSAGE), env)
    assert statuses(out) == {"u@example.test": DELIVERED}
    [mail] = commands(sink, "MAIL")
    assert f"SIZE={len(MESSAGE)}" in mail and "BODY=8BITMIME" in mail


def test_8bit_message_sent_to_a_server_without_8bitmime(world: MailWorld) -> None:
    sink = sink_with(world, eightbitmime=False)
    data = "Subject: café\r\n\r\nnaïve\r\n".encode()
    out, _ = deliver(world.config(), "example.test", [rcpt("u@example.test")],
                     world.source(data), envelope(body="8BITMIME"))
    assert statuses(out) == {"u@example.test": DELIVERED}
    assert "BODY" not in commands(sink, "MAIL")[0]
    assert sink.wait_for_messages(1)[0].data == data


def test_smtputf8_message_to_a_server_without_smtputf8_fails(world: MailWorld) -> None:
    sink = sink_with(world, smtputf8=False)
    out, _ = deliver(world.config(), "example.test",
                     [rcpt("a@example.test"), rcpt("b@example.test")],
                     world.source(MESSAGE), envelope(sender="jörg@client.test", smtputf8=True))
    assert {(o.status, o.enhanced) for o in out.values()} == {(FAILED, "5.6.7")}
    assert commands(sink, "MAIL") == []


def test_smtputf8_message_to_a_server_with_smtputf8(world: MailWorld) -> None:
    sink = sink_with(world, smtputf8=True)
    out, _ = deliver(world.config(), "example.test", [rcpt("jörg@example.test")],
                     world.source(MESSAGE), envelope(sender="zoë@client.test", smtputf8=True))
    assert statuses(out) == {"jörg@example.test": DELIVERED}
    [msg] = sink.wait_for_messages(1)
    assert msg.mail_from == "zoë@client.test" and "SMTPUTF8" in msg.mail_params
    assert msg.recipients == ["jörg@example.test"]


def test_utf8_recipient_alone_fails_only_itself(world: MailWorld) -> None:
    sink = sink_with(world, smtputf8=False)
    out, _ = deliver(world.config(), "example.test",
                     [rcpt("jörg@example.test"), rcpt("joerg@example.test")],
                     world.source(MESSAGE))
    assert statuses(out) == {"jörg@example.test": FAILED, "joerg@example.test": DELIVERED}
    assert sink.wait_for_messages(1)[0].recipients == ["joerg@example.test"]


DSN_RCPT = rcpt("u@example.test", orcpt="rfc822;U+x@example.test", notify=["SUCCESS", "DELAY"])


def test_dsn_parameters_passed_when_offered(world: MailWorld) -> None:
    sink = sink_with(world, dsn=True)
    deliver(world.config(), "example.test", [DSN_RCPT], world.source(MESSAGE),
            envelope(ret="HDRS", envid="QID 42"))
    [msg] = sink.wait_for_messages(1)
    assert "RET=HDRS" in msg.mail_params and "ENVID=QID+2042" in msg.mail_params
    assert msg.rcpts == [("u@example.test", "NOTIFY=SUCCESS,DELAY ORCPT=rfc822;U+2Bx@example.test")]


def test_dsn_parameters_left_out_when_not_offered(world: MailWorld) -> None:
    sink = sink_with(world, dsn=False)
    out, _ = deliver(world.config(), "example.test", [DSN_RCPT], world.source(MESSAGE),
                     envelope(ret="FULL", envid="QID"))
    assert statuses(out) == {"u@example.test": DELIVERED}
    [msg] = sink.wait_for_messages(1)
    assert "RET=" not in msg.mail_params and "ENVID=" not in msg.mail_params
    assert msg.rcpts == [("u@example.test", "")]


def test_null_sender(world: MailWorld) -> None:
    sink = sink_with(world)
    deliver(world.config(), "example.test", [rcpt("u@example.test")], world.source(MESSAGE),
            envelope(sender=""))
    assert commands(sink, "MAIL")[0].startswith("MAIL FROM:<>")


def test_helo_fallback_when_ehlo_is_refused(world: MailWorld) -> None:
    sink = world.sink("127.0.0.2")
    sink.behaviour = PRESETS["no-ehlo"]
    out, _ = deliver(world.config(), "example.test", [rcpt("u@example.test")],
                     world.source(MESSAGE), envelope(body="8BITMIME", ret="HDRS"))
    assert statuses(out) == {"u@example.test": DELIVERED}
    verbs = sink.sessions[0].verbs()
    assert verbs[:3] == ["EHLO", "HELO", "MAIL"]
    assert commands(sink, "MAIL") == ["MAIL FROM:<s@client.test>"]  # no ESMTP parameters


def test_binarymime_goes_by_bdat(world: MailWorld) -> None:
    sink = sink_with(world, chunking=True)
    data = bytes(range(256)) * 600 + b"\r\n.\r\n"  # binary, with what DATA would end on
    out, _ = deliver(world.config(), "example.test", [rcpt("u@example.test")],
                     world.source(data), envelope(body="BINARYMIME"))
    assert statuses(out) == {"u@example.test": DELIVERED}
    [msg] = sink.wait_for_messages(1)
    assert msg.via == "BDAT" and msg.data == data and "BODY=BINARYMIME" in msg.mail_params
    assert len(commands(sink, "BDAT")) == 3  # 153,605 bytes in 64 KiB chunks


def test_binarymime_to_a_server_without_chunking_fails(world: MailWorld) -> None:
    sink = sink_with(world, chunking=False)
    out, _ = deliver(world.config(), "example.test", [rcpt("u@example.test")],
                     world.source(b"\x00\x01\r\n"), envelope(body="BINARYMIME"))
    assert (out["u@example.test"].status, out["u@example.test"].enhanced) == (FAILED, "5.6.3")
    assert commands(sink, "MAIL") == []


def test_dispatcher_routes_remote_domains_to_smtp(world: MailWorld, tmp_path: Path) -> None:
    sink = sink_with(world)
    cfg = world.config()
    source = world.source(MESSAGE)
    rcpts = [rcpt("u@example.test"), rcpt("v@example.test")]

    async def go() -> Any:
        dispatcher = Dispatcher(cfg)
        try:
            return await dispatcher.deliver({**envelope(), "recipients": rcpts}, rcpts, source)
        finally:
            await dispatcher.close()

    outcomes, infos = uvloop.run(go())
    assert statuses(outcomes) == {"u@example.test": DELIVERED, "v@example.test": DELIVERED}
    assert [i["transport"] for i in infos] == ["smtp"]
    assert sink.wait_for_messages(1)[0].recipients == ["u@example.test", "v@example.test"]
    assert sink.sessions[0].verbs()[-1] == "QUIT"


def test_sink_runs_as_a_process_and_speaks_to_smtplib(tmp_path: Path) -> None:
    """The sink's command-line mode, as other end-to-end tests use it (checked with the
    standard library's client, so the sink is not only tested against our own)."""
    out_dir = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.sink", "--listen", "127.0.0.1:0",
         "--out", str(out_dir), "--no-dsn", "--reject-rcpt", "bad@x.test=550"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            assert not client.has_extn("dsn") and client.has_extn("pipelining")
            refused = client.sendmail("s@a.test", ["u@x.test", "bad@x.test"],
                                      b"Subject: hi\r\n\r\n.leading dot\r\n")
        assert refused == {"bad@x.test": (550, b"5.1.1 no such user")}
        meta = json.loads((out_dir / "1.json").read_text())
        assert meta["mail_from"] == "s@a.test" and meta["rcpts"] == [["u@x.test", ""]]
        assert (out_dir / "1.eml").read_bytes() == b"Subject: hi\r\n\r\n.leading dot\r\n"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        if proc.stdout is not None:
            proc.stdout.close()
