"""What every operator command shares: finding the spool (``--spool`` or ``-c``), errors and
exit statuses, JSON output, and the formatting of ages and sizes.

Exit statuses of ``empathctl``, ``empath mailq``: 0 success, 1 the operation failed or was
refused (unknown id, claimed message, unreadable spool, configuration error), 2 usage error.
This module never changes the spool.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any

import orjson

from empath.spool import Spool
from empath.spool.queue import Queue, QueueError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CtlError(Exception):
    """A failure to report on standard error; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def add_spool_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("spool")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--spool", metavar="PATH",
                       help="spool directory (instead of the configuration's spool.path)")
    where.add_argument("-c", "--config", metavar="FILE",
                       help="configuration file (default: $EMPATH_CONFIG, "
                            "/etc/empath/empath.yaml if it exists, the checkout's, else "
                            "the embedded default)")


@functools.cache
def load_settings(config: str | None) -> Any:
    """The validated configuration (``-c``, else the same default as ``empath``); read once
    per process (a command run as root may no longer read it once it acts as the spool's
    owner)."""
    from empath.config import ConfigError, defaults

    try:
        # Paths only: a broken certificate must not stop queue management.
        return defaults.load(config, check_contents=False)
    except ConfigError as exc:
        raise CtlError(str(exc)) from None
    except OSError as exc:
        raise CtlError(f"cannot read the configuration: {exc}") from None


def spool_path(args: argparse.Namespace) -> str:
    if getattr(args, "spool", None):
        return str(args.spool)
    return str(load_settings(getattr(args, "config", None)).spool.path)


def audit_settings(args: argparse.Namespace) -> tuple[str | None, bool]:
    """The audit log (path, redact local parts?): ``--audit-log``, else the configuration's
    ``audit.log_path`` (not with ``--spool``, which reads no configuration)."""
    if getattr(args, "audit_log", None):
        return str(args.audit_log), False
    if getattr(args, "spool", None):
        return None, False
    audit = load_settings(getattr(args, "config", None)).audit
    return audit.log_path, bool(audit.redact_local_parts)


def act_as_spool_owner(path: str) -> None:
    """Run as root on a spool another user owns (the daemon's ``user``): become that user
    before touching it. The spool's owner can replace its directories with links (control/
    with a link to /etc, say); as root, ``queue freeze`` would then create a file there, and
    a listing's cache or a rename go wherever the links lead. As the owner, nothing can be
    done through them that the owner could not do already."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(os.path.realpath(path))
    except OSError:
        return  # Queue.check() says what is wrong with it
    if st.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)


def open_queue(args: argparse.Namespace) -> Queue:
    """The Queue of ``--spool`` or of the configuration's spool, checked to be readable; run
    as root, the rest of the command runs as the spool's owner (``act_as_spool_owner``)."""
    path = spool_path(args)  # the configuration, if any, is read (and kept) as root
    act_as_spool_owner(path)
    queue = Queue(Spool(path))
    try:
        queue.check()
    except QueueError as exc:
        raise CtlError(str(exc)) from None
    return queue


def emit_json(value: Any) -> None:
    """Write one JSON document (2-space indent, newline-terminated) on standard output."""
    sys.stdout.buffer.write(orjson.dumps(value, option=orjson.OPT_INDENT_2
                                         | orjson.OPT_NON_STR_KEYS) + b"\n")
    sys.stdout.flush()


def emit_json_line(value: Any) -> None:
    """Write one compact JSON document on one line (``stats --watch --json``)."""
    sys.stdout.buffer.write(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS) + b"\n")
    sys.stdout.flush()


def error(prog: str, message: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr)


def format_age(seconds: float) -> str:
    """``45s``, ``12m``, ``3h05m``, ``2d04h``: two units at most."""
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_size(size: int) -> str:
    """Bytes as ``512``, ``1.5K``, ``34M``, ``2.0G``."""
    value = float(size)
    for unit in ("", "K", "M", "G"):
        if value < 1024 or unit == "G":
            if unit == "":
                return str(size)
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    return str(size)


def parse_age(text: str) -> float:
    """``--older-than`` values: ``90s``, ``15m``, ``2h``, ``3d`` or seconds."""
    from empath.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
