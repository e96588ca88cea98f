"""The SMTP client's sans-IO core (empath/delivery/client.py): bytes in, commands and verdicts out.

The last tests wire the client core to the receiver's own sans-IO session (pair-style, no
sockets): what one side writes, the other reads.
"""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from empath.delivery.client import (
    DotStuffer,
    Extensions,
    ProtocolError,
    Reply,
    ReplyParser,
    Transaction,
    mail_command,
    needs_smtputf8,
    rcpt_command,
)
from empath.delivery.state import DEFERRED, DELIVERED, FAILED
from empath.smtp import session as S

# -- replies -------------------------------------------------------------------------------


def parse(data: bytes) -> list[Reply]:
    return ReplyParser().feed(data)


def test_single_line_reply_with_enhanced_code() -> None:
    [reply] = parse(b"250 2.1.5 recipient <a@b> OK\r\n")
    assert (reply.code, reply.enhanced, reply.text) == (250, "2.1.5", "recipient <a@b> OK")
    assert reply.is_positive and not reply.is_permanent


def test_multiline_reply_strips_enhanced_code_from_every_line() -> None:
    [reply] = parse(b"550-5.1.1 first line\r\n550-5.1.1 second\r\n550 5.1.1 last\r\n")
    assert reply.code == 550 and reply.enhanced == "5.1.1"
    assert reply.lines == ("first line", "second", "last")
    assert reply.text == "first line second last"


def test_enhanced_code_of_another_class_is_text() -> None:
    [reply] = parse(b"250 5.1.1 not an enhanced code here\r\n")
    assert reply.enhanced is None and reply.text == "5.1.1 not an enhanced code here"


def test_bare_code_and_no_enhanced_code() -> None:
    replies = parse(b"354\r\n220 mx.test ESMTP\r\n")
    assert [(r.code, r.enhanced, r.text) for r in replies] == [
        (354, None, ""), (220, None, "mx.test ESMTP")]


def test_replies_fed_byte_by_byte_and_bare_lf() -> None:
    parser = ReplyParser()
    data = b"250-mx.test\r\n250-PIPELINING\n250 SIZE 100\r\n451 4.3.0 later\r\n"
    out: list[Reply] = []
    for i in range(len(data)):
        out += parser.feed(data[i:i + 1])
        if i < data.index(b"250 SIZE"):
            assert out == []
    assert [r.code for r in out] == [250, 451]
    assert out[0].lines == ("mx.test", "PIPELINING", "SIZE 100")
    assert out[1].enhanced == "4.3.0" and not parser.pending


@pytest.mark.parametrize("data", [
    b"hello\r\n", b"25\r\n", b"650 no such class\r\n", b"250_x\r\n",
    b"250-one\r\n251 two\r\n",  # the code changes inside one reply
    b"250 " + b"x" * 70000,  # a line that never ends, past the reply limit
])
def test_malformed_replies_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        ReplyParser().feed(data)


def test_endless_multiline_reply_is_bounded() -> None:
    parser = ReplyParser()
    with pytest.raises(ProtocolError):
        for _ in range(10_000):
            parser.feed(b"250-" + b"k" * 100 + b"\r\n")


def test_extensions_from_ehlo() -> None:
    [reply] = parse(b"250-mx.test greets\r\n250-pipelining\r\n250-SIZE 1000\r\n"
                    b"250-AUTH PLAIN LOGIN\r\n250 DSN\r\n")
    ext = Extensions.from_reply(reply)
    assert ext.has("PIPELINING") and ext.has("DSN") and not ext.has("STARTTLS")
    assert ext.keywords["AUTH"] == "PLAIN LOGIN"
    assert ext.size_limit == 1000
    assert Extensions({"SIZE": ""}).size_limit is None
    assert Extensions({"SIZE": "0"}).size_limit is None


# -- commands ------------------------------------------------------------------------------
ALL = Extensions({k: "" for k in ("SIZE", "8BITMIME", "SMTPUTF8", "DSN", "PIPELINING")})
NONE = Extensions()


def envelope(**params: object) -> dict[str, object]:
    base = {"body": None, "smtputf8": False, "size": 10, "ret": None, "envid": None}
    base.update(params)
    return {"id": "X", "sender": "s@a.test", "params": base}


