"""Delivery by HTTP POST: the ``webhook`` strategy of ``delivery.domains.<domain>``.

One request per message and webhook domain, carrying every open recipient of that domain
(docs/WEBHOOKS.md has the request, the signature and how to verify it). This module owns:

- the request body, built to the byte before it is sent: ``json`` (the envelope fields and the
  message base64-encoded, in one object) or ``multipart`` (multipart/form-data, RFC 7578: an
  ``envelope`` JSON part and the raw ``message`` part). Either way the message is streamed
  from the queue file in blocks, never held whole, and the length is known in advance, so the
  request has a Content-Length and is never chunked;
- the signature: HMAC-SHA256 with the key of ``webhook.secret_file`` over
  ``<timestamp>.<body>``, sent as ``X-Empath-Signature: sha256=<hex>`` with the timestamp in
  ``X-Empath-Timestamp`` (signing the timestamp is what lets a receiver refuse replays). The
  signature is a header, so the body is read once to sign it (in a thread for a large one:
  hashlib releases the GIL) and once to send it;
- the verdict, the same for every recipient of the request: 2xx delivered; 408, 429, 5xx,
  anything else outside 4xx (a redirect: none is followed, a POST must not be replayed
  elsewhere), a timeout or a connection error deferred, to be retried on the normal schedule;
  any other 4xx failed (bounced). A 408 is a timeout the server reports (RFC 9110 §15.5.9)
  and is retried like ours.

An HTTP status is not an SMTP reply, so an answered request's outcome has no ``code``: its
``enhanced`` code is 2.0.0, 4.0.0 or 5.0.0 and its text ``webhook <server> <status> <reason>``
(a refusal's first bytes of body appended). A timeout or a connection failure is our own
verdict (``errors.REPLIES``), as for SMTP. Retry-After is kept in the text, not obeyed: the
retry schedule is the message's, over all its domains.

A request that times out after the body went out may have been acted on: delivery is at least
once, and receivers deduplicate on the queue id (``id``). One aiohttp ClientSession per
worker, opened on first use and closed with the dispatcher; no cookies, no proxy from the
environment, the URL's host resolved by the system resolver. Never builds a spool path: the
message is read through the MessageSource it is given.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import ssl
import time
from binascii import b2a_base64
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, TypedDict
from urllib.parse import urlsplit

import aiohttp
import orjson

from empath.config.typed import Config, DomainPolicyWebhookConfig
from empath.delivery.errors import DeliveryError, LocalSystemError, TemporaryError
from empath.delivery.state import DEFERRED, DELIVERED, FAILED, RecipientOutcome
from empath.spool import MessageSource
from empath.spool.records import Envelope, Params, Recipient, Route, new_route

log = logging.getLogger("empath.delivery.webhook")

# A multiple of 3, so the base64 of consecutive blocks is the base64 of the whole message.
BLOCK_SIZE = 48 * 1024
SIGN_INLINE_LIMIT = 256 * 1024  # larger bodies are hashed in a thread, off the event loop
EXCERPT_BYTES = 512  # of a refusal's body, read for the recipient's text
EXCERPT_CHARS = 200
SIGNATURE_HEADER = "X-Empath-Signature"
TIMESTAMP_HEADER = "X-Empath-Timestamp"
QUEUE_ID_HEADER = "X-Empath-Queue-Id"
USER_AGENT = "Empath (webhook delivery)"
# The class of an HTTP answer as an RFC 3463 code (X.0.0: only the class is known). Not in
# errors.REPLIES: they stand for the server's answer, and bounce.py takes what matches REPLIES
# for a verdict of ours (no Remote-MTA).
ENHANCED = {DELIVERED: "2.0.0", DEFERRED: "4.0.0", FAILED: "5.0.0"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


# -- pure parts ------------------------------------------------------------------------------
def verdict(status: int) -> str:
    """What an HTTP status means for the recipients of the request."""
    if 200 <= status <= 299:
        return DELIVERED
    if 400 <= status <= 499 and status not in (408, 429):
        return FAILED
    return DEFERRED


def server_label(url: str) -> str:
    """The URL's host, with its port when the URL names one: ``hooks.example.net``,
    ``127.0.0.1:8080``, ``[::1]:8080``. What logs, the history and bounces show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{parts.port}" if parts.port is not None else shown


class EnvelopeDocument(TypedDict):
    """The envelope fields a request carries (docs/WEBHOOKS.md), without the message."""

    id: str
    sender: str
    recipients: list[str]
    params: Params | dict[str, Any]  # {} when the envelope has none
    received_at: float | None


