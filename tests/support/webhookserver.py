"""A small HTTP server on loopback for webhook-delivery tests: records requests, answers as told.

It runs aiohttp's web server on its own asyncio loop in a background thread, so both plain
tests and the real daemon (another process, through ``delivery.domains.<d>.webhook.url``) can
POST to it (over TLS when given an ssl context)::

    with WebhookServer(answers=[Answer(500), Answer(200)], secret=b"k") as server:
        ...deliver to server.url()...
        [first, second] = server.wait_for_requests(2)
        second.json()                 # the JSON body, parsed
        second.parts                  # multipart: {name: (headers, raw bytes)}
        second.signature_ok           # the HMAC checked with docs/WEBHOOKS.md's recipe

Answers are used in order, then ``default`` for every later request. An answer with a
``delay`` waits that long before answering (a slow server), or until the server stops. A
multipart body is parsed by aiohttp's own multipart reader, not by the code under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import ssl
import threading
import time
from typing import Any

import orjson
from aiohttp import MultipartReader, StreamReader, web
from aiohttp.base_protocol import BaseProtocol

MAX_BODY = 64 * 1024 * 1024
TOLERANCE = 300  # seconds a timestamp may be off: the recipe's replay window


def verify_signature(secret: bytes, timestamp: str, body: bytes, signature: str,
                     now: float | None = None) -> bool:
    """docs/WEBHOOKS.md's verification recipe, as a receiver would write it."""
    if not timestamp.isdigit() or abs((now or time.time()) - int(timestamp)) > TOLERANCE:
        return False
    expected = "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body,
                                    hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


@dataclasses.dataclass
class Answer:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0


@dataclasses.dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    parts: dict[str, tuple[dict[str, str], bytes]]
    signature_ok: bool | None  # None: the server has no secret

    def json(self) -> Any:
        return orjson.loads(self.body)


async def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[dict[str, str],
                                                                            bytes]]:
    """Each part of a multipart/form-data body by name: (its headers, its raw content)."""
    # A limit above the body's size: the stream never asks the (absent) transport to pause.
    stream = StreamReader(BaseProtocol(asyncio.get_running_loop()), len(body) + 2 ** 16)
    stream.feed_data(body)
    stream.feed_eof()
    reader = MultipartReader({"Content-Type": content_type}, stream)
    parts = {}
    async for part in reader:
        assert not isinstance(part, MultipartReader)
        parts[str(part.name)] = ({k.lower(): v for k, v in part.headers.items()},
                                 await part.read(decode=False))
    return parts


class WebhookServer:
    def __init__(self, answers: list[Answer] | None = None, default: Answer | None = None,
                 secret: bytes | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.answers = list(answers or [])
        self.ssl_context = ssl_context
        self.default = default or Answer()
        self.secret = secret
        self.requests: list[Request] = []
        self.port = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def url(self, path: str = "/mail") -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> WebhookServer:
        self._thread = threading.Thread(target=self._run, name="webhook-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("webhook server did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._thread is not None and self._thread.is_alive():
            assert self._stopping is not None
            loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)

    def __enter__(self) -> WebhookServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start() when it happens there
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = runner.addresses[0][1]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    # -- requests ----------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        ok = None
        if self.secret is not None:
            ok = verify_signature(self.secret, headers.get("x-empath-timestamp", ""), body,
                                  headers.get("x-empath-signature", ""))
        parts = {}
        if request.content_type == "multipart/form-data":
            parts = await parse_multipart(headers["content-type"], body)
        with self._lock:
            self.requests.append(Request(request.method, request.path, headers, body, parts,
                                         ok))
            answer = self.answers.pop(0) if self.answers else self.default
        if answer.delay:
            assert self._stopping is not None
            try:
                await asyncio.wait_for(self._stopping.wait(), answer.delay)
            except TimeoutError:
                pass
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    def wait_for_requests(self, count: int, timeout: float = 15.0) -> list[Request]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.requests)} request(s) of {count} after "
                                   f"{timeout:g}s")
            time.sleep(0.02)
