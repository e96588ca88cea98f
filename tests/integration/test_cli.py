"""The ``empath`` command: start/status/stop/reload of a detached daemon, pidfile handling,
start-up errors, check-config, config-template, info/--version, systemd notification."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from empath import __version__
from empath.config.template import render_template
from empath.master.daemon import is_empath_master, read_pid
from tests.support.daemon import EmpathDaemon, empath_command, wait_for


def empath(*args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.pop("EMPATH_CONFIG", None)
    full_env.update(env or {})
    return subprocess.run([*empath_command(), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


class Detached:
    """Configuration and files of a daemon started with ``empath start``; remembers the
    process groups it started so the fixture can kill them (by pid) at teardown."""

    def __init__(self, files: EmpathDaemon) -> None:
        self.files = files
        self.groups: set[int] = set()
        self.cfg = str(files.config_path)

    def start(self) -> subprocess.CompletedProcess[str]:
        result = empath("start", "-c", self.cfg)
        pid = read_pid(str(self.files.pidfile))
        if result.returncode == 0 and pid is not None:
            self.groups.add(os.getpgid(pid))
        return result

    @property
    def pid(self) -> int:
        pid = read_pid(str(self.files.pidfile))
        assert pid is not None
        return pid

    def kill(self) -> None:
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[Callable[..., Detached]]:
    made: list[Detached] = []

    def make(overrides: dict[str, Any] | None = None) -> Detached:
        d = Detached(EmpathDaemon(tmp_path / f"detached{len(made)}", overrides))
        made.append(d)
        return d

    yield make
    for d in made:
        d.kill()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_start_status_stop_round_trip(detached: Callable[..., Detached]) -> None:
    d = detached()
    result = d.start()
    assert result.returncode == 0, result.stderr
    status = d.files.status()
    assert status is not None and status["pid"] == d.pid
    port = d.files.port
    assert f"empath started (pid {d.pid}), listening on 127.0.0.1:{port}" in result.stdout
    assert is_empath_master(d.pid)
    assert os.getsid(d.pid) != os.getsid(0)  # detached: a session of its own
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        assert conn.recv(100).startswith(b"220")

    report = empath("status", "-c", d.cfg)
    assert report.returncode == 0
    assert f"empath is running (pid {d.pid}" in report.stdout
    assert f"listening on: 127.0.0.1:{port}" in report.stdout
    assert report.stdout.count("generation 1") == 4  # the master line and three children
    assert "receiver 2/2" in report.stdout and "delivery 1/1" in report.stdout

    pid, children = d.pid, d.files.child_pids()
    stopped = empath("stop", "-c", d.cfg)
    assert stopped.returncode == 0 and f"empath stopped (pid {pid})" in stopped.stdout
    assert gone(pid) and all(gone(c) for c in children)
    assert not d.files.pidfile.exists() and not d.files.status_path.exists()
    assert empath("status", "-c", d.cfg).returncode == 3
    assert empath("stop", "-c", d.cfg).returncode == 0  # stopping a stopped daemon is fine


def test_second_start_is_refused(detached: Callable[..., Detached]) -> None:
    d = detached()
    assert d.start().returncode == 0
    pid = d.pid
    again = d.start()
    assert again.returncode == 1
    assert f"already running (pid {pid}" in again.stderr
    run = empath("run", "-c", d.cfg)
    assert run.returncode == 1 and "already running" in run.stderr
    assert d.pid == pid and not gone(pid)
    assert empath("stop", "-c", d.cfg).returncode == 0


def test_stale_pidfile_is_reported_and_replaced(detached: Callable[..., Detached]) -> None:
    d = detached()
    dead = subprocess.Popen(["true"])
    dead.wait()
    d.files.pidfile.parent.mkdir(parents=True, exist_ok=True)
    d.files.pidfile.write_text(f"{dead.pid}\n")
    status = empath("status", "-c", d.cfg)
    assert status.returncode == 1 and "pidfile" in status.stdout
    started = d.start()
    assert started.returncode == 0, started.stderr
    assert d.pid != dead.pid and is_empath_master(d.pid)
    assert empath("status", "-c", d.cfg).returncode == 0
    assert empath("stop", "-c", d.cfg).returncode == 0


def test_start_and_stop_never_signal_a_bystander_named_in_a_stale_pidfile(
        detached: Callable[..., Detached]) -> None:
    # A live process that is not ours, with "empath" in its command line (sleep exec'd with
    # argv[0] "empath"), whose pid a stale pidfile names.
    bystander = subprocess.Popen(["empath", "300"], executable="/bin/sleep")
    try:
        d = detached()
        d.files.pidfile.parent.mkdir(parents=True, exist_ok=True)
        d.files.pidfile.write_text(f"{bystander.pid}\n")
        status = empath("status", "-c", d.cfg)
        assert status.returncode == 1 and "not running, but the pidfile" in status.stdout
        assert empath("reload", "-c", d.cfg).returncode == 7
        stopped = empath("stop", "-c", d.cfg)
        assert stopped.returncode == 0 and "not running" in stopped.stdout
        d.files.pidfile.write_text(f"{bystander.pid}\n")
        started = d.start()
        assert started.returncode == 0, started.stderr
        pid = d.pid
        assert pid != bystander.pid
        d.files.pidfile.write_text(f"{bystander.pid}\n")  # the pidfile lies; the lock does not
        status = empath("status", "-c", d.cfg)
        assert status.returncode == 0 and f"empath is running (pid {pid}" in status.stdout
        stopped = empath("stop", "-c", d.cfg)
        assert stopped.returncode == 0 and f"empath stopped (pid {pid})" in stopped.stdout
        assert gone(pid)
        assert bystander.poll() is None  # never signalled
    finally:
        bystander.kill()
        bystander.wait(10)


@pytest.mark.parametrize("command", ["start", "run"])
def test_config_error_at_start_forks_nothing(detached: Callable[..., Detached],
                                             command: str) -> None:
    d = detached()
    d.files.write_config({"processes": {"delivery": 0}})
    text = d.files.config_path.read_text().splitlines()
    line = next(i for i, t in enumerate(text, 1) if "delivery: 0" in t)
    result = empath(command, "-c", d.cfg)
    assert result.returncode == 1
    assert f"{d.cfg}:{line}: processes.delivery: must be an integer" in result.stderr
    assert not d.files.pidfile.exists() and not d.files.status_path.exists()
    assert not d.files.spool_path.exists()


def test_start_reports_a_listener_that_cannot_be_bound(detached: Callable[..., Detached]
                                                       ) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        d = detached({"listeners": [{"address": f"127.0.0.1:{port}"}]})
        result = d.start()
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "in use" in result.stderr
    assert not d.files.pidfile.exists()


def test_reload_command(detached: Callable[..., Detached]) -> None:
    d = detached()
    assert d.start().returncode == 0
    d.files.write_config({"processes": {"receivers": 1}})
    reloaded = empath("reload", "-c", d.cfg)
    assert reloaded.returncode == 0 and "reload requested" in reloaded.stdout
    wait_for(lambda: (d.files.status() or {}).get("generation") == 2
             and len(d.files.children()) == 2, 15, message="generation 2")
    d.files.write_config_text(d.files.config_path.read_text() + "bogus: 1\n")
    refused = empath("reload", "-c", d.cfg)
    assert refused.returncode == 1 and "bogus: unknown key" in refused.stderr
    status = d.files.status()
    assert status is not None and status["generation"] == 2
    assert empath("stop", "--pidfile", str(d.files.pidfile)).returncode == 0


def test_commands_when_not_running(tmp_path: Path) -> None:
    files = EmpathDaemon(tmp_path)
    cfg = str(files.config_path)
    assert empath("status", "-c", cfg).returncode == 3
    assert empath("stop", "-c", cfg).returncode == 0
    assert empath("reload", "-c", cfg).returncode == 7


def test_config_template_info_and_version() -> None:
    template = empath("config-template")
    assert template.returncode == 0 and template.stdout == render_template()
    version = empath("--version")
    assert version.returncode == 0
    assert version.stdout.startswith(f"empath {__version__} (Python ")
    assert "speedups: " in version.stdout
    info = empath("info")
    assert info.returncode == 0
    for word in ("empath ", "python: ", "speedups: ", "uvloop: ", "config: "):
        assert word in info.stdout
    speedups = info.stdout.split("speedups: ")[1].split()[0]
    # The suite runs on a built checkout (tools/bootstrap compiles them), unless told not to.
    expected = "python" if os.environ.get("EMPATH_NO_EXTENSIONS", "") not in ("", "0") \
        else "cython"
    assert speedups == expected, info.stdout


def test_no_extensions_switch_selects_the_twins_in_a_new_process() -> None:
    info = empath("info", env={"EMPATH_NO_EXTENSIONS": "1"})
    assert info.returncode == 0
    assert "speedups: python" in info.stdout and "EMPATH_NO_EXTENSIONS" in info.stdout
    version = empath("--version", env={"EMPATH_NO_EXTENSIONS": "1"})
    assert "speedups: python" in version.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import empath._speedups as s; "
         "print(s.IMPLEMENTATION, s.store_file.__module__, s.DataReader.__module__)"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "EMPATH_NO_EXTENSIONS": "1"})
    assert probe.stdout.split() == ["python", "empath._speedups.spoolio_py",
                                    "empath._speedups.datareader_py"], probe


def test_default_config_comes_from_the_environment(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("processes:\n  receivers: many\n")
    result = empath("check-config", env={"EMPATH_CONFIG": str(bad)})
    assert result.returncode == 1 and f"{bad}:2: processes.receivers" in result.stderr
    info = empath("info", env={"EMPATH_CONFIG": str(bad)})
    assert f"config: {bad}" in info.stdout


def test_run_notifies_systemd(daemon_factory: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(20)
        d: EmpathDaemon = daemon_factory(start=False)
        d.start(env={"NOTIFY_SOCKET": path})
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready and f"MAINPID={d.master_pid}" in ready
        d.signal(signal.SIGHUP)
        assert sock.recv(4096) == b"RELOADING=1"
        assert sock.recv(4096) == b"READY=1"
        assert d.stop() == 0
        assert sock.recv(4096) == b"STOPPING=1"


def test_master_logs_the_speedups_in_use(daemon_factory: Any) -> None:
    d: EmpathDaemon = daemon_factory()
    compiled = os.environ.get("EMPATH_NO_EXTENSIONS", "") in ("", "0")
    line = next(x for x in d.log_text().splitlines() if "empath.master" in x and
                "speedups: " in x)
    if compiled:  # the suite runs on a built checkout unless told not to
        assert " INFO " in line and "the compiled Cython modules are in use" in line
    d.stop()
    # The twins forced: a WARNING that says why; with EMPATH_REQUIRE_SPEEDUPS, no start.
    d.proc = None
    d.start(env={"EMPATH_NO_EXTENSIONS": "1", "EMPATH_REQUIRE_SPEEDUPS": ""})
    [line] = [x for x in d.log_text().splitlines() if "pure-Python twins are in use" in x]
    assert " WARNING empath.master[" in line and "(EMPATH_NO_EXTENSIONS is set)" in line
    d.stop()
    # What check-config warns about is logged at start too.
    d.write_config({"mynetworks": ["127.0.0.0/8", "0.0.0.0/0"]})
    d.proc = None
    d.start(env={"EMPATH_REQUIRE_SPEEDUPS": ""})
    [line] = [x for x in d.log_text().splitlines() if "open relay" in x]
    assert " WARNING empath.master[" in line
    assert f"configuration: {d.config_path}: mynetworks[1]: 0.0.0.0/0 lets every" in line
    d.stop()
    refused = empath("run", "-c", str(d.config_path),
                     env={"EMPATH_NO_EXTENSIONS": "1", "EMPATH_REQUIRE_SPEEDUPS": "1"})
    assert refused.returncode == 1
    assert refused.stderr.startswith("empath: EMPATH_REQUIRE_SPEEDUPS is set, but the "
                                     "compiled speedups are not in use"), refused.stderr


def test_check_config_loads_certificates_and_lists_every_error(tmp_path: Path) -> None:
    key = tmp_path / "tls.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    cert = tmp_path / "tls.crt"
    cert.write_text("not a certificate\n")
    cfg = tmp_path / "empath.yaml"
    cfg.write_text(f"listeners:\n  - address: 127.0.0.1:2525\n"
                   f"    tls: {{cert: {cert}, key: {key}}}\n"
                   "processes:\n  receivers: lots\n")
    r = empath("check-config", "-c", str(cfg))
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[0].startswith(f"empath: {cfg}:3: listeners[0].tls.cert: cannot load the "
                               f"certificate {cert} with the key {key}")
    assert lines[1].startswith(f"empath: {cfg}:5: processes.receivers: must be an integer")
    assert len(lines) == 2