def test_mail_command_passes_parameters_the_server_offers() -> None:
    env = envelope(body="8BITMIME", ret="HDRS", envid="id+1 x=", smtputf8=True)
    assert mail_command(env, 1234, ALL) == (
        b"MAIL FROM:<s@a.test> SIZE=1234 BODY=8BITMIME SMTPUTF8 RET=HDRS "
        b"ENVID=id+2B1+20x+3D\r\n")


def test_mail_command_leaves_out_what_the_server_lacks() -> None:
    env = envelope(body="8BITMIME", ret="FULL", envid="e")
    # 8-bit data is sent without BODY= to a server without 8BITMIME (documented choice).
    assert mail_command(env, 10, NONE) == b"MAIL FROM:<s@a.test>\r\n"
    assert mail_command({**env, "sender": ""}, 10, NONE) == b"MAIL FROM:<>\r\n"


def test_rcpt_command_dsn_only_when_offered_and_xtext_encoded() -> None:
    rcpt = {"address": "u@b.test", "orcpt": "rfc822;u+x=y@b.test",
            "notify": ["SUCCESS", "FAILURE"]}
    assert rcpt_command(rcpt, ALL) == (
        b"RCPT TO:<u@b.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+2Bx+3Dy@b.test\r\n")
    assert rcpt_command(rcpt, NONE) == b"RCPT TO:<u@b.test>\r\n"
    never = {"address": "u@b.test", "orcpt": None, "notify": ["NEVER"]}
    assert rcpt_command(never, ALL) == b"RCPT TO:<u@b.test> NOTIFY=NEVER\r\n"
    utf8 = {"address": "u@b.test", "orcpt": "rfc822;ü@b.test", "notify": None}
    assert rcpt_command(utf8, ALL) == b"RCPT TO:<u@b.test>\r\n"


def test_needs_smtputf8() -> None:
    assert needs_smtputf8(envelope(smtputf8=True))
    assert needs_smtputf8({**envelope(), "sender": "jö@a.test"})
    assert not needs_smtputf8(envelope())


# -- the transaction -----------------------------------------------------------------------
def reply(line: str) -> Reply:
    [r] = parse(line.encode() + b"\r\n")
    return r


RCPTS = [("a@x.test", b"RCPT TO:<a@x.test>\r\n"), ("b@x.test", b"RCPT TO:<b@x.test>\r\n"),
         ("c@x.test", b"RCPT TO:<c@x.test>\r\n")]
MAIL = b"MAIL FROM:<s@a.test>\r\n"


def test_pipelined_batch_is_mail_rcpts_data_in_order() -> None:
    txn = Transaction(MAIL, RCPTS, pipelining=True)
    assert txn.start() == MAIL + b"".join(c for _, c in RCPTS) + b"DATA\r\n"
    stages = []
    for line in ["250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 no such user", "451 4.2.1 later",
                 "354 go"]:
        stages.append(txn.expecting)
        assert txn.receive(reply(line)) == b""  # nothing more to write while pipelining
    assert stages == ["mail", "rcpt", "rcpt", "rcpt", "data_init"]
    assert txn.finished and txn.send_message and txn.accepted == ["a@x.test"]
    out = txn.outcomes(reply("250 2.0.0 queued"), "mx.test")
    assert out["a@x.test"].status == DELIVERED and out["a@x.test"].server == "mx.test"
    assert (out["b@x.test"].status, out["b@x.test"].code, out["b@x.test"].enhanced) == (
        FAILED, 550, "5.1.1")
    assert out["c@x.test"].status == DEFERRED


def test_lockstep_sends_each_command_after_the_previous_reply() -> None:
    txn = Transaction(MAIL, RCPTS, pipelining=False)
    assert txn.start() == MAIL
    assert txn.receive(reply("250 ok")) == RCPTS[0][1]
    assert txn.receive(reply("250 ok")) == RCPTS[1][1]
    assert txn.receive(reply("550 no")) == RCPTS[2][1]
    assert txn.receive(reply("250 ok")) == b"DATA\r\n"
    assert txn.receive(reply("354 go")) == b""
    assert txn.finished and txn.accepted == ["a@x.test", "c@x.test"]


