"""Delivery scheduling and per-recipient state, through the real daemon.

- A destination at its connection limit holds no delivery slot: a healthy destination's
  message arrives while a stalling one's messages wait (order read from the sinks' own logs).
- Per-recipient state is recorded as each destination finishes (the queue file's done marks),
  so SIGTERM, SIGHUP and SIGKILL during a stall resend only to the unfinished destination.
- A double bounce is dropped with an audit record after delivery.failed_retention.
- A malformed envelope value sends the file to corrupt/ (log line, audit record), no resend.
- A file in incoming/ whose name is no queue id is reported once and moved to corrupt/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from empath.spool import CorruptFile, Spool, new_message_id, read_envelope
from empath.spool.submit import store_message
from tests.integration import test_faults
from tests.support.daemon import EmpathDaemon
from tests.support.fixtures import DaemonFactory
from tests.support.sink import Behaviour, SinkServer

WAIT = 30.0
STALL = "stall.test"
HEALTHY = "healthy.test"


@pytest.fixture
def sinks() -> Iterator[tuple[SinkServer, SinkServer]]:
    stall = SinkServer(Behaviour()).start()
    healthy = SinkServer(Behaviour()).start()
    try:
        yield stall, healthy
    finally:
        stall.stop()
        healthy.stop()


def config(stall: SinkServer, healthy: SinkServer, **delivery: Any) -> dict[str, Any]:
    return {
        "processes": {"receivers": 1, "delivery": 1},
        "audit": {"log_path": "log/audit.jsonl"},
        "delivery": {
            "queue_scan_interval": "0.2s", "retry_base_delay": "1s", "retry_max_delay": "2s",
            "retry_jitter_factor": 0,
            "domains": {STALL: {"mx_override": f"127.0.0.1:{stall.port}"},
                        HEALTHY: {"mx_override": f"127.0.0.1:{healthy.port}"}},
            **delivery,
        },
    }


def send(daemon: EmpathDaemon, subject: str, recipients: list[str],
         sender: str = "sender@client.test") -> str:
    return test_faults.send(daemon, subject, tuple(recipients), sender)


def copies(sink: SinkServer, subject: str) -> int:
    return sum(1 for m in list(sink.messages) if f"Subject: {subject}\r\n".encode() in m.data)


def queued(spool: Spool) -> list[str]:
    out = [mid for state in ("incoming", "deferred", "failed", "hold") for mid in
           spool.list_ids(state)]
    return out + [mid for _, mid in spool.list_active()]


def audit(daemon: EmpathDaemon) -> list[dict[str, Any]]:
    path = daemon.dir / "log" / "audit.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def freeze(daemon: EmpathDaemon) -> Path:
    (daemon.spool_path / "control").mkdir(parents=True, exist_ok=True)
    flag = daemon.spool_path / "control" / "freeze"
    flag.touch()
    return flag


# -- A: waiting for a destination holds no delivery slot --------------------------------------
def test_a_destination_at_its_limit_does_not_delay_another_destination(
        daemon_factory: DaemonFactory, sinks: tuple[SinkServer, SinkServer]) -> None:
    stall, healthy = sinks
    stall.behaviour = Behaviour(final_delay=6.0)  # every message stalls after the dot
    cfg = config(stall, healthy, max_parallel_deliveries=2)
    cfg["delivery"]["domains"][STALL]["max_connections"] = 1
    daemon = daemon_factory(cfg, start=False)
    flag = freeze(daemon)
    daemon.start()
    # Queued first, so the worker claims them first: one delivers (and stalls), the others
    # wait for the one connection stall.test may have.
    for n in range(3):
        send(daemon, f"stalled {n}", [f"rcpt{n}@{STALL}"])
    send(daemon, "healthy", [f"rcpt@{HEALTHY}"])
    flag.unlink()
    daemon.wait_for(lambda: copies(healthy, "healthy") == 1, WAIT,
                    message="the healthy destination's message")
    daemon.wait_for(lambda: any(e == "replied" for _, e, _ in stall.journal), WAIT,
                    message="the first stalled message to finish")
    arrived = next(t for t, e, _ in healthy.journal if e == "stored")
    first_finished = min(t for t, e, _ in stall.journal if e == "replied")
    assert arrived < first_finished, (
        "the healthy message waited for the stalled destination: "
        f"healthy {healthy.journal}, stalled {stall.journal}")
    assert stall.max_concurrent_sessions == 1  # the destination's limit still held
    # Stopping now: the message still waiting for the connection is requeued at once
    # instead of being started during the stop.
    daemon.stop()
    assert "stopping while it waits for a destination; requeued" in daemon.log_text()


# -- B: per-recipient state survives a stop, a reload and a crash -----------------------------
def _healthy_recorded(spool: Spool, queue_id: str) -> bool:
    found = spool.find(queue_id)
    if found is None:
        return False
    try:
        envelope = read_envelope(found[1])
    except (FileNotFoundError, CorruptFile):
        return False
    status = {r["address"]: r.get("status") for r in envelope["recipients"]}
    return status.get(f"b@{HEALTHY}") == "delivered" and status.get(f"a@{STALL}") != "delivered"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "SIGKILL"])
def test_an_interrupted_attempt_resends_only_to_the_unfinished_destination(
        daemon_factory: DaemonFactory, sinks: tuple[SinkServer, SinkServer], how: str) -> None:
    stall, healthy = sinks
    stall.behaviour = Behaviour(final_delay=600.0)  # never answers the dot in this test
    daemon = daemon_factory(config(stall, healthy))
    spool = Spool(str(daemon.spool_path))
    queue_id = send(daemon, "two domains", [f"a@{STALL}", f"b@{HEALTHY}"])
    daemon.wait_for(lambda: copies(healthy, "two domains") == 1 and
                    copies(stall, "two domains") == 1, WAIT, message="both transfers")
    # The healthy destination's recipient is recorded while the stalled one still runs.
    daemon.wait_for(lambda: _healthy_recorded(spool, queue_id), WAIT,
                    message="the healthy recipient recorded as delivered")
    stall.behaviour = Behaviour()  # the next session is answered at once
    if how == "SIGTERM":
        daemon.stop()
        daemon.proc = None
        daemon.start()
    elif how == "SIGHUP":
        daemon.reload({"delivery": {"queue_scan_interval": "0.3s"}})
    else:
        daemon.kill()
        daemon.proc = None
        daemon.start()
    daemon.wait_for(lambda: copies(stall, "two domains") == 2 and not queued(spool), WAIT,
                    message="the stalled destination's retry")
    assert copies(healthy, "two domains") == 1
    retry = [m for m in stall.messages if b"Subject: two domains" in m.data][-1]
    assert retry.recipients == [f"a@{STALL}"]


# -- E: double bounces ------------------------------------------------------------------------
def test_a_double_bounce_is_kept_for_failed_retention_then_dropped_with_an_audit_record(
        daemon_factory: DaemonFactory, sinks: tuple[SinkServer, SinkServer]) -> None:
    stall, healthy = sinks
    healthy.behaviour = Behaviour(rcpt_default=(550, "5.1.1 no such user"))
    daemon = daemon_factory(config(stall, healthy, failed_retention="3s"))
    spool = Spool(str(daemon.spool_path))
    queue_id = send(daemon, "double bounce", [f"gone@{HEALTHY}"], sender="")
    daemon.wait_for(lambda: spool.list_ids("failed") == [queue_id], WAIT,
                    message="the double bounce in failed/")
    daemon.wait_for(lambda: not queued(spool), WAIT, message="the double bounce dropped")
    # The record is written right after the unlink: wait for it rather than race it.
    daemon.wait_for(lambda: any(r["event"] == "dropped" for r in audit(daemon)), WAIT,
                    message="the dropped record")
    dropped = [r for r in audit(daemon) if r["event"] == "dropped"]
    assert [r["id"] for r in dropped] == [queue_id]
    assert dropped[0]["recipients"] == [f"gone@{HEALTHY}"]
    assert f"{queue_id}: undeliverable message from the null sender (a double bounce) " \
           "dropped" in daemon.log_text()
    assert spool.list_ids("incoming") == []  # no notice about a notice


def test_a_double_bounce_is_dropped_at_once_with_no_retention(
        daemon_factory: DaemonFactory, sinks: tuple[SinkServer, SinkServer]) -> None:
    stall, healthy = sinks
    healthy.behaviour = Behaviour(rcpt_default=(550, "5.1.1 no such user"))
    daemon = daemon_factory(config(stall, healthy, failed_retention=0))
    spool = Spool(str(daemon.spool_path))
    queue_id = send(daemon, "double bounce", [f"gone@{HEALTHY}"], sender="")
    daemon.wait_for(lambda: any(r["event"] == "dropped" for r in audit(daemon)), WAIT,
                    message="the dropped record")
    assert not queued(spool) and not spool.list_ids("failed")
    events = [r["event"] for r in audit(daemon) if r["id"] == queue_id]
    assert events == ["received", "bounced", "dropped"]


# -- C: malformed envelope values -------------------------------------------------------------
# Each planted file, and the key its refusal must name (records.parse_envelope).
MALFORMED: dict[str, tuple[dict[str, Any], str]] = {
    "bad size": ({}, "malformed data_size"),  # data_size rewritten to "many" below
    "rcpts a string": ({"recipients": f"r@{HEALTHY}"},
                       "envelope has no recipients (recipients: a str, not a list)"),
    "no address": ({"recipients": [{"address": f"r@{HEALTHY}"}, {"orcpt": None}]},
                   "envelope has a recipient without an address (recipients[1].address)"),
    "bad status": ({"recipients": [{"address": f"r@{HEALTHY}", "status": "sent"}]},
                   "unknown status 'sent' (recipients[0].status)"),
    "no sender": ({"sender": None}, "envelope has no sender (sender)"),
}


def test_a_malformed_envelope_value_goes_to_corrupt_once_with_an_audit_record(
        daemon_factory: DaemonFactory, sinks: tuple[SinkServer, SinkServer]) -> None:
    """Queue files whose envelope delivery cannot use, planted in incoming/ before the
    daemon starts: each goes to corrupt/ once, with a log line and an audit record naming
    the key that is wrong, and nothing is sent; a good message beside them is delivered."""
    stall, healthy = sinks
    daemon = daemon_factory(config(stall, healthy), start=False)
    spool = Spool(str(daemon.spool_path))
    spool.create_tree()
    planted: dict[str, str] = {}
    for subject, (over, _) in MALFORMED.items():
        queue_id = new_message_id()
        data = f"From: <s@client.test>\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()
        envelope = {"id": queue_id, "sender": "s@client.test",
                    "recipients": [{"address": f"r@{HEALTHY}", "orcpt": None, "notify": None}],
                    "params": {}, "client": {}, "received_at": 1.0e9, "metadata": {}}
        envelope.update(over)
        envelope = {k: v for k, v in envelope.items() if v is not None}
        store_message(spool, data, envelope, wake=False)
        planted[queue_id] = subject
    [bad_size] = [mid for mid, subject in planted.items() if subject == "bad size"]
    path = spool.path("incoming", bad_size)
    spool.rewrite(path, dict(read_envelope(path), data_size="many"))
    daemon.start()
    good = send(daemon, "good", [f"r@{HEALTHY}"])
    daemon.wait_for(lambda: sorted(spool.list_ids("corrupt")) == sorted(planted), WAIT,
                    message="every planted file in corrupt/")
    daemon.wait_for(lambda: copies(healthy, "good") == 1, WAIT, message="the good message")
    records = {r["id"]: r for r in audit(daemon) if r["event"] == "corrupt"}
    assert sorted(records) == sorted(planted)  # one record each
    log_text = daemon.log_text()
    for queue_id, subject in planted.items():
        named = MALFORMED[subject][1]
        assert named in records[queue_id]["reason"], (subject, records[queue_id])
        assert f"{queue_id}: moved to corrupt/: {records[queue_id]['reason']}" in log_text
        assert copies(healthy, subject) == 0, subject
    assert good not in records and not queued(spool)


# -- F: files in incoming/ that are not queue files -------------------------------------------
def test_a_stray_file_in_incoming_is_reported_once_and_moved_aside(
        daemon_factory: DaemonFactory, sinks: tuple[SinkServer, SinkServer]) -> None:
    stall, healthy = sinks
    daemon = daemon_factory(config(stall, healthy))
    spool = Spool(str(daemon.spool_path))
    (daemon.spool_path / "incoming" / "notes.txt").write_bytes(b"not a message\n")
    send(daemon, "after the stray", [f"r@{HEALTHY}"])
    daemon.wait_for(lambda: (daemon.spool_path / "corrupt" / "notes.txt").exists(), WAIT,
                    message="the stray moved to corrupt/")
    daemon.wait_for(lambda: copies(healthy, "after the stray") == 1 and not queued(spool),
                    WAIT, message="the message delivered")
    (daemon.spool_path / "incoming" / "notes.txt").write_bytes(b"again\n")
    send(daemon, "second", [f"r@{HEALTHY}"])
    daemon.wait_for(lambda: (daemon.spool_path / "corrupt" / "notes.txt.1").exists(), WAIT,
                    message="the second stray moved beside the first")
    assert (daemon.spool_path / "corrupt" / "notes.txt").read_bytes() == b"not a message\n"
    lines = [line for line in daemon.log_text().splitlines()
             if "incoming/notes.txt is not a queue file" in line]
    assert len(lines) == 2, lines  # once per file, not once per listing
    assert not (daemon.spool_path / "incoming" / "notes.txt").exists()
