"""Delivery state in the envelope: recording attempts and deciding what comes next; and the
worker's handling of one message when something goes wrong."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import time
from pathlib import Path

import pytest
import yaml

from empath.config import load_config
from empath.delivery import attempt as attempt_module
from empath.delivery import state
from empath.delivery import worker as worker_module
from empath.delivery.retry import retry_delay
from empath.delivery.state import RecipientOutcome
from empath.delivery.worker import DeliveryWorker
from empath.spool import Spool, new_message_id, read_envelope
from empath.spool.submit import store_message

KW = dict(max_attempts=5, base=60.0, maximum=3600.0, jitter=0.0, expiration=86400.0)


def envelope(*addrs: str) -> dict:
    return {"id": "X", "sender": "s@a", "received_at": 1000.0,
            "recipients": [{"address": a} for a in addrs]}


def test_all_delivered_means_remove():
    env = envelope("a@x", "b@y")
    ok = RecipientOutcome("delivered", 250, "2.0.0", "ok", "mx.x")
    state.record_attempt(env, {"a@x": ok, "b@y": ok}, {"duration": 0.1}, 1001.0)
    assert state.decide(env, 1001.0, **KW).action == "remove"
    assert env["attempt_count"] == 1 and env["attempts"][0]["results"]["a@x"]["code"] == 250


def test_partial_failure_defers_only_open_recipients():
    env = envelope("a@x", "b@y", "c@z")
    state.record_attempt(env, {
        "a@x": RecipientOutcome("delivered", 250, "2.0.0", "ok"),
        "b@y": RecipientOutcome("deferred", 451, "4.3.0", "try later"),
        "c@z": RecipientOutcome("failed", 550, "5.1.1", "no such user"),
    }, {}, 1001.0)
    d = state.decide(env, 1001.0, **KW)
    assert d.action == "defer" and d.next_retry_at == 1061.0
    assert [r["address"] for r in state.open_recipients(env)] == ["b@y"]
    # Next attempt: only b is open; it gets delivered; c stays failed -> finished (bounce).
    state.record_attempt(env, {"b@y": RecipientOutcome("delivered", 250, "2.0.0", "ok")},
                         {}, 1070.0)
    assert state.decide(env, 1070.0, **KW).action == "finished"
    assert env["recipients"][1]["attempts"] == 2


def test_backoff_grows_and_is_capped():
    env = envelope("a@x")
    dues = []
    for _ in range(1, 5):
        state.record_attempt(env, {"a@x": RecipientOutcome("deferred", 421, None, "busy")},
                             {}, 1000.0)
        dues.append(state.decide(env, 1000.0, **{**KW, "max_attempts": 99,
                                                 "maximum": 200.0}).next_retry_at)
    assert dues == [1060.0, 1120.0, 1200.0, 1200.0]


def test_max_attempts_expires_open_recipients():
    env = envelope("a@x")
    for _ in range(5):
        state.record_attempt(env, {"a@x": RecipientOutcome("deferred", 421, None, "busy")},
                             {}, 1000.0)
    d = state.decide(env, 1000.0, **KW)
    assert d.action == "finished" and env["recipients"][0]["status"] == "expired"


def test_expiration_time_expires_and_due_never_passes_it():
    env = envelope("a@x")
    state.record_attempt(env, {"a@x": RecipientOutcome("deferred", 421, None, "busy")}, {},
                         1000.0)
    d = state.decide(env, 86000.0, **{**KW, "base": 3600.0})
    assert d.action == "defer" and d.next_retry_at == 1000.0 + 86400.0
    assert state.decide(env, 1000.0 + 86400.0, **KW).action == "finished"


def test_jitter_stays_in_bounds():
    env = envelope("a@x")
    state.record_attempt(env, {"a@x": RecipientOutcome("deferred", 421, None, "busy")}, {},
                         1000.0)
    rng = random.Random(7)
    dues = {state.decide(dict(env, recipients=[dict(r) for r in env["recipients"]]), 1000.0,
                         **{**KW, "jitter": 0.2}, rng=rng).next_retry_at for _ in range(50)}
    assert len(dues) > 1 and all(1048.0 <= d <= 1072.0 for d in dues)


def test_expiry_says_which_limit():
    by_attempts = envelope("a@x")
    for _ in range(5):
        state.record_attempt(by_attempts, {"a@x": RecipientOutcome("deferred", 421, None, "x")},
                             {}, 1000.0)
    state.decide(by_attempts, 1000.0, **KW)
    assert by_attempts["recipients"][0]["expired_by"] == state.BY_ATTEMPTS
    by_time = envelope("a@x")
    state.record_attempt(by_time, {"a@x": RecipientOutcome("deferred", 421, None, "x")}, {},
                         1000.0 + 86400.0)
    state.decide(by_time, 1000.0 + 86400.0, **KW)
    assert by_time["recipients"][0]["expired_by"] == state.BY_TIME
    assert by_time["next_retry_at"] is None


def test_route_of_each_recipient_is_recorded():
    env = envelope("a@x.example", "b@Y.example", "c@localhost")
    routes = [{"domain": "x.example", "transport": "smtp", "dsn": True},
              {"domain": "y.example", "transport": "smtp", "dsn": False},
              {"domain": "localhost", "transport": "maildir"}]
    ok = RecipientOutcome("delivered", 250, "2.0.0", "ok", "mx")
    state.record_attempt(env, {"a@x.example": ok, "b@Y.example": ok, "c@localhost": ok},
                         {"routes": routes}, 1001.0)
    lasts = [r["last"] for r in env["recipients"]]
    assert [(last["transport"], last.get("next_hop_dsn")) for last in lasts] == [
        ("smtp", True), ("smtp", False), ("maildir", None)]
    assert env["attempts"][0]["routes"] == routes


def test_closed_recipients_are_not_touched_again():
    env = envelope("a@x", "b@y")
    state.record_attempt(env, {"a@x": RecipientOutcome("failed", 550, "5.1.1", "no"),
                               "b@y": RecipientOutcome("deferred", 451, None, "later")},
                         {}, 1001.0)
    state.record_attempt(env, {"a@x": RecipientOutcome("delivered", 250, None, "ok"),
                               "b@y": RecipientOutcome("delivered", 250, None, "ok")},
                         {}, 1100.0)
    assert [r["status"] for r in env["recipients"]] == ["failed", "delivered"]
    assert [r["attempts"] for r in env["recipients"]] == [1, 2]


def test_history_is_bounded():
    env = envelope("a@x")
    for n in range(state.HISTORY_LIMIT + 5):
        state.record_attempt(env, {"a@x": RecipientOutcome("deferred", 421, None, "x")}, {},
                             1000.0 + n)
    assert len(env["attempts"]) == state.HISTORY_LIMIT
    assert env["attempts"][0]["number"] == 6 and env["attempt_count"] == state.HISTORY_LIMIT + 5


def test_retry_delay_is_pure_and_capped():
    rng = random.Random(1)
    assert [retry_delay(n, 60.0, 600.0, 0.0, rng) for n in (0, 1, 2, 3, 4, 5, 99)] == [
        60.0, 60.0, 120.0, 240.0, 480.0, 600.0, 600.0]
    spread = [retry_delay(1, 100.0, 1000.0, 0.5, rng) for _ in range(100)]
    assert all(50.0 <= d <= 150.0 for d in spread) and len(set(spread)) > 1


# -- the worker's handling of one message, with a scripted dispatcher ------------------------
class _Ctx:
    def __init__(self, cfg: object) -> None:
        self.config = cfg
        self.index = 1
        self.count = 1
        self.stopping = asyncio.Event()


def _worker(tmp_path: Path) -> DeliveryWorker:
    conf = tmp_path / "empath.yaml"
    conf.write_text(yaml.safe_dump({
        "base_dir": str(tmp_path), "hostname": "mta.test",
        "spool": {"path": "spool"}, "local_delivery": {"maildir_root": "mail"},
        "delivery": {"retry_base_delay": "30s", "retry_jitter_factor": 0}}))
    cfg = load_config(str(conf))
    Spool(cfg.spool.path).create_tree()
    return DeliveryWorker(_Ctx(cfg))


def _queue(worker: DeliveryWorker, **envelope: object) -> tuple[str, str]:
    """A message in incoming/, claimed by the worker: (id, active path)."""
    qid = new_message_id()
    env = {"id": qid, "sender": "s@a.example", "received_at": time.time(),
           "recipients": [{"address": "u@b.example", "orcpt": None, "notify": None}],
           "params": {}, **envelope}
    store_message(worker.spool, b"Subject: t\r\n\r\nbody\r\n", env, wake=False)
    os.makedirs(worker.spool.active_dir(worker.slot), exist_ok=True)
    path = worker.spool.claim(qid, "incoming", worker.slot)
    assert path is not None
    return qid, path


def test_an_unexpected_error_sets_the_message_aside_for_retry_base_delay(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    qid, path = _queue(worker)

    async def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    worker.dispatcher.deliver = broken  # type: ignore[method-assign]
    asyncio.run(worker._process(qid, path))
    deferred = worker.spool.path("deferred", qid)
    assert os.stat(deferred).st_mtime == pytest.approx(time.time() + 30, abs=5)
    assert "attempt_count" not in read_envelope(deferred)  # the file as it was


def test_a_notice_that_cannot_be_spooled_keeps_the_message(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    qid, path = _queue(worker)
    calls = []

    async def fails(envelope: dict, rcpts: list, source: object,
                    on_done: object = None) -> tuple[dict, list]:
        calls.append(1)
        return ({"u@b.example": RecipientOutcome("failed", 550, "5.1.1", "no", "mx.b")},
                [{"domain": "b.example", "transport": "smtp"}])

    def no_space(*args: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    worker.dispatcher.deliver = fails  # type: ignore[method-assign]
    worker.notices.spool = no_space  # type: ignore[method-assign]
    asyncio.run(worker._process(qid, path))
    deferred = worker.spool.path("deferred", qid)
    env = read_envelope(deferred)
    assert env["recipients"][0]["status"] == "failed" and "dsn" not in env["recipients"][0]
    assert env["attempt_count"] == 1 and worker.spool.list_ids("incoming") == []
    assert env["next_retry_at"] == pytest.approx(os.stat(deferred).st_mtime, abs=0.01)
    # Later, with space again: the bounce goes out without a new delivery attempt.
    del worker.notices.spool
    path = worker.spool.claim(qid, "deferred", worker.slot)
    assert path is not None
    asyncio.run(worker._process(qid, path))
    assert calls == [1] and worker.spool.find(qid) is None
    [notice_id] = worker.spool.list_ids("incoming")
    notice = read_envelope(worker.spool.path("incoming", notice_id))
    assert notice["sender"] == "" and notice["notice_of"] == qid
    assert [r["address"] for r in notice["recipients"]] == ["s@a.example"]


def test_a_foreign_envelope_goes_to_corrupt(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    qid, path = _queue(worker)
    worker.spool.rewrite(path, dict(read_envelope(path), id="01ARZ3NDEKTSV4RRFFQ69G5FAV"))
    asyncio.run(worker._process(qid, path))
    assert worker.spool.list_ids("corrupt") == [qid]


def test_a_finished_message_that_cannot_be_removed_is_retried_without_redelivery(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attempt_module, "REMOVE_RETRIES", 1)
    worker = _worker(tmp_path)
    qid, path = _queue(worker)
    calls = []

    async def delivers(envelope: dict, rcpts: list, source: object,
                       on_done: object = None) -> tuple[dict, list]:
        calls.append(1)
        return ({"u@b.example": RecipientOutcome("delivered", 250, "2.0.0", "ok", "mx.b")},
                [{"domain": "b.example", "transport": "smtp", "dsn": True}])

    def refused(path: str, size: int | None = None) -> None:
        raise OSError(errno.EIO, "Input/output error")

    async def go() -> None:
        worker.dispatcher.deliver = delivers  # type: ignore[method-assign]
        worker.spool.retire = refused  # type: ignore[method-assign]
        await worker._process(qid, path)
        assert list(worker._stranded) == [qid] and qid not in worker._held
        # The final state was recorded: a restart would find nothing left to deliver.
        assert read_envelope(path)["recipients"][0]["status"] == "delivered"
        del worker.spool.retire
        worker._stranded[qid] = (0.0, *worker._stranded[qid][1:])
        worker._fill_stranded()
        await asyncio.gather(*worker.inflight.values())

    asyncio.run(go())
    assert calls == [1] and worker.spool.find(qid) is None and not worker._stranded


def test_a_due_time_beyond_any_retry_delay_counts_as_due_now(tmp_path: Path) -> None:
    worker = _worker(tmp_path)  # retry_max_delay 24h, jitter 0: horizon a day ahead
    now = time.time()
    ids = {}
    for name, due in (("far", now + 10 * 365 * 86400), ("near", now + 3600)):
        qid, path = _queue(worker)
        os.utime(path, (due, due))
        worker.spool.move(path, "deferred", qid)
        ids[name] = qid
    worker.deferred.scan_all(now)
    due = {mid: at for at, mid in worker.deferred.schedule.entries()}
    assert due[ids["far"]] == pytest.approx(now, abs=1e-5)
    assert due[ids["near"]] == pytest.approx(now + 3600, abs=1)


def test_a_backlog_is_listed_once_and_worked_through_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker claims from its last listing of incoming/ and lists again only when
    LISTING_SHARE allows: with a backlog, not once per finished delivery."""
    worker = _worker(tmp_path)
    worker.capacity = 10
    ids = []
    for _ in range(300):
        qid = new_message_id()
        store_message(worker.spool, b"x\r\n", {
            "id": qid, "sender": "s@a.example", "received_at": time.time(), "params": {},
            "recipients": [{"address": "u@b.example", "orcpt": None, "notify": None}]},
            wake=False)
        ids.append(qid)
    listings = []
    real_list = worker.spool.list_ids
    monkeypatch.setattr(worker.spool, "list_ids",
                        lambda state, **kw: listings.append(state) or real_list(state, **kw))
    monkeypatch.setattr(worker_module, "LISTING_SHARE", 1e-6)  # relist only when allowed
    claimed: list[str] = []

    def start(message_id: str, work: object, ticket: object = None) -> None:
        claimed.append(message_id)
        worker.inflight[message_id] = None  # type: ignore[assignment]

    monkeypatch.setattr(worker, "_start", start)
    os.makedirs(worker.spool.active_dir(worker.slot), exist_ok=True)
    for _ in range(40):  # a delivery finishes, the worker fills its free slots again
        worker._fill()
        worker.inflight.clear()
    assert claimed == sorted(ids)
    assert listings == ["incoming"]
    assert sorted(os.listdir(worker.spool.active_dir(worker.slot))) == sorted(ids)
    # New mail is seen at the next listing, not before.
    late = new_message_id()
    store_message(worker.spool, b"x\r\n", {
        "id": late, "sender": "s@a.example", "received_at": time.time(), "params": {},
        "recipients": [{"address": "u@b.example", "orcpt": None, "notify": None}]},
        wake=False)
    worker._fill()
    assert claimed[-1] != late and listings == ["incoming"]
    worker._relist_at = 0.0
    worker._fill()  # allowed, but no wake-up and queue_scan_interval not over: no listing
    assert claimed[-1] != late and listings == ["incoming"]
    worker._woken()  # the receiver's datagram
    worker._relist_at = time.monotonic() + 60  # LISTING_SHARE still holds it back
    worker._fill()
    assert claimed[-1] != late and listings == ["incoming"]
    worker._relist_at = 0.0
    worker._fill()
    assert claimed[-1] == late and listings == ["incoming", "incoming"]
    worker._relist_at = 0.0
    worker._fill()  # that wake-up is used up
    assert listings == ["incoming", "incoming"]
    worker._listed_at -= worker.cfg.delivery.queue_scan_interval  # the scan is due
    worker._fill()
    assert listings == ["incoming", "incoming", "incoming"]


