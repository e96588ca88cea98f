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
    assert r1["Diagnostic-Code"] == "smtp;550 5.1.1 no such user Injected: yes"
    assert r2["Status"] == "4.4.7" and r2["Original-Recipient"] is None
    assert r2["Diagnostic-Code"] == "smtp;421 busy" and r2["Remote-MTA"] == "dns;mx.c.example"
    assert original.get_content_type() == "text/rfc822-headers"
    assert original["Content-Description"] == "Undelivered message headers"
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
    rcpt = dict(e["recipients"][1], status="deferred")
    msg = parse(bounce.build_report(e, [rcpt], "delayed", source, hostname="mta.test",
                                    retry_until=1.7e9 + 86400))
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


def test_unknown_kind_is_refused(source):
    e = env()
    with pytest.raises(ValueError):
        bounce.build_report(e, e["recipients"], "delivered", source, hostname="mta.test")


def test_own_verdicts_have_a_local_diagnostic_and_no_remote_mta(source):
    e = env()
    e["recipients"] = [
        {"address": "a@nullmx.example", "status": "failed",
         "last": {"at": 1.7e9, "code": 556, "enhanced": "5.1.10",
                  "text": "domain nullmx.example does not accept mail (null MX)",
                  "server": None}},
        {"address": "b@dead.example", "status": "expired", "expired_by": "max_attempts",
         "attempts": 3,
         "last": {"at": 1.7e9, "code": 451, "enhanced": "4.4.1",
                  "text": "cannot connect to mx.dead.example[192.0.2.1]:25: Connection refused",
                  "server": "mx.dead.example[192.0.2.1]:25"}},
        {"address": "c@local", "status": "failed",
         "last": {"at": 1.7e9, "code": 550, "enhanced": "5.1.1",
                  "text": "invalid local mailbox name", "server": "maildir"}},
    ]
    msg = parse(bounce.build_report(e, e["recipients"], "failed", source, hostname="mta.test"))
    _, a, b, c = msg.get_payload()[1].get_payload()
    assert a["Status"] == "5.1.10" and a["Remote-MTA"] is None
    assert a["Diagnostic-Code"] == "x-empath;domain nullmx.example does not accept mail (null MX)"
    # Expired after max_attempts: the last transient status is kept (what it kept failing on).
    assert b["Status"] == "4.4.1" and b["Remote-MTA"] is None
    assert b["Diagnostic-Code"].startswith("x-empath;cannot connect to mx.dead.example")
    assert c["Remote-MTA"] is None and c["Diagnostic-Code"] == "x-empath;invalid local mailbox name"
    assert "gave up after 3 attempts" in msg.get_payload()[0].get_content()


def test_expired_by_time_is_4_4_7(source):
    e = env()
    rcpt = dict(e["recipients"][0], status="expired", expired_by="message_expiration",
                last={"at": 1.7e9, "code": 451, "enhanced": "4.2.1", "text": "busy",
                      "server": "mx.b.example"})
    msg = parse(bounce.build_report(e, [rcpt], "failed", source, hostname="mta.test"))
    block = msg.get_payload()[1].get_payload()[1]
    assert block["Status"] == "4.4.7" and block["Diagnostic-Code"] == "smtp;451 4.2.1 busy"
    assert block["Remote-MTA"] == "dns;mx.b.example"


def test_success_report_actions(source):
    e = env()
    local = {"address": "l@here", "notify": ["SUCCESS"], "status": "delivered",
             "last": {"at": 1.7e9, "code": 250, "enhanced": "2.0.0",
                      "text": "delivered to maildir l", "server": "maildir",
                      "transport": "maildir"}}
    relayed = {"address": "r@far", "notify": ["SUCCESS"], "status": "delivered",
               "orcpt": "rfc822;R@far",
               "last": {"at": 1.7e9, "code": 250, "enhanced": "2.0.0", "text": "queued as 7",
                        "server": "mx.far", "transport": "smtp", "next_hop_dsn": False}}
    msg = parse(bounce.build_report(e, [local, relayed], "success", source,
                                    hostname="mta.test"))
    assert msg["Subject"] == "Successful Mail Delivery Report"
    _, lb, rb = msg.get_payload()[1].get_payload()
    assert (lb["Action"], lb["Status"], lb["Remote-MTA"]) == ("delivered", "2.0.0", None)
    assert (rb["Action"], rb["Status"], rb["Remote-MTA"]) == ("relayed", "2.0.0", "dns;mx.far")
    assert rb["Original-Recipient"] == "rfc822;R@far"
    assert rb["Diagnostic-Code"] == "smtp;250 2.0.0 queued as 7"
    original = msg.get_payload()[2]
    assert original.get_content_type() == "text/rfc822-headers"
    assert original["Content-Description"] == "Message headers"


def test_ret_full_applies_to_failures_only(source):
    e = env(ret="FULL")
    rcpt = dict(e["recipients"][1], status="deferred")
    msg = parse(bounce.build_report(e, [rcpt], "delayed", source, hostname="mta.test"))
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"


@pytest.mark.parametrize("last,expected", [
    ({"transport": "maildir"}, "delivered"),
    ({"transport": "lmtp"}, "delivered"),
    ({"transport": "smtp", "next_hop_dsn": False}, "relayed"),
    ({"transport": "smtp"}, "relayed"),
    ({"transport": "smtp", "next_hop_dsn": True}, None),
])
def test_success_action(last, expected):
    assert bounce.success_action({"last": last}) == expected


