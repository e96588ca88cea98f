"""Process-wide logging: one format, one destination (``log.file`` or standard error), reopened
on SIGUSR1.

Every process (master and children) writes lines like
``2026-11-25 09:00:00,123 INFO empath.master[1234]: listening on 127.0.0.1:2525`` to the same
file, opened in append mode so that lines of concurrent processes never overwrite each other.
After a log rotation renamed the file, ``reopen_logs()`` (on SIGUSR1) opens a new one at the
configured path; a detached daemon's standard output and error follow it too.

This module owns the root logger's handlers; it never decides *when* to reopen (the signal
handling of the master and the children does).
"""

from __future__ import annotations

import logging
import os
import sys

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


_handler: logging.Handler | None = None
_stdio_file: str | None = None


def setup_logging(file: str | None, level: str = "info") -> None:
    """Send every log record at ``level`` or above to ``file`` (None: standard error).

    Calling it again (on reload) replaces the destination and the level.
    """
    global _handler
    root = logging.getLogger()
    handler: logging.Handler
    if file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
        handler = ReopeningFileHandler(file, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
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


def reopen_logs() -> None:
    """Reopen the log file (and redirected standard output/error) at the configured path."""
    if isinstance(_handler, ReopeningFileHandler):
        _handler.reopen()
    if _stdio_file is not None:
        redirect_stdio(_stdio_file)


def current_log_file() -> str | None:
    """The file records go to, or None for standard error."""
    if isinstance(_handler, ReopeningFileHandler):
        return _handler.baseFilename
    return None
