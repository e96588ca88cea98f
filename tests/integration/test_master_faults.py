"""The master under faults injected for real: a read-only spool, a log directory moved away, a
full log file system, reloads with an unopenable log file, a broken certificate or a key that
does not match, new children that die before they are ready, claims whose pid was reused, and
planted links in the spool at start-up (docs/RELIABILITY.md, docs/SECURITY.md).

Faults are file systems the test mounts (tmpfs, remounted read-only or filled up) and processes
it starts; the tests run as root, where permission bits stop nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from empath.spool import Spool
from tests.integration.test_faults import (  # noqa: F401 (fixtures)
    WAIT,
    Mounts,
    deferred_message,
    delivered,
    fill,
    mounts,
    overrides,
    queued,
    send,
    sink,
)
from tests.support.certs import make_self_signed
from tests.support.daemon import EmpathDaemon, empath_command
from tests.support.fixtures import DaemonFactory
from tests.support.sink import SinkServer


def master_alive(d: EmpathDaemon) -> bool:
    return d.proc is not None and d.proc.poll() is None


def greets(d: EmpathDaemon) -> bool:
    with socket.create_connection(d.address, timeout=10) as conn:
        return conn.recv(100).startswith(b"220")


def accepts_a_message(d: EmpathDaemon, subject: str = "still serving",
                      tls: bool = False) -> None:
    with d.smtp() as client:
        client.ehlo("client.test")
        if tls:
            import ssl

            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            client.starttls(context=ctx)
            client.ehlo("client.test")
        client.sendmail("sender@client.test", ["alice@localhost"],
                        f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def empath(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*empath_command(), *args], capture_output=True, text=True,
                          timeout=60)


class ClaimHolder:
    """A process that owns ``active/<its pid>/`` as a delivery worker does (flock on the
    directory) until it is killed."""

    CODE = ("import fcntl, os, sys, time\n"
            "d = os.path.join(sys.argv[1], str(os.getpid()))\n"
            "os.makedirs(d, exist_ok=True)\n"
            "fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(300)\n")

    def __init__(self, spool: Spool) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, spool.active],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"
        self.pid = self.proc.pid

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not ours to signal, with "empath" in its command line (sleep,
    exec'd with argv[0] "empath")."""
    proc = subprocess.Popen(["empath", "300"], executable="/bin/sleep")
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


# -- A: file system and logging errors ---------------------------------------------------------
def test_requeue_on_a_read_only_spool_is_retried_and_the_master_keeps_serving(
        daemon_factory: DaemonFactory, sink: SinkServer,  # noqa: F811 (fixture)
        mounts: Mounts, tmp_path: Path) -> None:  # noqa: F811 (fixture)
    fs = mounts.tmpfs(tmp_path / "spoolfs", size="8m")
    spool = Spool(str(fs / "spool"))
    spool.create_tree()
    holder = ClaimHolder(spool)
    try:
        queue_id = deferred_message(spool, "claimed when ro", time.time() - 1)
        os.rename(spool.path("deferred", queue_id), spool.active_path(holder.pid, queue_id))
        d = daemon_factory(overrides(sink, fs / "spool"))
        # Its owner holds the lock: the claim is left alone, though no child of ours has it.
        time.sleep(1)
        assert os.path.exists(spool.active_path(holder.pid, queue_id))
        remount(fs, "ro")
        holder.kill()  # the owner is gone; requeueing it now fails with EROFS
        d.wait_for(lambda: f"cannot requeue the claims of delivery worker {holder.pid}: "
                   "Read-only file system" in d.log_text(), 20, "the failed requeue")
        time.sleep(5)  # two more retries, at least
        assert master_alive(d) and greets(d)
        assert d.status() is not None and d.status()["pid"] == d.master_pid  # type: ignore[index]
        assert d.log_text().count("cannot requeue the claims") == 1  # rate-limited
        assert os.path.exists(spool.active_path(holder.pid, queue_id))  # nothing lost
        remount(fs, "rw")
        d.wait_for(lambda: len(delivered(sink, "claimed when ro")) == 1, WAIT,
                   "delivery once the spool is writable again")
        d.wait_for(lambda: not queued(spool), WAIT, "an empty spool")
        time.sleep(1)
        assert len(delivered(sink, "claimed when ro")) == 1
        assert master_alive(d)
    finally:
        if holder.proc.poll() is None:
            holder.kill()
        subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=False)


