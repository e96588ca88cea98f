"""OpenTelemetry tracing: spans for SMTP sessions, received messages, delivery attempts and
their DNS lookups and SMTP phases, exported over OTLP/HTTP.

Spans (names, and the attributes that are Empath's own under ``empath.``):

- ``smtp.session`` (receiver, kind SERVER): one SMTP connection; ``client.address``,
  ``client.port``, ``empath.listener``, ``empath.messages``;
- ``smtp.message`` (child of its session): one message from DATA to the reply;
  ``empath.queue_id``, ``client.address``, ``empath.message.size``,
  ``empath.recipients``, ``empath.outcome`` (stored or refused), ``smtp.reply.code``;
- ``delivery.attempt`` (delivery worker): one attempt of one message; ``empath.queue_id``,
  ``empath.attempt``, ``empath.recipients``, ``empath.outcome`` (the recipients' results,
  e.g. ``delivered`` or ``deferred``, joined with ``+`` when they differ), and in brief what
  its routes say: ``empath.domains``, ``empath.mx_hosts``, ``empath.tls`` (any route over
  TLS);
- ``delivery.route`` (child of the attempt): the delivery to one destination domain over
  SMTP; ``empath.domain``, ``empath.mx_host``, ``server.address`` (IP), ``server.port``,
  ``empath.attempt``, ``tls.protocol.version`` (absent in plain), ``empath.outcome``;
- ``dns.lookup`` (child of the route): one DNS query (not a cache hit); ``dns.question.name``,
  ``dns.question.type``;
- ``smtp.connect`` and ``smtp.transaction`` (children of the route): the SMTP phases,
  connection set-up (TCP, greeting, EHLO, STARTTLS) and the MAIL/RCPT/DATA transaction;
  every reply of the server is an ``smtp.reply`` event (stage, code, enhanced code) on the
  span current when it arrives.

Across processes: a message is received by one process and delivered by another, possibly
hours later. The W3C ``traceparent`` of the ``smtp.message`` span is stored in the message's
envelope (key ``traceparent``), and every ``delivery.attempt`` span takes it as its **parent**
(not a link): the receipt and all its attempts, a deferral and the later success, are one trace,
found by one trace id and drawn as one tree in any trace viewer. A child may start after its
parent has ended; the trace's duration is then the message's time in the queue, which is what
an operator looking at it wants to see. Sampling is parent-based, so an attempt follows the
decision made at receipt.

Off (``tracing.enabled`` false, the default) nothing of OpenTelemetry is imported:
``session()`` returns the shared ``OFF`` object whose methods do nothing, the decorators call
the wrapped function's coroutine itself after one test of a module global (no frame is
added), and ``event`` returns at once
(``benchmarks/bench_observe.py`` measures that path). On, ``init(cfg)`` (each child, after the
fork: the SDK's export thread must be the child's own) builds a TracerProvider with a batching
processor and the OTLP/HTTP exporter; the standard ``OTEL_*`` variables apply
(``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``/``OTEL_EXPORTER_OTLP_ENDPOINT``, ``_HEADERS``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``,
``OTEL_SDK_DISABLED``), a ``tracing:`` key set in the configuration winning over its variable.
``shutdown()`` exports what is left when the child stops. Tracing never blocks mail: spans are
queued and exported from the SDK's thread; a full queue drops spans, an unreachable collector
loses them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from empath.config.typed import Config, ListenerConfig

T = TypeVar("T")

ENVELOPE_KEY = "traceparent"

_tracer: Any = None  # an opentelemetry Tracer while tracing is on in this process
_provider: Any = None


def enabled() -> bool:
    return _tracer is not None


def init(cfg: Config) -> bool:
    """Start tracing in this process when ``tracing.enabled`` (True if it started)."""
    global _tracer, _provider
    tcfg = getattr(cfg, "tracing", None)
    if tcfg is None or not tcfg.enabled:
        return False
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {
        SERVICE_NAME: tcfg.service_name}
    resource = Resource.create(attributes)
    sampler = None  # OTEL_TRACES_SAMPLER, else the SDK's default (parent-based, always on)
    if not os.environ.get("OTEL_TRACES_SAMPLER"):
        sampler = ParentBased(TraceIdRatioBased(tcfg.sample_ratio))
    _provider = TracerProvider(resource=resource, sampler=sampler)
    exporter = OTLPSpanExporter(endpoint=tcfg.endpoint, timeout=tcfg.export_timeout)
    _provider.add_span_processor(BatchSpanProcessor(
        exporter, schedule_delay_millis=int(tcfg.export_interval * 1000),
        export_timeout_millis=int(tcfg.export_timeout * 1000)))
    _tracer = _provider.get_tracer("empath")
    return True


def shutdown() -> None:
    """Export the spans still queued and stop (as the child stops)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        try:
            provider.shutdown()
        except Exception:  # tracing must never stop a child from stopping
            pass


