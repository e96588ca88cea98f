"""Run a complete Empath from Python: the master and its children, configured by a dict.

    from empath.embed import Empath

    with Empath({"listeners": [{"address": "127.0.0.1:0"}], "spool": {"path": "/srv/q"}},
                directory="/srv/empath") as mta:
        host, port = mta.address                # the SMTP listener, bound
        queue_id = mta.submit("app@example.org", ["user@example.net"], message_bytes)

``Empath(config, directory)`` writes the configuration to ``directory/empath.yaml`` (relative
paths in it are taken against ``directory``) and validates it there, so a bad key raises
``ConfigError`` naming the key before anything starts. ``start()`` runs ``empath run`` in a
process group of its own (the same master, receivers and delivery workers as a daemon, not a
reduced copy) and returns once every child is serving; ``stop()`` is SIGTERM and a wait, as
for the daemon (docs/ARCHITECTURE.md); leaving the ``with`` block stops it.

``submit()`` stores a message through the spool's own writer (``empath/spool/submit.py``, as
``empath sendmail`` does: Received:, missing From/Date/Message-ID added, fdatasync, rename,
directory fsync) and returns its queue id only once the message is durable; the delivery
workers are woken at once. It works while the daemon runs and also before ``start()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from empath.config import load_config

START_TIMEOUT = 60.0


class EmbedError(RuntimeError):
    """The embedded daemon did not start, or stopped on its own; the text has its log."""


class Empath:
    # ``config`` is the YAML configuration as a dict: free-form here, validated by the
    # schema when the daemon loads it.
    def __init__(self, config: dict[str, Any], directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        defaults: dict[str, Any] = {
            "base_dir": str(self.dir),
            "pidfile": "run/empath.pid",
            "log": {"file": "log/empath.log"},
            "spool": {"path": "spool"},
            "local_delivery": {"maildir_root": "mail"},
        }
        self.settings = _merge(defaults, config)
        self.config_path = self.dir / "empath.yaml"
        self.config_path.write_text(yaml.safe_dump(self.settings, sort_keys=False))
        self.cfg = load_config(str(self.config_path))  # ConfigError: file, line, key
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = self.dir / "empath.out"

    # -- life -------------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> Empath:
        if self.running:
            return self
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "empath.cli", "run", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.dir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._serving():
            if self.proc.poll() is not None:
                raise EmbedError(f"empath exited with status {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise EmbedError(f"empath did not start within {timeout:g}s:\n"
                                 f"{self.log_tail()}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM, then wait (``shutdown_timeout`` and 10 s); SIGKILL the group after that."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        wait = timeout if timeout is not None else float(self.cfg.shutdown_timeout) + 10.0
        try:
            status = self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.kill()
            status = self.proc.returncode if self.proc.returncode is not None else -9
        self.proc = None
        return status

    def kill(self) -> None:
        """SIGKILL the master's process group (children included) and reap the master."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def reload(self) -> None:
        """SIGHUP: the master re-reads ``empath.yaml`` (validated; invalid keeps the old)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGHUP)

    def __enter__(self) -> Empath:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- state ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any] | None:  # the master's status file, as JSON
        path = Path(self.cfg.pidfile).parent / "empath.status.json"
        try:
            data: dict[str, Any] = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        return data

    def _serving(self) -> bool:
        status = self.status()
        if not status or self.proc is None or status.get("pid") != self.proc.pid:
            return False
        kids = status.get("children") or []
        kinds = {c["kind"] for c in kids if c.get("booted")}
        return bool(status.get("listeners")) and {"receiver", "delivery"} <= kinds

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every SMTP listener's (host, port), as bound (port 0 resolved)."""
        status = self.status() or {}
        out = []
        for text in status.get("listeners") or []:
            host, _, port = str(text).rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return out

    @property
    def address(self) -> tuple[str, int]:
        found = self.addresses
        if not found:
            raise EmbedError("empath is not running")
        return found[0]

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (Path(self.cfg.log.file) if self.cfg.log.file else None, self.output):
            if path is not None:
                with contextlib.suppress(OSError):
                    parts += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(parts)

    # -- mail -------------------------------------------------------------------------------
    def submit(self, sender: str, recipients: list[str], message: bytes) -> str:
        """Queue ``message`` for ``recipients``; returns the queue id once it is durable."""
        from empath.ctl import sendmail
        from empath.spool import Spool, new_message_id
        from empath.spool.submit import store_message

        if not recipients:
            raise ValueError("no recipients")
        opts = sendmail.Options(recipients=list(recipients), sender=sender,
                                dot_ends_input=False)
        message_id = new_message_id()
        uid = os.getuid()
        data, env = sendmail.build(opts, message, self.cfg, uid=uid, user=f"embed:{uid}",
                                   message_id=message_id, now=time.time(), listener="embed")
        spool = Spool(self.cfg.spool.path)
        spool.create_tree()
        return store_message(spool, data, env)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