def test_lockstep_without_accepted_recipients_sends_no_data() -> None:
    txn = Transaction(MAIL, RCPTS[:2], pipelining=False)
    txn.start()
    txn.receive(reply("250 ok"))
    txn.receive(reply("550 5.1.1 no"))
    assert txn.receive(reply("551 5.1.6 moved")) == b""
    assert txn.finished and not txn.send_message
    out = txn.outcomes(None, "mx")
    assert [o.code for o in out.values()] == [550, 551]


@pytest.mark.parametrize("pipelining", [True, False])
def test_mail_failure_decides_for_every_recipient(pipelining: bool) -> None:
    txn = Transaction(MAIL, RCPTS, pipelining=pipelining)
    txn.start()
    txn.receive(reply("550 5.7.1 sender rejected"))
    if pipelining:  # the server still answers the rest of the batch
        for _ in RCPTS:
            txn.receive(reply("503 5.5.1 need MAIL"))
        txn.receive(reply("503 5.5.1 need MAIL"))
    assert txn.finished and not txn.send_message
    out = txn.outcomes(None, "mx")
    assert {o.code for o in out.values()} == {550}
    assert {o.status for o in out.values()} == {FAILED}


def test_temporary_mail_failure_defers_everyone() -> None:
    txn = Transaction(MAIL, RCPTS[:1], pipelining=False)
    txn.start()
    txn.receive(reply("451 4.7.1 greylisted"))
    assert txn.outcomes(None, "mx")["a@x.test"].status == DEFERRED


def test_final_reply_applies_to_accepted_recipients_only() -> None:
    txn = Transaction(MAIL, RCPTS[:2], pipelining=True)
    txn.start()
    for line in ["250 ok", "250 ok", "550 5.1.1 unknown", "354 go"]:
        txn.receive(reply(line))
    out = txn.outcomes(reply("554 5.6.0 content rejected"), "mx")
    assert (out["a@x.test"].status, out["a@x.test"].code) == (FAILED, 554)
    assert out["b@x.test"].code == 550


def test_rejected_data_command_applies_to_accepted_recipients() -> None:
    txn = Transaction(MAIL, RCPTS[:2], pipelining=True)
    txn.start()
    for line in ["250 ok", "250 ok", "250 ok", "451 4.3.0 no DATA now"]:
        txn.receive(reply(line))
    assert not txn.send_message
    out = txn.outcomes(None, "mx")
    assert {o.status for o in out.values()} == {DEFERRED}


def test_pipelined_354_without_accepted_recipients_needs_an_empty_data() -> None:
    txn = Transaction(MAIL, RCPTS[:1], pipelining=True)
    txn.start()
    for line in ["250 ok", "550 no", "354 go"]:
        txn.receive(reply(line))
    assert txn.data_accepted and not txn.accepted and not txn.send_message


def test_bdat_transaction_has_no_data_command() -> None:
    txn = Transaction(MAIL, RCPTS[:1], pipelining=True, use_data=False)
    assert not txn.start().endswith(b"DATA\r\n")
    txn.receive(reply("250 ok"))
    txn.receive(reply("250 ok"))
    assert txn.finished and txn.send_message
    assert txn.outcomes(reply("250 done"), "mx")["a@x.test"].status == DELIVERED


def test_reply_after_the_envelope_is_a_protocol_error() -> None:
    txn = Transaction(MAIL, RCPTS[:1], pipelining=False)
    txn.start()
    txn.receive(reply("550 no"))
    with pytest.raises(ProtocolError):
        txn.receive(reply("250 ok"))


# -- dot-stuffing across blocks ------------------------------------------------------------
def reference_stuffing(data: bytes) -> bytes:
    """Line by line: CRLF, a bare CR and a bare LF each end a line, sent as CRLF."""
    lines = re.split(b"\r\n|\r|\n", data)
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def stuff_in_blocks(data: bytes, cuts: list[int]) -> bytes:
    stuffer = DotStuffer()
    out, start = [], 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out.append(stuffer.feed(data[start:cut]))
        start = cut
    out.append(stuffer.finish())
    return b"".join(out)