# -- context across processes --------------------------------------------------------------
def traceparent(span: Any) -> str | None:
    """The W3C traceparent header value of ``span`` (None if it is not recording)."""
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
    return carrier.get(ENVELOPE_KEY)


def context_of(value: Any) -> Any:
    """The context whose span is the remote parent named by a stored traceparent (None: a
    new trace, for a message received with tracing off or from a damaged value)."""
    if not isinstance(value, str):
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({ENVELOPE_KEY: value})


# -- the receiving side ----------------------------------------------------------------------
class _Off:
    """A session's tracing while tracing is off: every call does nothing."""

    __slots__ = ()

    def message_started(self, queue_id: str) -> None:
        pass

    def message_done(self, size: int, code: int | None) -> None:
        pass

    def envelope_keys(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass


OFF = _Off()


class SessionTrace:
    """The spans of one SMTP connection: the session, and the message being received."""

    __slots__ = ("span", "message", "client", "messages")

    def __init__(self, tracer: Any, ip: str, port: int, listener: str) -> None:
        from opentelemetry.trace import SpanKind

        self.client = ip
        self.messages = 0
        self.message: Any = None
        self.span = tracer.start_span("smtp.session", kind=SpanKind.SERVER, attributes={
            "client.address": ip, "client.port": port, "empath.listener": listener})

    def message_started(self, queue_id: str) -> None:
        from opentelemetry.trace import set_span_in_context

        tracer = _tracer
        if tracer is None:
            return
        self.end_message("aborted", None)
        self.message = tracer.start_span(
            "smtp.message", context=set_span_in_context(self.span),
            attributes={"empath.queue_id": queue_id, "client.address": self.client})

    def envelope_keys(self) -> dict[str, str]:
        """What the envelope stores of this trace: the message span's traceparent."""
        if self.message is None:
            return {}
        value = traceparent(self.message)
        return {ENVELOPE_KEY: value} if value else {}

    def message_done(self, size: int, code: int | None) -> None:
        """The message was stored (``code`` None) or refused with ``code``."""
        if self.message is not None:
            self.message.set_attribute("empath.message.size", size)
        self.end_message("stored" if code is None else "refused", code)

    def end_message(self, outcome: str, code: int | None) -> None:
        span, self.message = self.message, None
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("empath.outcome", outcome)
        if code is not None:
            span.set_attribute("smtp.reply.code", code)
        if outcome != "stored":
            span.set_status(Status(StatusCode.ERROR, outcome))
        else:
            self.messages += 1
        span.end()

    def close(self) -> None:
        self.end_message("aborted", None)
        self.span.set_attribute("empath.messages", self.messages)
        self.span.end()


def session(ip: str, port: int, listener: ListenerConfig) -> SessionTrace | _Off:
    """The tracing of a new SMTP connection (``OFF`` while tracing is off)."""
    tracer = _tracer
    if tracer is None:
        return OFF
    return SessionTrace(tracer, ip, port, str(listener.address))


def recipients_of(envelope: dict[str, Any]) -> int:
    return len(envelope.get("recipients") or ())


# -- the delivery side -----------------------------------------------------------------------
def event(name: str, stage: str, code: int, enhanced: str | None) -> None:
    """An event on the current span (an SMTP reply of a destination server)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, {"smtp.stage": stage, "smtp.reply.code": code,
                              "smtp.reply.enhanced": enhanced or ""})


def _outcome(statuses: Any) -> str:
    found = sorted({str(s) for s in statuses if s})
    return "+".join(found) if found else "none"


def traced(name: str, start: Callable[..., dict[str, Any]],
           end: Callable[[Any], dict[str, Any]] | None = None
           ) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Run the decorated coroutine function in a span ``name`` (a child of the current one):
    ``start(*args, **kwargs)`` gives its first attributes, ``end(result)`` more at the end.
    While tracing is off the coroutine is awaited as it is."""

    def wrap(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        async def in_span(tracer: Any, args: Any, kwargs: Any) -> T:
            with tracer.start_as_current_span(name, attributes=start(*args, **kwargs)) as span:
                result = await fn(*args, **kwargs)
                if end is not None:
                    span.set_attributes(end(result))
                return result

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Awaitable[T]:
            # A plain function handing back the coroutine itself: off, no frame is added.
            tracer = _tracer
            if tracer is None:
                return fn(*args, **kwargs)
            return in_span(tracer, args, kwargs)

        return run

    return wrap


def delivery_attempt(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """The ``delivery.attempt`` span around a worker's ``_attempt(message_id, path, envelope,
    source)``, parented by the receipt's traceparent stored in the envelope."""

    @functools.wraps(fn)
    def run(worker: Any, message_id: str, path: str, envelope: dict[str, Any],
            source: Any) -> Awaitable[T]:
        tracer = _tracer
        if tracer is None:
            return fn(worker, message_id, path, envelope, source)
        return in_span(tracer, worker, message_id, path, envelope, source)

    async def in_span(tracer: Any, worker: Any, message_id: str, path: str,
                      envelope: dict[str, Any], source: Any) -> T:
        from opentelemetry.trace import SpanKind

        number = int(envelope.get("attempt_count") or 0) + 1
        with tracer.start_as_current_span(
                "delivery.attempt", context=context_of(envelope.get(ENVELOPE_KEY)),
                kind=SpanKind.CLIENT, attributes={
                    "empath.queue_id": message_id, "empath.attempt": number,
                    "empath.recipients": recipients_of(envelope)}) as span:
            result = await fn(worker, message_id, path, envelope, source)
            history = envelope.get("attempts") or []
            last = history[-1] if history else {}
            if last.get("number") == number:
                span.set_attribute("empath.outcome", _outcome(
                    r.get("status") for r in (last.get("results") or {}).values()))
                span.set_attributes(_routes_summary(last.get("routes") or []))
            return result

    return run


def _routes_summary(routes: list[dict[str, Any]]) -> dict[str, Any]:
    """The attempt's destinations at a glance (each route span has the details)."""
    return {
        "empath.domains": sorted({str(r.get("domain")) for r in routes if r.get("domain")}),
        "empath.mx_hosts": sorted({str(r.get("server")) for r in routes if r.get("server")}),
        "empath.tls": any(isinstance(r.get("tls"), dict) for r in routes)}


def _route_start(transport: Any, domain: str, envelope: dict[str, Any],
                 rcpts: list[dict[str, Any]], source: Any) -> dict[str, Any]:
    return {"empath.queue_id": str(envelope.get("id")), "empath.domain": domain.lower(),
            "empath.attempt": int(envelope.get("attempt_count") or 0) + 1,
            "empath.recipients": len(rcpts)}


def _route_end(result: Any) -> dict[str, Any]:
    outcomes, info = result
    out: dict[str, Any] = {"empath.outcome": _outcome(o.status for o in outcomes.values())}
    for key, attr in (("server", "empath.mx_host"), ("ip", "server.address"),
                      ("port", "server.port"), ("mx_index", "empath.mx_index")):
        if info.get(key) is not None:
            out[attr] = info[key]
    tls = info.get("tls")
    if isinstance(tls, dict) and tls.get("version"):
        out["tls.protocol.version"] = str(tls["version"])
        out["empath.tls"] = True
    else:
        out["empath.tls"] = False
    return out


route = traced("delivery.route", _route_start, _route_end)


def _connect_start(**kw: Any) -> dict[str, Any]:
    return {"empath.mx_host": kw.get("server"), "server.address": kw.get("ip"),
            "server.port": kw.get("port"), "empath.try_tls": bool(kw.get("try_tls", True))}


def _connect_end(conn: Any) -> dict[str, Any]:
    tls = getattr(conn, "tls", None)
    out: dict[str, Any] = {"empath.tls": bool(tls)}
    if tls:
        out["tls.protocol.version"] = str(tls.get("version"))
    return out


connect = traced("smtp.connect", _connect_start, _connect_end)


def _transaction_start(conn: Any, envelope: dict[str, Any], rcpts: list[dict[str, Any]],
                       source: Any) -> dict[str, Any]:
    return {"empath.mx_host": conn.server, "empath.recipients": len(rcpts),
            "empath.message.size": int(getattr(source, "length", 0) or 0)}


def _transaction_end(outcomes: Any) -> dict[str, Any]:
    return {"empath.outcome": _outcome(o.status for o in outcomes.values())}


transaction = traced("smtp.transaction", _transaction_start, _transaction_end)


def _dns_start(resolver: Any, name: str, rdtype: str) -> dict[str, Any]:
    return {"dns.question.name": name, "dns.question.type": rdtype}


dns_lookup = traced("dns.lookup", _dns_start)
