"""The ``empathctl`` command: operator tools that work on the spool directly.

    empathctl queue list|view|retry|flush|delete|hold|release|freeze|unfreeze|stats ...
    empathctl cluster status [--json]
    empathctl spool set-permissions [-c CONFIG | --spool PATH --user USER [--group G]]

``hold`` and ``release`` take ids, or select with ``--all``, ``--domain``, ``--sender`` and
``--older-than``; ``list --limit N`` shows the oldest N. A change to more than 1,000 messages
reports its progress on standard error.
    empathctl version

Every command takes ``--spool PATH`` or ``-c CONFIG`` and reads and renames spool files itself
(no daemon connection, no state file of its own), so it works whether the daemon runs or not.
Exit statuses: 0 done, 1 failed or refused (the reason is on standard error), 2 usage error.
docs/OPERATIONS.md documents each command and the JSON output. This module only parses
arguments and reports errors; the commands live in ``commands.py`` and ``stats.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from empath.ctl.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CtlError,
    add_spool_options,
    error,
    parse_age,
)
from empath.spool.queue import FORCE_WAIT, STATUSES, QueueError

PROG = "empathctl"
Command = Callable[[argparse.Namespace], int]


def _lazy(module: str, name: str) -> Command:
    """Import a command's module only when it runs (keeps ``--help`` and errors fast)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        func: Command = getattr(importlib.import_module(module), name)
        return func(args)

    return run


def cmd_version(args: argparse.Namespace) -> int:
    from empath.cli import version_line

    print(version_line())
    return EXIT_OK


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Manage Empath's mail queue.")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = top.add_parser("version", help="print the version and the speedups in use")
    p.set_defaults(func=cmd_version)
    p = top.add_parser("passwd", help="set a user's SMTP AUTH password (argon2id)")
    from empath.ctl import passwd

    passwd.add_arguments(p)
    p.set_defaults(func=passwd.cmd_passwd)
    p = top.add_parser("dkim", help="DKIM keys")
    from empath.ctl import dkimkeys

    dkimkeys.add_arguments(p)
    p = top.add_parser("cluster", help="fleet mode: the nodes and their shared limits")
    from empath.ctl import cluster

    cluster.add_arguments(p)
    p = top.add_parser("spool", help="the spool itself: hand its files over to the "
                       "daemon's user")
    from empath.ctl import spoolperms

    spoolperms.add_arguments(p)
    q = top.add_parser("queue", help="list, inspect and change queued messages",
                       description="Queue management. Statuses: pending (incoming/), active "
                       "(claimed by a delivery worker), deferred, held, failed, corrupt.")
    q.set_defaults(usage_of=q)
    sub = q.add_subparsers(dest="action", metavar="ACTION")

    def add(name: str, module: str, func: str, help_text: str,
            json_help: str = "print a JSON document (docs/OPERATIONS.md)"
            ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        add_spool_options(sp)
        sp.add_argument("--json", action="store_true", help=json_help)
        sp.set_defaults(func=_lazy(f"empath.ctl.{module}", func))
        return sp

    def filters(sp: argparse.ArgumentParser, status: bool = True) -> None:
        if status:
            sp.add_argument("--status", choices=STATUSES, help="only messages in this state")
        sp.add_argument("--domain", metavar="D",
                        help="only messages with a recipient (still waiting) at domain D")
        sp.add_argument("--sender", metavar="S",
                        help="only messages from address S (<> for the null sender), or from "
                             "domain S when it has no @")
        sp.add_argument("--older-than", metavar="AGE", type=parse_age,
                        help="only messages older than AGE (90s, 15m, 2h, 3d)")

    sp = add("list", "commands", "cmd_list", "list queued messages, oldest first")
    filters(sp)
    sp.add_argument("--limit", type=_positive, metavar="N",
                    help="show only the N oldest matching messages (the total is still said)")
    def audited(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument("--audit-log", metavar="PATH",
                        help=f"{what} (default: the configuration's audit.log_path; none "
                             "with --spool)")

    sp = add("view", "commands", "cmd_view",
             "show one message: envelope, recipients, attempt history, metadata, headers, "
             "and its audit records (also once it has left the queue)")
    sp.add_argument("id", metavar="ID")
    audited(sp, "the audit log whose records to show")
    sp.add_argument("--body", action="store_true", help="print the message body too")
    sp = add("retry", "commands", "cmd_retry",
             "make deferred messages due now and wake the delivery workers")
    sp.add_argument("ids", nargs="*", metavar="ID")
    sp.add_argument("--all", action="store_true", help="every deferred message")
    sp.add_argument("--domain", metavar="D", help="with --all: only those for domain D")
    add("flush", "commands", "cmd_flush", "make every deferred message due now")
    sp = add("delete", "commands", "cmd_delete",
             "delete messages (no bounce); asks for confirmation unless --yes")
    sp.add_argument("ids", nargs="*", metavar="ID")
    sp.add_argument("--all", action="store_true",
                    help="every message of --status (and the other filters)")
    filters(sp)
    sp.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    sp.add_argument("--force", action="store_true",
                    help="delete even a message a delivery worker is delivering right now")
    audited(sp, "the audit log to record deletions in")
    sp = add("hold", "commands", "cmd_hold",
             "move messages to hold/, where no worker looks: by id, or every pending, "
             "deferred or active message that matches --domain/--sender/--older-than, or "
             "--all of them")
    sp.add_argument("ids", nargs="*", metavar="ID")
    sp.add_argument("--all", action="store_true",
                    help="every waiting message (and the other filters)")
    filters(sp, status=False)
    sp.add_argument("--force", action="store_true",
                    help="for a message being delivered: wait for the attempt to end, then "
                         "hold it")
    sp.add_argument("--wait", type=float, default=FORCE_WAIT, metavar="SECONDS",
                    help=f"with --force, wait at most this long (default {FORCE_WAIT:g})")
    audited(sp, "the audit log to record holds in")
    sp = add("release", "commands", "cmd_release",
             "deliver held messages now: by id, or every held message that matches "
             "--domain/--sender/--older-than, or --all of them")
    sp.add_argument("ids", nargs="*", metavar="ID")
    sp.add_argument("--all", action="store_true", help="every held message (and the other "
                    "filters)")
    filters(sp, status=False)
    audited(sp, "the audit log to record releases in")
    sp = add("freeze", "commands", "cmd_freeze",
             "stop new delivery attempts (new mail is still accepted)")
    sp.set_defaults(frozen=True)
    sp = add("unfreeze", "commands", "cmd_freeze", "resume delivery attempts")
    sp.set_defaults(frozen=False)
    sp = add("stats", "stats", "cmd_stats",
             "counts by state and destination, bytes, oldest message",
             json_help="print a JSON document (with --watch: one JSON line per refresh)")
    sp.add_argument("--watch", action="store_true", help="refresh until interrupted")
    sp.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                    help="seconds between refreshes (default 2)")
    sp.add_argument("--count", type=int, default=None, metavar="N",
                    help="with --watch, stop after N refreshes")
    sp.add_argument("--full", action="store_true",
                    help="bytes and destinations even of a queue of more than 10,000 messages "
                         "(reads every queue file)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        getattr(args, "usage_of", parser).print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.func(args)
    except CtlError as exc:
        error(PROG, str(exc))
        return exc.code
    except QueueError as exc:
        error(PROG, str(exc))
        return EXIT_FAILED
    except PermissionError as exc:
        error(PROG, f"permission denied: {exc.filename or ''}: {exc.strerror or exc} (run "
                    "as the spool's owner or root)")
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (``| head``): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_FAILED
    except OSError as exc:
        error(PROG, f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
