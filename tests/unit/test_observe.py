"""Unit tests of empath/observe and the log formats: the per-domain folding, the audit log's
lines, reply counting, the admin endpoints, JSON and syslog log records."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from empath import logsetup
from empath.config import Address
from empath.observe import admin_enabled, admin_endpoints
from empath.observe.audit import AuditLog, read_records, redact
from empath.observe.domains import FoldState, fold, load, locked_state
from empath.observe.metrics import NOOP, OTHER, RESULTS, Instruments

ID = "01KB3X6Y5Q7ZPR0E2CQ8W4H2N9"


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