def test_an_outcome_that_cannot_be_recorded_is_held_and_never_delivered_again(
        tmp_path: Path) -> None:
    """One destination delivered, the other deferred, and the spool takes no writes: neither
    the rewrite nor the done mark lands. The outcome stays in memory, the file stays claimed
    (not set aside from its old envelope), and once writes work it is recorded without a
    second delivery."""
    worker = _worker(tmp_path)
    qid, path = _queue(worker, recipients=[
        {"address": "u@b.example", "orcpt": None, "notify": None},
        {"address": "v@c.example", "orcpt": None, "notify": None}])
    before = read_envelope(path)
    calls = []

    async def delivers(envelope: dict, rcpts: list, source: object,
                       on_done: object = None) -> tuple[dict, list]:
        calls.append([r["address"] for r in rcpts])
        return ({"u@b.example": RecipientOutcome("delivered", 250, "2.0.0", "ok", "mx.b"),
                 "v@c.example": RecipientOutcome("deferred", 451, "4.3.0", "later", "mx.c")},
                [{"domain": "b.example", "transport": "smtp"},
                 {"domain": "c.example", "transport": "smtp"}])

    def read_only(*args: object, **kw: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    async def go() -> None:
        worker.dispatcher.deliver = delivers  # type: ignore[method-assign]
        worker.spool.rewrite = read_only  # type: ignore[method-assign]
        worker.spool.mark_delivered = read_only  # type: ignore[method-assign]
        worker.spool.probe_writable = read_only  # type: ignore[method-assign]
        await worker._process(qid, path)
        assert list(worker._stranded) == [qid] and worker._held == {qid}
        assert worker._fault is not None  # claiming stopped
        assert read_envelope(path) == before  # untouched, still claimed
        assert worker.spool.list_ids("deferred") == []
        worker._stranded[qid] = (0.0, worker._stranded[qid][1])
        worker._fill()  # the probe still fails: nothing retried, nothing claimed
        assert not worker.inflight
        del worker.spool.rewrite, worker.spool.mark_delivered, worker.spool.probe_writable
        worker._probe_at = 0.0
        worker._fill()
        await asyncio.gather(*worker.inflight.values())

    asyncio.run(go())
    assert calls == [["u@b.example", "v@c.example"]]  # one delivery, never repeated
    assert worker._fault is None and not worker._held and not worker._stranded
    env = read_envelope(worker.spool.path("deferred", qid))
    assert [r["status"] for r in env["recipients"]] == ["delivered", "deferred"]
    assert env["attempt_count"] == 1


def test_a_malformed_file_in_failed_goes_to_corrupt_and_a_good_one_is_dropped(
        tmp_path: Path) -> None:
    """The sweep of failed/ reads each expired double bounce like any reader: one whose
    envelope delivery cannot use goes to corrupt/ (audit record naming the key) instead of
    back to failed/ at every sweep; a good one is dropped with its audit record."""
    worker = _worker(tmp_path)
    records = []
    worker.audit.write = (  # type: ignore[method-assign]
        lambda event, mid, **kw: records.append((event, mid, kw)))
    long_ago = time.time() - 10 * 86400  # failed_retention is a day by default
    ids = {}
    for name, rcpt in (("good", {"address": "u@b.example", "status": "failed"}),
                       ("bad", {"address": "u@b.example", "status": "bounced"})):
        qid, path = _queue(worker, sender="", recipients=[rcpt])
        os.utime(path, (long_ago, long_ago))
        worker.spool.move(path, "failed", qid)
        ids[name] = qid
    worker._sweep_failed(time.time())
    assert worker.spool.list_ids("failed") == []
    assert worker.spool.list_ids("corrupt") == [ids["bad"]]
    assert worker.spool.find(ids["good"]) is None
    events = {mid: (event, kw) for event, mid, kw in records}
    assert events[ids["good"]][0] == "dropped"
    assert events[ids["good"]][1]["recipients"] == ["u@b.example"]
    assert events[ids["bad"]][0] == "corrupt"
    assert "unknown status 'bounced' (recipients[0].status)" in events[ids["bad"]][1]["reason"]
