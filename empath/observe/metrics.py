"""The instruments the receivers and delivery workers update, and their names.

``init(cfg)`` is called once by a child's ``serve``: with ``metrics.listen_addr`` set (and the
master's ``PROMETHEUS_MULTIPROC_DIR`` exported) it builds prometheus_client metrics whose values
live in this process's memory-mapped files; otherwise every instrument is the shared ``NOOP``,
whose methods do nothing, so the hot path pays one method call per update and nothing else.
``current()`` returns what ``init`` built (the no-op set before it).

Updates are batched: an instrument adds to a plain float (a histogram to its own bucket
counts), and ``flush()`` hands the deltas to prometheus_client every ``FLUSH_INTERVAL`` from
the child's event loop, and when the child stops. One prometheus_client update takes a lock,
a ``getpid`` and an mmap write (2-10 us; a histogram observation several of them); a
message's dozen updates would cost a receiver tens of microseconds, a batched one about a
tenth of a microsecond each. The price: a process killed outright loses its last
``FLUSH_INTERVAL`` of increments (counters still never go backwards, nor count twice).

Hot-path updates are pre-bound: labelled children are resolved once here, never per message.
Gauges are ``livesum`` (a dead process's share disappears when the master marks it dead);
counters and histograms of dead processes stay in the sum, so they never go backwards.

The queue sizes, process counts and the folding of per-domain labels are not here: the admin
process computes them at scrape time (``collect.py``). This module never serves HTTP and never
reads the spool.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
from typing import Any

from empath.config.typed import Config
from empath.observe import metrics_enabled
from empath.observe.multiproc import ENV

SIZE_BUCKETS = (1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
                67108864.0)
SPOOL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
DNS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)

REJECT_REASONS = ("too_many_connections", "too_many_from_ip", "shutting_down", "early_talker",
                  "module")
REFUSE_REASONS = ("no_storage", "spool_error", "module", "duplicate")
REPLY_CLASSES = ("2xx", "3xx", "4xx", "5xx")
RESULTS = ("delivered", "deferred", "failed", "expired")
NOTICE_KINDS = ("failed", "delayed", "success")
TRANSPORTS = ("smtp", "maildir", "lmtp", "webhook")
# Why a recipient was deferred or bounced: the subject of its RFC 3463 enhanced code (X.1
# addressing, X.2 mailbox, X.3 mail system, X.4 network and routing, X.5 protocol, X.6
# content, X.7 security and policy), "unspecified" without one; "expired" for bounces of
# recipients whose retries ran out.
REASON_CLASSES = {"1": "address", "2": "mailbox", "3": "system", "4": "network",
                  "5": "protocol", "6": "content", "7": "policy"}
REASONS = (*REASON_CLASSES.values(), "unspecified", "expired")
# Why an outbound TLS session failed (deliveries.tls_failure_reason).
TLS_FAILURES = ("not_offered", "refused", "certificate", "timeout", "handshake", "dane")
DNS_TYPES = ("MX", "A", "AAAA", "TLSA", "TXT", "DS", "SOA")
REPLY_CAP = 200  # distinct (code, enhanced) labels a process gives remote replies
OTHER = "other"  # the label of domains beyond the per-process cap (and of the folded rest)
DOMAIN_CAP_FACTOR = 10  # a process labels at most this many times metrics.top_domains domains
FLUSH_INTERVAL = 0.25  # seconds between hand-overs of batched updates to prometheus_client


class _Noop:
    """Stands for any metric, child or label set: every update does nothing."""

    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        pass

    def dec(self, amount: float = 1.0) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass

    def labels(self, *values: str) -> _Noop:
        return self


NOOP = _Noop()


class _Sum:
    """A counter or gauge child whose updates add up here until ``flush``."""

    __slots__ = ("target", "pending")

    def __init__(self, target: Any) -> None:
        self.target = target
        self.pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.pending += amount

    def dec(self, amount: float = 1.0) -> None:
        self.pending -= amount

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0.0
            self.target.inc(amount)


class _Histogram:
    """A histogram child counting observations per bucket here until ``flush``, which adds
    them to prometheus_client's per-bucket values (``_buckets``, not cumulative) and sum."""

    __slots__ = ("target", "bounds", "counts", "total", "dirty")

    def __init__(self, target: Any) -> None:
        self.target = target
        self.bounds = list(target._upper_bounds)  # ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.dirty = False

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount (Prometheus' "le").
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.total += amount
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        counts, self.counts = self.counts, [0] * len(self.bounds)
        total, self.total, self.dirty = self.total, 0.0, False
        for value, n in zip(self.target._buckets, counts, strict=True):
            if n:
                value.inc(n)
        self.target._sum.inc(total)


class _Family:
    """A labelled metric: ``labels(...)`` gives a batched child, made once per label set."""

    __slots__ = ("target", "owner", "children")

    def __init__(self, target: Any, owner: Instruments) -> None:
        self.target = target
        self.owner = owner
        self.children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.owner._batched(self.target.labels(*values))
        return child


class Instruments:
    """Every metric a child updates. ``enabled`` False: all of them are ``NOOP``."""

    def __init__(self, enabled: bool = False, top_domains: int = 20) -> None:
        self.enabled = enabled
        self.domain_cap = max(1, top_domains) * DOMAIN_CAP_FACTOR
        self._domains: set[str] = set()
        self._flushable: list[Any] = []
        self._flusher: asyncio.TimerHandle | None = None
        n: Any = NOOP
        self.connections_accepted = n
        self.connections_active = n
        self.rejected = dict.fromkeys(REJECT_REASONS, n)
        self._replies: dict[int, Any] = dict.fromkeys(b"2345", n)
        self.messages_received = n
        self.received_bytes = n
        self.message_size = n
        self.refused = dict.fromkeys(REFUSE_REASONS, n)
        self.tls_in = n
        self.tls_in_failures = n
        self.spool_write = n
        self.spool_commit = n
        self.in_flow_waits = n
        self.in_flow_seconds = n
        self.attempts = dict.fromkeys(RESULTS, n)
        self.domain_attempts = n
        self.delivery_duration = n
        self.notices = dict.fromkeys(NOTICE_KINDS, n)
        self.tls_out = n
        self.tls_sessions_out = n
        self.dns_duration = n
        self.dns_cache_hits = n
        self.rate_limit_waits = n
        self.breakers_open = n
        self.breaker_openings = n
        self.connections_out = n
        self.remote_replies = n
        self.remote_errors = n
        self.deferrals = dict.fromkeys(REASONS, n)
        self.bounces = dict.fromkeys(REASONS, n)
        self.tls_failures_out = dict.fromkeys(TLS_FAILURES, n)
        self.auth_failures = n
        self.spool_delete_failures = n
        self._servers: set[str] = set()
        self._reply_labels: dict[tuple[int, str | None], tuple[str, str]] = {}
        if enabled:
            self._build()

    def cluster_redis_up(self, up: bool) -> None:
        """Fleet mode: whether this process reaches Redis (``empath_cluster_redis_up``, the
        lowest of the live processes that use it). Made on first use, so processes without
        a cluster connection add no series."""
        if not self.enabled:
            return
        gauge = getattr(self, "_redis_up", None)
        if gauge is None:
            from prometheus_client import Gauge

            gauge = self._redis_up = Gauge(
                "empath_cluster_redis_up", "1 while every process of this node that uses the "
                "fleet's Redis server reaches it, 0 while any of them falls back to its local "
                "share of the limits", multiprocess_mode="livemin", registry=None)
        gauge.set(1 if up else 0)

    def _batched(self, target: Any) -> Any:
        """``target`` (an unlabelled metric or a child) behind a batching wrapper."""
        wrapper: Any = _Histogram(target) if hasattr(target, "_upper_bounds") else _Sum(target)
        self._flushable.append(wrapper)
        return wrapper

    def flush(self) -> None:
        """Hand every batched update to prometheus_client (its memory-mapped files)."""
        for wrapper in self._flushable:
            wrapper.flush()

    def _build(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Counter(name, doc, labels, registry=None)

        self.connections_accepted = counter(
            "empath_smtp_connections_accepted", "SMTP connections accepted (TCP), including "
            "those then rejected")
        self.connections_active = Gauge(
            "empath_smtp_connections_active", "SMTP connections open now",
            multiprocess_mode="livesum", registry=None)
        rejected = counter("empath_smtp_connections_rejected",
                           "SMTP connections refused at connect, by reason", ("reason",))
        self.rejected = {r: rejected.labels(r) for r in REJECT_REASONS}
        replies = counter("empath_smtp_replies", "SMTP replies sent, by code class", ("class",))
        self._replies = {ord(c[0]): replies.labels(c) for c in REPLY_CLASSES}
        self.messages_received = counter("empath_messages_received",
                                         "Messages stored durably and acknowledged (250)")
        self.received_bytes = counter("empath_messages_received_bytes",
                                      "Bytes of the messages received, as stored")
        self.message_size = Histogram("empath_message_size_bytes", "Size of received messages",
                                      buckets=SIZE_BUCKETS, registry=None)
        refused = counter("empath_messages_refused",
                          "Messages refused after their data, by reason", ("reason",))
        self.refused = {r: refused.labels(r) for r in REFUSE_REASONS}
        self.tls_in = counter("empath_tls_sessions_in",
                              "TLS sessions established by SMTP clients (STARTTLS or smtps)",
                              ("version",))
        self.tls_in_failures = counter("empath_tls_handshake_failures_in",
                                       "Inbound TLS handshakes that failed")
        self.spool_write = Histogram(
            "empath_spool_write_seconds", "Writing a received message to the spool: data, "
            "envelope, fdatasync and rename into incoming/", buckets=SPOOL_BUCKETS,
            registry=None)
        self.spool_commit = Histogram(
            "empath_spool_commit_seconds", "From the final dot until the message is durable "
            "(spool write plus the group-committed fsync of incoming/)",
            buckets=SPOOL_BUCKETS, registry=None)
        self.in_flow_waits = counter(
            "empath_smtp_in_flow_waits", "MAIL FROM commands that waited because delivery "
            "fell behind (smtp.in_flow_delay)")
        self.in_flow_seconds = counter(
            "empath_smtp_in_flow_wait_seconds", "Seconds MAIL FROM commands waited for "
            "delivery to catch up (smtp.in_flow_delay)")
        attempts = counter("empath_delivery_attempts",
                           "Delivery attempts per recipient, by result", ("result",))
        self.attempts = {r: attempts.labels(r) for r in RESULTS}
        self.domain_attempts = counter(
            "empath_delivery_domain_attempts",
            "Delivery attempts per recipient, by destination domain (the busiest "
            "metrics.top_domains, the rest as \"other\") and result", ("domain", "result"))
        self.delivery_duration = Histogram(
            "empath_delivery_duration_seconds", "Duration of one delivery to one destination "
            "domain (a route of an attempt), by transport and domain (the busiest "
            "metrics.top_domains, the rest as \"other\")", ("transport", "domain"),
            buckets=DELIVERY_BUCKETS, registry=None)
        notices = counter("empath_notices_generated",
                          "Delivery status notifications spooled, by kind (failed: bounces)",
                          ("kind",))
        self.notices = {k: notices.labels(k) for k in NOTICE_KINDS}
        self.tls_out = counter("empath_tls_deliveries_out",
                               "Deliveries to a destination carried over TLS, by version",
                               ("version",))
        self.tls_sessions_out = counter(
            "empath_tls_sessions_out", "TLS handshakes completed with destination servers, by "
            "version", ("version",))
        self.dns_duration = Histogram(
            "empath_dns_lookup_seconds", "DNS queries for delivery, by record type (cache "
            "hits are not queries)", ("type",), buckets=DNS_BUCKETS, registry=None)
        self.dns_cache_hits = counter("empath_dns_cache_hits",
                                      "DNS answers served from the cache")
        self.rate_limit_waits = counter(
            "empath_rate_limit_waits", "Deliveries that waited for a per-domain rate limit")
        self.breakers_open = Gauge(
            "empath_circuit_breakers_open", "Destinations whose circuit breaker is open or "
            "waiting for its probe, summed over the delivery workers (each has its own)",
            multiprocess_mode="livesum", registry=None)
        self.breaker_openings = counter(
            "empath_circuit_breaker_openings", "Times a destination's circuit breaker opened")
        self.connections_out = Gauge(
            "empath_delivery_active_connections", "Outbound SMTP connections open now, by "
            "server (MX host), idle pooled ones included", ("server",),
            multiprocess_mode="livesum", registry=None)
        self.remote_replies = counter(
            "empath_delivery_replies", "SMTP replies received from destination servers, by "
            "code and enhanced status code", ("code", "enhanced"))
        self.remote_errors = counter(
            "empath_smtp_errors", "4xx and 5xx replies received from destination servers, "
            "by code", ("code",))
        deferrals = counter("empath_delivery_deferrals", "Recipients deferred, by reason "
                            "class (the enhanced code's subject)", ("reason",))
        self.deferrals = {r: deferrals.labels(r) for r in REASONS}
        bounces = counter("empath_delivery_bounces", "Recipients failed permanently or "
                          "expired, by reason class", ("reason",))
        self.bounces = {r: bounces.labels(r) for r in REASONS}
        tls_failures = counter("empath_tls_failures_out", "Outbound TLS sessions that "
                               "failed, by reason", ("reason",))
        self.tls_failures_out = {r: tls_failures.labels(r) for r in TLS_FAILURES}
        self.auth_failures = counter("empath_smtp_auth_failures",
                                     "SMTP AUTH attempts refused for wrong credentials")
        self.spool_delete_failures = counter(
            "empath_spool_delete_failures", "Failed removals of finished messages from the "
            "spool (each retry counts)")
        self._wrap_all()
        for transport in TRANSPORTS:  # so every series exists (at 0) from the start
            self.delivery_duration.labels(transport, OTHER)
        for rdtype in DNS_TYPES:
            self.dns_duration.labels(rdtype)

    def _wrap_all(self) -> None:
        """Put every instrument built by ``_build`` behind its batching wrapper."""
        for name, value in list(vars(self).items()):
            if name.startswith("_") and name != "_replies":
                continue
            if isinstance(value, dict):
                setattr(self, name, {k: self._batched(v) for k, v in value.items()})
            elif hasattr(value, "_labelnames") and value._labelnames:
                setattr(self, name, _Family(value, self))
            elif hasattr(value, "_labelnames"):
                setattr(self, name, self._batched(value))

    # -- hot-path helpers ---------------------------------------------------------------------
    def in_flow_wait(self, seconds: float) -> None:
        """A MAIL FROM waited ``seconds`` for delivery to catch up (smtp/inflow.py)."""
        self.in_flow_waits.inc()
        self.in_flow_seconds.inc(seconds)

    def count_replies(self, data: bytes) -> None:
        """Count the SMTP replies in ``data`` (one Send: a reply, or a pipelined batch) by the
        first digit of each reply's last line ("250 ..." after any "250-..." lines)."""
        if not self.enabled or not data:
            return
        replies = self._replies
        if data.find(b"\r\n") == len(data) - 2:  # the usual case: one single-line reply
            counter = replies.get(data[0])
            if counter is not None:
                counter.inc()
            return
        for line in data.split(b"\r\n"):
            if len(line) >= 3 and (len(line) == 3 or line[3] == 32):  # b" "
                counter = replies.get(line[0])
                if counter is not None:
                    counter.inc()

    def domain_label(self, domain: str) -> str:
        """``domain`` as a label value, or "other" once this process has labelled its cap of
        distinct domains (the admin folds them to the busiest top_domains at scrape time)."""
        return self._capped(domain or "(local)", self._domains)

    def server_label(self, server: str) -> str:
        """``server`` (an MX host) as a label value, capped like ``domain_label``."""
        return self._capped(server, self._servers)

    def _capped(self, value: str, seen: set[str]) -> str:
        if value in seen:
            return value
        if len(seen) < self.domain_cap and value != OTHER:
            seen.add(value)
            return value
        return OTHER

    def reply_labels(self, code: int, enhanced: str | None) -> tuple[str, str]:
        """(code, enhanced) label values of a reply from a remote server: what a server may
        send is unbounded, so only well-formed codes get a label of their own, at most
        REPLY_CAP pairs per process; anything else is "other"."""
        key = (code, enhanced)
        labels = self._reply_labels.get(key)
        if labels is None:
            well_formed = 200 <= code <= 599 and (enhanced is None or _enhanced_ok(enhanced))
            if well_formed and len(self._reply_labels) < REPLY_CAP:
                labels = (str(code), enhanced or "")
                self._reply_labels[key] = labels
            else:
                labels = (OTHER, OTHER)
        return labels

    def start_flushing(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush every FLUSH_INTERVAL from ``loop`` (a no-op when metrics are off)."""
        if not self.enabled:
            return

        def tick() -> None:
            self.flush()
            self._flusher = loop.call_later(FLUSH_INTERVAL, tick)

        self._flusher = loop.call_later(FLUSH_INTERVAL, tick)

    def stop_flushing(self) -> None:
        """The last flush, as the child stops."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self.enabled:
            self.flush()


def _enhanced_ok(enhanced: str) -> bool:
    """RFC 3463 §2: class.subject.detail, subject and detail of one to three digits."""
    parts = enhanced.split(".")
    return (len(parts) == 3 and parts[0] in ("2", "4", "5")
            and all(p.isdigit() and 1 <= len(p) <= 3 for p in parts[1:]))


_current = Instruments(False)


def init(cfg: Config) -> Instruments:
    """Build this process's instruments (call once, in the child, after the fork, from its
    running event loop: the batched updates are flushed from it)."""
    global _current
    enabled = metrics_enabled(cfg) and os.path.isdir(os.environ.get(ENV, "") or "/nonexistent")
    _current = Instruments(enabled, cfg.metrics.top_domains)
    with contextlib.suppress(RuntimeError):  # no running loop (tests, benchmarks)
        _current.start_flushing(asyncio.get_running_loop())
    return _current


def current() -> Instruments:
    return _current
