"""RFC 3464 reports, parsed back with Python's email package."""

from __future__ import annotations

import email
import email.policy

import pytest

from empath.delivery import bounce
from empath.spool import MessageSource

ORIGINAL = (b"Received: by test\r\nFrom: s@a.example\r\nSubject: hello\r\n"
            b"Message-ID: <m1@a.example>\r\n\r\nbody line\r\n")


@pytest.fixture
def source(tmp_path) -> MessageSource:
    path = tmp_path / "msg"
    path.write_bytes(ORIGINAL + b"TRAILING-ENVELOPE")
    return MessageSource(str(path), 0, len(ORIGINAL))


def env(ret=None, envid=None) -> dict:
    return {"id": "01ABCDEFGHJKMNPQRSTVWXYZ01", "sender": "s@a.example", "received_at": 1.7e9,
            "params": {"ret": ret, "envid": envid},
            "recipients": [
                {"address": "u1@b.example", "orcpt": "rfc822;U1@b.example", "notify": None,
                 "status": "failed", "last": {"at": 1.7e9 + 5, "code": 550,
                                              "enhanced": "5.1.1",
                                              "text": "no such user\r\nInjected: yes",
                                              "server": "mx.b.example"}},
                {"address": "u2@c.example", "orcpt": None, "notify": ["FAILURE"],
                 "status": "expired", "last": {"at": 1.7e9 + 9, "code": 421, "enhanced": None,
                                               "text": "busy", "server": "mx.c.example"}},
            ]}


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def test_failure_report_fields(source):
    e = env(envid="ENV-1")
    msg = parse(bounce.build_report(e, e["recipients"], "failed", source, hostname="mta.test",
                                    now=1.7e9 + 10))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "s@a.example" and "MAILER-DAEMON@mta.test" in msg["From"]
    assert msg["Injected"] is None
    human, status, original = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    assert "u1@b.example" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, r1, r2 = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns;mta.test"
    assert per_message["Original-Envelope-Id"] == "ENV-1"
    assert per_message["Arrival-Date"]
    assert r1["Final-Recipient"] == "rfc822;u1@b.example"
    assert r1["Original-Recipient"] == "rfc822;U1@b.example"
    assert r1["Action"] == "failed" and r1["Status"] == "5.1.1"
    assert r1["Remote-MTA"] == "dns;mx.b.example"
    assert r1["Diagnostic-Code"] == "smtp;550 no such user Injected: yes"
    assert r2["Status"] == "4.4.7" and r2["Original-Recipient"] is None
    assert original.get_content_type() == "text/rfc822-headers"
    assert b"body line" not in original.as_bytes()
    assert b"Subject: hello" in original.as_bytes()


def test_ret_full_returns_whole_message(source):
    e = env(ret="FULL")
    msg = parse(bounce.build_report(e, e["recipients"][:1], "failed", source,
                                    hostname="mta.test"))
    original = msg.get_payload()[2]
    assert original.get_content_type() == "message/rfc822"
    inner = original.get_payload()[0]
    assert inner["Subject"] == "hello" and "body line" in inner.get_content()


def test_delay_report_action_and_retry_until(source):
    e = env()
    rcpt = dict(e["recipients"][1], status="deferred", will_retry_until=1.7e9 + 86400)
    msg = parse(bounce.build_report(e, [rcpt], "delayed", source, hostname="mta.test"))
    r = msg.get_payload()[1].get_payload()[1]
    assert r["Action"] == "delayed" and r["Status"] == "4.0.0"
    assert r["Will-Retry-Until"]


@pytest.mark.parametrize("notify,kind,expected", [
    (None, "FAILURE", True), (None, "DELAY", True), (None, "SUCCESS", False),
    (["NEVER"], "FAILURE", False), (["SUCCESS"], "FAILURE", False),
    (["SUCCESS", "DELAY"], "DELAY", True),
])
def test_notify_rules(notify, kind, expected):
    assert bounce.wants({"notify": notify}, kind) is expected


def test_no_report_to_null_sender():
    assert not bounce.should_report({"sender": ""})
    assert bounce.should_report({"sender": "a@b"})
