"""Webhook delivery through the real daemon: smtplib in, HTTP POSTs out to a loopback server.

The server (tests/support/webhookserver.py) records each request, checks its signature with
docs/WEBHOOKS.md's recipe and answers as each test tells it; the spool's deferred/ entries,
the Maildir of a local sender (bounces) and the log are what the tests check besides.
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from empath.delivery.state import DEFERRED, DELIVERED
from empath.spool import Spool, read_queue_file
from tests.support.daemon import EmpathDaemon
from tests.support.fixtures import DaemonFactory
from tests.support.webhookserver import Answer, Request, WebhookServer

MESSAGE = ("From: alice@localhost\r\nTo: user@hook.example\r\nSubject: hook test\r\n\r\n"
           "Hello, webhook.\r\n.a line with a dot\r\n")
SECRET = b"integration-secret"
FAST_RETRY = {"retry_base_delay": "1s", "retry_jitter_factor": 0,
              "queue_scan_interval": "0.2s"}


@pytest.fixture
def server() -> Iterator[WebhookServer]:
    with WebhookServer(secret=SECRET) as srv:
        yield srv


def hook_daemon(factory: DaemonFactory, tmp_path: Path, server: WebhookServer,
                **webhook: Any) -> EmpathDaemon:
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(SECRET + b"\n")
    settings = {"url": server.url(), "secret_file": str(secret), **webhook}
    return factory({"delivery": {**FAST_RETRY, "domains": {
        "hook.example": {"strategy": "webhook", "webhook": settings}}}})


def send(d: EmpathDaemon, sender: str, recipients: list[str]) -> None:
    with d.smtp() as client:
        client.sendmail(sender, recipients, MESSAGE)


def deferred_envelopes(d: EmpathDaemon) -> list[dict[str, Any]]:
    spool = Spool(str(d.spool_path))
    out = []
    for message_id in spool.list_ids("deferred"):
        with contextlib.suppress(FileNotFoundError):  # claimed for a retry meanwhile
            out.append(read_queue_file(spool.path("deferred", message_id))[0])
    return out


def spool_is_empty(d: EmpathDaemon) -> bool:
    spool = Spool(str(d.spool_path))
    return not any(spool.list_ids(state) for state in ("incoming", "deferred", "failed")) \
        and not spool.list_active()


def maildir_files(d: EmpathDaemon, user: str) -> list[Path]:
    new = Path(d.config["local_delivery"]["maildir_root"]) / user / "new"
    return sorted(new.iterdir()) if new.exists() else []


def check_message(raw: bytes) -> None:
    """What was sent, after our Received: header (the only field added, and the first)."""
    assert raw.endswith(MESSAGE.encode())
    added = raw[: len(raw) - len(MESSAGE)]
    assert added.startswith(b"Received: from ") and b"by test.empath" in added
    assert re.fullmatch(rb"Received: [^\r\n]*\r\n([ \t][^\r\n]*\r\n)*", added)


def check_signed(req: Request) -> None:
    assert req.signature_ok is True
    assert req.headers["x-empath-signature"].startswith("sha256=")
    assert req.headers["content-length"] == str(len(req.body))


def test_json_body(daemon_factory: DaemonFactory, tmp_path: Path,
                   server: WebhookServer) -> None:
    d = hook_daemon(daemon_factory, tmp_path, server)
    send(d, "alice@localhost", ["user@hook.example", "other@hook.example"])
    [req] = server.wait_for_requests(1)
    check_signed(req)
    assert (req.method, req.path, req.headers["content-type"]) == (
        "POST", "/mail", "application/json")
    doc = req.json()
    assert set(doc) == {"id", "sender", "recipients", "params", "received_at", "message"}
    assert doc["sender"] == "alice@localhost"
    assert doc["recipients"] == ["user@hook.example", "other@hook.example"]
    assert req.headers["x-empath-queue-id"] == doc["id"]
    assert isinstance(doc["received_at"], float) and isinstance(doc["params"], dict)
    check_message(base64.b64decode(doc["message"], validate=True))
    d.wait_for(lambda: spool_is_empty(d), message="the message to be removed")
    log = d.log_text()
    assert f"server=127.0.0.1:{server.port}, status=delivered" in log
    assert f"webhook 127.0.0.1:{server.port} 200 OK" in log


def test_multipart_body(daemon_factory: DaemonFactory, tmp_path: Path,
                        server: WebhookServer) -> None:
    d = hook_daemon(daemon_factory, tmp_path, server, format="multipart")
    send(d, "alice@localhost", ["user@hook.example"])
    [req] = server.wait_for_requests(1)
    check_signed(req)
    assert req.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert list(req.parts) == ["envelope", "message"]
    env_headers, env_raw = req.parts["envelope"]
    msg_headers, msg_raw = req.parts["message"]
    assert env_headers["content-type"] == "application/json"
    assert msg_headers["content-type"] == "message/rfc822"
    doc = orjson.loads(env_raw)
    assert doc["recipients"] == ["user@hook.example"] and "message" not in doc
    assert f'filename="{doc["id"]}.eml"' in msg_headers["content-disposition"]
    check_message(msg_raw)
    d.wait_for(lambda: spool_is_empty(d), message="the message to be removed")


def test_mixed_webhook_and_maildir_recipients(daemon_factory: DaemonFactory, tmp_path: Path,
                                              server: WebhookServer) -> None:
    d = hook_daemon(daemon_factory, tmp_path, server)
    send(d, "alice@localhost", ["user@hook.example", "bob@localhost"])
    [req] = server.wait_for_requests(1)
    assert req.json()["recipients"] == ["user@hook.example"]
    [copy] = d.wait_for(lambda: maildir_files(d, "bob"), message="bob's copy")
    assert copy.read_bytes().endswith(MESSAGE.encode())
    check_message(base64.b64decode(req.json()["message"]))
    d.wait_for(lambda: spool_is_empty(d), message="the message to be removed")


def test_server_error_then_success_retries(daemon_factory: DaemonFactory, tmp_path: Path,
                                           server: WebhookServer) -> None:
    server.answers = [Answer(500, b"try later")]
    d = hook_daemon(daemon_factory, tmp_path, server)
    send(d, "alice@localhost", ["user@hook.example"])
    first, second = server.wait_for_requests(2, timeout=20)
    assert first.body == second.body  # the same request (same id), signed anew
    assert first.json()["id"] == second.json()["id"]
    check_signed(second)
    d.wait_for(lambda: spool_is_empty(d), message="the message to be removed")
    log = d.log_text()
    assert "attempt=1" in log and "status=deferred" in log
    assert "500 Internal Server Error: try later" in log
    assert re.search(r"to=<user@hook.example>, attempt=2, .*status=delivered", log)


def test_too_many_requests_defers(daemon_factory: DaemonFactory, tmp_path: Path,
                                  server: WebhookServer) -> None:
    server.default = Answer(429, b"", {"Retry-After": "3600"})
    d = hook_daemon(daemon_factory, tmp_path, server)
    send(d, "alice@localhost", ["user@hook.example"])
    [env] = d.wait_for(lambda: deferred_envelopes(d), message="a deferred message")
    [rcpt] = env["recipients"]
    assert rcpt["status"] == DEFERRED
    assert rcpt["last"]["transport"] == "webhook"
    assert (rcpt["last"]["code"], rcpt["last"]["enhanced"]) == (None, "4.0.0")
    assert "429 Too Many Requests (Retry-After: 3600)" in rcpt["last"]["text"]
    [route] = env["attempts"][0]["routes"]
    assert route["transport"] == "webhook" and route["status"] == 429
    assert route["domain"] == "hook.example"
    assert route["server"] == f"127.0.0.1:{server.port}"


def test_client_error_bounces_to_the_sender(daemon_factory: DaemonFactory, tmp_path: Path,
                                            server: WebhookServer) -> None:
    server.default = Answer(404, b"no such hook")
    d = hook_daemon(daemon_factory, tmp_path, server)
    send(d, "alice@localhost", ["user@hook.example", "bob@localhost"])
    [bounce] = d.wait_for(lambda: maildir_files(d, "alice"), message="the bounce")
    report = bounce.read_bytes().decode()
    assert "Final-Recipient: rfc822;user@hook.example" in report
    assert "Action: failed" in report and "Status: 5.0.0" in report
    assert "Remote-MTA: dns;127.0.0.1" in report
    assert f"webhook 127.0.0.1:{server.port} 404 Not Found: no such hook" in report
    assert "bob@localhost" not in report.split("\r\n\r\n", 1)[1].split("--")[0]
    assert len(maildir_files(d, "bob")) == 1
    d.wait_for(lambda: spool_is_empty(d), message="both messages to be delivered")
    assert len(server.requests) == 1


def test_slow_server_times_out_and_defers(daemon_factory: DaemonFactory, tmp_path: Path,
                                          server: WebhookServer) -> None:
    server.default = Answer(delay=30)
    d = hook_daemon(daemon_factory, tmp_path, server, timeout="500ms")
    send(d, "alice@localhost", ["user@hook.example"])
    [env] = d.wait_for(lambda: deferred_envelopes(d), message="a deferred message")
    [rcpt] = env["recipients"]
    assert rcpt["status"] == DEFERRED
    assert (rcpt["last"]["code"], rcpt["last"]["enhanced"]) == (451, "4.4.2")
    assert rcpt["last"]["text"] == (
        f"timeout waiting for webhook reply from 127.0.0.1:{server.port}")
    [route] = env["attempts"][0]["routes"]
    assert route["status"] is None and route["duration"] < 5


def test_delivered_status_recorded_for_queue_tools(daemon_factory: DaemonFactory,
                                                   tmp_path: Path,
                                                   server: WebhookServer) -> None:
    """A delivered webhook recipient next to a deferred local one: the envelope keeps the
    webhook's verdict and route, and the retry does not post the message again."""
    d = hook_daemon(daemon_factory, tmp_path, server)
    maildir = Path(d.config["local_delivery"]["maildir_root"])
    maildir.mkdir(parents=True, exist_ok=True)
    (maildir / "carol").write_text("not a directory")  # carol's delivery fails: deferred
    send(d, "alice@localhost", ["user@hook.example", "carol@localhost"])
    [env] = d.wait_for(lambda: deferred_envelopes(d), message="a deferred message")
    by_address = {r["address"]: r for r in env["recipients"]}
    hook = by_address["user@hook.example"]
    assert hook["status"] == DELIVERED and hook["last"]["transport"] == "webhook"
    assert by_address["carol@localhost"]["status"] == DEFERRED
    assert {r["transport"] for r in env["attempts"][0]["routes"]} == {"webhook", "maildir"}
    d.wait_for(lambda: any(e.get("attempt_count", 0) >= 2 for e in deferred_envelopes(d)),
               message="a second attempt")
    assert len(server.requests) == 1  # the retry is carol's alone