def test_due_notices_and_marking():
    smtp_ok = {"transport": "smtp", "next_hop_dsn": False}
    e = {"sender": "s@a", "recipients": [
        {"address": "f1", "status": "failed", "notify": None},
        {"address": "f2", "status": "expired", "notify": ["FAILURE", "DELAY"]},
        {"address": "f3", "status": "failed", "notify": ["NEVER"]},
        {"address": "d1", "status": "delivered", "notify": ["SUCCESS"], "last": smtp_ok},
        {"address": "d2", "status": "delivered", "notify": None, "last": smtp_ok},
        {"address": "d3", "status": "delivered", "notify": ["SUCCESS"],
         "last": {"transport": "smtp", "next_hop_dsn": True}},
        {"address": "o1", "status": "deferred", "notify": None},
        {"address": "x1", "status": "failed", "notify": None, "dsn": "failed"},
    ]}
    due = bounce.due_notices(e)
    assert {k: [r["address"] for r in v] for k, v in due.items()} == {
        "failed": ["f1", "f2"], "success": ["d1"]}
    marks = {r["address"]: r.get("dsn") for r in e["recipients"]}
    assert marks == {"f1": None, "f2": None, "f3": "none", "d1": None, "d2": "none",
                     "d3": "none", "o1": None, "x1": "failed"}
    for kind, rcpts in due.items():
        bounce.mark_notified(rcpts, kind)
    assert bounce.due_notices(e) == {}
    assert {r["address"]: r.get("dsn") for r in e["recipients"]}["d1"] == "relayed"


def test_null_sender_is_owed_nothing():
    e = {"sender": "", "recipients": [{"address": "f", "status": "failed", "notify": None},
                                      {"address": "d", "status": "delivered",
                                       "notify": ["SUCCESS"], "last": {}}]}
    assert bounce.due_notices(e) == {}
    assert [r["dsn"] for r in e["recipients"]] == ["none", "none"]


def test_header_injection_through_addresses_is_flattened(source):
    e = env()
    e["sender"] = "s@a.example\r\nBcc: victim@x"
    rcpt = dict(e["recipients"][0], address="u@b\r\nX-Evil: 1")
    msg = parse(bounce.build_report(e, [rcpt], "failed", source, hostname="mta.test"))
    assert msg["Bcc"] is None and msg["X-Evil"] is None
    block = msg.get_payload()[1].get_payload()[1]
    assert block["X-Evil"] is None and block["Final-Recipient"] == "rfc822;u@b X-Evil: 1"


@pytest.mark.parametrize("server,expected", [
    ("mx.b.example", "dns;mx.b.example"),
    ("mx.b.example[192.0.2.1]:25", "dns;mx.b.example"),
    ("192.0.2.7:24", "dns;192.0.2.7"),
    ("[2001:db8::1]:24", "dns;2001:db8::1"),
])
def test_remote_mta_is_the_server_name(source, server, expected):
    e = env()
    rcpt = dict(e["recipients"][0], last={"at": 1.7e9, "code": 550, "enhanced": "5.1.1",
                                          "text": "unknown user", "server": server})
    msg = parse(bounce.build_report(e, [rcpt], "failed", source, hostname="mta.test"))
    assert msg.get_payload()[1].get_payload()[1]["Remote-MTA"] == expected


# -- hostile text from the network and size limits (issues 16.10, 23) ---------------------
def test_every_line_of_a_notice_stays_within_998_octets(source):
    e = env(ret="FULL")
    long_text = " ".join(["word"] * 5000) + " " + "x" * 3000  # 28 KB, one unbroken run too
    e["recipients"][0]["last"]["text"] = long_text
    data = bounce.build_report(e, e["recipients"], "failed", source, hostname="mta.test")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    status = parse(data).get_payload()[1]
    diagnostic = str(status.get_payload()[1]["Diagnostic-Code"])
    # folded, not cut: every character is still there (an unbroken run is split with a
    # folding space)
    assert diagnostic.replace(" ", "").endswith("x" * 3000)
    assert diagnostic.count("word") == 5000
    assert diagnostic.startswith("smtp;550 5.1.1 word word")


def test_control_characters_in_envelope_values_are_escaped(source):
    e = env(envid="id\x00with\x1b[2Jescapes\u202e")
    e["recipients"][0]["orcpt"] = "rfc822;u1\x07@b.example"
    data = bounce.build_report(e, e["recipients"], "failed", source, hostname="mta.test")
    head = data[:data.index(b"Received: by test")]  # the notice's own parts
    for raw in (b"\x00", b"\x1b", b"\x07", "\u202e".encode()):
        assert raw not in head
    per_message = parse(data).get_payload()[1].get_payload()[0]
    assert per_message["Original-Envelope-Id"] == "id\\x00with\\x1b[2Jescapes\\u202e"
    assert b"Original-Recipient: rfc822;u1\\x07@b.example" in data


@pytest.mark.parametrize(("size", "limit", "ctype"), [
    (40_000, 50_000, "message/rfc822"),
    (60_000, 50_000, "text/rfc822-headers"),
    (60_000, 100_000, "message/rfc822"),
])
def test_ret_full_returns_headers_only_above_the_bounce_size_limit(tmp_path, size, limit,
                                                                   ctype):
    body = ORIGINAL + b"x" * 78 + b"\r\n"
    data = body * (size // len(body) + 1)
    path = tmp_path / "big"
    path.write_bytes(data[:size])
    src = MessageSource(str(path), 0, size)
    e = env(ret="FULL")
    msg = parse(bounce.build_report(e, e["recipients"][:1], "failed", src, hostname="mta.test",
                                    size_limit=limit))
    original = msg.get_payload()[2]
    assert original.get_content_type() == ctype
    if ctype == "text/rfc822-headers":
        assert b"xxxx" not in original.as_bytes()