def envelope_document(envelope: Envelope, rcpts: list[Recipient]) -> EnvelopeDocument:
    """The envelope fields a request carries (docs/WEBHOOKS.md), without the message."""
    return {"id": envelope["id"], "sender": envelope.get("sender", ""),
            "recipients": [r["address"] for r in rcpts],
            "params": envelope.get("params") or {},
            "received_at": envelope.get("received_at")}


def _flatten(text: str, limit: int) -> str:
    """One line of printable text: what came from the network goes into texts and bounces."""
    printable = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(printable.split())[:limit]


@dataclass
class RequestBody:
    """The exact bytes of one request: ``head``, the message (raw or base64), ``tail``."""

    head: bytes
    tail: bytes
    source: MessageSource
    base64: bool
    content_type: str
    read_error: OSError | None = field(default=None, init=False)

    @property
    def length(self) -> int:
        n = self.source.length
        return len(self.head) + (4 * ((n + 2) // 3) if self.base64 else n) + len(self.tail)

    def chunks(self) -> Iterator[bytes]:
        """The body in pieces. Plain reads: the queue file was just written or read and is in
        the page cache (as for SMTP, ``connection.py``)."""
        yield self.head
        try:
            with open(self.source.path, "rb", buffering=0) as f:
                f.seek(self.source.offset)
                remaining = self.source.length
                while remaining > 0:
                    block = f.read(min(BLOCK_SIZE, remaining))
                    if not block:
                        raise OSError("queue file shorter than its recorded length")
                    remaining -= len(block)
                    yield b2a_base64(block, newline=False) if self.base64 else block
        except OSError as exc:
            self.read_error = exc  # aiohttp wraps what a body raises: keep the cause
            raise
        yield self.tail

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks():
            yield chunk


def json_body(document: EnvelopeDocument, source: MessageSource) -> RequestBody:
    """``document`` with ``"message": "<base64 of the message>"`` added as its last member."""
    head = orjson.dumps(document)
    return RequestBody(head[:-1] + b',"message":"', b'"}', source, True, "application/json")


def multipart_body(document: EnvelopeDocument, source: MessageSource,
                   boundary: str | None = None) -> RequestBody:
    """multipart/form-data (RFC 7578): ``envelope`` (JSON), then ``message`` (raw, binary: no
    Content-Transfer-Encoding, §4.7). The boundary is 128 random bits, so it occurs in no
    message (RFC 2046 §5.1.1) but by a chance not worth a scan of the message for it."""
    boundary = boundary or "empath-" + secrets.token_hex(16)
    queue_id = str(document.get("id"))
    name = f"{queue_id}.eml" if _SAFE_NAME.match(queue_id) else "message.eml"
    mark = b"--" + boundary.encode()
    head = (mark + b"\r\nContent-Disposition: form-data; name=\"envelope\"\r\n"
            b"Content-Type: application/json\r\n\r\n" + orjson.dumps(document) + b"\r\n"
            + mark + b"\r\nContent-Disposition: form-data; name=\"message\"; filename=\""
            + name.encode() + b"\"\r\nContent-Type: message/rfc822\r\n\r\n")
    return RequestBody(head, b"\r\n" + mark + b"--\r\n", source, False,
                       f"multipart/form-data; boundary={boundary}")


def sign(secret: bytes, timestamp: str, chunks: Iterator[bytes]) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``<timestamp>.<body>`` under ``secret``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b".", hashlib.sha256)
    for chunk in chunks:
        mac.update(chunk)
    return "sha256=" + mac.hexdigest()


def read_secret(path: str) -> bytes:
    """The key in ``secret_file``: its first line, surrounding white space removed.
    OSError when it cannot be read or holds no key."""
    with open(path, "rb") as fh:
        lines = fh.read(64 * 1024).splitlines()
    key = lines[0].strip() if lines else b""
    if not key:
        raise OSError(f"{path}: no key on its first line")
    return key


# -- the transport ---------------------------------------------------------------------------
class WebhookTransport:
    """Delivery of webhook domains for one delivery worker: one HTTP session for them all."""

    def __init__(self, cfg: Config) -> None:
        self.ca_file: str | None = cfg.delivery.tls.ca_file
        self._http: aiohttp.ClientSession | None = None
        self._secrets: dict[str, bytes] = {}

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
            # limit=0: the worker's max_parallel_deliveries bounds the requests; a connector
            # limit would make them queue inside aiohttp, on their timeout's clock. The
            # threaded resolver is getaddrinfo (/etc/hosts too), whether or not aiodns is
            # installed (aiohttp would pick it by default).
            connector = aiohttp.TCPConnector(ssl=context, limit=0,
                                             resolver=aiohttp.ThreadedResolver())
            self._http = aiohttp.ClientSession(
                connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": USER_AGENT})
        return self._http

    def _secret(self, path: str) -> bytes:
        """The key of ``path``, read once per worker (a reload starts new workers)."""
        key = self._secrets.get(path)
        if key is None:
            key = self._secrets[path] = read_secret(path)
        return key

    async def close(self) -> None:
        if self._http is not None:
            session, self._http = self._http, None
            await session.close()

    async def deliver(self, domain: str, settings: DomainPolicyWebhookConfig, envelope: Envelope,
                      rcpts: list[Recipient], source: MessageSource
                      ) -> tuple[dict[str, RecipientOutcome], Route]:
        """POST ``source`` for ``rcpts`` to ``settings.url``; one outcome per recipient (the
        same for all) and a route record. Never raises but for cancellation."""
        started = time.monotonic()
        assert settings.url is not None  # the loader requires it with strategy webhook
        label = server_label(settings.url)
        status: int | None = None
        try:
            status, text = await self._post(settings, label, envelope, rcpts, source)
            result = verdict(status)
            outcome = RecipientOutcome(result, None, ENHANCED[result], text, label)
            if result != DELIVERED:
                log.info("%s: %s", envelope.get("id"), text)
        except DeliveryError as err:
            log.info("%s: webhook %s: %s", envelope.get("id"), label, err)
            outcome = err.outcome()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must defer, never fail, the recipients
            log.exception("%s: webhook delivery to %s failed unexpectedly",
                          envelope.get("id"), label)
            outcome = LocalSystemError.make("local", reason=type(exc).__name__).outcome()
        info = new_route(domain, "webhook", round(time.monotonic() - started, 6),
                         server=label, status=status)
        return {r["address"]: outcome for r in rcpts}, info

    async def _post(self, settings: DomainPolicyWebhookConfig, label: str,
                    envelope: Envelope, rcpts: list[Recipient],
                    source: MessageSource) -> tuple[int, str]:
        """Send the request: the status and the text of the answer, else a DeliveryError."""
        document = envelope_document(envelope, rcpts)
        body = (multipart_body(document, source) if settings.format == "multipart"
                else json_body(document, source))
        timestamp = str(int(time.time()))
        headers = {"Content-Type": body.content_type, "Content-Length": str(body.length),
                   TIMESTAMP_HEADER: timestamp, QUEUE_ID_HEADER: str(document["id"])}
        if settings.secret_file is not None:
            headers[SIGNATURE_HEADER] = await self._signature(settings.secret_file, timestamp,
                                                              body)
        assert settings.url is not None  # the loader requires it with strategy webhook
        try:
            async with self._session().post(
                    settings.url, data=body.stream(), headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=settings.timeout)) as response:
                return response.status, await _answer_text(response, label)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if body.read_error is not None:
                raise LocalSystemError.make(
                    "local", reason=f"reading the message: {body.read_error}") from None
            raise _network_error(exc, label) from None

    async def _signature(self, path: str, timestamp: str, body: RequestBody) -> str:
        try:
            key = self._secret(path)
        except OSError as exc:
            reason = f"{path}: {exc.strerror}" if exc.strerror else str(exc)
            raise LocalSystemError.make(
                "local", reason=f"webhook secret_file {reason}") from None
        try:
            if body.length <= SIGN_INLINE_LIMIT:
                return sign(key, timestamp, body.chunks())
            return await asyncio.to_thread(sign, key, timestamp, body.chunks())
        except OSError as exc:
            raise LocalSystemError.make("local", reason=f"reading the message: {exc}") from None


async def _answer_text(response: aiohttp.ClientResponse, label: str) -> str:
    """``webhook <server> <status> <reason>``; for a refusal, the start of its body too (what
    the receiver says is wrong), and Retry-After, which is shown, not obeyed."""
    text = f"webhook {label} {response.status} {_flatten(response.reason or '', 80)}".rstrip()
    if verdict(response.status) == DELIVERED:
        return text
    try:
        excerpt = _flatten((await response.content.read(EXCERPT_BYTES)).decode(
            "utf-8", "replace"), EXCERPT_CHARS)
    except (TimeoutError, aiohttp.ClientError, OSError):
        excerpt = ""  # the status is the answer; its body is a courtesy
    if excerpt:
        text += f": {excerpt}"
    retry_after = response.headers.get("Retry-After")
    if retry_after:
        text += f" (Retry-After: {_flatten(retry_after, 40)})"
    return text


def _network_error(exc: BaseException, label: str) -> TemporaryError:
    """A failed request as our own temporary verdict (``errors.REPLIES``)."""
    if isinstance(exc, TimeoutError):
        return TemporaryError.make("timeout", server=label, stage="webhook")
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        return TemporaryError.make("connect", server=label, reason=reason)
    return TemporaryError.make("lost", server=label, stage="webhook request",
                               reason=str(exc) or type(exc).__name__)