def test_sigusr1_with_the_log_directory_moved_away_keeps_the_old_stream(
        daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    moved = d.log_path.parent.with_name("log.moved")
    os.rename(d.log_path.parent, moved)
    d.signal(signal.SIGUSR1)
    old = moved / d.log_path.name
    d.wait_for(lambda: "cannot reopen the log file" in old.read_text(errors="replace"), 10,
               "the report in the old log file")
    assert "cannot reopen the log file" in d.output_path.read_text()  # standard error
    assert master_alive(d) and greets(d)
    accepts_a_message(d)
    d.wait_for(lambda: "from=<sender@client.test>" in old.read_text(), 10,
               "later lines in the old file")
    assert not d.log_path.parent.exists()
    assert d.stop() == 0


def test_sigusr1_on_a_full_log_file_system_keeps_serving(
        daemon_factory: DaemonFactory, mounts: Mounts) -> None:  # noqa: F811 (fixture)
    d = daemon_factory(start=False)
    logfs = mounts.tmpfs(d.log_path.parent, size="1m")
    d.start()
    ballast = fill(logfs)
    os.rename(d.log_path, d.log_path.with_suffix(".1"))  # a rotation
    d.signal(signal.SIGUSR1)
    accepts_a_message(d, "on a full log disk")
    d.wait_for(lambda: "cannot write the log file" in d.output_path.read_text(), 10,
               "the write failure on standard error")
    assert master_alive(d) and greets(d)
    accepts_a_message(d, "second one")
    assert d.output_path.read_text().count("cannot write the log file") <= 4  # not per line
    ballast.unlink()
    accepts_a_message(d, "after space came back")
    d.wait_for(lambda: "from=<sender@client.test>" in d.log_path.read_text(), 10,
               "lines in the new log file once there is space")
    assert d.stop() == 0


def test_reload_whose_log_file_cannot_be_opened_is_refused(
        daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    d = daemon_factory({"health": {"listen_addr": "127.0.0.1:0"}})
    log_path = d.log_path
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the log directory should be\n")
    d.reload({"log": {"file": str(blocker / "empath.log")}}, wait=False)
    d.wait_for(lambda: (d.status() or {}).get("last_reload"), 10, "the reload's outcome")
    last = d.status()["last_reload"]  # type: ignore[index]
    assert last["ok"] is False and "log.file" in last["error"]
    assert "reload failed, keeping the running configuration: log.file" in log_path.read_text()
    assert d.status()["generation"] == 1  # type: ignore[index]
    assert master_alive(d) and greets(d)
    check = empath("check-config", "-c", str(d.config_path))
    assert check.returncode == 1 and "log.file: cannot open" in check.stderr
    status = empath("status", "-c", str(d.config_path))
    assert status.returncode == 0 and "last reload: FAILED" in status.stdout
    health = d.status()["admin_listeners"]["health"]  # type: ignore[index]
    with urllib.request.urlopen(f"http://{health}/health/detailed", timeout=10) as resp:
        detailed = json.loads(resp.read())
    assert detailed["master"]["last_reload"]["ok"] is False
    assert "log.file" in detailed["master"]["last_reload"]["error"]


@pytest.mark.parametrize("command", ["run", "start"])
def test_start_with_a_log_file_that_cannot_be_opened_is_refused(
        daemon_factory: DaemonFactory, tmp_path: Path, command: str) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the log directory should be\n")
    d = daemon_factory({"log": {"file": str(blocker / "empath.log")}}, start=False)
    result = empath(command, "-c", str(d.config_path))
    assert result.returncode == 1
    assert (f"log.file: cannot open {blocker / 'empath.log'}: {blocker} is not a directory"
            in result.stderr)
    assert not d.pidfile.exists() and not d.status_path.exists()


# -- B: reloads validated end to end -----------------------------------------------------------
def _tls_daemon(daemon_factory: DaemonFactory, tmp_path: Path) -> tuple[EmpathDaemon, Any]:
    pair = make_self_signed(tmp_path / "certs", "test.empath")
    d = daemon_factory({"listeners": [{"address": "127.0.0.1:0",
                                       "tls": {"cert": pair.cert_path, "key": pair.key_path}}]})
    return d, pair


@pytest.mark.parametrize("fault", ["unparsable certificate", "mismatched key"])
def test_reload_with_a_broken_certificate_is_refused_and_smtp_keeps_answering(
        daemon_factory: DaemonFactory, tmp_path: Path, fault: str) -> None:
    d, pair = _tls_daemon(daemon_factory, tmp_path)
    pids = d.child_pids()
    if fault == "unparsable certificate":
        Path(pair.cert_path).write_text("-----BEGIN CERTIFICATE-----\nnot base64\n"
                                        "-----END CERTIFICATE-----\n")
    else:  # a renewal whose key is another one
        other = make_self_signed(tmp_path / "other", "test.empath")
        os.replace(other.key_path, pair.key_path)
    d.signal(signal.SIGHUP)
    d.wait_for(lambda: ((d.status() or {}).get("last_reload") or {}).get("ok") is False, 10,
               "the refused reload")
    error = d.status()["last_reload"]["error"]  # type: ignore[index]
    assert "listeners[0].tls" in error
    if fault == "mismatched key":
        assert "does not belong to the certificate" in error
    assert d.child_pids() == pids and d.status()["generation"] == 1  # type: ignore[index]
    assert greets(d)
    accepts_a_message(d, "after a refused reload", tls=True)
    status = empath("status", "-c", str(d.config_path))
    assert "last reload: FAILED" in status.stdout and "listeners[0].tls" in status.stdout
    check = empath("check-config", "-c", str(d.config_path))
    assert check.returncode == 1 and "listeners[0].tls" in check.stderr


def test_reload_with_an_unparsable_dkim_key_is_refused(daemon_factory: DaemonFactory,
                                                         tmp_path: Path) -> None:
    d = daemon_factory()
    key = tmp_path / "example.org.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    d.reload({"dkim": {"domains": {"example.org": {"selector": "s1", "key": str(key)}}}},
             wait=False)
    d.wait_for(lambda: ((d.status() or {}).get("last_reload") or {}).get("ok") is False, 10,
               "the refused reload")
    error = d.status()["last_reload"]["error"]  # type: ignore[index]
    assert "dkim.domains.example.org.key" in error and "not a usable private key" in error
    assert d.status()["generation"] == 1  # type: ignore[index]
    accepts_a_message(d, "after a refused dkim reload")


def test_check_config_loads_certificates_and_warns_an_unprivileged_user_it_cannot(
        tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="empath-check-"))
    try:
        base.chmod(0o755)
        pair = make_self_signed(base, "test.empath")
        os.chmod(pair.cert_path, 0o644)
        os.chmod(pair.key_path, 0o600)  # root's: the daemon reads it before dropping privileges
        files = EmpathDaemon(base / "d", {
            "listeners": [{"address": "127.0.0.1:0",
                           "tls": {"cert": pair.cert_path, "key": pair.key_path}}]})
        os.chmod(base / "d", 0o755)
        os.chmod(files.config_path, 0o644)
        as_root = empath("check-config", "-c", str(files.config_path))
        assert as_root.returncode == 0 and as_root.stdout.splitlines()[-1] == "ok"
        assert "Permission denied" not in as_root.stdout + as_root.stderr
        as_nobody = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             *empath_command(), "check-config", "-c", str(files.config_path)],
            capture_output=True, text=True, timeout=60)
        assert as_nobody.returncode == 0, as_nobody.stderr
        assert "listeners[0].tls: cannot read" in as_nobody.stdout
        assert "Permission denied (checked as uid 65534" in as_nobody.stdout
        Path(pair.cert_path).write_text("not a certificate\n")
        broken = empath("check-config", "-c", str(files.config_path))
        assert broken.returncode == 1 and "listeners[0].tls.cert" in broken.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("how", ["exit 1", "SIGKILL"])
