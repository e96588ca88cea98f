"""Files and permissions: spool modes, loose TLS keys, a read-only spool."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from empath.observe.multiproc import default_dir
from empath.passwords import set_password
from empath.spool import Spool
from tests.integration.test_receiver import Raw
from tests.support.certs import make_ca, make_server_cert
from tests.support.daemon import EmpathDaemon, wait_for

MESSAGE = b"Subject: perms\r\n\r\nbody\r\n"


def test_spool_files_are_0600_and_directories_0700(daemon_factory: Any) -> None:
    d: EmpathDaemon = daemon_factory(start=False)
    Spool(str(d.spool_path)).create_tree()
    Spool(str(d.spool_path)).set_frozen(True)
    d.start()
    with d.smtp() as s:
        s.sendmail("a@example.org", ["b@localhost"], MESSAGE)
    for root, dirs, files in os.walk(d.spool_path):
        for name in dirs:
            mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
            assert mode == 0o700, f"{root}/{name} has mode {mode:o}"
        for name in files:
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # used or removed meanwhile (the slot thread keeps working)
            if stat.S_ISSOCK(st.st_mode):
                continue  # wake-up sockets: the directory's 0700 is what guards them
            mode = stat.S_IMODE(st.st_mode)
            assert mode == 0o600, f"{path} has mode {mode:o}"
    assert Spool(str(d.spool_path)).list_ids("incoming")


def test_loose_tls_key_is_warned_about(daemon_factory: Any, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki")
    server = make_server_cert(tmp_path / "pki", ca, "mx.test.empath")
    os.chmod(server.key_path, 0o644)
    d: EmpathDaemon = daemon_factory({"listeners": [{
        "address": "127.0.0.1:0", "tls": {"cert": server.cert_path, "key": server.key_path}}]})
    assert f"TLS key {server.key_path} is readable by others (mode 644)" in d.log_text()


def test_read_only_spool_refuses_to_start(daemon_factory: Any, tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"this machine cannot mount a tmpfs: {made.stderr!r}")
    try:
        Spool(str(mnt / "spool")).create_tree()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        d: EmpathDaemon = daemon_factory({"spool": {"path": str(mnt / "spool")}}, start=False)
        d.start(wait=False)
        assert d.wait_exit(15) == 1
        log = d.log_text()
        assert f"spool {mnt / 'spool'}" in log and "Read-only file system" in log, log
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def auth_daemon(daemon_factory: Any, tmp_path: Path, **auth: Any) -> EmpathDaemon:
    """A submission listener with AUTH over plain text (loopback only), one user."""
    pwfile = tmp_path / "passwd"
    set_password(str(pwfile), "alice@example.org", "correct horse")
    d: EmpathDaemon = daemon_factory({
        "listeners": [{"address": "127.0.0.1:0", "mode": "submission"}],
        "smtp": {"auth": {"password_file": str(pwfile), "allow_plaintext": True, **auth}}})
    return d


def test_simultaneous_auth_attempts_are_not_all_tried(daemon_factory: Any,
                                                      tmp_path: Path) -> None:
    """40 wrong passwords sent at once on 40 connections: attempts in flight count against
    max_failures (5), so at most 5 + one per other receiver are checked; the rest get 421
    without a password check."""
    d = auth_daemon(daemon_factory, tmp_path, max_failures=5)
    clients = []
    for _ in range(40):
        c = Raw(d, timeout=60)
        c.reply()
        c.send(b"EHLO c\r\n")
        c.reply()
        clients.append(c)
    wrong = base64.b64encode(b"\0alice@example.org\0wrong")
    for c in clients:
        c.send(b"AUTH PLAIN " + wrong + b"\r\n")
    codes = sorted(c.reply()[:3] for c in clients)
    for c in clients:
        c.close()
    receivers = d.config["processes"]["receivers"]
    tried = d.log_text().count("AUTH failed for user 'alice@example.org'")
    assert 5 <= tried <= 5 + receivers - 1, (tried, codes)
    assert codes.count(b"421") >= 40 - tried and set(codes) <= {b"421", b"535"}, codes


def test_expired_auth_failure_files_are_swept(daemon_factory: Any, tmp_path: Path) -> None:
    """One file per client address that ever failed AUTH: removed once nothing in it is
    within failure_window, whether or not that address comes back."""
    d = auth_daemon(daemon_factory, tmp_path, failure_window="2s")
    spool = Spool(str(d.spool_path))
    old, fresh = spool.auth_failures_path("192.0.2.7"), spool.auth_failures_path("192.0.2.8")
    os.makedirs(os.path.dirname(old), exist_ok=True)
    Path(old).write_bytes(b"1000.0\n1001.0\n")
    Path(fresh).write_bytes(b"%.3f\n" % (time.time() + 3600))
    wait_for(lambda: not os.path.exists(old), 20, message="the expired file to be swept")
    assert os.path.exists(fresh)


NOBODY = 65534  # another local user (Debian's nobody)


@pytest.mark.parametrize("planted", ["directory", "symlink"])
def test_metrics_directory_planted_in_dev_shm_is_not_used(daemon_factory: Any, tmp_path: Path,
                                                          planted: str) -> None:
    """Another local user creates /dev/shm/empath-metrics-<hash of the spool path> first (a
    directory of theirs, or a symlink to one): root must not write its metrics files there.
    A fresh private directory is used instead and the planted one stays empty."""
    d: EmpathDaemon = daemon_factory({"metrics": {"listen_addr": "127.0.0.1:0"}},
                                     start=False)
    predicted = default_dir(str(d.spool_path), str(d.spool_path / "control"))
    assert predicted.startswith("/dev/shm/empath-metrics-")
    trap = tmp_path / "trap"
    trap.mkdir()
    os.chmod(trap, 0o777)
    os.chown(trap, NOBODY, NOBODY)
    if planted == "directory":
        os.mkdir(predicted)
        os.chmod(predicted, 0o777)
        os.chown(predicted, NOBODY, NOBODY)
        target = Path(predicted)
    else:
        os.symlink(trap, predicted)
        os.lchown(predicted, NOBODY, NOBODY)
        target = trap
    used = ""
    try:
        d.start()
        with d.smtp() as s:
            s.sendmail("a@example.org", ["b@localhost"], MESSAGE)
        found = re.search(r"metrics: per-process files in (\S+)", d.log_text())
        assert found, d.log_text()
        used = found.group(1)
        assert used != predicted and used.startswith(predicted + "-"), used
        st = os.lstat(used)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
        assert stat.S_IMODE(st.st_mode) == 0o700
        wait_for(lambda: any(n.endswith(".db") for n in os.listdir(used)), 20,
                 message="the children's metrics files")
        assert os.listdir(target) == []
        assert f"metrics: not using {predicted}" in d.log_text()
    finally:
        if d.proc is not None:
            d.stop()
        if os.path.islink(predicted):
            os.unlink(predicted)
        else:
            shutil.rmtree(predicted, ignore_errors=True)
        if used:
            with contextlib.suppress(OSError):
                shutil.rmtree(used)
