"""An OTLP/HTTP trace receiver on loopback for tests: what a collector would be sent.

    with OTLPReceiver() as otlp:                # 127.0.0.1, a free port, in a thread
        otlp.endpoint                           # -> tracing.endpoint
        otlp.spans()                            # every span received so far, decoded
        otlp.wait_for(lambda spans: ..., 20)    # bounded wait on a condition of the spans

It serves ``POST /v1/traces`` (``application/x-protobuf``), decodes each request with the
``opentelemetry-proto`` package's ``ExportTraceServiceRequest`` (so the test checks what went
over the wire, not what the SDK meant to send) and answers an empty
``ExportTraceServiceResponse``. Each decoded span is a ``Span`` with hex ids, its service
name and its attributes as a plain dict; ``posts`` counts requests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

T = TypeVar("T")


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start_ns: int
    end_ns: int
    service: str
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    status_code: int = 0


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


class OTLPReceiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.posts = 0
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}/v1/traces"

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        decoded = []
        for rs in req.resource_spans:
            service = str(_attrs(rs.resource.attributes).get("service.name", ""))
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    decoded.append(Span(
                        sp.name, sp.trace_id.hex(), sp.span_id.hex(), sp.parent_span_id.hex(),
                        sp.kind, sp.start_time_unix_nano, sp.end_time_unix_nano, service,
                        _attrs(sp.attributes),
                        [(e.name, _attrs(e.attributes)) for e in sp.events],
                        sp.status.code))
        with self._lock:
            self.posts += 1
            self._spans.extend(decoded)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, self.host, 0)
        loop.run_until_complete(site.start())
        self._runner = runner
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def start(self) -> OTLPReceiver:
        self._thread = threading.Thread(target=self._run, name="otlp-receiver", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the OTLP receiver did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, pred: Callable[[list[Span]], T], timeout: float,
                 what: str = "spans") -> T:
        deadline = time.monotonic() + timeout
        while True:
            got = pred(self.spans())
            if got:
                return got
            if time.monotonic() > deadline:
                names = sorted({s.name for s in self.spans()})
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}; "
                                   f"spans so far: {names}")
            time.sleep(0.1)
