"""conf/empath.init: the LSB actions against a real daemon, pointed at the checkout's empath
and a temporary configuration through the environment or a defaults file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from empath.master.daemon import is_empath_master, read_pid
from tests.support.daemon import REPO, EmpathDaemon, empath_command, wait_for

SCRIPT = REPO / "conf" / "empath.init"


class Service:
    """The daemon's configuration and files, and the process groups it was started in."""

    def __init__(self, files: EmpathDaemon) -> None:
        self.files = files
        self.groups: set[int] = set()

    def remember(self) -> None:
        pid = read_pid(str(self.files.pidfile))
        if pid is not None:
            self.groups.add(os.getpgid(pid))


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """Kills, by process group, whatever the test started through the script."""
    svc = Service(EmpathDaemon(tmp_path / "empath", {"processes": {"receivers": 1}}))
    yield svc
    for group in svc.groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


def init(action: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("EMPATH", "CONFIG", "EMPATH_CONFIG")}
    full.update(env)
    return subprocess.run(["sh", str(SCRIPT), action], capture_output=True, text=True,
                          timeout=60, env=full, stdin=subprocess.DEVNULL)


def environment(d: EmpathDaemon, tmp_path: Path) -> dict[str, str]:
    if len(empath_command()) != 1:
        pytest.skip("needs the empath console script (pip install -e .)")
    return {"EMPATH": empath_command()[0], "CONFIG": str(d.config_path),
            "EMPATH_DEFAULTS": str(tmp_path / "no-defaults")}


def test_header_and_syntax() -> None:
    text = SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n### BEGIN INIT INFO\n")
    assert "### END INIT INFO" in text
    for field in ("Provides:", "Required-Start:", "Default-Start:", "Short-Description:"):
        assert f"# {field}" in text
    assert subprocess.run(["sh", "-n", str(SCRIPT)]).returncode == 0
    assert os.access(SCRIPT, os.X_OK)


def test_start_status_reload_restart_stop(service: Service, tmp_path: Path) -> None:
    files = service.files
    env = environment(files, tmp_path)
    assert init("status", env).returncode == 3

    started = init("start", env)
    assert started.returncode == 0, started.stderr
    service.remember()
    pid = read_pid(str(files.pidfile))
    assert pid is not None and is_empath_master(pid)
    assert "listening on 127.0.0.1:" in started.stdout

    status = init("status", env)
    assert status.returncode == 0 and f"empath is running (pid {pid}" in status.stdout
    again = init("start", env)
    assert again.returncode == 0 and "already running" in again.stdout
    assert read_pid(str(files.pidfile)) == pid

    assert init("reload", env).returncode == 0
    wait_for(lambda: (files.status() or {}).get("generation") == 2, 15, message="generation 2")
    assert init("force-reload", env).returncode == 0
    wait_for(lambda: (files.status() or {}).get("generation") == 3, 15, message="generation 3")

    restarted = init("restart", env)
    assert restarted.returncode == 0, restarted.stderr
    service.remember()
    new_pid = read_pid(str(files.pidfile))
    assert new_pid is not None and new_pid != pid and is_empath_master(new_pid)

    stopped = init("stop", env)
    assert stopped.returncode == 0
    assert not files.pidfile.exists()
    assert init("status", env).returncode == 3
    assert init("stop", env).returncode == 0


def test_settings_from_the_defaults_file(service: Service, tmp_path: Path) -> None:
    files = service.files
    env = environment(files, tmp_path)
    defaults = tmp_path / "default-empath"
    defaults.write_text(f"EMPATH={env['EMPATH']}\nCONFIG={files.config_path}\n"
                        "STOP_TIMEOUT=20\n")
    only_defaults = {"EMPATH_DEFAULTS": str(defaults)}
    assert init("start", only_defaults).returncode == 0
    service.remember()
    assert init("status", only_defaults).returncode == 0
    assert init("stop", only_defaults).returncode == 0
    assert init("status", only_defaults).returncode == 3


def test_missing_program_and_bad_action(tmp_path: Path) -> None:
    env = {"EMPATH": str(tmp_path / "nowhere"), "CONFIG": str(tmp_path / "x.yaml"),
           "EMPATH_DEFAULTS": str(tmp_path / "none")}
    assert init("start", env).returncode == 5
    assert init("status", env).returncode == 4
    assert init("stop", env).returncode == 0
    real = {"EMPATH": empath_command()[0], "EMPATH_DEFAULTS": str(tmp_path / "none")}
    usage = init("frobnicate", real)
    assert usage.returncode == 2 and "Usage:" in usage.stderr
