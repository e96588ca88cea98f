"""Webhook delivery (empath/delivery/webhook.py) and its configuration.

The first tests check the pure parts (verdicts, labels, request bodies, the signature); the
rest POST over loopback to the test server (tests/support/webhookserver.py), which checks
signatures with docs/WEBHOOKS.md's recipe and parses multipart bodies with aiohttp's reader.
"""

from __future__ import annotations

import base64
import socket
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop

from empath.config import ConfigError, load_config
from empath.delivery import webhook
from empath.delivery.dispatch import Dispatcher
from empath.delivery.state import DEFERRED, DELIVERED, FAILED, RecipientOutcome
from empath.delivery.webhook import (
    BLOCK_SIZE,
    SIGN_INLINE_LIMIT,
    WebhookTransport,
    json_body,
    multipart_body,
    server_label,
    verdict,
)
from empath.spool import MessageSource
from tests.support.certs import make_ca, make_server_cert
from tests.support.webhookserver import Answer, WebhookServer, parse_multipart, verify_signature

MESSAGE = b"Received: from a by b\r\nSubject: test\r\n\r\nHello.\r\n.dot\r\n"
SECRET = b"s3cret-key"


def source(tmp_path: Path, data: bytes = MESSAGE, prefix: bytes = b"junk") -> MessageSource:
    """A queue-file stand-in: the message after some bytes, followed by more."""
    path = tmp_path / "queue-file"
    path.write_bytes(prefix + data + b"{envelope}")
    return MessageSource(str(path), len(prefix), len(data))


def envelope(**extra: Any) -> dict[str, Any]:
    return {"id": "0ABCDEF123", "sender": "alice@example.org", "received_at": 1700000000.5,
            "params": {"body": "8BITMIME", "size": len(MESSAGE)}, **extra}


def rcpts(*addresses: str) -> list[dict[str, Any]]:
    return [{"address": a} for a in addresses]


def config(tmp_path: Path, domains: str = "", ca_file: str | None = None) -> Any:
    path = tmp_path / "empath.yaml"
    path.write_text(textwrap.dedent(f"""\
        listeners:
          - address: 127.0.0.1:2525
        local_delivery:
          maildir_root: {tmp_path / 'mail'}
        delivery:
          tls:
            ca_file: {ca_file or 'null'}
          domains:
        """) + textwrap.indent(textwrap.dedent(domains), "    "))
    return load_config(str(path))


def hook_config(tmp_path: Path, url: str, ca_file: str | None = None,
                **settings: Any) -> Any:
    lines = [f"url: {url}"] + [f"{k}: {v}" for k, v in settings.items()]
    return config(tmp_path, "hook.example:\n  strategy: webhook\n  webhook:\n"
                  + "".join(f"    {line}\n" for line in lines), ca_file)


def deliver(cfg: Any, src: MessageSource, *addresses: str, domain: str = "hook.example",
            env: dict[str, Any] | None = None
            ) -> tuple[dict[str, RecipientOutcome], dict[str, Any]]:
    async def go() -> tuple[dict[str, RecipientOutcome], dict[str, Any]]:
        transport = WebhookTransport(cfg)
        try:
            settings = cfg.delivery.domains[domain].webhook
            return await transport.deliver(domain, settings, env or envelope(),
                                           rcpts(*addresses), src)
        finally:
            await transport.close()

    return uvloop.run(go())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def secret_file(tmp_path: Path, text: bytes = SECRET + b"\n") -> Path:
    path = tmp_path / "webhook.secret"
    path.write_bytes(text)
    return path


# -- pure parts ------------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "result"), [
    (200, DELIVERED), (201, DELIVERED), (204, DELIVERED), (299, DELIVERED),
    (400, FAILED), (403, FAILED), (404, FAILED), (410, FAILED), (413, FAILED), (499, FAILED),
    (408, DEFERRED), (429, DEFERRED), (500, DEFERRED), (502, DEFERRED), (503, DEFERRED),
    (301, DEFERRED), (307, DEFERRED), (100, DEFERRED), (600, DEFERRED),
])
def test_verdict_of_each_status(status: int, result: str) -> None:
    assert verdict(status) == result


