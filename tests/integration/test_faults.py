"""Disk faults during a delivery-state update, and clock jumps, through the real daemon.

A delivery-state update is the rewrite of the queue file (new envelope written in tmp/, fsync,
renamed over active/<pid>/<id>) followed by its rename into deferred/. Each step is made to fail
for real, not by mocking: the spool sits on a small tmpfs that is filled up (the rewrite fails
with ENOSPC), or deferred/ is covered by a tmpfs of its own (the rename into it fails with
EXDEV, as it would with ENOSPC or EIO on a directory that cannot grow). The tests run as root,
where permission bits stop nothing, hence file systems rather than chmod.

The rules under test (docs/RELIABILITY.md):

- a failed state update leaves the message in its previous state, complete, and it is retried
  once the fault clears, without waiting for a restart of the worker;
- a deferred file's mtime is its due time; a due time further ahead than the longest retry
  delay the configuration can produce (``retry_max_delay * (1 + retry_jitter_factor)``) cannot
  come from this clock — the clock has moved back — and the message is due now. A due time in
  the past (the clock moved forward) is due now as well; one within the horizon is honoured.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from empath.spool import CorruptFile, Spool, new_message_id, read_envelope
from empath.spool.submit import store_message
from tests.support.daemon import EmpathDaemon, wait_for
from tests.support.fixtures import DaemonFactory
from tests.support.sink import Behaviour, SinkServer

TEMPFAIL = (451, "4.3.0 try again later")
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
YEAR = 365.25 * 86400
WAIT = 30.0


# -- fixtures and helpers ---------------------------------------------------------------------
@pytest.fixture
def sink() -> Iterator[SinkServer]:
    server = SinkServer(Behaviour()).start()
    try:
        yield server
    finally:
        server.stop()


class Mounts:
    """tmpfs mounts made by a test; unmounted (lazily, so a busy one cannot stay) at teardown."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def tmpfs(self, where: Path, size: str = "4m") -> Path:
        where.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                                 "tmpfs", str(where)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        self.points.append(where)
        return where

    def unmount(self, where: Path) -> None:
        subprocess.run(["umount", "-l", str(where)], check=True)
        self.points.remove(where)


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    m = Mounts()
    try:
        yield m
    finally:
        for point in reversed(m.points):
            subprocess.run(["umount", "-l", str(point)], check=False)


def overrides(sink: SinkServer, spool_path: Path | None = None, **delivery: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "processes": {"receivers": 1, "delivery": 1},
        "delivery": {
            "smarthost": f"127.0.0.1:{sink.port}",
            "queue_scan_interval": "0.2s",
            "retry_base_delay": "1s",
            "retry_max_delay": "2s",
            "retry_jitter_factor": 0,
            **delivery,
        },
    }
    if spool_path is not None:
        out["spool"] = {"path": str(spool_path), "min_free_space": 0}
    return out


def freeze(spool_path: Path) -> Path:
    """Create the spool's control/freeze flag (before the daemon starts, if need be)."""
    (spool_path / "control").mkdir(parents=True, exist_ok=True)
    flag = spool_path / "control" / "freeze"
    flag.touch()
    return flag


