"""Unit tests of empath/observe and the log formats: the per-domain folding, the audit log's
lines, reply counting, the admin endpoints, JSON and syslog log records."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from empath import logsetup
from empath.config import Address
from empath.delivery.errors import TemporaryError
from empath.delivery.handshake import DANEFailure, TLSHandshakeError, TLSPolicyFailure
from empath.observe import admin_enabled, admin_endpoints, deliveries, tracing
from empath.observe.audit import AuditLog, read_records, redact
from empath.observe.deliveries import reason_class, tls_failure_reason
from empath.observe.domains import FoldState, fold, follow, load, locked_state
from empath.observe.health import Deliveries
from empath.observe.metrics import (
    NOOP,
    OTHER,
    REASONS,
    REPLY_CAP,
    RESULTS,
    TLS_FAILURES,
    Instruments,
)

ID = "01KB3X6Y5Q7ZPR0E2CQ8W4H2N9"
KEYS = ("bucket|1.0", "bucket|+Inf", "count", "sum")


# -- per-domain folding ---------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 12), st.sampled_from(RESULTS),
                                   st.integers(1, 50)), max_size=12),
                min_size=1, max_size=15),
       st.integers(1, 4))
def test_fold_is_bounded_and_never_goes_backwards(rounds: list[list[tuple[int, str, int]]],
                                                  top: int) -> None:
    counts: dict[tuple[str, str], float] = {}
    state = FoldState()
    shown_before: dict[tuple[str, str], float] = {}
    for increments in rounds:
        for n, result, amount in increments:
            domain = OTHER if n == 12 else f"d{n}.example"
            counts[(domain, result)] = counts.get((domain, result), 0.0) + amount
        series, state = fold(counts, state, top)
        named = {d for d, _ in series if d != OTHER}
        assert len(named) <= top
        for result in RESULTS:
            total = sum(v for (_, r), v in counts.items() if r == result)
            assert sum(v for (_, r), v in series.items() if r == result) == total
        for key, old in shown_before.items():
            if key in series:  # a series that continues never decreases
                assert series[key] >= old, (key, old, series[key])
        for result in RESULTS:
            assert series[(OTHER, result)] >= shown_before.get((OTHER, result), 0.0)
        shown_before = series


def test_fold_names_the_busiest_domains_and_keeps_its_state(tmp_path: Path) -> None:
    counts = {("a.example", "delivered"): 10.0, ("b.example", "delivered"): 5.0,
              ("c.example", "failed"): 1.0}
    series, state = fold(counts, FoldState(), 2)
    assert series[("a.example", "delivered")] == 10 and series[("b.example", "delivered")] == 5
    assert series[(OTHER, "failed")] == 1 and ("c.example", "failed") not in series
    # c becomes much busier: it displaces b, which hands its count to "other"; c starts at
    # what "other" had not shown yet.
    counts[("c.example", "failed")] = 30.0
    series, state = fold(counts, state, 2)
    assert series[("c.example", "failed")] == 29
    assert series[(OTHER, "failed")] == 1 and series[(OTHER, "delivered")] == 5
    path = str(tmp_path / "domains.json")
    with locked_state(path) as box:
        box[0] = state
    assert load(path) == state


# -- audit log -------------------------------------------------------------------------------
def test_audit_lines_from_concurrent_processes_never_interleave(tmp_path: Path) -> None:
    path = str(tmp_path / "audit.jsonl")
    pids = []
    for n in range(4):
        pid = os.fork()
        if pid == 0:
            try:
                log = AuditLog(path)
                for i in range(300):
                    log.write("received", ID, sender=f"p{n}@example.org", size=i,
                              text="x" * 3000)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    lines = Path(path).read_text().splitlines()
    assert len(lines) == 1200
    records = [json.loads(line) for line in lines]
    assert {r["sender"] for r in records} == {f"p{n}@example.org" for n in range(4)}


def test_audit_redaction_reopen_and_reading_back(tmp_path: Path) -> None:
    path = str(tmp_path / "audit.jsonl")
    log = AuditLog(path, redact_local_parts=True)
    log.write("received", ID, sender="alice@example.org", recipients=["bob@example.net"],
              tls=None)
    os.rename(path, path + ".1")
    log.reopen()
    log.write("delivered", ID, sender="", recipient="bob@example.net", code=250)
    log.write("notice", "01KB3X7Q2M1V9S8D4F6G0H2J3K", notice_id="01KB3X7Q2M1V9S8D4F6G0H2J3M")
    log.close()
    records = read_records(path, ID)
    assert [r["event"] for r in records] == ["received", "delivered"]
    assert records[0]["sender"] == "***@example.org"
    assert records[0]["recipients"] == ["***@example.net"] and "tls" not in records[0]
    assert records[1]["sender"] == "" and records[1]["recipient"] == "***@example.net"
    assert records[0]["time"].endswith("Z")
    assert read_records(path, "01KB3X7Q2M1V9S8D4F6G0H2J3M")[0]["event"] == "notice"
    assert redact("root") == "***"
    AuditLog(None).write("received", ID)  # off: nothing, no error


# -- metrics ---------------------------------------------------------------------------------
class _Counter:
    def __init__(self) -> None:
        self.n = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.n += amount


def test_replies_are_counted_by_class() -> None:
    m = Instruments(False)
    m.count_replies(b"250 ok\r\n")  # off: no-ops, nothing to count
    m.enabled = True
    fake = {ord(c): _Counter() for c in "2345"}
    m._replies = fake  # type: ignore[assignment]
    m.count_replies(b"250 2.1.0 ok\r\n")
    m.count_replies(b"250-first\r\n250-PIPELINING\r\n250 SIZE\r\n")
    m.count_replies(b"250 2.1.0 ok\r\n550 5.1.1 no\r\n354 go ahead\r\n")
    m.count_replies(b"421\r\n")
    assert [fake[ord(c)].n for c in "2345"] == [3, 1, 1, 1]


def test_disabled_instruments_are_no_ops_and_domains_are_capped() -> None:
    m = Instruments(False, top_domains=1)
    assert m.connections_active is NOOP and m.attempts["delivered"] is NOOP
    NOOP.labels("x", "y").inc()
    NOOP.observe(1.0)
    labels = {m.domain_label(f"d{i}.example") for i in range(30)}
    assert len(labels) == 11 and OTHER in labels
    assert m.domain_label("") == OTHER  # the cap is reached: even "(local)" is other


def test_admin_endpoints_share_one_address() -> None:
    def cfg(metrics: Any, health: Any) -> Any:
        return SimpleNamespace(metrics=SimpleNamespace(listen_addr=metrics),
                               health=SimpleNamespace(listen_addr=health))

    a, b = Address("127.0.0.1", 9100), Address("127.0.0.1", 9101)
    assert admin_endpoints(cfg(a, a)) == [(a, frozenset({"metrics", "health"}))]
    assert admin_endpoints(cfg(a, b)) == [(a, frozenset({"metrics"})),
                                          (b, frozenset({"health"}))]
    assert not admin_enabled(cfg(None, None))


# -- operational logs ------------------------------------------------------------------------
def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("empath.smtp", logging.INFO, __file__, 1, message, (), None)


def test_json_log_lines_carry_the_queue_id() -> None:
    fmt = logsetup.JSONFormatter()
    doc = json.loads(fmt.format(_record(f"{ID}: from=<a@example.org> size=10")))
    assert doc["queue_id"] == ID and doc["level"] == "INFO" and doc["logger"] == "empath.smtp"
    assert doc["message"].startswith(ID) and doc["pid"] == os.getpid()
    assert "queue_id" not in json.loads(fmt.format(_record("listening on 127.0.0.1:25")))


def test_syslog_destination(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    root = logging.getLogger()
    before = root.handlers[:], root.level
    try:
        logsetup.setup_logging(None, "info", syslog="mail", syslog_socket=path)
        logging.getLogger("empath.smtp").info("%s: from=<a@example.org>", ID)
        data = server.recv(4096).decode()
        # <priority>: facility mail (2) * 8 + info (6) = 22
        assert data.startswith("<22>empath/smtp[") and f"]: {ID}: from=<a@example.org>" in data
    finally:
        logsetup.setup_logging(None, "info")
        root.handlers[:] = before[0]
        root.setLevel(before[1])
        server.close()


# -- the duration histogram per domain follows the folded domains ----------------------------
@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(KEYS),
                                             st.integers(1, 30)), max_size=10),
                          st.sets(st.integers(0, 6), max_size=3)),
                min_size=1, max_size=12))
def test_follow_keeps_totals_and_never_goes_backwards(
        rounds: list[tuple[list[tuple[int, str, int]], set[int]]]) -> None:
    counts: dict[tuple[str, str], float] = {}
    state = FoldState()
    before: dict[tuple[str, str], float] = {}
    for increments, chosen in rounds:
        for n, key, amount in increments:
            domain = OTHER if n == 6 else f"d{n}.example"
            counts[(domain, key)] = counts.get((domain, key), 0.0) + amount
        names = {f"d{n}.example" for n in chosen if n != 6}
        series, state = follow(counts, names, state)
        assert {d for d, _ in series} <= names | {OTHER}
        for key in KEYS:  # nothing lost, nothing counted twice
            assert sum(v for (_, k), v in series.items() if k == key) == sum(
                v for (_, k), v in counts.items() if k == key)
        for k, old in before.items():
            if k in series and (k[0] == OTHER or k[0] in names):
                assert series[k] >= old, (k, old, series[k])
        before = series


def test_follow_hands_a_leaving_domain_back_to_other() -> None:
    counts = {("a.example", "b"): 5.0, ("z.example", "b"): 2.0}
    series, state = follow(counts, {"a.example"}, FoldState())
    assert series == {("a.example", "b"): 5.0, (OTHER, "b"): 2.0}
    counts[("a.example", "b")] = 6.0
    counts[("z.example", "b")] = 3.0
    series, state = follow(counts, {"z.example"}, state)  # z joins, a leaves
    # z starts from what "other" had not shown of it (2 were shown there); a's 6 go to other.
    assert series == {("z.example", "b"): 1.0, (OTHER, "b"): 8.0}


# -- labels of what remote servers send ------------------------------------------------------
def test_remote_reply_labels_are_bounded() -> None:
    m = Instruments(False)
    assert m.reply_labels(451, "4.2.1") == ("451", "4.2.1")
    assert m.reply_labels(220, None) == ("220", "")
    for bad in ((999, None), (451, "4.2"), (451, "9.9.9"), (451, "4.1234.1"), (250, "2.x.0")):
        assert m.reply_labels(*bad) == (OTHER, OTHER), bad
    for detail in range(300):
        m.reply_labels(550, f"5.7.{detail}")
    assert len({m.reply_labels(550, f"5.7.{d}") for d in range(300)}) == REPLY_CAP - 2 + 1
    assert m.reply_labels(550, "5.7.299") == (OTHER, OTHER)
    assert m.reply_labels(451, "4.2.1") == ("451", "4.2.1")  # still known


@pytest.mark.parametrize("result, enhanced, reason", [
    ("deferred", "4.2.1", "mailbox"), ("deferred", "4.4.1", "network"),
    ("deferred", "4.7.5", "policy"), ("failed", "5.1.1", "address"),
    ("failed", "5.6.7", "content"), ("failed", None, "unspecified"),
    ("deferred", "4.9.1", "unspecified"), ("expired", "4.2.1", "expired")])
def test_deferrals_and_bounces_are_classed_by_enhanced_subject(result: str,
                                                               enhanced: str | None,
                                                               reason: str) -> None:
    assert reason_class({"last": {"enhanced": enhanced}}, result) == reason
    assert reason in REASONS


def test_tls_failures_are_classed_by_kind() -> None:
    cases = [
        (TLSHandshakeError.make("tls_failed", server="mx", domain="d", reason=(
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")), "certificate"),
        (TLSHandshakeError.make("tls_failed", server="mx", domain="d", reason="timed out"),
         "timeout"),
        (TLSHandshakeError.make("tls_failed", server="mx", domain="d", reason="EOF"),
         "handshake"),
        (TLSPolicyFailure.make("tls_not_offered", server="mx", domain="d"), "not_offered"),
        (TLSPolicyFailure.make("tls_failed", server="mx", domain="d",
                               reason="STARTTLS refused: 454 4.7.0 no"), "refused"),
        (DANEFailure.make("dane_mismatch", server="mx", reason="no match"), "dane"),
        (TemporaryError.make("connect", server="mx", reason="refused"), None),
    ]
    for err, want in cases:
        assert tls_failure_reason(err) == want, err
        assert want is None or want in TLS_FAILURES


def test_an_open_connection_leaves_the_gauge_once() -> None:
    values: list[float] = []
    gauge = SimpleNamespace(inc=lambda a=1.0: values.append(a),
                            dec=lambda a=1.0: values.append(-a))
    token = deliveries._Open(gauge)
    token.close()
    token.close()  # abort() after quit(): counted once
    assert values == [1.0, -1.0]
    assert isinstance(deliveries.connection_opened("mx.example"), deliveries._Closed)  # off


# -- health: the delivery success rate over a window ----------------------------------------
def test_delivery_window_rate_threshold_and_reset() -> None:
    w = Deliveries(window=60.0, min_attempts=10, threshold=0.9)
    w.add(0.0, 100.0, 0.0)
    w.add(30.0, 104.0, 1.0)
    check = w.check()
    assert check.ok and "too few" in check.detail  # 5 attempts in the window
    w.add(50.0, 110.0, 6.0)  # 10 delivered, 6 not: 62.5%
    check = w.check()
    assert not check.ok and "62.5% delivered" in check.detail and "below 90.0%" in check.detail
    w.add(120.0, 140.0, 6.0)  # since t=60 (the base: the sample at 50): 30 delivered, 0 not
    assert w.figures() == (30.0, 0.0) and w.check().ok
    w.add(130.0, 1.0, 0.0)  # a new master: counters from zero, the window starts again
    assert w.figures() == (0.0, 0.0) and w.check().ok
    assert Deliveries(60.0, 1, None).check().ok  # no threshold: never fails


# -- tracing off costs no import -------------------------------------------------------------
def test_tracing_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    conf = tmp_path / "empath.yaml"
    conf.write_text(f"base_dir: {tmp_path}\nspool: {{path: spool}}\n")
    code = (
        "import sys\n"
        "from empath.config import load_config\n"
        "import empath.smtp.server, empath.delivery.worker, empath.delivery.remote\n"
        "from empath.observe import tracing\n"
        f"cfg = load_config({str(conf)!r})\n"
        "assert tracing.init(cfg) is False and tracing.session('1', 2, None) is tracing.OFF\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=str(Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_stored_traceparent_parents_the_attempt(tmp_path: Path) -> None:
    """With the SDK in memory: an attempt's span continues the trace of the stored context."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    receipt = tracer.start_span("smtp.message")
    stored = tracing.traceparent(receipt)
    receipt.end()
    assert stored and stored.startswith("00-")

    @tracing.delivery_attempt
    async def attempt(worker: Any, message_id: str, path: str, envelope: dict[str, Any],
                      source: Any) -> None:
        envelope["attempt_count"] = 1
        envelope["attempts"] = [{"number": 1, "results": {"a@b": {"status": "deferred"}}}]

    old = tracing._tracer
    tracing._tracer = tracer
    try:
        envelope: dict[str, Any] = {"recipients": [{}], tracing.ENVELOPE_KEY: stored}
        asyncio.run(attempt(None, "ID1", "p", envelope, None))
        asyncio.run(attempt(None, "ID2", "p", {"recipients": [], "traceparent": "junk"}, None))
    finally:
        tracing._tracer = old
    first, second = [s for s in exporter.get_finished_spans() if s.name == "delivery.attempt"]
    ctx = receipt.get_span_context()
    assert first.context.trace_id == ctx.trace_id and first.parent is not None
    assert first.parent.span_id == ctx.span_id and first.parent.is_remote
    assert first.attributes["empath.outcome"] == "deferred"
    assert first.attributes["empath.attempt"] == 1
    assert second.parent is None and second.context.trace_id != ctx.trace_id  # a new trace


def test_spool_deletion_failures_are_counted(tmp_path: Path) -> None:
    """A finished message whose unlink fails twice: two failures counted, then removed."""
    from tests.unit.test_worker_state import _queue, _worker

    worker = _worker(tmp_path)
    qid, path = _queue(worker)
    failures: list[float] = []
    worker.metrics = SimpleNamespace(spool_delete_failures=SimpleNamespace(
        inc=lambda amount=1.0: failures.append(amount)))  # type: ignore[assignment]
    retire = worker.spool.retire
    calls = []

    def flaky(p: str, size: int | None = None) -> None:
        calls.append(p)
        if len(calls) <= 2:
            raise OSError(5, "Input/output error")
        retire(p, size)

    worker.spool.retire = flaky  # type: ignore[method-assign]
    asyncio.run(worker._remove(qid, path, None, "test"))
    assert failures == [1.0, 1.0] and len(calls) == 3 and not os.path.exists(path)
