"""Process-wide logging: one format, one destination (``log.file`` or standard error), reopened
on SIGUSR1.

Every process (master and children) writes lines like
``2026-11-25 09:00:00,123 INFO empath.master[1234]: listening on 127.0.0.1:2525`` to the same
file, opened in append mode so that lines of concurrent processes never overwrite each other.
After a log rotation renamed the file, ``reopen_logs()`` (on SIGUSR1) opens a new one at the
configured path; a detached daemon's standard output and error follow it too.

With ``log.format: json`` each record is one JSON object per line (``time``, ``level``,
``logger``, ``pid``, ``message``, and ``queue_id`` when the message is about a message: every
such line starts with ``<queue id>: ``, as Postfix's maillog lines do, so ``grep QUEUEID``
tells a message's story in either format). With ``log.syslog`` records go to the syslog
socket instead, tagged ``empath/<part>[pid]`` (``empath/smtp[1234]: ...``).

This module owns the root logger's handlers; it never decides *when* to reopen (the signal
handling of the master and the children does). Other files reopened on SIGUSR1 (the audit
log) register with ``add_reopen_hook``.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from empath.spool.ids import is_valid_id

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


class ReopeningFileHandler(logging.FileHandler):
    """A FileHandler whose file can be reopened at its path (after rotation)."""

    def reopen(self) -> None:
        self.acquire()
        try:
            old = self.stream
            self.stream = self._open()
            if old is not None:
                old.close()
        finally:
            self.release()


def queue_id_of(message: str) -> str | None:
    """The queue id a log message is about (``<id>: ...``), or None."""
    if len(message) > 27 and message[26] == ":" and is_valid_id(message[:26]):
        return message[:26]
    return None


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line (orjson)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        secs = int(record.created)
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "pid": record.process,
            "message": message}
        queue_id = queue_id_of(message)
        if queue_id is not None:
            doc["queue_id"] = queue_id
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class SyslogFormatter(logging.Formatter):
    """``empath/smtp[1234]: message`` (the syslog daemon adds the time and host)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        tag = record.name.replace(".", "/", 1)
        body = (self.inner.format(record) if self.inner is not None
                else record.getMessage())
        if self.inner is None and record.exc_info:
            body += "\n" + self.formatException(record.exc_info)
        return f"{tag}[{record.process}]: {body}"


_handler: logging.Handler | None = None
_stdio_file: str | None = None
_reopen_hooks: list[Callable[[], None]] = []


def configure(log_cfg: Any) -> None:
    """``setup_logging`` from the configuration's ``log`` section."""
    setup_logging(log_cfg.file, log_cfg.level, fmt=log_cfg.format, syslog=log_cfg.syslog,
                  syslog_socket=log_cfg.syslog_socket)


def setup_logging(file: str | None, level: str = "info", *, fmt: str = "text",
                  syslog: str | None = None, syslog_socket: str = "/dev/log") -> None:
    """Send every log record at ``level`` or above to syslog (facility ``syslog``), else to
    ``file`` (None: standard error), as text lines or JSON objects (``fmt``).

    Calling it again (on reload) replaces the destination, the format and the level.
    """
    global _handler
    root = logging.getLogger()
    handler: logging.Handler | None = None
    formatter: logging.Formatter = (JSONFormatter() if fmt == "json"
                                    else logging.Formatter(FORMAT))
    if syslog is not None:
        try:
            handler = logging.handlers.SysLogHandler(
                address=syslog_socket,
                facility=logging.handlers.SysLogHandler.facility_names[syslog])
            formatter = SyslogFormatter(formatter if fmt == "json" else None)
        except OSError as exc:
            print(f"empath: cannot log to syslog at {syslog_socket}: {exc.strerror or exc}; "
                  "logging to " + (file or "standard error"), file=sys.stderr)
            handler = None
    if handler is not None:
        pass
    elif file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
        handler = ReopeningFileHandler(file, mode="a", encoding="utf-8")
    handler.setFormatter(formatter)
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    _handler = handler
    logging.captureWarnings(True)


def redirect_stdio(file: str | None) -> None:
    """Point standard input at /dev/null and standard output and error at ``file`` (or
    /dev/null), so a detached daemon's stray output and tracebacks land in its log."""
    global _stdio_file
    _stdio_file = file
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    if file is None:
        out = null
    else:
        os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
        out = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        os.close(fd)


def add_reopen_hook(hook: Callable[[], None]) -> None:
    """Call ``hook`` too whenever the log files are reopened (SIGUSR1)."""
    _reopen_hooks.append(hook)


def reopen_logs() -> None:
    """Reopen the log file (and redirected standard output/error) at the configured path,
    and every file registered with ``add_reopen_hook``."""
    if isinstance(_handler, ReopeningFileHandler):
        _handler.reopen()
    if _stdio_file is not None:
        redirect_stdio(_stdio_file)
    for hook in _reopen_hooks:
        try:
            hook()
        except Exception:
            logging.getLogger("empath").exception("reopening a file on SIGUSR1 failed")


def current_log_file() -> str | None:
    """The file records go to, or None for standard error."""
    if isinstance(_handler, ReopeningFileHandler):
        return _handler.baseFilename
    return None