def test_dot_at_block_boundaries() -> None:
    data = b".a\r\nb\r\n.c\r\n..d\r\n.\r\n"
    for cut in range(len(data) + 1):
        assert stuff_in_blocks(data, [cut]) == reference_stuffing(data), cut


def test_empty_message_and_missing_final_crlf() -> None:
    assert stuff_in_blocks(b"", []) == b".\r\n"
    assert stuff_in_blocks(b"x\r\n.y", [4]) == b"x\r\n..y\r\n.\r\n"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b".", b"\r\n", b"a", b"\r", b"\n", b"..", b"x."]),
                max_size=60),
       st.lists(st.integers(min_value=0, max_value=120), max_size=8))
def test_stuffing_is_independent_of_block_boundaries(parts: list[bytes],
                                                     cuts: list[int]) -> None:
    data = b"".join(parts) + b"\r\n"
    cuts = [c for c in cuts if c <= len(data)]
    assert stuff_in_blocks(data, cuts) == reference_stuffing(data)


# -- pair-style: the client core against the receiver's session ----------------------------
class Pair:
    """Client core on one side, empath.smtp.session.ServerSession on the other."""

    def __init__(self) -> None:
        settings_ = S.Settings(hostname="mx.test", local_domains=frozenset({"x.test"}))
        self.server = S.ServerSession(settings_)
        self.parser = ReplyParser()
        self.replies: list[Reply] = []
        self.writes: list[bytes] = []
        self.stored: list[tuple[S.Envelope, bytes]] = []
        self._data: list[bytes] = []
        self.handle(self.server.start())

    def handle(self, events: list[S.Event]) -> None:
        for ev in events:
            if isinstance(ev, S.Send):
                self.replies += self.parser.feed(ev.data)
            elif isinstance(ev, S.DataStart):
                self._data = []
            elif isinstance(ev, S.Data):
                self._data.append(ev.chunk)
            elif isinstance(ev, S.DataEnd):
                self.stored.append((ev.envelope, b"".join(self._data)))
                self.handle(self.server.message_stored(f"Q{len(self.stored)}"))

    def send(self, data: bytes) -> None:
        self.writes.append(data)
        self.handle(self.server.feed(data))

    def next_reply(self) -> Reply:
        return self.replies.pop(0)


def test_pair_pipelined_transaction_with_dsn_and_a_refused_recipient() -> None:
    pair = Pair()
    assert pair.next_reply().code == 220
    pair.send(b"EHLO client.test\r\n")
    ext = Extensions.from_reply(pair.next_reply())
    assert ext.has("PIPELINING") and ext.has("DSN")
    env = {**envelope(body="8BITMIME", ret="HDRS", envid="env 1"), "sender": "s@a.test"}
    rcpts = [{"address": "u@x.test", "orcpt": "rfc822;U+1@x.test", "notify": ["FAILURE"]},
             {"address": "v@elsewhere.test", "orcpt": None, "notify": None}]
    txn = Transaction(mail_command(env, 50, ext),
                      [(r["address"], rcpt_command(r, ext)) for r in rcpts],
                      pipelining=ext.has("PIPELINING"))
    pair.send(txn.start())
    assert len(pair.writes) == 2  # EHLO, then the whole envelope in one write
    while not txn.finished:
        txn.receive(pair.next_reply())
    assert txn.send_message and txn.accepted == ["u@x.test"]
    body = b"Subject: t\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n"
    rng = random.Random(7)
    stuffer = DotStuffer()
    pos = 0
    while pos < len(body):
        step = rng.randint(1, 7)
        pair.send(stuffer.feed(body[pos:pos + step]))
        pos += step
    pair.send(stuffer.finish())
    out = txn.outcomes(pair.next_reply(), "mx.test")
    assert out["u@x.test"].status == DELIVERED
    assert out["v@elsewhere.test"].status == FAILED  # relay denied by the receiver
    [(stored_env, data)] = pair.stored
    assert data == body
    assert stored_env.envid == "env 1" and stored_env.ret == "HDRS"
    assert stored_env.recipients[0]["orcpt"] == "rfc822;U+1@x.test"
    assert stored_env.recipients[0]["notify"] == ["FAILURE"]
