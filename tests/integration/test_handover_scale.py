"""The start-up hand-over of the spool to ``user`` at scale, through the real daemon run as root:
a start walks the queue files only when the stamp of the last hand-over does not hold
(empath/master/privileges.py), and every way a file not the user's can reach the spool still
ends with the file the user's and its mail delivered: a spool left by a run as root without
``user``, ``empath sendmail`` run as root, and a file root put there behind the daemon's back
(left where it is by the delivery worker, handed over by ``empathctl spool set-permissions``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from empath.master.privileges import read_stamp
from empath.spool import Spool
from tests.integration.test_faults import (  # noqa: F401 (fixture)
    WAIT,
    deferred_message,
    delivered,
    overrides,
    sink,
)
from tests.support.daemon import REPO, EmpathDaemon, deep_merge
from tests.support.fixtures import DaemonFactory, daemon_factory  # noqa: F401 (fixture)
from tests.support.seed import seed_deferred
from tests.support.sink import SinkServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")

EMPATH = str(REPO / ".venv" / "bin" / "empath")
EMPATHCTL = str(REPO / ".venv" / "bin" / "empathctl")
NOBODY = 65534
STAMP = f"{NOBODY}:{NOBODY}"


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory under /tmp that "nobody" can reach (pytest's own is private to root).
    Asked for first, so that it is removed after the daemons are killed."""
    path = Path(tempfile.mkdtemp(prefix="empath-handover-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(sink: SinkServer, base: Path, **delivery: Any) -> dict[str, Any]:  # noqa: F811
    return {**overrides(sink, base / "spool", **delivery), "user": "nobody",
            "pidfile": str(base / "run" / "empath.pid"),
            "log": {"file": str(base / "log" / "empath.log")}}


def restart(d: EmpathDaemon) -> None:
    assert d.stop() == 0
    d.proc = None
    d.start()


def owner(path: str) -> int:
    return os.lstat(path).st_uid


def test_a_spool_left_by_a_run_as_root_is_handed_over_and_its_mail_delivered(
        base: Path, daemon_factory: DaemonFactory, sink: SinkServer) -> None:  # noqa: F811
    d = daemon_factory(as_nobody(sink, base))
    spool = Spool(str(base / "spool"))
    assert read_stamp(spool.handed_over) == STAMP
    assert d.stop() == 0
    # The same spool run by root without `user`, delivery frozen: the message it accepts
    # stays in incoming/, root's.
    spool.set_frozen(True)
    # (recycle_files 0: a receiver overwrites no file of the earlier run, still the user's.)
    r = daemon_factory(deep_merge(overrides(sink, base / "spool"),
                                  {"spool": {"recycle_files": 0}}))
    assert f"the stamp of the hand-over to {STAMP} is removed" in r.log_text()
    assert not os.path.exists(spool.handed_over)
    with r.smtp() as client:
        client.sendmail("sender@client.test", ["rcpt@remote.test"],
                        b"Subject: left by root\r\n\r\nHello.\r\n")
    queued = spool.list_ids("incoming")
    assert len(queued) == 1 and owner(spool.path("incoming", queued[0])) == 0
    assert r.stop() == 0
    spool.set_frozen(False)
    # Back to `user`: no stamp, so the start walks the queue and the message is delivered.
    d.proc = None
    d.start()
    assert f"no stamp of a hand-over to {STAMP}" in d.log_text()
    d.wait_for(lambda: len(delivered(sink, "left by root")) == 1, WAIT, "the delivery")
    assert read_stamp(spool.handed_over) == STAMP
    assert "is owned by uid" not in d.log_text()


def test_a_restart_with_the_stamp_walks_no_queue_file(
        base: Path, daemon_factory: DaemonFactory, sink: SinkServer) -> None:  # noqa: F811
    spool = Spool(str(base / "spool"))
    seed_deferred(spool, 20000, time.time() + 86400)  # written by root, due in a day
    # (A due time beyond the longest retry delay would count as set by a clock gone wrong.)
    d = daemon_factory(as_nobody(sink, base, retry_max_delay="2d"))
    log = d.log_text()
    assert "spool handed over to nobody" in log and " 20000 file(s) were not the user's" in log
    some = spool.list_ids("deferred")
    assert len(some) == 20000 and {owner(spool.path("deferred", i)) for i in some} == {NOBODY}
    assert read_stamp(spool.handed_over) == STAMP
    assert d.stop() == 0
    # Root puts a due message in deferred/ behind the daemon's back (a restore from a
    # backup). The stamp holds, so the next start does not walk deferred/: the file stays
    # root's (the observable sign that no queue file was looked at), and the delivery worker
    # leaves it where it is rather than take it for a corrupt file.
    planted = deferred_message(spool, "restored by root", time.time() - 1)
    path = spool.path("deferred", planted)
    os.chown(path, 0, 0)  # as a copy made by root is
    d.proc = None
    d.start()
    assert "queue files not walked" in d.log_text()
    d.wait_for(lambda: f"deferred/{planted} is owned by uid 0" in d.log_text(), WAIT,
               "the worker's report of the file it cannot use")
    assert owner(path) == 0 and os.path.exists(path)
    assert not os.listdir(base / "spool" / "corrupt")
    assert not delivered(sink, "restored by root")
    # ... and removes the stamp, so the next start as root would walk the queue again.
    assert not os.path.exists(spool.handed_over)
    # Links the unprivileged user plants for root's walk are still never followed.
    victim = base / "victim"
    victim.write_text("someone else's\n")
    os.chown(victim, 4242, 4242)
    os.link(victim, spool.path("hold", "1" * 26))
    os.symlink(victim, spool.path("hold", "2" * 26))
    # The operator hands the spool over without a restart (delivery frozen meanwhile, only
    # so that the stamp it writes is seen before the worker's next look); then it delivers.
    spool.set_frozen(True)
    time.sleep(0.5)  # a claim already begun ends (its removal of the stamp included)
    done = subprocess.run([EMPATHCTL, "spool", "set-permissions", "-c", str(d.config_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "handed over to nobody" in done.stdout and "1 file(s) were not" in done.stdout
    assert "has 2 hard links; left owned by uid 4242" in done.stderr
    assert owner(str(victim)) == 4242 and owner(path) == NOBODY
    assert read_stamp(spool.handed_over) == STAMP
    spool.set_frozen(False)
    d.wait_for(lambda: len(delivered(sink, "restored by root")) == 1, WAIT, "the delivery")
    assert not os.listdir(base / "spool" / "corrupt")


def test_sendmail_run_as_root_queues_a_file_the_user_can_deliver(
        base: Path, daemon_factory: DaemonFactory, sink: SinkServer) -> None:  # noqa: F811
    d = daemon_factory(as_nobody(sink, base))
    spool = Spool(str(base / "spool"))
    spool.set_frozen(True)  # to see the file before a worker takes it
    r = subprocess.run([EMPATH, "sendmail", "-C", str(d.config_path), "rcpt@remote.test"],
                       input=b"Subject: from root's cron\n\nHello.\n", capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    queued = spool.list_ids("incoming")
    assert len(queued) == 1
    st = os.lstat(spool.path("incoming", queued[0]))
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    spool.set_frozen(False)
    d.wait_for(lambda: len(delivered(sink, "from root's cron")) == 1, WAIT, "the delivery")
    # Nothing for the next start to hand over: the stamp still holds.
    assert read_stamp(spool.handed_over) == STAMP
    restart(d)
    assert d.log_text().count("queue files not walked") == 1


def refused_with_link(base: Path, daemon_factory: DaemonFactory, sink: SinkServer,  # noqa: F811
                      state: str, victim: Path) -> tuple[Spool, EmpathDaemon]:
    """The spool with its directory ``state`` replaced by a link to ``victim``, as the user
    could leave it: a start as root with ``user`` exits 1 naming the directory."""
    spool = Spool(str(base / "spool"))
    spool.create_tree()
    shutil.rmtree(os.path.join(spool.root, state))
    os.symlink(victim, os.path.join(spool.root, state))
    d = daemon_factory(as_nobody(sink, base), start=False)
    d.start(wait=False)
    assert d.wait_exit(30) == 1
    assert f"{os.path.join(spool.root, state)}: not a directory (a symlink?)" in d.log_text()
    return spool, d


def test_a_control_directory_replaced_by_a_symlink_leads_the_hand_over_nowhere(
        base: Path, daemon_factory: DaemonFactory, sink: SinkServer) -> None:  # noqa: F811
    # The unprivileged user owns the spool: before a restart as root it can replace control/
    # with a link to a directory of someone else, hoping root chowns control/wake/ or writes
    # the stamp (or control/boot) there. The master refuses the tampered spool, naming it.
    victim = base / "victim"
    for path in (victim, victim / "wake", victim / "auth-failures"):
        path.mkdir()
    (victim / "counts").write_text("someone else's\n")
    for path in (victim, victim / "wake", victim / "auth-failures", victim / "counts"):
        os.chown(path, 4244, 4244)
    refused_with_link(base, daemon_factory, sink, "control", victim)
    assert not (victim / "handed-over").exists() and not (victim / "boot").exists()
    for path in (victim, victim / "wake", victim / "auth-failures", victim / "counts"):
        assert owner(str(path)) == 4244, path
    assert not [p for p in victim.iterdir() if owner(str(p)) == NOBODY]


def test_a_spool_directory_replaced_by_a_symlink_is_refused_and_nothing_removed_there(
        base: Path, daemon_factory: DaemonFactory, sink: SinkServer) -> None:  # noqa: F811
    """The user replaces tmp/ with a link to a directory of root's: start-up recovery sweeps
    tmp/ of files no live process writes (any name not "<pid>-..."), so root running it
    through the link would remove that directory's files. The master refuses the spool
    before anything is recovered, and recovery runs as the user anyway (after the switch)."""
    victim = base / "victim"
    victim.mkdir()
    (victim / "passwd").write_text("root:x:0:0\n")
    (victim / "shadow").write_text("root:*:1::::::\n")
    spool, d = refused_with_link(base, daemon_factory, sink, "tmp", victim)
    assert sorted(p.name for p in victim.iterdir()) == ["passwd", "shadow"]
    # Put right, the same spool starts, handed over, and takes mail.
    os.unlink(spool.tmp)
    d.proc = None
    d.start()
    assert owner(spool.tmp) == NOBODY
    with d.smtp() as s:
        assert s.sendmail("a@example.org", ["rcpt@example.net"], b"Subject: x\r\n\r\nx\r\n") == {}

def test_empathctl_as_root_acts_as_the_spools_owner(
        base: Path, daemon_factory: DaemonFactory, sink: SinkServer) -> None:  # noqa: F811
    """Root runs queue commands on the spool the daemon's user owns. That user may have
    replaced control/ with a link to a directory of root's, hoping `queue freeze` creates a
    file there as root: empathctl becomes the owner first, so the link leads nowhere it could
    not go already; on an intact spool the flag is the owner's."""
    d = daemon_factory(as_nobody(sink, base))
    spool = Spool(str(base / "spool"))
    config = str(d.config_path)
    os.chmod(config, 0o600)  # root's only: read before empathctl acts as the owner
    frozen = subprocess.run([EMPATHCTL, "queue", "freeze", "-c", config],
                            capture_output=True, text=True, timeout=60)
    assert frozen.returncode == 0, frozen.stderr
    assert owner(spool.freeze_flag) == NOBODY
    stats = subprocess.run([EMPATHCTL, "queue", "stats", "-c", config],
                           capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert d.stop() == 0
    victim = base / "victim"
    victim.mkdir()
    victim.chmod(0o755)  # root's: nobody may look, not write
    shutil.rmtree(spool.control)
    os.symlink(victim, spool.control)
    planted = subprocess.run([EMPATHCTL, "queue", "freeze", "--spool", spool.root],
                             capture_output=True, text=True, timeout=60)
    assert planted.returncode != 0 and "permission denied" in planted.stderr, planted.stderr
    assert list(victim.iterdir()) == []
