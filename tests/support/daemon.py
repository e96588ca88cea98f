"""A real ``empath run`` master for integration tests, in its own process group.

``EmpathDaemon`` writes a small configuration into a temporary directory (listener on
127.0.0.1 port 0, spool, pidfile, maildir and log under that directory), starts the master in a
new session and waits, bounded in time, until the master's status file
(``<pidfile dir>/empath.status.json``) lists the bound listeners and every child. It only ever
signals processes it started: the master by pid, and at clean-up the master's process group
(children are forked into it) by that same pid.

Use it through the ``daemon_factory`` fixture of ``tests/support/fixtures.py`` (import the
fixture into the test module), which kills every started process group at teardown.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from empath.config import parse_duration

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0

T = TypeVar("T")


def empath_command() -> list[str]:
    """The ``empath`` console script of the checkout's virtualenv, else ``python -m``."""
    script = REPO / ".venv" / "bin" / "empath"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "empath.cli"]


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: mappings recursively, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def wait_for(pred: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
             message: str = "condition") -> T:
    """Poll ``pred`` until it returns something truthy (returned); TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


class EmpathDaemon:
    """One ``empath run`` master with its configuration and files under ``tmp_path``."""

    def __init__(self, tmp_path: os.PathLike[str] | str,
                 overrides: dict[str, Any] | None = None) -> None:
        self.dir = Path(tmp_path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "empath.yaml"
        self.overrides: dict[str, Any] = copy.deepcopy(overrides or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.output_path = self.dir / "empath.out"
        self.write_config()

    # -- configuration ---------------------------------------------------------------------
    def base_config(self) -> dict[str, Any]:
        d = self.dir
        return {
            "base_dir": str(d),
            "hostname": "test.empath",
            "pidfile": str(d / "run" / "empath.pid"),
            "shutdown_timeout": "3s",
            "log": {"file": str(d / "log" / "empath.log"), "level": "info"},
            "listeners": [{"address": "127.0.0.1:0"}],
            "processes": {"receivers": 2, "delivery": 1},
            "spool": {"path": str(d / "spool"), "min_free_space": 0},
            "local_delivery": {"maildir_root": str(d / "mail")},
        }

    @property
    def config(self) -> dict[str, Any]:
        """The configuration as written (base merged with the overrides)."""
        return deep_merge(self.base_config(), self.overrides)

    def write_config(self, overrides: dict[str, Any] | None = None) -> None:
        """Write the YAML file; ``overrides`` (if given) are merged into the current ones."""
        if overrides:
            self.overrides = deep_merge(self.overrides, overrides)
        text = yaml.safe_dump(self.config, sort_keys=False)
        self.write_config_text(text)

    def write_config_text(self, text: str) -> None:
        """Replace the configuration file with raw text (e.g. a broken one)."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    # -- paths -----------------------------------------------------------------------------
    @property
    def pidfile(self) -> Path:
        return Path(self.config["pidfile"])

    @property
    def status_path(self) -> Path:
        return self.pidfile.parent / "empath.status.json"

    @property
    def log_path(self) -> Path:
        return Path(self.config["log"]["file"])

    @property
    def spool_path(self) -> Path:
        return Path(self.config["spool"]["path"])

    def log_text(self) -> str:
        parts = []
        for p in (self.log_path, self.output_path):
            with contextlib.suppress(OSError):
                parts.append(p.read_text(errors="replace"))
        return "\n".join(parts)

    # -- state -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any] | None:
        """The master's status file, or None while there is none (or it is mid-write)."""
        try:
            data: dict[str, Any] = json.loads(self.status_path.read_bytes())
        except (OSError, ValueError):
            return None
        return data

    @property
    def master_pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the first listener, with the port really bound."""
        return self.addresses()[0]

    @property
    def port(self) -> int:
        return self.address[1]

    def addresses(self) -> list[tuple[str, int]]:
        status = self.status()
        assert status and status["listeners"], "no listeners in the status file"
        out = []
        for text in status["listeners"]:
            host, _, port = text.rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return out

    def children(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Children in the status file: dicts with pid, kind, index, generation."""
        status = self.status() or {"children": []}
        return [c for c in status["children"] if kind is None or c["kind"] == kind]

    def child_pids(self, kind: str | None = None) -> list[int]:
        return sorted(c["pid"] for c in self.children(kind))

    def expected_counts(self) -> tuple[int, int]:
        procs = self.config["processes"]
        return int(procs["receivers"]), int(procs["delivery"])

    def settled(self, receivers: int | None = None, delivery: int | None = None,
                generation: int | None = None) -> bool:
        """True when the status file shows exactly the expected children, all of the current
        generation (or of ``generation`` and later) and running their event loop, and at least
        one listener."""
        status = self.status()
        if not status or not status.get("listeners") or status.get("pid") != self.master_pid:
            return False
        want_r, want_d = self.expected_counts()
        want_r = want_r if receivers is None else receivers
        want_d = want_d if delivery is None else delivery
        gen = status["generation"]
        if generation is not None and gen < generation:
            return False
        kids = status["children"]
        if any(c["generation"] != gen or not c.get("booted", True) for c in kids):
            return False
        return (sum(c["kind"] == "receiver" for c in kids) == want_r
                and sum(c["kind"] == "delivery" for c in kids) == want_d)

    def wait_for(self, pred: Callable[[], T], timeout: float = 10.0,
                 message: str = "condition") -> T:
        """Poll ``pred``; fail early (with the log) if the master has exited."""

        def check() -> T:
            value = pred()
            if not value and self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"empath exited with {self.proc.returncode} while waiting for "
                                   f"{message}\n--- log ---\n{self.log_text()}")
            return value

        try:
            return wait_for(check, timeout, message=message)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- log ---\n{self.log_text()}") from None

    def wait_settled(self, timeout: float = START_TIMEOUT, **counts: int) -> None:
        self.wait_for(lambda: self.settled(**counts), timeout, message="children to settle")

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT, wait: bool = True,
              args: list[str] | None = None, env: dict[str, str] | None = None
              ) -> EmpathDaemon:
        """Spawn ``empath run -c <config>`` in a new session; wait until it is serving.

        ``env`` adds to (or, with a value of "", removes from) the inherited environment."""
        assert self.proc is None, "already started"
        env_vars = dict(os.environ, PYTHONUNBUFFERED="1")
        env_vars.pop("EMPATH_CONFIG", None)
        for key, value in (env or {}).items():
            if value:
                env_vars[key] = value
            else:
                env_vars.pop(key, None)
        with open(self.output_path, "ab") as out:
            self.proc = subprocess.Popen(
                [*empath_command(), "run", "-c", str(self.config_path), *(args or [])],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.dir, env=env_vars, start_new_session=True)
        if wait:
            self.wait_settled(timeout)
        return self

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the master (by pid) if it is still ours and running."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def reload(self, new_overrides: dict[str, Any] | None = None, wait: bool = True,
               timeout: float = START_TIMEOUT) -> None:
        """Merge ``new_overrides`` into the configuration, SIGHUP, and (by default) wait for the
        new generation of children to replace the old one."""
        before = (self.status() or {}).get("generation", 0)
        self.write_config(new_overrides)
        self.signal(signal.SIGHUP)
        if wait:
            self.wait_settled(timeout, generation=before + 1)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None, "not started"
        return self.proc.wait(timeout)

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM the master and wait for it; returns its exit status."""
        assert self.proc is not None, "not started"
        self.signal(signal.SIGTERM)
        if timeout is None:
            timeout = 10.0 + parse_duration(self.config.get("shutdown_timeout", 30))
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the master's process group (by the master's pid) and reap the master."""
        if self.proc is None:
            return
        # start_new_session made the master a group leader: its pid is the group id, and its
        # children were forked into that group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    # -- clients ---------------------------------------------------------------------------
    def smtp(self, timeout: float = 10.0) -> smtplib.SMTP:
        """An smtplib client connected to the first listener."""
        host, port = self.address
        return smtplib.SMTP(host, port, timeout=timeout)
