"""The master with real processes and real signals: children, respawn, requeue of a dead
worker's claims, reload without refused connections, stop, quit, log reopening, TTIN/TTOU,
heartbeats, boot failures and crash loops, orphaned children."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from empath.spool import Spool, new_message_id
from empath.spool.ids import shard_of
from empath.spool.submit import store_message
from tests.support.daemon import EmpathDaemon, wait_for
from tests.support.sink import PRESETS, SinkServer

Factory = Any


def title(pid: int) -> str:
    return " ".join(psutil.Process(pid).cmdline()).strip()


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def fake_role(tmp_path: Path, module: str, source: str | None) -> dict[str, str]:
    """Environment that replaces ``module`` in the daemon's processes: by a module built from
    ``source``, or (None) by an import failure. The master never imports the roles, so only
    the children see it."""
    directory = tmp_path / "fake_role"
    directory.mkdir(exist_ok=True)
    body = (f"import sys, types\n_m = types.ModuleType({module!r})\n"
            f"exec({source!r}, _m.__dict__)\nsys.modules[{module!r}] = _m\n"
            if source is not None else f"import sys\nsys.modules[{module!r}] = None\n")
    (directory / "sitecustomize.py").write_text(body)
    return {"PYTHONPATH": str(directory)}


def test_children_titles_and_status(daemon_factory: Factory) -> None:
    d: EmpathDaemon = daemon_factory()
    status = d.status()
    assert status is not None
    assert status["pid"] == d.master_pid and status["generation"] == 1
    assert status["config_file"] == str(d.config_path)
    assert isinstance(status["started_at"], float)
    assert d.port > 0 and status["listeners"] == [f"127.0.0.1:{d.port}"]
    assert title(d.master_pid) == "empath: master"
    kids = psutil.Process(d.master_pid).children()
    assert sorted(title(p.pid) for p in kids) == [
        "empath: delivery 1/1", "empath: receiver 1/2", "empath: receiver 2/2"]
    assert sorted(p.pid for p in kids) == d.child_pids()
    assert f"listening on 127.0.0.1:{d.port}" in d.log_text()
    with socket.create_connection(d.address, timeout=5) as conn:
        assert conn.recv(100).startswith(b"220")


def test_killed_child_is_replaced(daemon_factory: Factory) -> None:
    d: EmpathDaemon = daemon_factory()
    victim = next(c for c in d.children("receiver") if c["index"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    d.wait_for(lambda: victim["pid"] not in d.child_pids() and d.settled(), 10,
               "a replacement receiver")
    new = next(c for c in d.children("receiver") if c["index"] == 1)
    assert title(new["pid"]) == "empath: receiver 1/2"
    assert f"(pid {victim['pid']}), generation 1, killed by SIGKILL" in d.log_text()


def test_dead_delivery_workers_claims_go_back_to_incoming(daemon_factory: Factory) -> None:
    d: EmpathDaemon = daemon_factory(start=False)
    spool = Spool(str(d.spool_path))
    spool.create_tree()
    spool.set_frozen(True)  # so the replacement worker leaves the requeued file alone
    d.start()
    [worker] = d.child_pids("delivery")
    wait_for(lambda: os.path.isdir(spool.active_dir(worker)), 10, message="active/<pid>/")
    message_id = new_message_id()
    Path(spool.active_path(worker, message_id)).write_bytes(b"claimed, not finished\n")
    os.kill(worker, signal.SIGKILL)
    d.wait_for(lambda: message_id in spool.list_ids("incoming"), 10, "the requeued file")
    assert not os.path.exists(spool.active_dir(worker))
    d.wait_for(lambda: d.settled() and worker not in d.child_pids(), 10, "a new worker")


def _hammer(address: tuple[str, int], stop: threading.Event, results: dict[str, Any]) -> None:
    """Connect again and again, reading the greeting, until told to stop."""
    while not stop.is_set():
        try:
            with socket.create_connection(address, timeout=10) as conn:
                line = conn.recv(512)
            results["ok" if line[:3] in (b"220", b"421") else "other"].append(line[:40])
        except ConnectionRefusedError:
            results["refused"].append(time.monotonic())
        except OSError as exc:
            results["other"].append(repr(exc))


def test_reload_replaces_children_and_never_refuses_a_connection(
        daemon_factory: Factory) -> None:
    d: EmpathDaemon = daemon_factory()
    old_pids = set(d.child_pids())
    port = d.port
    results: dict[str, Any] = {"ok": [], "refused": [], "other": []}
    stop = threading.Event()
    threads = [threading.Thread(target=_hammer, args=(d.address, stop, results))
               for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        d.reload({"processes": {"receivers": 3, "delivery": 2}})
        d.wait_for(lambda: not old_pids & {p for p in old_pids if running(p)}, 15,
                   "the old generation to exit")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    status = d.status()
    assert status is not None and status["generation"] == 2
    assert len(d.children("receiver")) == 3 and len(d.children("delivery")) == 2
    assert not old_pids & set(d.child_pids())
    assert d.port == port
    assert results["refused"] == [], f"{len(results['refused'])} connections refused"
    assert results["other"] == []
    assert len(results["ok"]) > 20


def test_reload_adds_and_removes_a_listener(daemon_factory: Factory) -> None:
    d: EmpathDaemon = daemon_factory({"processes": {"receivers": 1}})
    first = d.address
    d.reload({"listeners": [{"address": "127.0.0.1:0"}, {"address": "127.0.0.2:0"}]})
    assert len(d.addresses()) == 2 and d.addresses()[0] == first
    second = d.addresses()[1]
    for address in (first, second):
        with socket.create_connection(address, timeout=5) as conn:
            assert conn.recv(100).startswith(b"220")
    d.reload({"listeners": [{"address": "127.0.0.1:0"}]})
    d.wait_for(lambda: "closed listener 127.0.0.2" in d.log_text(), 10, "the listener to close")
    assert d.addresses() == [first]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(second, timeout=5).close()


def test_reload_with_a_broken_config_keeps_everything(daemon_factory: Factory) -> None:
    d: EmpathDaemon = daemon_factory()
    pids = d.child_pids()
    d.write_config_text(d.config_path.read_text() + "processes: {receivers: zero}\n")
    d.signal(signal.SIGHUP)
    d.wait_for(lambda: "reload failed" in d.log_text(), 10, "the reload error")
    assert f"keeping the running configuration: {d.config_path}:" in d.log_text()
    time.sleep(0.5)
    assert d.child_pids() == pids
    status = d.status()
    assert status is not None and status["generation"] == 1


def test_sigterm_drains_and_removes_the_pidfile(daemon_factory: Factory) -> None:
    d: EmpathDaemon = daemon_factory()
    pids = d.child_pids()
    assert d.pidfile.read_text().strip() == str(d.master_pid)
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 4  # shutdown_timeout is 3s; idle children are faster
    assert not d.pidfile.exists() and not d.status_path.exists()
    assert not any(running(p) for p in pids)
    assert "exiting (status 0)" in d.log_text()


def test_sigterm_kills_children_that_outlive_shutdown_timeout(daemon_factory: Factory,
                                                              tmp_path: Path) -> None:
    env = fake_role(tmp_path, "empath.smtp.server", (
        "import time\n"
        "async def serve(ctx):\n"
        "    await ctx.stopping.wait()\n"
        "    time.sleep(60)  # blocks the event loop: only SIGKILL ends this\n"))
    d: EmpathDaemon = daemon_factory({"shutdown_timeout": "1s"}, start=False)
    d.start(env=env)
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 5
    assert "still running" in d.log_text() or "killing 2 children" in d.log_text()


def test_child_exits_by_itself_after_shutdown_timeout(daemon_factory: Factory,
                                                      tmp_path: Path) -> None:
    env = fake_role(tmp_path, "empath.smtp.server", (
        "import asyncio\n"
        "async def serve(ctx):\n"
        "    await asyncio.sleep(3600)  # ignores ctx.stopping\n"))
    d: EmpathDaemon = daemon_factory({"shutdown_timeout": "1s"}, start=False)
    d.start(env=env)
    assert d.stop() == 0
    log = d.log_text()
    assert "did not finish within 1s" in log
    assert "exited with status 4" in log


def test_sigquit_stops_at_once(daemon_factory: Factory) -> None:
    d: EmpathDaemon = daemon_factory()
    pids = d.child_pids()
    started = time.monotonic()
    d.signal(signal.SIGQUIT)
    assert d.wait_exit(10) == 0
    assert time.monotonic() - started < 3
    assert not any(running(p) for p in pids)
    assert not d.pidfile.exists()


def test_sigusr1_reopens_the_log_in_master_and_children(daemon_factory: Factory) -> None:
    d: EmpathDaemon = daemon_factory()
    rotated = d.log_path.with_name("empath.log.1")
    os.rename(d.log_path, rotated)
    d.signal(signal.SIGUSR1)
    d.wait_for(lambda: d.log_path.exists() and "reopened log files" in d.log_path.read_text(),
               10, "a new log file")
    time.sleep(0.3)
    d.signal(signal.SIGTTOU)  # receiver 2 logs its stop: into the new file, not the old one
    d.wait_for(lambda: "receiver 2/2 stopping" in d.log_path.read_text(), 10,
               "the child's line in the new log")
    assert "receiver 2/2 stopping" not in rotated.read_text()


def test_ttin_and_ttou_add_and_remove_receivers(daemon_factory: Factory) -> None:
    d: EmpathDaemon = daemon_factory()
    d.signal(signal.SIGTTIN)
    d.wait_settled(10, receivers=3)
    third = next(c for c in d.children("receiver") if c["index"] == 3)
    assert title(third["pid"]) == "empath: receiver 3/3"
    for _ in range(4):
        d.signal(signal.SIGTTOU)
        time.sleep(0.1)
    d.wait_settled(10, receivers=1)
    assert [c["index"] for c in d.children("receiver")] == [1]
    assert not running(third["pid"])


def test_children_exit_when_the_master_is_killed(daemon_factory: Factory) -> None:
    d: EmpathDaemon = daemon_factory()
    pids = d.child_pids()
    master = d.master_pid
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: not any(running(p) for p in pids), 6, message="orphans to exit")
    # The kernel told them (PR_SET_PDEATHSIG), not their once-a-second parent check.
    log = d.log_text()
    assert log.count("stopping (SIGTERM)") == len(pids), log
    assert f"master {master} is gone" not in log


def test_tmp_files_of_a_killed_child_are_swept(daemon_factory: Factory) -> None:
    d: EmpathDaemon = daemon_factory()
    victim = d.child_pids("receiver")[0]
    other = d.child_pids("receiver")[1]
    spool = Spool(str(d.spool_path))
    left = Path(spool.tmp_path(new_message_id(), victim))
    left.write_bytes(b"half a message")
    kept = Path(spool.tmp_path(new_message_id(), other))
    kept.write_bytes(b"a message being written")
    os.kill(victim, signal.SIGKILL)
    d.wait_for(lambda: not left.exists(), 10, "the dead receiver's tmp/ file to go")
    assert kept.exists()
    kept.unlink()


def test_silent_child_is_killed_and_replaced(daemon_factory: Factory) -> None:
    # 4 s: a replacement must beat within it even on a loaded machine (a child that starts
    # more slowly than the timeout is itself taken for silent and replaced again).
    d: EmpathDaemon = daemon_factory({"processes": {"heartbeat_timeout": "4s"}})
    victim = d.child_pids("receiver")[0]
    os.kill(victim, signal.SIGSTOP)
    d.wait_for(lambda: victim not in d.child_pids() and d.settled(), 30,
               "the silent child's replacement")
    assert f"(pid {victim}) silent for" in d.log_text()
    assert not running(victim)


def test_children_that_cannot_boot_halt_the_master(daemon_factory: Factory,
                                                   tmp_path: Path) -> None:
    d: EmpathDaemon = daemon_factory(start=False)
    d.start(wait=False, env=fake_role(tmp_path, "empath.smtp.server", None))
    assert d.wait_exit(20) == 3
    log = d.log_text()
    assert "receiver 1/2 cannot start" in log
    assert "receiver processes fail to start" in log and "halting" in log
    assert not d.pidfile.exists()


def test_reload_whose_children_cannot_start_goes_back(daemon_factory: Factory,
                                                      tmp_path: Path) -> None:
    marker = tmp_path / "broken"
    directory = tmp_path / "finder"
    directory.mkdir()
    # Children import their role after the fork: this finder breaks the receiver's import
    # only while the marker file exists, so only a later generation is affected.
    (directory / "sitecustomize.py").write_text(
        "import os, sys\n"
        "class BreakReceiver:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == 'empath.smtp.server' and os.path.exists({str(marker)!r}):\n"
        "            raise ImportError('broken on purpose')\n"
        "        return None\n"
        "sys.meta_path.insert(0, BreakReceiver())\n")
    d: EmpathDaemon = daemon_factory(start=False)
    d.start(env={"PYTHONPATH": str(directory)})
    pids = d.child_pids()
    marker.touch()
    d.reload({"processes": {"receivers": 3}}, wait=False)
    d.wait_for(lambda: "going back to the configuration of generation 1" in d.log_text(), 15,
               "the roll-back")
    d.wait_settled(15, receivers=2)
    assert d.child_pids() == pids
    status = d.status()
    assert status is not None and status["generation"] == 3
    assert d.proc is not None and d.proc.poll() is None
    marker.unlink()
    d.reload()
    assert len(d.children("receiver")) == 3 and not set(pids) & set(d.child_pids())


def test_crash_loop_backs_off(daemon_factory: Factory, tmp_path: Path) -> None:
    env = fake_role(tmp_path, "empath.smtp.server", (
        "async def serve(ctx):\n"
        "    raise RuntimeError('boom')\n"))
    d: EmpathDaemon = daemon_factory({"processes": {"receivers": 1}}, start=False)
    d.start(wait=False, env=env)
    time.sleep(3)
    log = d.log_text()
    starts = log.count("started receiver 1/1")
    assert 3 <= starts <= 8, starts  # backoff 0, 0.25, 0.5, 1, 2 s: not hundreds
    assert "RuntimeError: boom" in log and "restarting receiver 1" in log
    assert d.proc is not None and d.proc.poll() is None
    # The backoff itself is tested on a fake clock (tests/unit/test_respawn.py); here, the
    # count of starts shows the master does not respawn in a busy loop.


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_privileges_drop_in_a_forked_process(tmp_path: Path) -> None:
    from empath.master import privileges

    spool = tmp_path / "spool"
    (spool / "incoming").mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "empath.pid").write_text("1\n")
    ident = privileges.lookup("nobody", None)
    assert ident is not None
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            privileges.hand_over(ident, str(spool), [str(run / "empath.pid")])
            privileges.drop(ident)
            os.write(write_fd, f"{os.getuid()} {os.getgid()} {os.getgroups()}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    result = os.read(read_fd, 200).decode()
    os.waitpid(pid, 0)
    assert result.startswith(f"{ident.uid} {ident.gid} ")
    for path in (spool, spool / "incoming", run, run / "empath.pid"):
        assert (path.stat().st_uid, path.stat().st_gid) == (ident.uid, ident.gid)
    assert tmp_path.stat().st_uid == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_hand_over_changes_only_queue_files_not_yet_the_users(tmp_path: Path) -> None:
    """A restart finds a big queue already the user's: those files are only looked at (no
    chown, so their ctime stays), while a file root wrote, or one with root's group, is
    handed over."""
    from empath.master import privileges

    ident = privileges.lookup("nobody", None)
    assert ident is not None
    deferred = tmp_path / "spool" / "deferred"
    deferred.mkdir(parents=True)
    theirs, roots, half = (deferred / n for n in ("theirs", "roots", "half"))
    for path in (theirs, roots, half):
        path.write_bytes(b"x")
    os.chown(theirs, ident.uid, ident.gid)
    os.chown(half, ident.uid, 0)
    before = theirs.stat().st_ctime_ns
    time.sleep(0.05)
    privileges.hand_over(ident, str(tmp_path / "spool"), [])
    assert theirs.stat().st_ctime_ns == before
    for path in (theirs, roots, half):
        assert (path.stat().st_uid, path.stat().st_gid) == (ident.uid, ident.gid)


def _readable_as_nobody(paths: list[str]) -> bool:
    probe = subprocess.run(
        ["su", "nobody", "-s", "/bin/sh", "-c",
         " && ".join(f"test -r '{p}'" for p in paths)], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_runs_as_the_configured_user(daemon_factory: Factory) -> None:
    # The master imports the children's code before the switch, so this works even where
    # the Python installation is not readable by the user (an interpreter under /root).
    base = Path(tempfile.mkdtemp(prefix="empath-user-"))
    stack = contextlib.ExitStack()
    try:
        base.chmod(0o755)
        mail = base / "mail"
        mail.mkdir()
        os.chown(mail, 65534, 65534)
        # The bounce: a next hop that refuses the recipient (a local name Maildir cannot
        # use is refused at RCPT now, before any bounce).
        sink = SinkServer(PRESETS["reject-mail"]).start()
        stack.callback(sink.stop)
        d: EmpathDaemon = daemon_factory({"user": "nobody", "pidfile": str(base / "run/e.pid"),
                                          "spool": {"path": str(base / "spool")},
                                          "log": {"file": str(base / "log/empath.log")},
                                          "local_delivery": {"maildir_root": str(mail)},
                                          "delivery": {"domains": {"refusing.test": {
                                              "mx_override": f"127.0.0.1:{sink.port}"}}}})
        for pid in [d.master_pid, *d.child_pids()]:
            assert psutil.Process(pid).uids().effective == 65534
        assert (base / "spool" / "incoming").stat().st_uid == 65534
        with socket.create_connection(d.address, timeout=5) as conn:
            assert conn.recv(100).startswith(b"220")
        # The whole path works as the user: receipt, spool, delivery to a Maildir, and a
        # bounce (a refused recipient) built and delivered back to the sender.
        with d.smtp() as s:
            s.sendmail("carol@localhost", ["alice@localhost", "no-such@refusing.test"],
                       b"Subject: as nobody\r\n\r\nbody\r\n")
        d.wait_for(lambda: len(list((mail / "alice" / "new").glob("*"))) == 1
                   and len(list((mail / "carol" / "new").glob("*"))) == 1, 30,
                   message="the message and the bounce")
        assert (mail / "alice").stat().st_uid == 65534
        bounce = next((mail / "carol" / "new").iterdir()).read_bytes()
        assert b"multipart/report" in bounce and b"no-such@refusing.test" in bounce
        assert d.stop() == 0
        assert not (base / "run" / "e.pid").exists()
    finally:
        stack.close()
        shutil.rmtree(base, ignore_errors=True)


def test_unknown_user_is_a_start_up_error(daemon_factory: Factory) -> None:
    d: EmpathDaemon = daemon_factory({"user": "no-such-user-here"}, start=False)
    d.start(wait=False)
    assert d.wait_exit(10) == 1
    assert "no such user 'no-such-user-here'" in d.log_text()


def _relay_to(sink: SinkServer) -> dict[str, Any]:
    """One receiver and two delivery workers relaying everything to ``sink``."""
    return {"processes": {"receivers": 1, "delivery": 2},
            "delivery": {"smarthost": f"127.0.0.1:{sink.port}",
                         "tls": {"default_policy": "disabled"}}}


def _share_worker(d: EmpathDaemon, spool: Spool, share: int) -> tuple[int, str] | None:
    """(pid, wake socket) of the running delivery worker of ``share`` (of 2)."""
    for path, found in spool.wake_sockets():
        pid = int(os.path.basename(path).partition(".")[0])
        if found == (share, 2) and pid in d.child_pids("delivery"):
            return pid, path
    return None


def test_a_replaced_delivery_worker_is_woken_for_its_share_at_once(
        daemon_factory: Factory) -> None:
    """Receivers wake only the worker whose share holds a message, reading the list of worker
    sockets every two seconds. A worker killed leaves its socket behind; the master removes
    it when it reaps the worker, a receiver that finds it gone (or refusing) reads the list
    again at once, and the replacement is woken for its first message instead of that message
    waiting for the ten-second scan."""
    with SinkServer() as sink:
        d: EmpathDaemon = daemon_factory(_relay_to(sink))
        spool = Spool(str(d.spool_path))
        wait_for(lambda: _share_worker(d, spool, 0), 30, message="worker 0's socket")
        old = _share_worker(d, spool, 0)
        assert old is not None
        with d.smtp() as s:  # the receiver has read the list of sockets, with the old one
            s.sendmail("a@example.org", ["b@example.net"], b"Subject: first\r\n\r\nx\r\n")
        sink.wait_for_messages(1, timeout=30)
        os.kill(old[0], signal.SIGKILL)
        wait_for(lambda: (_share_worker(d, spool, 0) or old)[0] != old[0], 30,
                 message="the replacement's socket")
        wait_for(lambda: not os.path.exists(old[1]), 30, message="the old socket removed")
        delays = []
        with d.smtp() as s:
            s.ehlo()
            while len(delays) < 4:  # four messages of share 0
                count = len(sink.messages)  # before: the delivery may beat the next line
                assert s.mail("a@example.org")[0] == 250
                assert s.rcpt("b@example.net")[0] == 250
                code, text = s.data(b"Subject: after\r\n\r\nx\r\n")
                assert code == 250
                accepted = time.monotonic()
                wait_for(lambda: len(sink.messages) > count, 30, message="delivery")
                if shard_of(text.decode().rsplit(" ", 1)[1], 2) == 0:
                    delays.append(time.monotonic() - accepted)
        assert max(delays) < 3.0, delays  # the scan would take 10 s


def test_a_dead_workers_claims_are_delivered_by_the_other_worker_at_once(
        daemon_factory: Factory) -> None:
    """The master requeues a dead worker's claims into incoming/ and wakes every worker: a
    claim of the other worker's share goes out at once, not at that worker's next scan
    (queue_scan_interval, 10 s) nor after the replacement's two-second grace for it."""
    with SinkServer() as sink:
        d: EmpathDaemon = daemon_factory(_relay_to(sink))
        spool = Spool(str(d.spool_path))
        wait_for(lambda: None not in (_share_worker(d, spool, 0), _share_worker(d, spool, 1)),
                 30, message="both workers' sockets")
        found = _share_worker(d, spool, 0)
        assert found is not None
        victim = found[0]
        message_id = next(i for i in iter(new_message_id, None) if shard_of(i, 2) == 1)
        spool.set_frozen(True)  # written and moved without a worker taking it
        time.sleep(0.2)
        store_message(spool, b"Subject: claimed\r\n\r\nx\r\n", {
            "id": message_id, "sender": "a@example.org", "params": {},
            "recipients": [{"address": "b@example.net", "orcpt": None, "notify": None}]},
            wake=False)
        os.rename(spool.path("incoming", message_id), spool.active_path(victim, message_id))
        spool.set_frozen(False)  # by hand: no wake-up
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        [got] = sink.wait_for_messages(1, timeout=15)
        assert time.monotonic() - killed < 1.5
        assert b"Subject: claimed" in got.data


def test_idle_delivery_workers_sleep(daemon_factory: Factory) -> None:
    """With nothing to do, a delivery worker sleeps until a wake-up, a due time or its scan
    interval: it listed incoming/ every 50 ms (20 wake-ups a second each, for nothing)."""
    d: EmpathDaemon = daemon_factory({"processes": {"receivers": 1, "delivery": 2}})
    time.sleep(1.0)

    def switches(pid: int) -> int:
        return int(psutil.Process(pid).num_ctx_switches().voluntary)

    workers = d.child_pids("delivery")
    before = {pid: switches(pid) for pid in workers}
    time.sleep(3.0)
    rates = {pid: (switches(pid) - before[pid]) / 3.0 for pid in workers}
    assert all(rate < 5 for rate in rates.values()), rates
