"""The SMTP client's sans-IO core (empath/delivery/client.py): bytes in, commands and verdicts out.

The client core against the receiver's own sans-IO session (pair-style, no sockets) is in
test_client_pair.py.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from empath.delivery.client import (
    DotStuffer,
    Extensions,
    LINE_LENGTH_LIMIT,
    ProtocolError,
    Reply,
    ReplyChannel,
    ReplyParser,
    Transaction,
    mail_command,
    needs_smtputf8,
    rcpt_command,
)
from empath.delivery.state import DEFERRED, DELIVERED, FAILED

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


# -- strict reply matching: scripted peers, in memory --------------------------------------
def run_script(pipelining: bool, script: list[str],
               rcpts: list[tuple[str, bytes]] = RCPTS[:1]) -> Transaction:
    """Feed a peer's scripted replies to a transaction through a ReplyChannel, as the
    connection does: each write declares how many replies it asks for."""
    txn = Transaction(MAIL, rcpts, pipelining=pipelining)
    channel = ReplyChannel(expected=0)
    channel.expect(txn.start_replies, "mail")
    peer = iter(script)
    while not txn.finished:
        if not channel.pending:
            channel.feed(next(peer).encode() + b"\r\n")
        reply = channel.next()
        assert reply is not None
        follow = txn.receive(reply)
        if follow:
            channel.expect(1, "next")
    return txn


@pytest.mark.parametrize("pipelining", [True, False])
def test_250_to_data_is_a_protocol_error_not_a_delivery(pipelining: bool) -> None:
    with pytest.raises(ProtocolError, match="to DATA"):
        run_script(pipelining, ["250 2.1.0 ok", "250 2.1.5 ok", "250 2.0.0 ok"])


def test_pipelined_replies_out_of_order_are_a_protocol_error() -> None:
    # 354 first: the server answered DATA before MAIL and RCPT.
    with pytest.raises(ProtocolError, match="to MAIL"):
        run_script(True, ["354 go ahead", "250 2.1.0 ok", "250 2.1.5 ok"])


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize(("script", "command"), [
    (["354 go ahead"], "MAIL"),
    (["250 2.1.0 ok", "354 go ahead"], "RCPT"),
])
def test_3xx_to_mail_or_rcpt_is_a_protocol_error(pipelining: bool, script: list[str],
                                                 command: str) -> None:
    with pytest.raises(ProtocolError, match=f"to {command}"):
        run_script(pipelining, script + ["354 go", "354 go"])


def test_only_a_2xx_after_the_final_dot_delivers() -> None:
    txn = run_script(True, ["250 ok", "250 ok", "354 go"])
    with pytest.raises(ProtocolError, match="end of data"):
        txn.outcomes(reply("354 more please"), "mx")
    assert txn.outcomes(reply("250 2.0.0 queued"), "mx")["a@x.test"].status == DELIVERED
    lmtp = run_script(True, ["250 ok", "250 ok", "354 go"])
    with pytest.raises(ProtocolError):
        lmtp.per_recipient_outcomes([reply("354 again")], "lmtp")


def test_a_stray_reply_after_the_final_one_breaks_the_channel() -> None:
    """``250`` twice after the dot: the first is the verdict, the second makes the
    connection unusable (the next command would be answered one step behind)."""
    channel = ReplyChannel(expected=0)
    channel.expect(1, "data_termination")
    with pytest.raises(ProtocolError, match="unexpected reply"):
        channel.feed(b"250 2.0.0 queued\r\n250 2.0.0 queued again\r\n")
    first = channel.next()
    assert first is not None and first.code == 250
    with pytest.raises(ProtocolError):
        channel.next()
    with pytest.raises(ProtocolError):
        channel.expect(1, "RSET")


def test_a_reply_arriving_while_none_is_expected_is_refused() -> None:
    channel = ReplyChannel(expected=0)
    with pytest.raises(ProtocolError, match="unexpected reply"):
        channel.feed(b"250 2.1.5 ok\r\n")
    assert channel.error is not None


def test_unread_bytes_refuse_the_next_command() -> None:
    channel = ReplyChannel(expected=0)
    channel.expect(1, "mail")
    channel.feed(b"250 ok\r\n")
    assert channel.next() is not None
    channel.feed(b"25")  # half a reply nobody asked for, not yet complete
    with pytest.raises(ProtocolError, match="before rcpt"):
        channel.expect(1, "rcpt")


def test_replies_in_turn_pass_through_the_channel() -> None:
    channel = ReplyChannel()  # the greeting
    channel.feed(b"220 hi\r\n")
    assert channel.next().code == 220  # type: ignore[union-attr]
    channel.expect(3, "mail")
    channel.feed(b"250 a\r\n250 b\r")
    channel.feed(b"\n354 c\r\n")
    assert [channel.next().code for _ in range(3)] == [250, 250, 354]  # type: ignore[union-attr]
    assert channel.next() is None and not channel.pending
    channel.expect(1, "data_termination")  # nothing unread: allowed


# -- reply text made safe where it enters ------------------------------------------------
def test_reply_text_is_made_printable() -> None:
    [r] = parse(b"550 5.7.1 bad\x00nul \x1b[31mred\x07 \xff\xfe \xe2\x80\xae "
                b"\xc2\x9b caf\xc3\xa9\r\n")
    assert r.text == "bad?nul ?[31mred? ?? ? ? café"
    assert all(ch.isprintable() for ch in str(r))


def test_a_long_reply_line_is_cut_not_refused() -> None:
    [r] = parse(b"550 5.1.1 " + b"x" * 58000 + b"\r\n")
    assert r.code == 550 and r.enhanced == "5.1.1"
    assert len(r.text) <= LINE_LENGTH_LIMIT and r.text.startswith("xxx")
    # the parser is in step afterwards: the next reply is read normally
    parser = ReplyParser()
    out = parser.feed(b"250-" + b"y" * 9000 + b"\r\n250 done\r\n")
    assert [x.code for x in out] == [250] and out[0].lines[-1] == "done"
    # the same bytes in small pieces give the same replies
    data = b"550 5.1.1 " + b"z" * 7000 + b"\r\n250 ok\r\n"
    pieces = ReplyParser()
    got = [x for i in range(0, len(data), 333) for x in pieces.feed(data[i:i + 333])]
    assert [(x.code, x.text) for x in got] == [(x.code, x.text) for x in parse(data)]


# -- CRLF-only output --------------------------------------------------------------------
def test_bare_lf_and_bare_cr_go_out_as_crlf() -> None:
    assert stuff_in_blocks(b"a\nb\rc\r\nd", []) == b"a\r\nb\r\nc\r\nd\r\n.\r\n"
    assert stuff_in_blocks(b"clean\r\n", [3]) == b"clean\r\n.\r\n"
    smuggle = b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@x>\r\n\r.\r\n"
    out = stuff_in_blocks(smuggle, [14, 18, 19])
    assert out.endswith(b"\r\n.\r\n")
    body = out[:-3]
    assert b"\r\n.\r\n" not in body  # only the real end of data ends the data
    assert b"\n" not in body.replace(b"\r\n", b"") and b"\r" not in body.replace(b"\r\n", b"")


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