def test_new_receivers_that_die_before_ready_roll_the_reload_back(
        daemon_factory: DaemonFactory, tmp_path: Path, how: str) -> None:
    marker = tmp_path / "broken"
    finder = tmp_path / "finder"
    finder.mkdir()
    # Only receivers that import their role while the marker exists (a later generation)
    # die before their first heartbeat: with status 1, or killed.
    die = ("raise RuntimeError('cannot start on purpose')" if how == "exit 1"
           else "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    (finder / "sitecustomize.py").write_text(
        "import os, sys, importlib.abc\n"
        "class Break(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name != 'empath.smtp.server' or not os.path.exists({str(marker)!r}):\n"
        "            return None\n"
        "        for other in sys.meta_path:\n"
        "            spec = None if other is self else other.find_spec(name, path, target)\n"
        "            if spec is not None:\n"
        "                break\n"
        "        real = spec.loader.exec_module\n"
        "        def exec_module(module):\n"
        "            real(module)\n"
        "            async def serve(ctx):\n"
        f"                {die}\n"
        "            module.serve = serve\n"
        "        spec.loader.exec_module = exec_module\n"
        "        return spec\n"
        "sys.meta_path.insert(0, Break())\n")
    d = daemon_factory(start=False)
    d.start(env={"PYTHONPATH": str(finder)})
    pids = d.child_pids()
    marker.touch()
    d.reload({"processes": {"receivers": 3}}, wait=False)
    d.wait_for(lambda: "going back to the configuration of generation 1" in d.log_text(), 20,
               "the roll-back")
    assert "before it was ready" in d.log_text()
    d.wait_settled(20, receivers=2)
    assert d.child_pids() == pids
    last = d.status()["last_reload"]  # type: ignore[index]
    assert last["ok"] is False and "before it was ready" in last["error"]
    assert master_alive(d) and greets(d)
    accepts_a_message(d, "after a rolled-back reload")
    marker.unlink()
    d.reload()
    assert len(d.children("receiver")) == 3 and not set(pids) & set(d.child_pids())
    assert d.status()["last_reload"]["ok"] is True  # type: ignore[index]


