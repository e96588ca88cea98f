"""``empathctl`` against a running daemon with real queued messages.

Messages reach the queue over SMTP and are deferred by a real delivery attempt to a sink that
answers 451 (``example.net``); ``slow.example`` goes to a sink that waits before every reply, so
a message stays claimed by the worker long enough to race with; ``reject.example`` refuses
permanently, which leaves a message from the null sender in failed/. Every command runs as a
subprocess (``.venv/bin/empathctl``) and is checked in its text and JSON output, exit status
and effect on the spool.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from empath.spool import Spool, read_queue_file
from empath.spool.queue import Queue
from tests.support.daemon import REPO, EmpathDaemon
from tests.support.fixtures import DaemonFactory
from tests.support.sink import PRESETS, Behaviour, SinkServer

EMPATHCTL = str(REPO / ".venv" / "bin" / "empathctl")
SLOW = 0.8  # seconds the slow sink waits before each reply: ~3 s per attempt


class World:
    """A daemon whose remote domains go to local sinks, and helpers to drive empathctl."""

    def __init__(self, daemon: EmpathDaemon, sinks: dict[str, SinkServer]) -> None:
        self.daemon = daemon
        self.sinks = sinks

    @property
    def spool(self) -> Path:
        return self.daemon.spool_path

    def ctl(self, *args: str, stdin: str | None = None, spool: str | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        where = ["--spool", spool] if spool else ["-c", str(self.daemon.config_path)]
        return subprocess.run([EMPATHCTL, *args, *where], capture_output=True, text=True,
                              input=stdin if stdin is not None else "", timeout=timeout)

    def ctl_json(self, *args: str) -> Any:
        r = self.ctl(*args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def send(self, rcpt: str, count: int = 1, sender: str = "alice@example.org") -> list[str]:
        """Queue ``count`` messages over SMTP; their queue ids (from the 250 replies)."""
        ids = []
        with self.daemon.smtp() as s:
            for n in range(count):
                s.ehlo("client.test")
                s.mail(sender)
                s.rcpt(rcpt)
                code, reply = s.data(f"Subject: test {n}\r\nX-N: {n}\r\n\r\nbody {n}\r\n")
                assert code == 250, reply
                ids.append(reply.decode().rsplit(" ", 1)[1])
        return ids

    def statuses(self) -> dict[str, str]:
        """Status of every queued message, read in-process (cheap enough to poll); what
        empathctl prints is checked by the tests themselves."""
        return {e.id: e.status for e in Queue(Spool(str(self.spool))).scan()}

    def wait_status(self, ids: list[str], status: str, timeout: float = 10) -> None:
        self.daemon.wait_for(lambda: all(self.statuses().get(i) == status for i in ids),
                             timeout, message=f"{ids} to be {status}")

    def deferred(self, count: int = 1, rcpt: str = "bob@example.net") -> list[str]:
        ids = self.send(rcpt, count)
        self.wait_status(ids, "deferred")
        return ids

    def copies(self, message_id: str) -> list[Path]:
        """Every file of this message anywhere in the spool (there must never be two)."""
        return [p for p in self.spool.rglob("*") if message_id in p.name]


@pytest.fixture
def world(daemon_factory: DaemonFactory) -> Iterator[World]:
    sinks = {"example.net": SinkServer(PRESETS["tempfail"]).start(),
             "slow.example": SinkServer(Behaviour(delay=SLOW, mail_reply=(451, "4.3.0 slow"))
                                        ).start(),
             "reject.example": SinkServer(PRESETS["reject-mail"]).start()}
    try:
        daemon = daemon_factory({
            "processes": {"receivers": 1, "delivery": 1},
            "local_domains": ["localhost", "test.empath"],
            "delivery": {
                "retry_base_delay": "1h", "retry_jitter_factor": 0,
                "queue_scan_interval": "0.3s", "delay_warning": 0,
                "connection_reuse": {"max_idle": 0},
                "domains": {d: {"mx_override": f"127.0.0.1:{s.port}"}
                            for d, s in sinks.items()}}})
        yield World(daemon, sinks)
    finally:
        for sink in sinks.values():
            sink.stop()


# -- reading ---------------------------------------------------------------------------------
def test_list_text_json_and_filters(world: World) -> None:
    ids = world.deferred(3)
    other = world.send("carol@slow.example")  # claimed by the worker for a while
    r = world.ctl("queue", "list")
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ID") and "NEXT RETRY" in lines[0]
    order = [line.split()[0] for line in lines if line[:1] not in (" ", "-", "I")]
    assert order == ids + other  # by arrival
    assert "bob@example.net" in r.stdout and "451 4.3.0 try later" in r.stdout
    assert lines[-1].startswith("-- 4 message(s)")

    doc = world.ctl_json("queue", "list")
    assert set(doc) == {"generated_at", "frozen", "count", "total", "messages"}
    assert doc["count"] == doc["total"] == 4
    first = doc["messages"][0]
    assert first["id"] == ids[0] and first["status"] == "deferred"
    assert first["sender"] == "alice@example.org" and first["attempts"] == 1
    assert first["recipients"][0]["address"] == "bob@example.net"
    assert first["recipients"][0]["status"] == "deferred"
    assert first["last_error"].startswith("451 4.3.0 try later")
    assert first["next_retry_at"] > time.time() + 1800  # retry_base_delay is an hour

    assert [m["id"] for m in world.ctl_json("queue", "list", "--domain", "slow.example")[
        "messages"]] == other
    assert world.ctl_json("queue", "list", "--sender", "alice@example.org")["count"] == 4
    assert world.ctl_json("queue", "list", "--sender", "nobody.example")["count"] == 0
    assert world.ctl_json("queue", "list", "--older-than", "1h")["count"] == 0
    assert world.ctl_json("queue", "list", "--status", "held")["messages"] == []
    r = world.ctl("queue", "list", "--status", "held")
    assert r.returncode == 0 and r.stdout == "no matching messages\n"


def test_view_text_json_and_body(world: World) -> None:
    [mid] = world.deferred()
    r = world.ctl("queue", "view", mid)
    assert r.returncode == 0
    assert f"id:          {mid}" in r.stdout and "status:      deferred" in r.stdout
    assert "history:     1 attempt(s)" in r.stdout and "route domain=example.net" in r.stdout
    assert "Subject: test 0" in r.stdout and "body 0" not in r.stdout
    r = world.ctl("queue", "view", mid, "--body")
    assert r.stdout.endswith("body:\nbody 0\n")  # (text mode reads CRLF as LF)
    doc = world.ctl_json("queue", "view", mid, "--body")
    assert doc["envelope"]["id"] == mid and doc["envelope"]["client"]["helo"] == "client.test"
    assert doc["envelope"]["attempts"][0]["results"]["bob@example.net"]["code"] == 451
    assert ["Subject", "test 0"] in doc["headers"] and doc["headers"][0][0] == "Received"
    assert doc["body"] == "body 0\r\n" and doc["path"].endswith(f"deferred/{mid}")
    assert world.ctl_json("queue", "view", mid)["body"] is None


def test_errors_and_exit_statuses(world: World, tmp_path: Path) -> None:
    [mid] = world.deferred()
    unknown = mid[:-1] + ("0" if mid[-1] != "0" else "1")
    for args in (("view", unknown), ("hold", unknown), ("release", unknown),
                 ("retry", unknown), ("delete", "--yes", unknown)):
        r = world.ctl("queue", *args)
        assert r.returncode == 1 and "no such message" in r.stderr, args
    r = world.ctl("queue", "hold", "not-an-id")
    assert r.returncode == 1 and "not a queue id" in r.stderr
    # Usage errors: 2.
    for args in (("delete", "--all", "--yes"), ("list", "--status", "lost"),
                 ("retry", mid, "--all")):
        r = world.ctl("queue", *args)
        assert r.returncode == 2 and r.stderr, args
    # Spools that cannot be read.
    missing = world.ctl("queue", "list", spool=str(tmp_path / "missing"))
    assert missing.returncode == 1 and "no spool at" in missing.stderr
    (tmp_path / "file").write_text("not a spool")
    r = world.ctl("queue", "stats", spool=str(tmp_path / "file"))
    assert r.returncode == 1 and "is not a directory" in r.stderr
    r = world.ctl("queue", "list", spool=str(tmp_path))
    assert r.returncode == 1 and "not an Empath spool" in r.stderr
    damaged = tmp_path / "damaged"
    for d in ("incoming", "failed", "control"):
        (damaged / d).mkdir(parents=True)
    (damaged / "deferred").write_text("a file where a directory should be")
    r = world.ctl("queue", "list", spool=str(damaged))
    assert r.returncode == 1 and "damaged" in r.stderr and "Traceback" not in r.stderr
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("spool: [\n")
    r = subprocess.run([EMPATHCTL, "queue", "list", "-c", str(bad_config)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and "bad.yaml" in r.stderr


def _immutable(path: Path, on: bool) -> bool:
    r = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return r.returncode == 0


def test_permission_denied_is_reported(world: World) -> None:
    """Root passes permission bits, so an immutable directory (chattr +i: EPERM even for
    root) stands in for a spool this user may not change."""
    [mid] = world.deferred()
    deferred = world.spool / "deferred"
    if not _immutable(deferred, True):
        pytest.skip("chattr +i is not available here")
    try:
        r = world.ctl("queue", "delete", "--yes", mid)
        assert r.returncode == 1
        assert "permission denied" in r.stderr and "Traceback" not in r.stderr
        r = world.ctl("queue", "hold", mid)
        assert r.returncode == 1 and "permission denied" in r.stderr
    finally:
        _immutable(deferred, False)
    assert world.statuses() == {mid: "deferred"}


# -- changes ---------------------------------------------------------------------------------
def test_retry_sends_a_deferred_message_now(world: World) -> None:
    ids = world.deferred(2)
    sink = world.sinks["example.net"]
    sink.behaviour = PRESETS["accept"]
    r = world.ctl("queue", "retry", ids[0])
    assert r.returncode == 0 and r.stdout == f"{ids[0]}: due now\n"
    [msg] = sink.wait_for_messages(1, timeout=10)
    assert b"X-N: 0" in msg.data
    world.daemon.wait_for(lambda: ids[0] not in world.statuses(), 10, "removal")
    assert world.statuses() == {ids[1]: "deferred"}
    doc = world.ctl_json("queue", "retry", "--all", "--domain", "example.net")
    assert doc["due_now"] == 1 and doc["results"][0]["id"] == ids[1]
    assert doc["results"][0] == {"id": ids[1], "ok": True, "result": "done",
                                 "status": "deferred", "message": "due now"}
    assert len(sink.wait_for_messages(2, timeout=10)) == 2


def test_flush_makes_everything_due(world: World) -> None:
    ids = world.deferred(3)
    world.sinks["example.net"].behaviour = PRESETS["accept"]
    r = world.ctl("queue", "flush")
    assert r.returncode == 0 and r.stdout == "3 deferred message(s) made due now\n"
    world.sinks["example.net"].wait_for_messages(3, timeout=10)
    world.daemon.wait_for(lambda: not set(ids) & set(world.statuses()), 10, "the queue to empty")
    assert world.ctl_json("queue", "flush") == {"deferred": 0, "due_now": 0}


def test_delete_asks_and_deletes(world: World) -> None:
    ids = world.deferred(3)
    r = world.ctl("queue", "delete", ids[0], stdin="n\n")
    assert r.returncode == 1 and "Delete 1 message(s)?" in r.stderr
    assert "nothing deleted" in r.stderr and ids[0] in world.statuses()
    r = world.ctl("queue", "delete", ids[0], stdin="")  # no answer is no
    assert r.returncode == 1 and ids[0] in world.statuses()
    r = world.ctl("queue", "delete", ids[0], ids[1], stdin="y\n")
    assert r.returncode == 0 and f"{ids[0]}: deleted (was deferred)" in r.stdout
    assert world.statuses() == {ids[2]: "deferred"} and world.copies(ids[0]) == []
    doc = world.ctl_json("queue", "delete", "--yes", ids[2])
    assert doc["deleted"] == 1 and doc["results"][0]["ok"]
    assert world.statuses() == {}


def test_delete_all_failed(world: World) -> None:
    # From the null sender and refused permanently: kept in failed/ (no bounce to send).
    with world.daemon.smtp() as s:
        s.sendmail("", ["x@reject.example"], "Subject: undeliverable\r\n\r\nx\r\n")
        s.sendmail("", ["y@reject.example"], "Subject: undeliverable\r\n\r\ny\r\n")
    world.daemon.wait_for(lambda: list(world.statuses().values()) == ["failed", "failed"],
                          10, "two failed messages")
    [keep] = world.deferred()
    r = world.ctl("queue", "delete", "--all", "--status", "failed", stdin="y\n")
    assert r.returncode == 0 and "Delete all 2 failed message(s)?" in r.stderr
    assert world.statuses() == {keep: "deferred"}
    r = world.ctl("queue", "delete", "--all", "--status", "failed", "--yes")
    assert r.returncode == 0 and "no failed messages to delete" in r.stdout


def test_hold_and_release_round_trip(world: World) -> None:
    [mid] = world.deferred()
    before = read_queue_file(str(world.spool / "deferred" / mid))[0]
    r = world.ctl("queue", "hold", mid)
    assert r.returncode == 0 and r.stdout == f"{mid}: held (was deferred)\n"
    assert (world.spool / "hold" / mid).exists() and len(world.copies(mid)) == 1
    assert read_queue_file(str(world.spool / "hold" / mid))[0] == before
    assert world.ctl("queue", "hold", mid).stdout == f"{mid}: already held\n"
    r = world.ctl("queue", "retry", mid)
    assert r.returncode == 1 and "release it first" in r.stderr
    sink = world.sinks["example.net"]
    sink.behaviour = PRESETS["accept"]
    world.ctl("queue", "flush")
    time.sleep(1.0)  # several scans: a held message is not delivered
    assert sink.messages == [] and world.statuses() == {mid: "held"}
    doc = world.ctl_json("queue", "release", mid)
    assert doc["results"] == [{"id": mid, "ok": True, "result": "done", "status": "pending",
                               "message": "released for delivery"}]
    sink.wait_for_messages(1, timeout=10)
    world.daemon.wait_for(lambda: world.statuses() == {}, 10, "delivery after release")
    r = world.ctl("queue", "release", mid)
    assert r.returncode == 1 and "no such message" in r.stderr


def test_hold_and_release_by_domain_sender_and_all(world: World) -> None:
    net = world.deferred(2)
    other = world.send("dave@example.net", sender="billing@example.org")
    world.wait_status(other, "deferred")
    failed = world.send("x@reject.example", sender="")  # failed/: never held in bulk
    r = world.ctl("queue", "hold", "--sender", "billing@example.org")
    assert (r.returncode, r.stdout, r.stderr) == (0, "1 message(s) held\n", "")
    assert world.statuses()[other[0]] == "held"
    assert {world.statuses()[i] for i in net} == {"deferred"}
    doc = world.ctl_json("queue", "hold", "--domain", "example.net")
    assert doc["held"] == 2 and sorted(x["id"] for x in doc["results"]) == sorted(net)
    assert {world.statuses()[i] for i in [*net, *other]} == {"held"}
    r = world.ctl("queue", "release", "--domain", "example.org")  # no recipient there
    assert (r.returncode, r.stdout) == (0, "0 message(s) released\n")
    r = world.ctl("queue", "release", "--sender", "example.org")  # a sender domain
    assert (r.returncode, r.stdout) == (0, "3 message(s) released\n")
    world.wait_status([*net, *other], "deferred")
    r = world.ctl("queue", "hold", "--all")
    assert (r.returncode, r.stdout) == (0, "3 message(s) held\n"), r.stderr
    world.wait_status(failed, "failed")
    r = world.ctl("queue", "release", "--all")
    assert (r.returncode, r.stdout) == (0, "3 message(s) released\n")
    for i in [*net, *other]:
        assert len(world.copies(i)) == 1
    # ids and a selection together, or neither, is a usage error
    for args in (("hold",), ("release",), ("hold", net[0], "--all"),
                 ("release", net[0], "--domain", "example.net")):
        r = world.ctl("queue", *args)
        assert r.returncode == 2 and "give message ids, or select with --all" in r.stderr


def write_messages(spool: Path, state: str, count: int, rcpt: str = "bob@example.net"
                   ) -> list[str]:
    """``count`` queue files written straight into ``state`` (no daemon, no fsync: a large
    queue built in well under a second)."""
    from empath.ctl.submission import envelope
    from empath.spool import new_message_id
    from empath.spool.fileformat import encode_tail

    s = Spool(str(spool))
    s.create_tree()
    ids = []
    now = time.time()
    for n in range(count):
        mid = new_message_id()
        data = f"Subject: bulk {n}\r\n\r\nbody\r\n".encode()
        env = envelope(message_id=mid, sender="bulk@example.org", recipients=[rcpt],
                       data=data, notify=None, ret=None, envid=None, uid=0, user="root",
                       now=now - count + n)
        env["data_size"] = len(data)
        Path(s.path(state, mid)).write_bytes(data + encode_tail(env, len(data)))
        ids.append(mid)
    return ids


def test_bulk_operations_over_a_thousand_messages_show_progress(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    ids = sorted(write_messages(spool, "deferred", 1001))  # the queue's order: by id

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EMPATHCTL, "queue", *args, "--spool", str(spool)],
                              capture_output=True, text=True, timeout=120)

    r = ctl("list", "--limit", "3")
    assert r.returncode == 0, r.stderr
    listed = [line.split()[0] for line in r.stdout.splitlines()
              if line[:1] not in (" ", "-", "I")]
    assert listed == ids[:3]
    assert r.stdout.splitlines()[-1].startswith("-- the oldest 3 of 1001 message(s) (--limit)")
    doc = json.loads(ctl("list", "--limit", "2", "--json").stdout)
    assert (doc["count"], doc["total"], [m["id"] for m in doc["messages"]]) == (2, 1001, ids[:2])
    assert ctl("list", "--limit", "0").returncode == 2
    r = ctl("hold", "--all")
    assert (r.returncode, r.stdout) == (0, "1001 message(s) held\n"), r.stderr
    lines = r.stderr.splitlines()
    assert lines and lines[-1] == "hold: 1001/1001 messages held", r.stderr
    assert all(line.startswith("hold: ") for line in lines)
    assert len(os.listdir(spool / "hold")) == 1001
    r = ctl("release", "--sender", "bulk@example.org")
    assert (r.returncode, r.stdout) == (0, "1001 message(s) released\n"), r.stderr
    assert r.stderr.splitlines()[-1] == "release: 1001/1001 messages released"
    assert len(os.listdir(spool / "incoming")) == 1001
    # At most 1,000 messages: no progress lines.
    small = tmp_path / "small"
    write_messages(small, "deferred", 1000)
    r = subprocess.run([EMPATHCTL, "queue", "hold", "--all", "--spool", str(small)],
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (0, "1000 message(s) held\n", "")


def test_freeze_stops_new_attempts_and_unfreeze_resumes(world: World) -> None:
    sink = world.sinks["example.net"]
    sink.behaviour = PRESETS["accept"]
    r = world.ctl("queue", "freeze")
    assert r.returncode == 0 and "frozen" in r.stdout
    assert (world.spool / "control" / "freeze").exists()
    [mid] = world.send("bob@example.net")
    time.sleep(1.0)
    assert sink.messages == [] and world.statuses() == {mid: "pending"}
    assert world.ctl_json("queue", "stats")["frozen"] is True
    assert "FROZEN" in world.ctl("queue", "list").stdout
    assert world.ctl_json("queue", "unfreeze") == {"frozen": False}
    sink.wait_for_messages(1, timeout=10)
    assert not (world.spool / "control" / "freeze").exists()


def test_stats_text_and_json(world: World) -> None:
    world.deferred(2)
    world.send("x@slow.example")
    with world.daemon.smtp() as s:
        s.sendmail("a@example.org", ["u@example.net", "v@example.net", "w@slow.example"],
                   "Subject: three\r\n\r\nx\r\n")
    doc = world.ctl_json("queue", "stats")
    assert set(doc) == {"generated_at", "frozen", "detail", "total", "states", "domains",
                        "oldest"}
    assert doc["detail"] == "full"  # a small queue: every file read
    assert doc["total"]["messages"] == 4 and doc["total"]["bytes"] > 0
    assert sum(s["messages"] for s in doc["states"].values()) == 4
    assert set(doc["states"]) == {"pending", "active", "deferred", "held", "failed", "corrupt"}
    assert doc["domains"]["example.net"] == {"messages": 3, "recipients": 4}
    assert doc["domains"]["slow.example"] == {"messages": 2, "recipients": 2}
    assert doc["oldest"]["age"] >= 0 and len(doc["oldest"]["id"]) == 26
    r = world.ctl("queue", "stats")
    assert r.returncode == 0 and r.stdout.startswith("queue: 4 message(s)")
    assert "example.net" in r.stdout and "oldest:" in r.stdout


def test_stats_watch_redraws_in_a_terminal(world: World) -> None:
    world.deferred()
    master, slave = pty.openpty()
    def as_from_a_shell() -> None:
        # Ctrl-C must reach the command as from a shell, whatever another test left the
        # signal mask of this test process at (a blocked SIGINT is inherited through exec).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([EMPATHCTL, "queue", "stats", "--watch", "--interval", "0.2",
                             "-c", str(world.daemon.config_path)],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE,
                            preexec_fn=as_from_a_shell)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 10
    try:
        while out.count(b"\x1b[H\x1b[2J") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                out += os.read(master, 65536)
        proc.send_signal(signal.SIGINT)
        # Keep reading: a terminal nobody reads fills, and the last write would block.
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                with contextlib.suppress(OSError):  # EIO once the child has closed it
                    out += os.read(master, 65536)
        if proc.poll() is None:  # say why before failing
            status = open(f"/proc/{proc.pid}/status").read()
            pytest.fail("empathctl --watch still runs 10 s after SIGINT: " + " ".join(
                line for line in status.splitlines() if line.startswith(("State", "Sig"))))
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    frames = out.split(b"\x1b[H\x1b[2J")[1:]
    assert len(frames) >= 3
    assert all(b"queue: 1 message(s)" in f and b"every 0.2s" in f for f in frames[:3])
    # Not a terminal: --json gives one line per refresh.
    r = world.ctl("queue", "stats", "--watch", "--interval", "0.1", "--count", "2", "--json")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2
    assert [json.loads(line)["total"]["messages"] for line in lines] == [1, 1]


# -- races with a worker ---------------------------------------------------------------------
def _claimed(world: World, rcpt: str = "carol@slow.example") -> str:
    [mid] = world.send(rcpt)
    world.wait_status([mid], "active")
    return mid


def test_claimed_message_is_refused_then_held_after_its_attempt(world: World) -> None:
    # A longer attempt (~8 s) than the others: the two refused commands below must both run
    # while it lasts, even on a loaded machine.
    world.sinks["slow.example"].behaviour = Behaviour(delay=2.0, mail_reply=(451, "4.3.0 slow"))
    mid = _claimed(world)
    for args in (("delete", "--yes", mid), ("hold", mid)):
        r = world.ctl("queue", *args)
        assert r.returncode == 1, args
        assert "being delivered right now by delivery worker" in r.stderr
        assert "--force" in r.stderr
    assert world.statuses() == {mid: "active"}
    r = world.ctl("queue", "hold", "--force", mid)
    # "... after its attempt ended", unless a loaded machine was slower than the attempt
    assert r.returncode == 0 and r.stdout.startswith(f"{mid}: held (was deferred)")
    [copy] = world.copies(mid)
    assert copy.parent.name == "hold"
    env = read_queue_file(str(copy))[0]
    assert env["attempt_count"] == 1 and env["recipients"][0]["status"] == "deferred"


def test_forced_delete_of_a_message_being_delivered(world: World) -> None:
    mid = _claimed(world)
    r = world.ctl("queue", "delete", "--yes", "--force", mid)
    assert r.returncode == 0
    # "(was deferred)" only if a loaded machine was slower than the attempt
    assert "deleted while worker" in r.stdout or "deleted (was deferred)" in r.stdout
    assert world.copies(mid) == []
    # The attempt ends (logged), then the worker's record of it meets the missing file.
    world.daemon.wait_for(lambda: f"{mid}: to=<carol@slow.example>" in world.daemon.log_text(),
                          10, "the end of the attempt")
    time.sleep(0.3)
    assert world.copies(mid) == [] and mid not in world.statuses()
    # The worker carries on with other mail.
    world.sinks["example.net"].behaviour = PRESETS["accept"]
    world.send("bob@example.net")
    world.sinks["example.net"].wait_for_messages(1, timeout=10)


def test_hold_and_delete_racing_many_attempts_leave_one_intact_copy(world: World) -> None:
    """Hold and forced deletes at arbitrary moments of real attempts: each message ends up
    exactly once (held, deferred) or nowhere (deleted), never twice, never unreadable."""
    world.sinks["slow.example"].behaviour = Behaviour(delay=0.05,
                                                      mail_reply=(451, "4.3.0 slow"))
    ids = world.send("carol@slow.example", 6)
    time.sleep(0.1)
    held, deleted = ids[:3], ids[3:]
    for mid in held:
        world.ctl("queue", "hold", "--force", "--wait", "20", mid)
    for mid in deleted:
        world.ctl("queue", "delete", "--yes", "--force", mid)
    time.sleep(1.0)
    for mid in held:
        copies = world.copies(mid)
        assert len(copies) == 1, (mid, copies)
        assert read_queue_file(str(copies[0]))[0]["id"] == mid
        assert copies[0].parent.name in ("hold", "deferred")
    for mid in deleted:
        assert world.copies(mid) == []


# -- without the daemon ----------------------------------------------------------------------
def test_commands_work_with_the_daemon_stopped(world: World) -> None:
    ids = world.deferred(2)
    assert world.daemon.stop() == 0
    assert world.statuses() == {ids[0]: "deferred", ids[1]: "deferred"}
    assert world.ctl("queue", "hold", ids[0]).returncode == 0
    assert world.ctl("queue", "release", ids[0]).returncode == 0
    assert world.ctl("queue", "delete", "--yes", ids[1]).returncode == 0
    assert world.ctl("queue", "view", ids[0]).returncode == 0
    assert world.statuses() == {ids[0]: "pending"}
    r = world.ctl("queue", "list", spool=str(world.spool))
    assert r.returncode == 0 and ids[0] in r.stdout


def test_mailq_prints_the_traditional_layout(world: World) -> None:
    ids = world.deferred(2)
    world.ctl("queue", "hold", ids[1])
    empath = str(REPO / ".venv" / "bin" / "empath")
    r = subprocess.run([empath, "mailq", "-c", str(world.daemon.config_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith("-Queue ID-") and "-Sender/Recipient-" in lines[0]
    assert lines[1].startswith(f"{ids[0]} ") and lines[1].endswith("alice@example.org")
    assert lines[2] == "(host 127.0.0.1 said: 451 4.3.0 try later)"
    assert lines[3].strip() == "bob@example.net"
    assert any(line.startswith(f"{ids[1]}!") for line in lines)
    assert lines[-1] == "-- 1 Kbytes in 2 Requests."


def test_empathctl_version() -> None:
    r = subprocess.run([EMPATHCTL, "version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("empath ") and "speedups" in r.stdout
