"""Delivery status notifications (RFC 3461/3464) produced by the real daemon.

Mail goes in over SMTP with DSN parameters (RET, ENVID, NOTIFY, ORCPT) from
``sender@localhost``, a local Maildir user, so every notice the daemon sends back is read from
``mail/sender/new`` and parsed with Python's email package, field by field. The world (DNS
server, sinks) is the one of test_delivery_e2e.py.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Iterator

import pytest

from empath.spool import read_envelope
from tests.integration.test_delivery_e2e import (
    SENDER,
    TEMPFAIL,
    WAIT,
    Report,
    World,
    deferred_envelope,
    delivered_copy,
    mailbox,
    message,
    queued,
    send,
    spool,
    wait_log,
    wait_mailbox,
    wait_spool_empty,
)
from tests.support.fixtures import DaemonFactory
from tests.support.sink import Behaviour


@pytest.fixture
def world(daemon_factory: DaemonFactory) -> Iterator[World]:
    w = World(daemon_factory)
    try:
        yield w
    finally:
        w.stop()


def date_of(value: object) -> float:
    return email.utils.parsedate_to_datetime(str(value)).timestamp()


def test_one_bounce_for_every_failed_recipient_with_ret_hdrs(world: World) -> None:
    world.sink("127.0.0.2").behaviour = Behaviour(rcpt_replies={
        "gone1@example.test": (550, "5.1.1 no such user"),
        "gone2@example.test": (553, "5.1.3 bad mailbox name"),
        "never@example.test": (550, "5.1.1 no such user"),
    })
    daemon = world.daemon()
    sent = message("bounce me")
    submitted = time.time()
    qid = send(daemon, ["gone1@example.test", "gone2@example.test", "ok@example.test",
                        "u@nullmx.test", "never@example.test"], sent,
               mail_options=["RET=HDRS", "ENVID=env-42"],
               rcpt_options={"gone2@example.test": ["ORCPT=rfc822;Gone2@Example.test"],
                             "never@example.test": ["NOTIFY=NEVER"]})
    [raw] = wait_mailbox(daemon, "sender")
    wait_spool_empty(daemon)
    assert len(mailbox(daemon, "sender")) == 1  # one bounce for the whole message
    [got] = world.sink("127.0.0.2").messages
    assert got.recipients == ["ok@example.test"]
    delivered_copy(got.data, sent)
    # Delivered from the null sender, to the original sender.
    assert raw.startswith(b"Return-Path: <>\r\nDelivered-To: sender@localhost\r\n")
    bounce = Report(raw)
    msg = bounce.msg
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@test.empath"
    assert msg["To"].addresses[0].addr_spec == SENDER
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert abs(date_of(msg["Date"]) - time.time()) < 60
    # Human-readable part.
    for addr in ("gone1@example.test", "gone2@example.test", "u@nullmx.test"):
        assert f"<{addr}>: failed:" in bounce.text
    assert "never@example.test" not in bounce.text and "ok@example.test" not in bounce.text
    # Per-message fields.
    pm = bounce.per_message
    assert pm["Reporting-MTA"] == "dns;test.empath"
    assert pm["Original-Envelope-Id"] == "env-42"
    assert pm["X-Empath-Queue-ID"] == qid
    assert abs(date_of(pm["Arrival-Date"]) - submitted) < 5
    # Per-recipient fields: only the failed recipients that want a notice, all together.
    assert sorted(bounce.recipients) == ["gone1@example.test", "gone2@example.test",
                                         "u@nullmx.test"]
    g1 = bounce.recipients["gone1@example.test"]
    assert g1["Original-Recipient"] is None
    assert (g1["Action"], g1["Status"]) == ("failed", "5.1.1")
    assert g1["Remote-MTA"] == "dns;mx1.example.test"
    assert g1["Diagnostic-Code"] == "smtp;550 5.1.1 no such user"
    assert abs(date_of(g1["Last-Attempt-Date"]) - time.time()) < 60
    g2 = bounce.recipients["gone2@example.test"]
    assert g2["Original-Recipient"] == "rfc822;Gone2@Example.test"
    assert g2["Final-Recipient"] == "rfc822;gone2@example.test"
    assert (g2["Action"], g2["Status"]) == ("failed", "5.1.3")
    assert g2["Diagnostic-Code"] == "smtp;553 5.1.3 bad mailbox name"
    nm = bounce.recipients["u@nullmx.test"]
    assert (nm["Action"], nm["Status"], nm["Remote-MTA"]) == ("failed", "5.1.10", None)
    assert nm["Diagnostic-Code"] == ("x-empath;domain nullmx.test does not accept mail "
                                     "(null MX)")
    # RET=HDRS: the original's headers, not its body.
    assert bounce.original.get_content_type() == "text/rfc822-headers"
    returned = bounce.original.get_payload()
    returned = returned if isinstance(returned, str) else str(returned)
    assert "Subject: bounce me" in returned and f"id {qid}" in returned
    assert "Hello." not in bounce.raw.decode()
    # The bounce was durable before the original left the spool.
    log = daemon.log_text()
    notice = re.search(rf"{qid}: sender non-delivery notification: ([0-9A-Z]{{26}})", log)
    assert notice and log.index(notice.group(0)) < log.index(f"{qid}: removed")
    wait_log(daemon, rf"{notice.group(1)}: to=<sender@localhost>, attempt=1, server=maildir, "
                     r"status=delivered")


def test_ret_full_returns_the_whole_message(world: World) -> None:
    world.sink("127.0.0.2").behaviour = Behaviour(rcpt_default=(550, "5.7.1 go away"))
    daemon = world.daemon()
    sent = message("full return", extra=b"second body line\r\n")
    send(daemon, ["x@example.test"], sent, mail_options=["RET=FULL"])
    [bounce] = [Report(m) for m in wait_mailbox(daemon, "sender")]
    assert bounce.original.get_content_type() == "message/rfc822"
    assert bounce.original["Content-Description"] == "Undelivered message"
    [inner] = bounce.original.get_payload()
    assert inner["Subject"] == "full return"
    assert inner["Received"].startswith("from client.test ([127.0.0.1])")
    assert "second body line" in inner.get_content()
    assert bounce.raw.count(b".a line starting with a dot\r\n") == 1  # unstuffed, once
    block = bounce.recipients["x@example.test"]
    assert (block["Status"], block["Diagnostic-Code"]) == ("5.7.1", "smtp;550 5.7.1 go away")
    wait_spool_empty(daemon)


def test_no_bounce_to_the_null_sender_nor_for_a_failed_bounce(world: World) -> None:
    world.sink("127.0.0.2").behaviour = Behaviour(rcpt_default=(550, "5.1.1 no such user"))
    daemon = world.daemon()
    from_null = send(daemon, ["a@example.test"], message("from null", sender=""), sender="")
    # A bounce to an address that cannot receive mail fails in turn; it is not bounced.
    original = send(daemon, ["b@example.test"], message("to nowhere", sender="bob@nullmx.test"),
                    sender="bob@nullmx.test")

    def settled() -> bool:
        q = queued(daemon)
        return set(q) == {"failed"} and len(q["failed"]) == 2

    daemon.wait_for(settled, WAIT, message="two messages in failed/ and nothing else")
    failed = {mid: read_envelope(spool(daemon).path("failed", mid))
              for mid in queued(daemon)["failed"]}
    assert from_null in failed and original not in failed
    [notice_id] = [mid for mid in failed if mid != from_null]
    notice = failed[notice_id]
    assert notice["sender"] == "" and notice["notice_of"] == original
    assert [r["address"] for r in notice["recipients"]] == ["bob@nullmx.test"]
    assert notice["recipients"][0]["status"] == "failed"
    assert notice["recipients"][0]["last"]["enhanced"] == "5.1.10"
    assert failed[from_null]["recipients"][0]["status"] == "failed"
    for mid in (from_null, notice_id):
        wait_log(daemon, rf"{mid}: undeliverable message from the null sender; kept in failed/")
    assert mailbox(daemon, "sender") == []


def test_delay_warning_is_sent_once_to_those_who_asked(world: World) -> None:
    sink = world.sink("127.0.0.4")
    sink.behaviour = TEMPFAIL
    daemon = world.daemon({"delay_warning": "1s", "retry_max_delay": "1s"})
    qid = send(daemon, ["a@retry.test", "b@retry.test", "c@retry.test"], message("slowly"),
               rcpt_options={"a@retry.test": ["NOTIFY=DELAY,FAILURE"],
                             "b@retry.test": ["NOTIFY=FAILURE"]})
    env, _ = deferred_envelope(daemon, qid, min_attempts=4)
    assert env["delay_notified"] is True
    [warning] = [Report(m) for m in wait_mailbox(daemon, "sender")]
    assert warning.msg["Subject"] == "Delayed Mail (still being retried)"
    assert "you do not need to resend it" in warning.text
    assert sorted(warning.recipients) == ["a@retry.test", "c@retry.test"]  # not b: FAILURE only
    expires = env["received_at"] + 5 * 86400  # the default message_expiration
    for block in warning.recipients.values():
        assert (block["Action"], block["Status"]) == ("delayed", "4.3.0")
        assert block["Remote-MTA"] == "dns;mx3.example.test"
        assert block["Diagnostic-Code"] == "smtp;451 4.3.0 try later"
        assert abs(date_of(block["Will-Retry-Until"]) - expires) < 2
    assert warning.original.get_content_type() == "text/rfc822-headers"
    sink.behaviour = Behaviour()
    sink.wait_for_messages(1, WAIT)
    wait_spool_empty(daemon)
    assert len(mailbox(daemon, "sender")) == 1  # once, and no other notice on delivery


def test_success_notices_delivered_relayed_or_left_to_a_dsn_next_hop(world: World) -> None:
    world.sink("127.0.0.5").behaviour = Behaviour(dsn=False)  # nodsn.test's MX
    daemon = world.daemon()
    success = ["NOTIFY=SUCCESS"]
    qid = send(daemon, ["bob@localhost", "r@nodsn.test", "d@example.test"], message("hooray"),
               mail_options=["RET=HDRS", "ENVID=env-7"],
               rcpt_options={"bob@localhost": success, "r@nodsn.test": success,
                             "d@example.test": ["NOTIFY=SUCCESS,FAILURE",
                                                "ORCPT=rfc822;D@Example.test"]})
    wait_spool_empty(daemon)
    [raw] = wait_mailbox(daemon, "sender")
    wait_spool_empty(daemon)
    assert len(mailbox(daemon, "sender")) == 1 and len(mailbox(daemon, "bob")) == 1
    # The DSN-capable hop received NOTIFY, ORCPT, RET and ENVID (RFC 3461 §5.2.2).
    [dsn_hop] = world.sink("127.0.0.2").messages
    assert dsn_hop.rcpts == [("d@example.test",
                              "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;D@Example.test")]
    assert "RET=HDRS" in dsn_hop.mail_params and "ENVID=env-7" in dsn_hop.mail_params
    [plain_hop] = world.sink("127.0.0.5").messages
    assert plain_hop.rcpts == [("r@nodsn.test", "")]
    assert "RET=" not in plain_hop.mail_params
    report = Report(raw)
    assert report.msg["Subject"] == "Successful Mail Delivery Report"
    assert sorted(report.recipients) == ["bob@localhost", "r@nodsn.test"]
    assert report.per_message["Original-Envelope-Id"] == "env-7"
    assert report.per_message["X-Empath-Queue-ID"] == qid
    local = report.recipients["bob@localhost"]
    assert (local["Action"], local["Status"], local["Remote-MTA"]) == ("delivered", "2.0.0",
                                                                      None)
    assert local["Diagnostic-Code"] == "x-empath;delivered to maildir bob"
    relayed = report.recipients["r@nodsn.test"]
    assert (relayed["Action"], relayed["Status"]) == ("relayed", "2.0.0")
    assert relayed["Remote-MTA"] == "dns;mx4.example.test"
    assert relayed["Diagnostic-Code"] == "smtp;250 2.0.0 queued as 1"
    assert report.original.get_content_type() == "text/rfc822-headers"
    wait_log(daemon, rf"{qid}: sender delivery notification: ")