# -- C: found by locks, not by pids ------------------------------------------------------------
def test_a_reused_pid_does_not_strand_claims(daemon_factory: DaemonFactory,
                                             sink: SinkServer,  # noqa: F811 (fixture)
                                             bystander: subprocess.Popen[bytes]) -> None:
    d = daemon_factory(overrides(sink), start=False)
    spool = Spool(str(d.spool_path))
    spool.create_tree()
    # A worker died (a crash, a reboot) and its pid now belongs to an unrelated process.
    queue_id = deferred_message(spool, "pid reused", time.time() - 1)
    os.makedirs(spool.active_dir(bystander.pid))
    os.rename(spool.path("deferred", queue_id), spool.active_path(bystander.pid, queue_id))
    d.start()
    d.wait_for(lambda: len(delivered(sink, "pid reused")) == 1, WAIT, "the delivery")
    assert bystander.poll() is None
    assert not os.path.exists(spool.active_dir(bystander.pid))


def test_claims_of_a_running_worker_are_locked(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    worker = d.child_pids("delivery")[0]
    spool = Spool(str(d.spool_path))
    d.wait_for(lambda: os.path.isdir(spool.active_dir(worker)), 10, "active/<pid>/")
    fd = os.open(spool.active_dir(worker), os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert spool.recover_unowned(worker) == 0 and os.path.isdir(spool.active_dir(worker))
    finally:
        os.close(fd)


# -- D: start-up ownership, log hygiene ---------------------------------------------------------
def test_start_up_chown_follows_no_link_planted_in_the_spool(
        daemon_factory: DaemonFactory) -> None:
    # Under /tmp, where "nobody" can reach (pytest's own directory is private to root).
    base = Path(tempfile.mkdtemp(prefix="empath-chown-"))
    try:
        base.chmod(0o755)
        victim = base / "victim"
        victim.write_text("owned by someone else\n")
        os.chown(victim, 4242, 4242)
        linked = base / "linked"
        linked.write_text("hard-linked into the spool\n")
        os.chown(linked, 4243, 4243)
        victim_dir = base / "victim-dir"
        victim_dir.mkdir()
        os.chown(victim_dir, 4244, 4244)
        mail = base / "mail"
        mail.mkdir()
        os.chown(mail, 65534, 65534)
        d = daemon_factory({"user": "nobody", "pidfile": str(base / "run/e.pid"),
                            "spool": {"path": str(base / "spool")},
                            "log": {"file": str(base / "log/empath.log")},
                            "local_delivery": {"maildir_root": str(mail)}}, start=False)
        spool = Spool(str(base / "spool"))
        spool.create_tree()
        # What the unprivileged user could have planted before a restart as root.
        os.symlink(victim, spool.path("hold", "0" * 26))
        os.symlink(victim, os.path.join(spool.control, "freeze"))
        os.link(linked, spool.path("failed", "1" * 26))
        os.symlink(victim_dir, os.path.join(spool.active, "12345"))
        d.start()
        assert victim.stat().st_uid == 4242 and linked.stat().st_uid == 4243
        assert victim_dir.stat().st_uid == 4244
        assert (base / "spool" / "incoming").stat().st_uid == 65534
        assert "has 2 hard links; left owned by uid 4243" in d.log_text()
        assert greets(d)
        assert d.stop() == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_root_without_user_is_warned_and_the_log_is_0640(daemon_factory: DaemonFactory) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test runs as root (the warning is about root)")
    d = daemon_factory()
    assert "SECURITY WARNING: running as root: `user` is not set" in d.log_text()
    assert d.log_path.stat().st_mode & 0o777 == 0o640
    check = empath("check-config", "-c", str(d.config_path))
    assert check.returncode == 0 and "warning: running as root" in check.stderr


def test_unsafe_characters_from_the_network_are_escaped_in_the_text_log(
        daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    # RLO (a bidi override), LINE SEPARATOR, NEL (a C1 control), ZERO WIDTH SPACE.
    local = "ev\u202eil\u2028x\u0085y\u200bz"
    with d.smtp() as client:
        client.ehlo("client.test")
        assert "smtputf8" in client.esmtp_features
        code, reply = client.mail(f"{local}@client.test", ["SMTPUTF8"])
        assert code == 250, reply
        assert client.rcpt("alice@localhost")[0] == 250
        assert client.data(b"Subject: escape\r\n\r\nbody\r\n")[0] == 250
    d.wait_for(lambda: "from=<ev" in d.log_text(), 10, "the receipt line")
    text = d.log_path.read_text(encoding="utf-8")
    assert "from=<ev\\u202eil\\u2028x\\x85y\\u200bz@client.test>" in text
    for raw in ("\u202e", "\u2028", "\u0085", "\u200b"):
        assert raw not in text
    line = next(x for x in text.split("\n") if "from=<ev" in x)
    assert line.endswith("client=[127.0.0.1]") or "client=[127.0.0.1]" in line


def test_a_second_master_is_refused_by_the_lock(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    os.unlink(d.pidfile)  # even without its pidfile, the running master holds the lock
    again = empath("run", "-c", str(d.config_path))
    assert again.returncode == 1 and f"already running (pid {d.master_pid}" in again.stderr
    assert master_alive(d) and greets(d)
