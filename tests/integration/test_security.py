"""Files and permissions: spool modes, loose TLS keys, a read-only spool."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from empath.spool import Spool
from tests.support.certs import make_ca, make_server_cert
from tests.support.daemon import EmpathDaemon

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
            if stat.S_ISSOCK(os.stat(path).st_mode):
                continue  # wake-up sockets: the directory's 0700 is what guards them
            mode = stat.S_IMODE(os.stat(path).st_mode)
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