@pytest.mark.parametrize(("url", "label"), [
    ("https://hooks.example.net/in", "hooks.example.net"),
    ("http://127.0.0.1:8080/mail?x=1", "127.0.0.1:8080"),
    ("http://[::1]:8080/", "[::1]:8080"),
    ("https://Hooks.Example.NET:443/", "hooks.example.net:443"),
])
def test_server_label(url: str, label: str) -> None:
    assert server_label(url) == label


SIZES = [0, 1, 2, 3, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE + 2]


@pytest.mark.parametrize("size", SIZES)
def test_json_body_streams_base64_of_the_whole_message(tmp_path: Path, size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    doc = webhook.envelope_document(envelope(), rcpts("a@hook.example", "b@hook.example"))
    body = json_body(doc, source(tmp_path, data))
    raw = b"".join(body.chunks())
    assert len(raw) == body.length
    parsed = orjson.loads(raw)
    assert base64.b64decode(parsed.pop("message"), validate=True) == data
    assert parsed == {"id": "0ABCDEF123", "sender": "alice@example.org",
                      "recipients": ["a@hook.example", "b@hook.example"],
                      "params": {"body": "8BITMIME", "size": len(MESSAGE)},
                      "received_at": 1700000000.5}


@pytest.mark.parametrize("size", [0, 1, BLOCK_SIZE + 1])
def test_multipart_body_parts(tmp_path: Path, size: int) -> None:
    data = (MESSAGE * (size // len(MESSAGE) + 1))[:size]
    doc = webhook.envelope_document(envelope(), rcpts("a@hook.example"))
    body = multipart_body(doc, source(tmp_path, data))
    raw = b"".join(body.chunks())
    assert len(raw) == body.length
    assert body.content_type.startswith("multipart/form-data; boundary=empath-")
    parts = uvloop.run(parse_multipart(body.content_type, raw))
    assert list(parts) == ["envelope", "message"]
    env_headers, env_raw = parts["envelope"]
    assert env_headers["content-type"] == "application/json"
    assert orjson.loads(env_raw) == doc
    msg_headers, msg_raw = parts["message"]
    assert msg_headers["content-type"] == "message/rfc822"
    assert 'filename="0ABCDEF123.eml"' in msg_headers["content-disposition"]
    assert msg_raw == data


def test_multipart_boundaries_differ_and_odd_ids_get_a_plain_file_name(tmp_path: Path) -> None:
    doc = webhook.envelope_document(envelope(id='x"\r\ny'), rcpts("a@hook.example"))
    one, two = multipart_body(doc, source(tmp_path)), multipart_body(doc, source(tmp_path))
    assert one.content_type != two.content_type
    assert b'filename="message.eml"' in one.head


def test_signature_is_the_documented_recipe(tmp_path: Path) -> None:
    body = json_body(webhook.envelope_document(envelope(), rcpts("a@x")), source(tmp_path))
    raw = b"".join(body.chunks())
    signature = webhook.sign(SECRET, "1700000000", body.chunks())
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify_signature(SECRET, "1700000000", raw, signature, now=1700000100)
    assert not verify_signature(SECRET, "1700000000", raw, signature, now=1700000400)  # replay
    assert not verify_signature(SECRET, "1700000001", raw, signature, now=1700000100)
    assert not verify_signature(b"other", "1700000000", raw, signature, now=1700000100)
    assert not verify_signature(SECRET, "1700000000", raw + b" ", signature, now=1700000100)


@pytest.mark.parametrize(("text", "key"), [
    (b"k1\n", b"k1"), (b"  k2  \r\nsecond line\n", b"k2"), (b"k3", b"k3")])
def test_secret_is_the_first_line(tmp_path: Path, text: bytes, key: bytes) -> None:
    assert webhook.read_secret(str(secret_file(tmp_path, text))) == key


@pytest.mark.parametrize("text", [b"", b"\n", b"   \nkey\n"])
def test_secret_file_without_a_key_is_refused(tmp_path: Path, text: bytes) -> None:
    with pytest.raises(OSError, match="no key"):
        webhook.read_secret(str(secret_file(tmp_path, text)))


# -- configuration ---------------------------------------------------------------------------
def test_strategy_defaults_to_smtp(tmp_path: Path) -> None:
    cfg = config(tmp_path, "example.com:\n  tls: required\n")
    policy = cfg.delivery.domains["example.com"]
    assert policy.strategy == "smtp"
    assert (policy.webhook.url, policy.webhook.secret_file) == (None, None)
    assert (policy.webhook.timeout, policy.webhook.format) == (30.0, "json")
    assert Dispatcher(cfg).webhook_settings("example.com") is None


@pytest.mark.parametrize(("domains", "key", "reason"), [
    ("hook.example:\n  strategy: webhook\n", "delivery.domains.hook.example.webhook.url",
     "strategy webhook needs webhook.url"),
    ("hook.example:\n  strategy: webhook\n  webhook: {url: 'ftp://h/x'}\n",
     "delivery.domains.hook.example.webhook.url", "http:// or https://"),
    ("hook.example:\n  strategy: webhook\n  webhook: {url: 'http:///x'}\n",
     "delivery.domains.hook.example.webhook.url", "with a host"),
    ("hook.example:\n  strategy: webhook\n  webhook: {url: 'http://u:p@h/x'}\n",
     "delivery.domains.hook.example.webhook.url", "no credentials"),
    ("hook.example:\n  strategy: webhook\n  webhook: {url: 'http://h:99999/x'}\n",
     "delivery.domains.hook.example.webhook.url", "Port out of range"),
    ("hook.example:\n  strategy: carrier-pigeon\n", "delivery.domains.hook.example.strategy",
     "is not smtp, webhook or package.module:Class"),
    ("hook.example:\n  strategy: webhook\n  webhook: {url: 'http://h/', format: xml}\n",
     "delivery.domains.hook.example.webhook.format", "one of json, multipart"),
    ("hook.example:\n  strategy: webhook\n  webhook: {url: 'http://h/', timeout: 0s}\n",
     "delivery.domains.hook.example.webhook.timeout", "out of range"),
    ("hook.example:\n  strategy: webhook\n  webhook: {url: 'http://h/', secret_file: nope}\n",
     "delivery.domains.hook.example.webhook.secret_file", "no such file"),
    ("localhost:\n  strategy: webhook\n  webhook: {url: 'http://h/'}\n",
     "delivery.domains.localhost.strategy", "local_domains"),
])
def test_webhook_configuration_errors(tmp_path: Path, domains: str, key: str,
                                      reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(tmp_path, domains)
    assert info.value.key == key
    assert reason in info.value.reason


def test_dispatcher_finds_webhook_settings_by_a_labels(tmp_path: Path) -> None:
    cfg = config(tmp_path, "xn--bcher-kva.example:\n  strategy: webhook\n"
                 "  webhook: {url: 'https://h.example/in'}\n")
    dispatcher = Dispatcher(cfg)
    for domain in ("xn--bcher-kva.example", "bücher.example"):
        settings = dispatcher.webhook_settings(domain)
        assert settings is not None and settings.url == "https://h.example/in"


# -- over loopback ---------------------------------------------------------------------------
def test_delivered_with_signed_json(tmp_path: Path) -> None:
    secret = secret_file(tmp_path)
    with WebhookServer(secret=SECRET) as server:
        cfg = hook_config(tmp_path, server.url(), secret_file=secret)
        out, info = deliver(cfg, source(tmp_path), "a@hook.example", "b@hook.example")
        [req] = server.wait_for_requests(1)
    label = f"127.0.0.1:{server.port}"
    assert {o.status for o in out.values()} == {DELIVERED}
    outcome = out["a@hook.example"]
    assert (outcome.code, outcome.enhanced, outcome.server) == (None, "2.0.0", label)
    assert outcome.text == f"webhook {label} 200 OK"
    assert info["transport"] == "webhook" and info["server"] == label
    assert info["domain"] == "hook.example" and info["status"] == 200
    assert isinstance(info["duration"], float)
    assert (req.method, req.path, req.signature_ok) == ("POST", "/mail", True)
    assert req.headers["content-type"] == "application/json"
    assert req.headers["content-length"] == str(len(req.body))
    assert "transfer-encoding" not in req.headers
    assert req.headers["x-empath-queue-id"] == "0ABCDEF123"
    doc = req.json()
    assert base64.b64decode(doc.pop("message")) == MESSAGE
    assert doc["recipients"] == ["a@hook.example", "b@hook.example"]


def test_unsigned_without_secret_file(tmp_path: Path) -> None:
    with WebhookServer() as server:
        out, _ = deliver(hook_config(tmp_path, server.url()), source(tmp_path), "a@hook.example")
        [req] = server.wait_for_requests(1)
    assert out["a@hook.example"].status == DELIVERED
    assert "x-empath-signature" not in req.headers and "x-empath-timestamp" in req.headers


@pytest.mark.parametrize(("answer", "result", "enhanced", "words"), [
    (Answer(500, b"database\ndown"), DEFERRED, "4.0.0", "500 Internal Server Error: database down"),
    (Answer(503, b"", {"Retry-After": "120"}), DEFERRED, "4.0.0",
     "503 Service Unavailable (Retry-After: 120)"),
    (Answer(429, b"slow down", {"Retry-After": "30"}), DEFERRED, "4.0.0",
     "429 Too Many Requests: slow down (Retry-After: 30)"),
    (Answer(408, b""), DEFERRED, "4.0.0", "408 Request Timeout"),
    (Answer(301, b"", {"Location": "/elsewhere"}), DEFERRED, "4.0.0", "301 Moved Permanently"),
    (Answer(404, b"no such hook"), FAILED, "5.0.0", "404 Not Found: no such hook"),
    (Answer(400, b"x" * 5000), FAILED, "5.0.0", "400 Bad Request: " + "x" * 200),
    (Answer(202, b"queued"), DELIVERED, "2.0.0", "202 Accepted"),
])
def test_answers(tmp_path: Path, answer: Answer, result: str, enhanced: str,
                 words: str) -> None:
    with WebhookServer(default=answer) as server:
        out, info = deliver(hook_config(tmp_path, server.url(), format="multipart"),
                            source(tmp_path), "a@hook.example", "b@hook.example")
        assert len(server.wait_for_requests(1)) == 1  # one request for both; no redirect
    label = f"127.0.0.1:{server.port}"
    assert {o.status for o in out.values()} == {result}
    outcome = out["b@hook.example"]
    assert (outcome.code, outcome.enhanced, outcome.server) == (None, enhanced, label)
    assert outcome.text == f"webhook {label} {words}"
    assert info["status"] == answer.status


def test_timeout_defers(tmp_path: Path) -> None:
    with WebhookServer(default=Answer(delay=10)) as server:
        out, info = deliver(hook_config(tmp_path, server.url(), timeout="0.3s"),
                            source(tmp_path), "a@hook.example")
    outcome = out["a@hook.example"]
    assert outcome.status == DEFERRED and (outcome.code, outcome.enhanced) == (451, "4.4.2")
    assert outcome.text == f"timeout waiting for webhook reply from 127.0.0.1:{server.port}"
    assert info["status"] is None and info["duration"] < 5


def test_refused_connection_defers(tmp_path: Path) -> None:
    port = free_port()
    out, info = deliver(hook_config(tmp_path, f"http://127.0.0.1:{port}/mail"),
                        source(tmp_path), "a@hook.example")
    outcome = out["a@hook.example"]
    assert outcome.status == DEFERRED and (outcome.code, outcome.enhanced) == (451, "4.4.1")
    assert outcome.text.startswith(f"cannot connect to 127.0.0.1:{port}: ")
    assert info["status"] is None and info["server"] == f"127.0.0.1:{port}"


def test_https_verified_against_ca_file(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    cert = make_server_cert(tmp_path, ca, "hooks.example.test", ips=["127.0.0.1"])
    with WebhookServer(ssl_context=cert.server_context()) as server:
        assert server.url().startswith("https://")
        out, _ = deliver(hook_config(tmp_path, server.url(), ca_file=ca.cert_path),
                         source(tmp_path), "a@hook.example")
        assert len(server.wait_for_requests(1)) == 1
    assert out["a@hook.example"].status == DELIVERED


def test_https_with_an_untrusted_certificate_defers(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)  # not given to Empath: the system store does not know it
    cert = make_server_cert(tmp_path, ca, "hooks.example.test", ips=["127.0.0.1"])
    with WebhookServer(ssl_context=cert.server_context()) as server:
        out, info = deliver(hook_config(tmp_path, server.url()), source(tmp_path),
                            "a@hook.example")
        assert not server.requests
    outcome = out["a@hook.example"]
    assert outcome.status == DEFERRED and (outcome.code, outcome.enhanced) == (451, "4.4.1")
    assert outcome.text.startswith(f"cannot connect to 127.0.0.1:{server.port}: ")
    assert "certificate verify failed" in outcome.text
    assert info["status"] is None


def test_unreadable_secret_defers_without_a_request(tmp_path: Path) -> None:
    secret = secret_file(tmp_path)
    with WebhookServer() as server:
        cfg = hook_config(tmp_path, server.url(), secret_file=secret)
        secret.unlink()
        out, _ = deliver(cfg, source(tmp_path), "a@hook.example")
        assert not server.requests
    outcome = out["a@hook.example"]
    assert outcome.status == DEFERRED and (outcome.code, outcome.enhanced) == (451, "4.3.0")
    assert "webhook secret_file" in outcome.text and str(secret) in outcome.text


@pytest.mark.parametrize("secret", [False, True])
def test_short_queue_file_defers_as_a_local_error(tmp_path: Path, secret: bool) -> None:
    src = source(tmp_path)
    short = MessageSource(src.path, src.offset, src.length + 100)  # past the end of the file
    settings = {"secret_file": secret_file(tmp_path)} if secret else {}
    with WebhookServer() as server:
        out, _ = deliver(hook_config(tmp_path, server.url(), **settings), short,
                         "a@hook.example")
    outcome = out["a@hook.example"]
    assert outcome.status == DEFERRED and (outcome.code, outcome.enhanced) == (451, "4.3.0")
    assert "reading the message" in outcome.text and "shorter" in outcome.text


@pytest.mark.parametrize("fmt", ["json", "multipart"])
def test_large_message_signed_in_a_thread(tmp_path: Path, fmt: str) -> None:
    data = b"".join(b"line %07d of a long message\r\n" % i for i in range(110000))
    assert len(data) > 2 * SIGN_INLINE_LIMIT
    with WebhookServer(secret=SECRET) as server:
        cfg = hook_config(tmp_path, server.url(), secret_file=secret_file(tmp_path),
                          format=fmt)
        out, _ = deliver(cfg, source(tmp_path, data), "a@hook.example")
        [req] = server.wait_for_requests(1)
    assert out["a@hook.example"].status == DELIVERED
    assert req.signature_ok
    message = (req.parts["message"][1] if fmt == "multipart"
               else base64.b64decode(req.json()["message"]))
    assert message == data


def test_dispatcher_routes_webhook_and_local_domains(tmp_path: Path) -> None:
    with WebhookServer() as server:
        cfg = hook_config(tmp_path, server.url())

        async def go() -> tuple[dict[str, RecipientOutcome], list[dict[str, Any]], bool]:
            dispatcher = Dispatcher(cfg)
            try:
                result = await dispatcher.deliver(
                    envelope(), rcpts("u@localhost", "a@hook.example", "b@Hook.Example"),
                    source(tmp_path))
            finally:
                await dispatcher.close()
            session = dispatcher.strategies["webhook"].transport._http  # type: ignore[attr-defined]
            return *result, session is None

        out, infos, closed = uvloop.run(go())
        [req] = server.wait_for_requests(1)
    assert {a: o.status for a, o in out.items()} == {
        "u@localhost": DELIVERED, "a@hook.example": DELIVERED, "b@Hook.Example": DELIVERED}
    assert sorted((i["domain"], i["transport"]) for i in infos) == [
        ("hook.example", "webhook"), ("localhost", "maildir")]
    assert req.json()["recipients"] == ["a@hook.example", "b@Hook.Example"]
    assert len(list((tmp_path / "mail" / "u" / "new").iterdir())) == 1
    assert closed
