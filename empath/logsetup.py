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

import contextlib
import logging
import logging.handlers
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from empath.config.typed import LogConfig
from empath.spool.ids import is_valid_id

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


LOG_FILE_MODE = 0o640  # like the audit log: addresses and subjects are not for every user
REPORT_INTERVAL = 60.0  # most one report a minute of a log file that cannot be written

# Characters a peer can put in a logged value that would forge or hide text on a terminal or
# in a log viewer: C0 controls (CR and LF forge lines; ESC starts terminal sequences) but TAB,
# DEL and C1 controls, the line and paragraph separators U+2028/U+2029, bidi embeddings,
# overrides and isolates (U+202A-U+202E, U+2066-U+2069), marks and zero-width characters,
# the BOM and lone surrogates (undecodable bytes). They are written as \xNN / \uNNNN.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e"
                     "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_unsafe(text: str) -> str:
    """``text`` with every character of ``_UNSAFE`` written as an escape (cheap when there
    is none: one regex search)."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape_char, text)


class TextFormatter(logging.Formatter):
    """The text line format, with the message's unsafe characters escaped: one record is one
    line whatever a peer sent (a traceback, added after the message, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape_unsafe(record.message)
        return super().formatMessage(record)


def report_problem(message: str) -> None:
    """Say ``message`` where an operator sees it when the log file itself is the problem:
    standard error (the journal or terminal of ``empath run``) and syslog (best effort)."""
    text = f"empath[{os.getpid()}]: {message}"
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    try:
        import syslog

        syslog.syslog(syslog.LOG_MAIL | syslog.LOG_ERR, text)
    except (ImportError, OSError):
        pass


class ReopeningFileHandler(logging.FileHandler):
    """A FileHandler whose file can be reopened at its path (after rotation), created 0640.

    Neither a reopen nor a write that fails ever raises into the process: a reopen that cannot
    open the file keeps writing the previous stream, and failed writes are reported (standard
    error, syslog) at most once a minute, never once per record."""

    _failed_at: float | None = None
    _suppressed = 0

    def _open(self) -> Any:
        fd = os.open(self.baseFilename,
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def reopen(self) -> bool:
        """Open the file at its path again; False (the old stream kept) when that fails."""
        self.acquire()
        try:
            try:
                new = self._open()
            except OSError as exc:
                problem = (f"cannot reopen the log file {self.baseFilename}: "
                           f"{exc.strerror or exc}; still writing to the previous file")
                report_problem(problem)
                if self.stream is not None:
                    # The old file is what an operator is looking at, rotated or moved.
                    with contextlib.suppress(OSError, ValueError):
                        self.stream.write(problem + "\n")
                        self.stream.flush()
                return False
            old = self.stream
            self.stream = new
            if old is not None:
                with contextlib.suppress(OSError, ValueError):
                    old.close()
            return True
        finally:
            self.release()

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        now = time.monotonic()
        if self._failed_at is not None and now - self._failed_at < REPORT_INTERVAL:
            self._suppressed += 1
            return
        exc = sys.exc_info()[1]
        more = f" ({self._suppressed} more records lost)" if self._suppressed else ""
        report_problem(f"cannot write the log file {self.baseFilename}: "
                       f"{getattr(exc, 'strerror', None) or exc}{more}")
        self._failed_at, self._suppressed = now, 0


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
                else escape_unsafe(record.getMessage()))
        if self.inner is None and record.exc_info:
            body += "\n" + self.formatException(record.exc_info)
        return f"{tag}[{record.process}]: {body}"


_handler: logging.Handler | None = None
_stdio_file: str | None = None
_reopen_hooks: list[Callable[[], None]] = []


def configure(log_cfg: LogConfig) -> None:
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
                                    else TextFormatter(FORMAT))
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


def redirect_stdio(file: str | None, create_dirs: bool = True) -> None:
    """Point standard input at /dev/null and standard output and error at ``file`` (or
    /dev/null), so a detached daemon's stray output and tracebacks land in its log.
    OSError (nothing changed) when ``file`` cannot be opened."""
    global _stdio_file
    _stdio_file = file
    if file is not None:
        if create_dirs:
            os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
        out = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                      LOG_FILE_MODE)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    if file is None:
        out = null
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
        try:
            # Not the directories: one moved away is not made again behind the log's back.
            redirect_stdio(_stdio_file, create_dirs=False)
        except OSError as exc:  # standard output and error keep their previous file
            report_problem(f"cannot reopen {_stdio_file} for standard output and error: "
                           f"{exc.strerror or exc}")
    for hook in _reopen_hooks:
        try:
            hook()
        except Exception:
            logging.getLogger("empath").exception("reopening a file on SIGUSR1 failed")


def check_log_file(log_cfg: LogConfig) -> str | None:
    """Why the ``log`` section's file cannot be used (its directory cannot be created, or the
    file cannot be opened for appending), or None. Opens nothing else and writes nothing."""
    file = log_cfg.file
    if file is None or log_cfg.syslog is not None:
        return None
    directory = os.path.dirname(file) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        os.close(os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         LOG_FILE_MODE))
    except FileExistsError:  # from makedirs: something that is not a directory is in the way
        return f"log.file: cannot open {file}: {directory} is not a directory"
    except OSError as exc:
        return f"log.file: cannot open {file}: {exc.strerror or exc}"
    return None


def current_log_file() -> str | None:
    """The file records go to, or None for standard error."""
    if isinstance(_handler, ReopeningFileHandler):
        return _handler.baseFilename
    return None
