"""Operator queue operations (empath.spool.queue), their output records, mailq's layout and the
sendmail message building, on a real spool directory without a daemon."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from empath.ctl import mailq, records, sendmail, submission
from empath.spool import Spool, is_valid_id, new_message_id, read_data, read_queue_file
from empath.spool.queue import Queue, QueueError, matches, queue_stats
from empath.spool.submit import store_message

NOW = time.time()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    sp = Spool(str(tmp_path / "spool"))
    sp.create_tree()
    return sp


@pytest.fixture
def queue(spool: Spool) -> Queue:
    q = Queue(spool)
    q.check()
    return q


def put(spool: Spool, state: str = "incoming", *, rcpts: tuple[str, ...] = ("b@example.net",),
        sender: str = "a@example.org", at: float | None = None, slot: int | None = None,
        extra: dict[str, Any] | None = None, data: bytes = b"Subject: x\r\n\r\nbody\r\n") -> str:
    """A complete queue file in ``state`` (``active`` needs ``slot``)."""
    mid = new_message_id(at)
    env: dict[str, Any] = {"id": mid, "sender": sender, "received_at": at or time.time(),
                           "recipients": [{"address": r} for r in rcpts], "metadata": {}}
    env.update(extra or {})
    store_message(spool, data, env, wake=False)
    src = spool.path("incoming", mid)
    if state == "active":
        assert slot is not None
        os.makedirs(spool.active_dir(slot), exist_ok=True)
        os.rename(src, spool.active_path(slot, mid))
    elif state != "incoming":
        spool.move(src, state, mid)
    return mid


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- checks and listing ----------------------------------------------------------------------
def test_check_explains_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(QueueError, match="no spool at"):
        Queue(Spool(str(tmp_path / "missing"))).check()
    (tmp_path / "file").write_text("x")
    with pytest.raises(QueueError, match="not a directory"):
        Queue(Spool(str(tmp_path / "file"))).check()
    with pytest.raises(QueueError, match="not an Empath spool"):
        Queue(Spool(str(tmp_path))).check()


def test_scan_names_states_and_orders_by_arrival(spool: Spool, queue: Queue) -> None:
    me = os.getpid()
    ids = [put(spool, "deferred", at=NOW - 50), put(spool, "incoming", at=NOW - 40),
           put(spool, "hold", at=NOW - 30), put(spool, "failed", at=NOW - 20),
           put(spool, "active", at=NOW - 10, slot=me)]
    entries = queue.scan()
    assert [e.id for e in entries] == ids
    assert [e.status for e in entries] == ["deferred", "pending", "held", "failed", "active"]
    assert entries[-1].worker == me and entries[-1].claimed_by_live_worker
    assert [e.id for e in queue.scan(["held", "failed"])] == ids[2:4]
    assert all(e.envelope is not None and e.error is None for e in entries)


def test_unreadable_file_is_listed_with_its_error_and_left_in_place(spool: Spool,
                                                                    queue: Queue) -> None:
    mid = new_message_id()
    Path(spool.path("deferred", mid)).write_bytes(b"half a message")
    [entry] = queue.scan()
    assert entry.envelope is None and "unreadable" in (entry.error or "")
    assert os.path.exists(spool.path("deferred", mid))
    assert records.entry_record(entry, NOW)["error"] == entry.error


def test_locate_finds_a_message_anywhere_or_nothing(spool: Spool, queue: Queue) -> None:
    mid = put(spool, "active", slot=os.getpid())
    entry = queue.locate(mid)
    assert entry is not None and entry.status == "active" and entry.worker == os.getpid()
    assert queue.locate(new_message_id()) is None
    assert queue.locate("../../etc/passwd") is None
    out = queue.delete("nonsense")
    assert out.result == "unknown" and "not a queue id" in out.message


def test_filters(spool: Spool, queue: Queue) -> None:
    a = put(spool, "deferred", rcpts=("x@Example.NET", "y@other.org"), at=NOW - 7200)
    b = put(spool, "deferred", sender="", rcpts=("z@other.org",), at=NOW - 60)
    entries = {e.id: e for e in queue.scan()}
    assert matches(entries[a], domain="example.net") and not matches(entries[b],
                                                                      domain="example.net")
    assert matches(entries[b], sender="<>") and not matches(entries[a], sender="<>")
    assert matches(entries[a], sender="A@example.org") and matches(entries[a],
                                                                  sender="example.org")
    assert matches(entries[a], older_than=3600, now=NOW)
    assert not matches(entries[b], older_than=3600, now=NOW)


def test_stats_counts_states_domains_bytes_and_oldest(spool: Spool, queue: Queue) -> None:
    old = put(spool, "deferred", rcpts=("a@example.net", "b@example.net"), at=NOW - 100)
    put(spool, "incoming", rcpts=("c@example.net", "d@other.org"))
    put(spool, "hold", rcpts=("e@other.org",),
        extra={"recipients": [{"address": "e@other.org", "status": "delivered"},
                              {"address": "f@third.org", "status": "deferred"}]})
    entries = queue.scan()
    stats = queue_stats(entries, NOW, frozen=False)
    assert stats["states"]["deferred"]["messages"] == 1
    assert stats["states"]["pending"]["messages"] == 1 and stats["states"]["held"]["messages"] == 1
    assert stats["total"] == {"messages": 3, "bytes": sum(e.file_size for e in entries)}
    assert stats["domains"]["example.net"] == {"messages": 2, "recipients": 3}
    assert stats["domains"]["other.org"] == {"messages": 1, "recipients": 1}
    assert "third.org" in stats["domains"] and list(stats["domains"])[0] == "example.net"
    assert stats["oldest"]["id"] == old and stats["oldest"]["age"] == pytest.approx(100, abs=1)


# -- changes ---------------------------------------------------------------------------------
def test_make_due_sets_the_due_time_and_explains_other_states(spool: Spool,
                                                              queue: Queue) -> None:
    d = put(spool, "deferred")
    os.utime(spool.path("deferred", d), (NOW + 3600, NOW + 3600))
    out = queue.make_due(d, now=NOW)
    assert out.result == "done" and os.stat(spool.path("deferred", d)).st_mtime == NOW
    assert queue.make_due(put(spool, "incoming")).result == "unchanged"
    held = queue.make_due(put(spool, "hold"))
    assert held.result == "refused" and "release it first" in held.message
    assert queue.make_due(new_message_id()).result == "unknown"


def test_make_due_of_a_message_claimed_meanwhile(spool: Spool, queue: Queue) -> None:
    d = put(spool, "deferred")
    entry = queue.locate(d)
    assert entry is not None
    os.makedirs(spool.active_dir(os.getpid()), exist_ok=True)
    assert spool.claim(d, "deferred", os.getpid())  # a worker wins the race
    out = queue.make_entry_due(entry)
    assert (out.result, out.status) == ("unchanged", "active") and out.ok


def test_hold_and_release_round_trip_keeps_the_file_intact(spool: Spool, queue: Queue) -> None:
    mid = put(spool, "deferred")
    before = Path(spool.path("deferred", mid)).read_bytes()
    assert queue.hold(mid).result == "done"
    assert Path(spool.path("hold", mid)).read_bytes() == before
    assert queue.hold(mid).result == "unchanged"
    assert queue.release(mid).result == "done"
    assert Path(spool.path("incoming", mid)).read_bytes() == before
    assert queue.release(mid).result == "refused"
    failed = put(spool, "failed")
    assert queue.hold(failed).result == "refused"
    queue.sync()


def test_hold_refuses_a_claimed_message_and_force_waits_for_the_attempt(
        spool: Spool, queue: Queue) -> None:
    me = os.getpid()
    mid = put(spool, "active", slot=me)
    out = queue.hold(mid)
    assert out.result == "refused" and "being delivered" in out.message and "--force" in out.message

    def worker_defers() -> None:
        time.sleep(0.3)
        spool.move(spool.active_path(me, mid), "deferred", mid)

    t = threading.Thread(target=worker_defers)
    t.start()
    out = queue.hold(mid, force=True, wait=5)
    t.join()
    assert out.result == "done" and "after its attempt ended" in out.message
    assert os.listdir(spool.state_dir("hold")) == [mid]
    assert os.listdir(spool.state_dir("deferred")) == []


def test_hold_force_reports_a_message_delivered_meanwhile(spool: Spool, queue: Queue) -> None:
    me = os.getpid()
    mid = put(spool, "active", slot=me)
    threading.Timer(0.2, os.unlink, [spool.active_path(me, mid)]).start()
    out = queue.hold(mid, force=True, wait=5)
    assert out.result == "gone" and out.ok
    timeout = queue.hold(put(spool, "active", slot=me), force=True, wait=0.2)
    assert timeout.result == "refused" and "still being delivered" in timeout.message


def test_delete_refuses_a_claimed_message_unless_forced(spool: Spool, queue: Queue) -> None:
    me = os.getpid()
    mid = put(spool, "active", slot=me)
    out = queue.delete(mid)
    assert out.result == "refused" and "--force" in out.message
    assert os.path.exists(spool.active_path(me, mid))
    out = queue.delete(mid, force=True)
    assert out.result == "done" and "may still reach" in out.message
    assert queue.locate(mid) is None


def test_delete_of_a_dead_workers_claim_needs_no_force(spool: Spool, queue: Queue) -> None:
    pid = dead_pid()
    mid = put(spool, "active", slot=pid)
    entry = queue.locate(mid)
    assert entry is not None and not entry.claimed_by_live_worker
    assert queue.delete(mid).result == "done"


def test_forced_delete_buries_a_copy_brought_back_by_a_rewrite(spool: Spool,
                                                               queue: Queue) -> None:
    """A worker whose rewrite opened the file before the unlink renames a new copy into
    place afterwards and moves it on to deferred/: the delete must remove that copy too."""
    me = os.getpid()
    mid = put(spool, "active", slot=me)
    path = spool.active_path(me, mid)
    tmp = spool.tmp_path(mid, me)
    Path(tmp).write_bytes(Path(path).read_bytes())  # the rewrite's copy, made before unlink

    def finish_rewrite() -> None:
        while os.path.exists(path):
            time.sleep(0.005)
        time.sleep(0.05)
        os.rename(tmp, path)  # the file comes back...
        time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):  # ENOENT if the delete was quicker
            spool.move(path, "deferred", mid)  # ...and moves on

    t = threading.Thread(target=finish_rewrite)
    t.start()
    out = queue.delete(mid, force=True)
    t.join()
    assert out.result == "done"
    assert queue.locate(mid) is None and not os.path.exists(tmp)


def test_delete_every_state_and_sync(spool: Spool, queue: Queue) -> None:
    ids = [put(spool, s) for s in ("incoming", "deferred", "hold", "failed")]
    assert all(queue.delete(i).result == "done" for i in ids)
    queue.sync()
    assert queue.scan() == []
    assert queue.delete(ids[0]).result == "unknown"


def test_freeze_flag(spool: Spool, queue: Queue) -> None:
    queue.freeze(True)
    assert queue.is_frozen() and spool.is_frozen()
    queue.freeze(False)
    assert not queue.is_frozen()


def test_touch_deferred_for_flush(spool: Spool, queue: Queue) -> None:
    ids = [put(spool, "deferred", at=NOW - 10 + i) for i in range(3)]
    assert queue.deferred_ids() == ids
    assert all(queue.touch_deferred(i, NOW - 5) for i in ids)
    assert not queue.touch_deferred(new_message_id(), NOW)


# -- records ---------------------------------------------------------------------------------
def test_entry_record_fields_and_last_error(spool: Spool, queue: Queue) -> None:
    last = {"at": NOW, "code": 451, "enhanced": "4.3.0", "text": "try later", "server": "mx"}
    mid = put(spool, "deferred", extra={
        "attempt_count": 2,
        "recipients": [{"address": "a@x.org", "status": "delivered", "attempts": 1},
                       {"address": "b@y.org", "status": "deferred", "attempts": 2,
                        "last": last}]})
    os.utime(spool.path("deferred", mid), (NOW + 60, NOW + 60))
    [entry] = queue.scan()
    rec = records.entry_record(entry, NOW)
    assert set(rec) == {"id", "status", "worker", "arrival", "age", "size", "file_size",
                        "sender", "recipients", "attempts", "next_retry_at", "last_error",
                        "error"}
    assert rec["attempts"] == 2 and rec["next_retry_at"] == NOW + 60
    assert rec["last_error"] == "451 4.3.0 try later (mx)"
    assert rec["recipients"][1] == {"address": "b@y.org", "status": "deferred",
                                    "attempts": 2, "last": last}
    assert rec["size"] == len(b"Subject: x\r\n\r\nbody\r\n")
    text = "\n".join(records.list_lines(rec, NOW))
    assert mid in text and "b@y.org" in text and "451 4.3.0 try later" in text


def test_view_record_unfolds_headers_and_keeps_the_body(spool: Spool, queue: Queue) -> None:
    data = b"Received: from a\r\n\tby b; now\r\nSubject: hi\r\n\r\nline 1\r\nline 2\r\n"
    mid = put(spool, "incoming", data=data)
    entry = queue.locate(mid)
    assert entry is not None
    headers, body = records.message_parts(entry)
    assert headers == [["Received", "from a\tby b; now"], ["Subject", "hi"]]
    assert body == b"line 1\r\nline 2\r\n"
    view = records.view_record(entry, NOW, headers, body)
    assert view["body"] == "line 1\r\nline 2\r\n" and view["envelope"]["id"] == mid
    assert "Subject: hi" in "\n".join(records.view_lines(view, NOW))


# -- mailq -----------------------------------------------------------------------------------
def test_mailq_layout(spool: Spool, queue: Queue) -> None:
    assert mailq.render([]) == "Mail queue is empty\n"
    last = {"at": NOW, "code": 451, "enhanced": "4.3.0", "text": "busy", "server": "mx.y.org"}
    d = put(spool, "deferred", at=NOW - 10, extra={"recipients": [
        {"address": "a@y.org", "status": "deferred", "last": last},
        {"address": "done@y.org", "status": "delivered"}]})
    h = put(spool, "hold", sender="", at=NOW - 5)
    text = mailq.render(queue.scan())
    lines = text.splitlines()
    assert lines[0].startswith("-Queue ID-") and lines[0].endswith("-Sender/Recipient-------")
    assert lines[1].startswith(d + " ") and lines[1].endswith("a@example.org")
    assert "(host mx.y.org said: 451 4.3.0 busy)" in lines and "done@y.org" not in text
    assert any(line.startswith(h + "!") and line.endswith("MAILER-DAEMON") for line in lines)
    assert lines[-1] == "-- 1 Kbytes in 2 Requests."


# -- sendmail --------------------------------------------------------------------------------
def test_sendmail_options() -> None:
    o = sendmail.parse_options(["-ti", "-fme@x.org", "-F", "Me Myself", "-oem", "-odb",
                                "-N", "failure,delay", "-R", "hdrs", "-V", "env1", "--",
                                "-weird@x.org"])
    assert (o.extract, o.dot_ends_input, o.sender, o.full_name) == (
        True, False, "me@x.org", "Me Myself")
    assert o.notify == ["FAILURE", "DELAY"] and o.ret == "HDRS" and o.envid == "env1"
    assert o.recipients == ["-weird@x.org"]
    o = sendmail.parse_options(["-oi", "a@b", "-t"])  # options end at the first recipient
    assert not o.dot_ends_input and o.recipients == ["a@b", "-t"] and not o.extract
    assert sendmail.parse_options(["-bp"]).mode == "p"
    for bad in (["-bs"], ["-q"], ["-Z"], ["-f"], ["-N", "sometimes"], ["-bd"]):
        with pytest.raises(sendmail.UsageError):
            sendmail.parse_options(bad)


def test_sendmail_reads_to_a_lone_dot_unless_i() -> None:
    raw = b"Subject: x\n\nbody\n.\nnot part of it\n"
    assert sendmail.read_message(io.BytesIO(raw), True, 10**6) == b"Subject: x\n\nbody\n"
    assert sendmail.read_message(io.BytesIO(raw), False, 10**6) == raw
    with pytest.raises(submission.SubmissionError, match="larger"):
        sendmail.read_message(io.BytesIO(b"x" * 100), False, 10)


CFG = SimpleNamespace(hostname="host.example", local_domains=["localhost", "mail.example"])


def build(argv: list[str], raw: bytes, cfg: Any = CFG) -> tuple[bytes, dict[str, Any]]:
    return sendmail.build(sendmail.parse_options(argv), raw, cfg, uid=1000, user="joe",
                          message_id="01TESTTESTTESTTESTTESTTEST", now=NOW)


def test_sendmail_t_takes_header_recipients_and_drops_bcc() -> None:
    raw = (b"From: Joe <joe@host.example>\nTo: a@x.org, B <b@y.org>\nCc: root\n"
           b"Bcc: secret@z.org,\n  other@z.org\nSubject: s\n\nbody\r\nmore\rend")
    data, env = build(["-t", "extra@w.org"], raw)
    assert [r["address"] for r in env["recipients"]] == [
        "extra@w.org", "a@x.org", "b@y.org", "root@localhost", "secret@z.org", "other@z.org"]
    assert b"Bcc" not in data and b"secret" not in data
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    assert data.endswith(b"\r\n\r\nbody\r\nmore\r\nend\r\n")
    assert data.startswith(b"Received: by host.example (Empath, from userid 1000)\r\n"
                           b"\twith local id 01TESTTESTTESTTESTTESTTEST;")
    assert env["sender"] == "joe@host.example" and env["client"]["listener"] == "sendmail"
    assert env["client"]["ip"] is None and env["params"]["body"] == "7BIT"


def test_sendmail_resent_headers_win_with_t() -> None:
    raw = b"To: old@x.org\nResent-To: new@x.org\nResent-Bcc: hidden@x.org\n\nbody\n"
    data, env = build(["-t"], raw)
    assert [r["address"] for r in env["recipients"]] == ["new@x.org", "hidden@x.org"]
    assert b"hidden" not in data and b"To: old@x.org" in data


def test_sendmail_adds_missing_headers_and_qualifies_addresses() -> None:
    data, env = build(["-f", "<>", "-F", "Jöe", "-N", "never", "u1", "u2@x.org"],
                      b"Subject: s\n\n\xc3\xa9t\xc3\xa9\n")
    assert [r["address"] for r in env["recipients"]] == ["u1@localhost", "u2@x.org"]
    assert env["sender"] == "" and env["recipients"][0]["notify"] == ["NEVER"]
    assert env["params"]["body"] == "8BITMIME"
    head = data.split(b"\r\n\r\n")[0]
    assert b"From: =?utf-8?" in head and b"<joe@host.example>" in head
    assert b"\r\nDate: " in head
    assert b"Message-ID: <01TESTTESTTESTTESTTESTTEST@host.example>" in head
    cfg = SimpleNamespace(hostname="mail.example", local_domains=["localhost", "mail.example"])
    _, env = build(["-f", "boss", "root"], b"", cfg)
    assert env["sender"] == "boss@mail.example"
    assert env["recipients"][0]["address"] == "root@mail.example"


def test_sendmail_refuses_bad_input() -> None:
    with pytest.raises(sendmail.UsageError, match="no recipients"):
        build(["-t"], b"Subject: nobody\n\nx\n")
    with pytest.raises(submission.SubmissionError, match="invalid address"):
        build(["a b@x.org"], b"x\n")
    with pytest.raises(submission.SubmissionError, match="invalid address"):
        build(["@x.org"], b"x\n")


def test_sendmail_message_parsing_edge_cases() -> None:
    msg = submission.parse(b"From someone Mon Jan 1\nSubject: a\nnot a header line\nrest\n")
    assert [h.name for h in msg.headers] == ["Subject"]
    assert msg.body == b"not a header line\nrest\n"
    assert submission.parse(b"").headers == []
    assert submission.normalize(b"a\r\nb\rc") == b"a\nb\nc\n"


def test_sendmail_stores_a_durable_message(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SimpleNamespace(hostname="host.example", local_domains=["localhost"],
                          spool=SimpleNamespace(path=spool.root),
                          smtp=SimpleNamespace(max_message_size=10**6))
    monkeypatch.setattr("sys.stdin", SimpleNamespace(buffer=io.BytesIO(b"Subject: s\n\nhi\n")))
    assert sendmail.submit(sendmail.parse_options(["-i", "u@x.org"]), cfg) == 0
    [mid] = spool.list_ids("incoming")
    env, src = read_queue_file(spool.path("incoming", mid))
    assert env["id"] == mid and env["data_size"] == src.length
    assert read_data(src).startswith(b"Received: by host.example (Empath, from userid ")
    assert read_data(src).endswith(b"\r\n\r\nhi\r\n")
    assert os.listdir(spool.tmp) == []


# -- empathctl in-process: progress, damaged and unreadable spools ---------------------------
def test_flush_shows_progress_for_a_large_queue(spool: Spool,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from empath.ctl import cli

    template = Path(spool.path("deferred", put(spool, "deferred", at=NOW - 100)))
    for i in range(1200):  # copies under fresh ids: flush only needs the names
        os.link(template, spool.path("deferred", new_message_id(NOW - 50 + i / 1000)))
    assert cli.main(["queue", "flush", "--spool", spool.root]) == 0
    out, err = capsys.readouterr()
    assert out == "1201 deferred message(s) made due now\n"
    assert err.splitlines()[-1] == "flush: 1201/1201 deferred messages made due"


def test_unreadable_state_directory_is_a_clear_error(spool: Spool, queue: Queue,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    """Tests run as root, which reads anything: an EACCES from listdir is simulated."""
    from empath.ctl import cli

    from empath.spool import layout

    real = layout.list_names

    def listdir(path: Any = ".", limit: int = -1) -> list[str]:
        if str(path).endswith("deferred"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, limit)

    monkeypatch.setattr(layout, "list_names", listdir)
    with pytest.raises(QueueError, match="permission denied reading .*deferred"):
        queue.scan()
    assert cli.main(["queue", "list", "--spool", spool.root]) == 1
    assert "permission denied reading" in capsys.readouterr().err


def test_missing_state_directory_is_reported_not_retried(spool: Spool, queue: Queue) -> None:
    mid = put(spool, "deferred")
    os.rmdir(spool.state_dir("hold"))
    with pytest.raises(QueueError, match="hold is missing"):
        queue.hold(mid)
    assert os.path.exists(spool.path("deferred", mid))


@pytest.mark.parametrize("args", [["queue", "delete"], ["queue", "retry"],
                                  ["queue", "stats", "--interval", "soon"],
                                  ["queue", "list", "--older-than", "ages"], ["queue"]])
def test_usage_errors_exit_2(spool: Spool, args: list[str]) -> None:
    from empath.ctl import cli

    try:
        code = cli.main([*args, "--spool", spool.root] if len(args) > 1 else args)
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    assert code == 2


def test_stats_of_a_large_queue_count_names_and_full_reads_every_file(
        spool: Spool, queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    from empath.ctl import stats as stats_module

    old = put(spool, "deferred", at=NOW - 500)
    put(spool, "incoming", at=NOW - 10)
    put(spool, "active", at=NOW - 20, slot=os.getpid())
    put(spool, "hold", rcpts=("x@other.org",), at=NOW - 30)
    (Path(spool.state_dir("deferred")) / "not-a-queue-id").write_bytes(b"junk")
    monkeypatch.setattr(stats_module, "FULL_LIMIT", 3)
    opened: list[str] = []
    real_open, real_stat = os.open, os.stat

    def spy_open(path: Any, *args: Any, **kw: Any) -> Any:
        opened.append(str(path))
        return real_open(path, *args, **kw)

    def spy_stat(path: Any, *args: Any, **kw: Any) -> Any:
        opened.append(str(path))
        return real_stat(path, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "open", spy_open)
        m.setattr(os, "stat", spy_stat)
        counted = stats_module.collect(queue)
        # (the state directories are stat'ed and control/counts read: see spool/counts.py)
        files = [p for p in opened if is_valid_id(os.path.basename(p))]
        assert files == []  # no queue file opened or stat'ed
        stats_module.collect(queue, full=True)
        files = [p for p in opened if is_valid_id(os.path.basename(p))]
        assert len(files) >= 4  # the spies see the reads of a full count
    assert counted["detail"] == "counts" and counted["domains"] is None
    assert counted["total"] == {"messages": 4, "bytes": None}
    assert {s: v["messages"] for s, v in counted["states"].items()} == {
        "pending": 1, "active": 1, "deferred": 1, "held": 1, "failed": 0, "corrupt": 0}
    assert counted["oldest"]["id"] == old and counted["oldest"]["status"] == "deferred"
    assert counted["oldest"]["age"] >= time.time() - NOW + 499
    text = "\n".join(stats_module.render(counted))
    assert text.startswith("queue: 4 message(s), bytes not counted")
    assert "not counted (more than 3 messages" in text
    full = stats_module.collect(queue, full=True)
    assert full["detail"] == "full" and full["total"]["bytes"] > 0
    assert full["domains"]["example.net"]["messages"] == 3
    assert full["oldest"]["id"] == old
    monkeypatch.setattr(stats_module, "FULL_LIMIT", 4)
    assert stats_module.collect(queue)["detail"] == "full"  # small enough: read in full
