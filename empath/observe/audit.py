"""The audit log: one JSON object per line (JSON Lines) for every event in a message's life.

Events: ``received`` (receiver), ``delivered``, ``deferred``, ``bounced``, ``expired`` (delivery
worker, one record per recipient and attempt: a delivery attempt is recorded as its result),
``notice`` (a delivery status notification was spooled), and ``held``, ``released``,
``deleted`` (an operator, through empathctl). The fields are listed in docs/OPERATIONS.md
("Audit log"); every record has ``time``, ``event`` and ``id``.

Every process appends to the same file: each record is one ``write(2)`` of one complete line
on a descriptor opened with O_APPEND, so records of concurrent processes never interleave
inside a line. ``reopen()`` (on SIGUSR1, after logrotate moved the file) opens the configured
path anew. A failing write is logged (at most once a minute) and never disturbs mail handling.

With ``audit.redact_local_parts`` the local part of every address is written as ``***``.
This module never decides what happened to a message; callers say so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import orjson

from empath.config.typed import Config

log = logging.getLogger("empath.audit")

ERROR_INTERVAL = 60.0  # seconds between two log lines about failing audit writes
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def redact(address: str) -> str:
    """``***@domain`` (``""``, the null sender, stays as it is)."""
    if not address:
        return address
    local, at, domain = address.rpartition("@")
    return f"***@{domain}" if at else "***"


def timestamp(when: float) -> str:
    """ISO 8601 in UTC with milliseconds: ``2026-11-25T09:00:00.123Z``."""
    secs = int(when)
    millis = int((when - secs) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{millis:03d}Z"


class AuditLog:
    """Appends records to ``path``; with ``path`` None every call does nothing."""

    def __init__(self, path: str | None, redact_local_parts: bool = False) -> None:
        self.path = path
        self.redact = redact_local_parts
        self._fd = -1
        self._last_error = 0.0
        if path is not None:
            self.reopen()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def reopen(self) -> None:
        """Open the configured path (again): after a rotation renamed the old file."""
        if self.path is None:
            return
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path, _FLAGS, 0o640)
        except OSError as exc:
            self._complain(exc)
            return
        old, self._fd = self._fd, fd
        if old >= 0:
            with contextlib.suppress(OSError):
                os.close(old)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def address(self, address: str | None) -> str | None:
        if address is None or not self.redact:
            return address
        return redact(address)

    def write(self, event: str, message_id: str, **fields: Any) -> None:
        """One record: ``time``, ``event``, ``id``, then ``fields`` (None values dropped)."""
        if self._fd < 0:
            return
        record: dict[str, Any] = {"time": timestamp(time.time()), "event": event,
                                  "id": message_id}
        for key, value in fields.items():
            if value is not None:
                record[key] = value
        if self.redact:
            for key in ("sender", "recipient"):
                if isinstance(record.get(key), str):
                    record[key] = redact(record[key])
            if isinstance(record.get("recipients"), list):
                record["recipients"] = [redact(r) for r in record["recipients"]]
        line = orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS) + b"\n"
        try:
            # One write of one whole line: O_APPEND makes it land after every other process's
            # complete record. A short write (disk full) is not completed by a second write,
            # which could land after another process's line.
            os.write(self._fd, line)
        except OSError as exc:
            self._complain(exc)

    def _complain(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._last_error >= ERROR_INTERVAL or not self._last_error:
            self._last_error = now
            log.error("audit log %s: %s", self.path, exc.strerror or exc)


def read_records(path: str, message_id: str) -> list[dict[str, Any]]:
    """The records about ``message_id`` in ``path`` and its first rotated copy (``path.1``),
    oldest first; unreadable lines are skipped."""
    out: list[dict[str, Any]] = []
    needle = message_id.encode()
    for name in (path + ".1", path):
        for line in _lines(name):
            if needle not in line:
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict) and (record.get("id") == message_id
                                             or record.get("notice_id") == message_id):
                out.append(record)
    return out


def _lines(path: str) -> Iterator[bytes]:
    try:
        with open(path, "rb") as fh:
            yield from fh
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return


_process_log: AuditLog = AuditLog(None)


def init(cfg: Config) -> AuditLog:
    """This process's audit log (call once, in the child); reopened with the log files."""
    global _process_log
    from empath import logsetup

    _process_log = AuditLog(cfg.audit.log_path, cfg.audit.redact_local_parts)
    logsetup.add_reopen_hook(_process_log.reopen)
    return _process_log


def current() -> AuditLog:
    return _process_log