def send(daemon: EmpathDaemon, subject: str,
         recipients: tuple[str, ...] = ("rcpt@remote.test",),
         sender: str = "sender@client.test") -> str:
    """Submit one message over SMTP and return its queue id (from the 250)."""
    body = (f"From: <sender@client.test>\r\nTo: <{recipients[0]}>\r\nSubject: {subject}\r\n"
            f"\r\nHello.\r\n").encode()
    with daemon.smtp() as client:
        client.ehlo("client.test")
        client.mail(sender)
        for rcpt in recipients:
            code, reply = client.rcpt(rcpt)
            assert code == 250, reply
        code, reply = client.data(body)
        assert code == 250, reply
    match = re.search(rb"queued as ([0-9A-Z]{26})", reply)
    assert match, reply
    return match.group(1).decode()


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` with a ballast file until ENOSPC."""
    ballast = directory / "ballast"
    chunk = b"\0" * 65536
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(100_000):  # bounded: 6 GiB, far more than any test tmpfs
            os.write(fd, chunk)
        raise AssertionError("the file system never filled up")
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return ballast


def where(spool: Spool, message_id: str) -> str | None:
    found = spool.find(message_id)
    return found[0] if found else None


def queued(spool: Spool) -> dict[str, list[str]]:
    out = {state: spool.list_ids(state) for state in ("incoming", "deferred", "failed", "hold",
                                                      "corrupt")}
    out["active"] = [mid for _, mid in spool.list_active()]
    return {k: v for k, v in out.items() if v}


def delivered(sink: SinkServer, subject: str) -> list[Any]:
    return [m for m in list(sink.messages) if f"Subject: {subject}\r\n".encode() in m.data]


# -- a failed delivery-state update -----------------------------------------------------------
def test_rewrite_failing_for_a_full_disk_keeps_the_previous_state_and_retries(
        daemon_factory: DaemonFactory, sink: SinkServer, mounts: Mounts,
        tmp_path: Path) -> None:
    fs = mounts.tmpfs(tmp_path / "spoolfs", size="4m")
    spool_path = fs / "spool"
    flag = freeze(spool_path)
    sink.behaviour = Behaviour(rcpt_default=TEMPFAIL)
    daemon = daemon_factory(overrides(sink, spool_path))
    spool = Spool(str(spool_path))
    queue_id = send(daemon, "full disk")
    before = read_envelope(spool.path("incoming", queue_id))

    ballast = fill(fs)
    flag.unlink()
    # The attempt gets its 451; recording it needs a new file in tmp/, which cannot be written.
    daemon.wait_for(lambda: f"{queue_id}: delivery attempt failed unexpectedly"
                    in daemon.log_text(), WAIT, message="the failed state update")
    daemon.wait_for(lambda: where(spool, queue_id) == "deferred", WAIT,
                    message="the message set aside in deferred/")
    assert any(c.startswith("RCPT TO:<rcpt@remote.test>") for c in sink.commands())
    # Its previous state: the envelope as it was before the attempt, file complete.
    assert read_envelope(spool.path("deferred", queue_id)) == before
    assert os.listdir(spool.tmp) == []  # the half-written rewrite was removed
    assert not delivered(sink, "full disk")

    ballast.unlink()
    sink.behaviour = Behaviour()
    daemon.wait_for(lambda: not queued(spool), WAIT, message="the retry to finish")
    copies = delivered(sink, "full disk")
    assert len(copies) == 1
    assert f"id {queue_id}".encode() in copies[0].data
    assert os.listdir(spool.tmp) == []


def test_failed_move_to_deferred_is_retried_without_a_worker_restart(
        daemon_factory: DaemonFactory, sink: SinkServer, mounts: Mounts) -> None:
    sink.behaviour = Behaviour(rcpt_default=TEMPFAIL)
    daemon = daemon_factory(overrides(sink), start=False)
    flag = freeze(daemon.spool_path)
    daemon.start()
    spool = Spool(str(daemon.spool_path))
    worker = daemon.child_pids("delivery")
    queue_id = send(daemon, "stuck rename")

    # deferred/ on another file system: the rename into it fails (EXDEV) while everything
    # else, the rewrite in tmp/ and active/ included, works.
    cover = mounts.tmpfs(daemon.spool_path / "deferred", size="1m")
    flag.unlink()
    daemon.wait_for(lambda: f"{queue_id}: cannot set the message aside" in daemon.log_text(),
                    WAIT, message="the failed rename into deferred/")
    # Still complete, still claimable state: nothing half-done, nothing in corrupt/.
    state = where(spool, queue_id)
    assert state in ("active", "incoming"), state
    found = spool.find(queue_id)
    assert found is not None
    with contextlib.suppress(FileNotFoundError):
        envelope = read_envelope(found[1])
        assert envelope["id"] == queue_id
    assert not spool.list_ids("corrupt")

    mounts.unmount(cover)
    sink.behaviour = Behaviour()
    started = time.monotonic()
    deadline = 10 * 2.0  # ten times retry_max_delay: ample for "retried", far below "restart"
    try:
        wait_for(lambda: delivered(sink, "stuck rename"), deadline, interval=0.1,
                 message="the retry")
    except TimeoutError:
        pytest.fail(f"{queue_id} was not retried within {deadline:g}s after the fault cleared "
                    f"(the delivery worker {worker} still runs: "
                    f"{daemon.child_pids('delivery')}); it sits in {where(spool, queue_id)}/ "
                    f"({found[1] if found else '?'}). A claim whose state update failed is "
                    "only requeued when its worker exits.\n--- log ---\n"
                    + "\n".join(line for line in daemon.log_text().splitlines()
                                if queue_id in line))
    assert daemon.child_pids("delivery") == worker  # no restart was needed
    assert time.monotonic() - started < deadline
    daemon.wait_for(lambda: not queued(spool), WAIT, message="an empty spool")
    assert len(delivered(sink, "stuck rename")) == 1


# -- clock jumps ------------------------------------------------------------------------------
def deferred_message(spool: Spool, subject: str, due: float) -> str:
    """A message as a worker leaves it after one temporary failure, due at ``due``."""
    queue_id = new_message_id()
    data = (f"Received: from client.test ([127.0.0.1])\r\n\tby test.empath (Empath) with ESMTP "
            f"id {queue_id}; Wed, 25 Nov 2026 09:00:00 +0000\r\nFrom: <sender@client.test>\r\n"
            f"To: <rcpt@remote.test>\r\nSubject: {subject}\r\n\r\nHello.\r\n").encode()
    failed_at = min(due, time.time()) - 1.0
    envelope = {
        "id": queue_id, "sender": "sender@client.test",
        "recipients": [{"address": "rcpt@remote.test", "orcpt": None, "notify": None,
                        "status": "deferred", "attempts": 1,
                        "last": {"at": failed_at, "code": 451, "enhanced": "4.3.0",
                                 "text": "try again later", "server": "127.0.0.1"}}],
        "params": {"body": "7BIT", "smtputf8": False, "size": None, "ret": None,
                   "envid": None},
        "client": {"ip": "127.0.0.1", "port": 40000, "helo": "client.test", "esmtp": True,
                   "tls": None, "listener": "127.0.0.1:25", "auth": None},
        "received_at": failed_at - 1.0, "metadata": {}, "attempt_count": 1,
        "attempts": [], "next_retry_at": due,
    }
    store_message(spool, data, envelope, wake=False)
    path = spool.move(spool.path("incoming", queue_id), "deferred", queue_id)
    os.utime(path, (due, due))
    return queue_id


def test_clock_jumps_far_future_due_time_is_due_now_and_near_one_is_honoured(
        daemon_factory: DaemonFactory, sink: SinkServer) -> None:
    # Horizon: retry_max_delay 5s * (1 + 0.2) = 6 s; no due time this clock set lies beyond.
    daemon = daemon_factory(overrides(sink, retry_max_delay="5s", retry_jitter_factor=0.2),
                            start=False)
    spool = Spool(str(daemon.spool_path))
    spool.create_tree()
    flag = freeze(daemon.spool_path)
    subjects = ("clock moved back", "clock moved forward", "near")
    ids = {s: deferred_message(spool, s, time.time()) for s in subjects}
    daemon.start()
    # Due times are set while delivery is frozen, relative to the moment it resumes.
    t0 = time.time()
    due = {"clock moved back": t0 + 10 * YEAR, "clock moved forward": t0 - 10 * YEAR,
           "near": t0 + 4.0}
    for subject, queue_id in ids.items():
        os.utime(spool.path("deferred", queue_id), (due[subject], due[subject]))
    flag.unlink()
    arrived: dict[str, float] = {}

    def poll() -> bool:
        for subject in ids:
            if subject not in arrived and delivered(sink, subject):
                arrived[subject] = time.time()
        return len(arrived) == len(ids)

    with contextlib.suppress(TimeoutError):
        wait_for(poll, 15.0, interval=0.05, message="all three messages")
    late = {s: where(spool, i) for s, i in ids.items() if s not in arrived}
    assert "clock moved forward" in arrived, late
    assert arrived["clock moved forward"] - t0 < 3.0
    # A due time 10 years ahead cannot have been set by this clock: due now, not in 2036.
    assert "clock moved back" in arrived, (
        f"{ids['clock moved back']} (mtime {due['clock moved back']:.0f}, 10 years ahead) was "
        f"not attempted; still in {late.get('clock moved back')}/. A due time beyond "
        "retry_max_delay * (1 + retry_jitter_factor) from now must count as due now.")
    assert arrived["clock moved back"] - t0 < 3.0
    # Within the horizon the due time is honoured: not early, and on time.
    assert "near" in arrived, late
    assert due["near"] - 0.5 <= arrived["near"] <= due["near"] + 3.0
    daemon.wait_for(lambda: not queued(spool), WAIT, message="an empty spool")
    for subject in ids:
        assert len(delivered(sink, subject)) == 1, subject


def test_deferred_files_are_complete_after_the_clock_jump_retries(
        daemon_factory: DaemonFactory, sink: SinkServer) -> None:
    """The far-future message, failing again, gets a fresh due time from the current clock
    (within the horizon) instead of keeping the bogus one."""
    sink.behaviour = Behaviour(rcpt_default=TEMPFAIL)
    daemon = daemon_factory(overrides(sink, retry_max_delay="5s", retry_jitter_factor=0.2),
                            start=False)
    spool = Spool(str(daemon.spool_path))
    spool.create_tree()
    queue_id = deferred_message(spool, "bogus due", time.time() + 10 * YEAR)
    daemon.start()
    path = spool.path("deferred", queue_id)

    def attempted_again() -> tuple[dict[str, Any], float] | None:
        with contextlib.suppress(FileNotFoundError, CorruptFile):
            env = read_envelope(path)  # first: a file with attempt 2 here is the new one
            mtime = os.stat(path).st_mtime
            if env.get("attempt_count", 0) >= 2:
                return env, mtime
        return None

    try:
        envelope, due = wait_for(attempted_again, 10.0, message="a second attempt")
    except TimeoutError:
        pytest.fail(f"{queue_id}, due 10 years ahead, was never attempted again (still in "
                    f"{where(spool, queue_id)}/ with its bogus due time)")
    assert time.time() - 1.0 <= due <= time.time() + 6.0
    assert envelope["next_retry_at"] == pytest.approx(due, abs=0.01)


def test_a_backward_clock_jump_does_not_stall_deferred_mail(
        daemon_factory: DaemonFactory, sink: SinkServer, tmp_path: Path) -> None:
    """The daemon runs under Debian's libfaketime, its wall clock read from a file the test
    rewrites: one hour back (the monotonic clock is left alone). The message's due time was
    set by the clock before the jump; within the horizon (retry_max_delay is a day), so only
    the jump detection releases it before the hour is over."""
    if not os.path.exists(LIBFAKETIME):
        pytest.fail(f"{LIBFAKETIME} is missing: run tools/install-test-deps (faketime)")
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    sink.behaviour = Behaviour(rcpt_default=TEMPFAIL)
    daemon = daemon_factory(overrides(sink, retry_base_delay="4s", retry_max_delay="1d"),
                            start=False)
    daemon.start(env={"LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(clock),
                      "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                      "NO_FAKE_STAT": "1"})
    spool = Spool(str(daemon.spool_path))
    queue_id = send(daemon, "clock jump")
    daemon.wait_for(lambda: where(spool, queue_id) == "deferred", WAIT,
                    message="the first attempt deferred")
    clock.write_text("-1h\n")
    sink.behaviour = Behaviour()
    daemon.wait_for(lambda: delivered(sink, "clock jump"), WAIT,
                    message="the retry after the clock jumped back an hour")
    assert re.search(r"the wall clock jumped by -3[56]\d\ds", daemon.log_text())
    assert "moved the due times of 1 deferred message(s) back" in daemon.log_text()
    daemon.wait_for(lambda: not queued(spool), WAIT, message="an empty spool")
    assert len(delivered(sink, "clock jump")) == 1


# -- a read-only spool --------------------------------------------------------------------------
def remount(point: Path, mode: str) -> None:
    result = subprocess.run(["mount", "-o", f"remount,{mode}", str(point)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_read_only_spool_holds_the_outcome_and_recovers_without_a_restart(
        daemon_factory: DaemonFactory, sink: SinkServer, mounts: Mounts,
        tmp_path: Path) -> None:
    fs = mounts.tmpfs(tmp_path / "spoolfs", size="16m")
    spool_path = fs / "spool"
    sink.behaviour = Behaviour(final_delay=2.0)  # the 250 comes after the remount
    daemon = daemon_factory(overrides(sink, spool_path))
    spool = Spool(str(spool_path))
    worker = daemon.child_pids("delivery")
    queue_id = send(daemon, "read-only")
    daemon.wait_for(lambda: delivered(sink, "read-only"), WAIT, message="the transfer")
    remount(fs, "ro")
    try:
        daemon.wait_for(lambda: f"{queue_id}: finished but neither removable nor recordable"
                        in daemon.log_text(), WAIT, message="the outcome held in memory")
        assert "claiming stops until the spool takes writes again" in daemon.log_text()
        assert where(spool, queue_id) == "active"
        assert daemon.child_pids("delivery") == worker  # no crash, no restart
    finally:
        remount(fs, "rw")
    daemon.wait_for(lambda: not queued(spool), WAIT, message="the held outcome recorded")
    assert "the spool takes writes again" in daemon.log_text()
    assert daemon.child_pids("delivery") == worker
    assert len(delivered(sink, "read-only")) == 1
    # Claiming resumed: new mail goes out.
    sink.behaviour = Behaviour()
    send(daemon, "after")
    daemon.wait_for(lambda: delivered(sink, "after") and not queued(spool), WAIT,
                    message="delivery after the spool recovered")
    assert len(delivered(sink, "read-only")) == 1


def test_a_delivery_worker_started_on_a_read_only_spool_waits_instead_of_crash_looping(
        daemon_factory: DaemonFactory, sink: SinkServer, mounts: Mounts,
        tmp_path: Path) -> None:
    fs = mounts.tmpfs(tmp_path / "spoolfs", size="16m")
    spool_path = fs / "spool"
    daemon = daemon_factory(overrides(sink, spool_path))
    spool = Spool(str(spool_path))
    [first] = daemon.child_pids("delivery")
    remount(fs, "ro")
    try:
        os.kill(first, signal.SIGKILL)  # the master starts a new worker, on a read-only spool
        daemon.wait_for(lambda: daemon.child_pids("delivery") not in ([], [first]), WAIT,
                        message="a new delivery worker")
        [second] = daemon.child_pids("delivery")
        daemon.wait_for(lambda: "cannot set up this worker in the spool" in daemon.log_text(),
                        WAIT, message="the worker noticing the read-only spool")
        time.sleep(2.0)  # room for a crash loop to show: several restarts at 0.25 s, 0.5 s...
        assert daemon.child_pids("delivery") == [second]
        assert "delivery 1/1 crashed" not in daemon.log_text()
    finally:
        remount(fs, "rw")
    send(daemon, "after read-only start")
    daemon.wait_for(lambda: delivered(sink, "after read-only start") and not queued(spool),
                    WAIT, message="delivery once the spool is writable")
    assert daemon.child_pids("delivery") == [second]
