"""``empathctl queue`` commands that list, show and change messages: list, view, retry, flush,
delete, hold, release, freeze, unfreeze.

Each ``cmd_*`` takes the parsed arguments and returns the exit status; the spool work is done
by ``empath.spool.queue``. Results of changes go to standard output, refusals and unknown ids
to standard error (or all of them in one JSON document with ``--json``); the status is 1 when
any message could not be handled as asked.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from empath.ctl.common import (
    EXIT_FAILED,
    EXIT_OK,
    CtlError,
    audit_settings,
    emit_json,
    open_queue,
)
from empath.ctl.records import (
    LIST_HEADER,
    audit_lines,
    entry_record,
    list_lines,
    message_parts,
    view_lines,
    view_record,
)
from empath.observe.audit import AuditLog, read_records
from empath.spool.queue import Outcome, Queue, QueueEntry, matches

PROG = "empathctl"
T = TypeVar("T")
R = TypeVar("R")
PROGRESS_MIN = 1000  # a change to more messages than this shows progress on standard error
PROGRESS_EVERY = 0.25  # seconds between progress updates


class Progress:
    """``verb: n/total what`` on standard error while a change to more than PROGRESS_MIN
    messages runs: redrawn in place on a terminal, a line every PROGRESS_EVERY seconds
    otherwise (and the last one always). Nothing with ``--json`` or for fewer messages."""

    def __init__(self, args: argparse.Namespace, verb: str, total: int, what: str) -> None:
        self.verb, self.total, self.what = verb, total, what
        self.show = total > PROGRESS_MIN and not getattr(args, "json", False)
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def step(self, n: int) -> None:
        if not self.show or (time.monotonic() - self.last < PROGRESS_EVERY and n != self.total):
            return
        self.last = time.monotonic()
        line = f"{self.verb}: {n}/{self.total} {self.what}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.show and self.tty:
            print(file=sys.stderr)


def _each(args: argparse.Namespace, verb: str, what: str, items: list[T],
          func: Callable[[T], R]) -> list[R]:
    """``func(item)`` for every item, with progress for large batches."""
    progress = Progress(args, verb, len(items), what)
    outcomes: list[R] = []
    for n, item in enumerate(items, 1):
        outcomes.append(func(item))
        progress.step(n)
    progress.end()
    return outcomes


def _filtered(queue: Queue, args: argparse.Namespace, statuses: list[str] | None,
              now: float) -> list[QueueEntry]:
    return [e for e in queue.scan(statuses)
            if matches(e, getattr(args, "domain", None), getattr(args, "sender", None),
                       getattr(args, "older_than", None), now)]


def _report(args: argparse.Namespace, outcomes: list[Outcome], extra: dict[str, Any] | None = None
            ) -> int:
    """Print outcomes (text or JSON); 0 when every one is ok, else 1."""
    if args.json:
        emit_json({**(extra or {}), "results": [
            {"id": o.id, "ok": o.ok, "result": o.result, "status": o.status,
             "message": o.message} for o in outcomes]})
    else:
        for o in outcomes:
            if o.ok:
                print(f"{o.id}: {o.message}")
            else:
                print(f"{PROG}: {o.id}: {o.message}", file=sys.stderr)
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_FAILED


# -- reading ---------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    queue = open_queue(args)
    now = time.time()
    entries = _filtered(queue, args, [args.status] if args.status else None, now)
    total = len(entries)
    limit = getattr(args, "limit", None)
    if limit is not None:
        entries = entries[:limit]
    records = [entry_record(e, now) for e in entries]
    if args.json:
        emit_json({"generated_at": now, "frozen": queue.is_frozen(), "count": len(records),
                   "total": total, "messages": records})
        return EXIT_OK
    filtered = any(getattr(args, k, None) is not None
                   for k in ("status", "domain", "sender", "older_than"))
    if not records:
        print("no matching messages" if filtered else "the queue is empty")
        return EXIT_OK
    print(LIST_HEADER)
    for record in records:
        print("\n".join(list_lines(record, now)))
    size = sum(r["size"] for r in records)
    shown = (f"the oldest {len(records)} of {total} message(s) (--limit)" if total > len(records)
             else f"{len(records)} message(s)")
    print(f"-- {shown}, {size} bytes"
          + ("; delivery is FROZEN" if queue.is_frozen() else ""))
    return EXIT_OK


def cmd_view(args: argparse.Namespace) -> int:
    queue = open_queue(args)
    audit_path, _ = audit_settings(args)
    events = read_records(audit_path, args.id) if audit_path else []
    for _ in range(5):  # a worker may move the file while we read it: read it where it went
        entry = queue.locate(args.id)
        if entry is None and events:
            return _view_departed(args, events)
        if entry is None:
            raise CtlError(f"{args.id}: no such message in the queue"
                           + ("" if len(args.id) == 26 else " (a queue id has 26 characters)"))
        try:
            headers, body = message_parts(entry) if entry.envelope else ([], b"")
            break
        except FileNotFoundError:
            continue
    else:
        raise CtlError(f"{args.id}: kept moving while being read; try again")
    now = time.time()
    record = view_record(entry, now, headers, body if args.body else None)
    if args.json:
        emit_json({**record, "audit": events} if audit_path else record)
        return EXIT_OK
    print("\n".join(view_lines(record, now)))
    if audit_path:
        print("\n".join(audit_lines(events)))
    if args.body:
        print("body:")
        sys.stdout.flush()
        sys.stdout.buffer.write(body)
        if body and not body.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
    return EXIT_OK


def _view_departed(args: argparse.Namespace, events: list[dict[str, Any]]) -> int:
    """A message no longer queued (delivered, bounced, deleted) but in the audit log."""
    if args.json:
        emit_json({"id": args.id, "status": None, "audit": events})
        return EXIT_OK
    print(f"id:          {args.id}")
    print("status:      not in the queue (its audit records follow)")
    print("\n".join(audit_lines(events)))
    return EXIT_OK


def _audit_changes(args: argparse.Namespace, event: str, outcomes: list[Outcome],
                   before: dict[str, QueueEntry]) -> None:
    """One audit record per message an operator changed (``done`` outcomes)."""
    path, redact = audit_settings(args)
    if path is None:
        return
    log = AuditLog(path, redact)
    try:
        operator = getpass.getuser()
    except (KeyError, OSError):
        operator = None
    for o in outcomes:
        if o.result != "done":
            continue
        entry = before.get(o.id)
        env = entry.envelope if entry is not None else None
        log.write(event, o.id, operator=operator,
                  previous=entry.status if entry is not None else None, status=o.status,
                  sender=env.get("sender") if env else None,
                  recipients=[str(r.get("address")) for r in env.get("recipients", [])]
                  if env else None, force=True if getattr(args, "force", False) else None)
    log.close()


def _located(queue: Queue, ids: list[str]) -> dict[str, QueueEntry]:
    found = {}
    for message_id in ids:
        entry = queue.locate(message_id)
        if entry is not None:
            found[message_id] = entry
    return found


# -- changes ---------------------------------------------------------------------------------
def cmd_retry(args: argparse.Namespace) -> int:
    if args.all == bool(args.ids):
        raise CtlError("give message ids or --all (not both)", 2)
    if args.domain and not args.all:
        raise CtlError("--domain goes with --all", 2)
    queue = open_queue(args)
    now = time.time()
    if args.all:
        outcomes = _each(args, "retry", "deferred messages made due",
                         _filtered(queue, args, ["deferred"], now),
                         lambda e: queue.make_entry_due(e, now))
    else:
        outcomes = [queue.make_due(i, now) for i in args.ids]
    done = sum(o.result == "done" for o in outcomes)
    if done:
        queue.wake()
    if args.all and not args.json:
        print(f"{done} deferred message(s) made due now")
        return _report(args, [o for o in outcomes if not o.ok])
    return _report(args, outcomes, {"due_now": done})


def cmd_flush(args: argparse.Namespace) -> int:
    queue = open_queue(args)
    ids = queue.deferred_ids()
    total = len(ids)
    now = time.time()
    done = sum(_each(args, "flush", "deferred messages made due", ids,
                     lambda message_id: queue.touch_deferred(message_id, now)))
    if done:
        queue.wake()
    if args.json:
        emit_json({"deferred": total, "due_now": done})
    else:
        print(f"{done} deferred message(s) made due now"
              + (f" ({total - done} taken by workers meanwhile)" if total > done else ""))
    return EXIT_OK


def _confirm(question: str) -> bool:
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def cmd_delete(args: argparse.Namespace) -> int:
    if args.all == bool(args.ids):
        raise CtlError("give message ids or --all --status STATUS (not both)", 2)
    if args.all and not args.status:
        raise CtlError("--all needs --status (pending, deferred, held, failed, corrupt or "
                       "active), so that a whole queue is never deleted by accident", 2)
    if not args.all and (args.status or args.domain or args.sender or args.older_than):
        raise CtlError("--status, --domain, --sender and --older-than go with --all", 2)
    queue = open_queue(args)
    now = time.time()
    early: list[Outcome] = []
    found: list[QueueEntry] = []
    if args.all:
        found = _filtered(queue, args, [args.status], now)
    else:
        for message_id in dict.fromkeys(args.ids):
            entry = queue.locate(message_id)
            if entry is None:
                early.append(queue.delete(message_id))  # reports "unknown", changes nothing
            else:
                found.append(entry)
    targets = []
    for entry in found:
        if entry.claimed_by_live_worker and not args.force:
            early.append(queue.delete(entry.id))  # reports the refusal, changes nothing
        else:
            targets.append(entry)
    if targets and not args.yes:
        what = f"{len(targets)} message(s)"
        if args.all:
            what = f"all {len(targets)} {args.status} message(s)"
        if not _confirm(f"Delete {what}? This cannot be undone."):
            print(f"{PROG}: nothing deleted", file=sys.stderr)
            if early:
                _report(args, early)
            return EXIT_FAILED
    outcomes = early + _each(args, "delete", "messages deleted", targets,
                             lambda e: queue.delete(e.id, force=args.force))
    queue.sync()
    _audit_changes(args, "deleted", outcomes, {e.id: e for e in targets})
    if args.all and not targets and not args.json:
        print(f"no {args.status} messages to delete")
    return _report(args, outcomes, {"deleted": sum(o.result == "done" for o in outcomes)})


def _selection(args: argparse.Namespace, queue: Queue, statuses: list[str]
               ) -> tuple[list[str], dict[str, QueueEntry]]:
    """The ids ``hold``/``release`` act on: the ones given, or with ``--all``, ``--domain``,
    ``--sender`` (or ``--older-than``) every message in ``statuses`` that matches, oldest
    first; and what each was before (for the audit log)."""
    bulk = args.all or any(getattr(args, k, None) is not None
                           for k in ("domain", "sender", "older_than"))
    if bulk == bool(args.ids):
        raise CtlError("give message ids, or select with --all, --domain, --sender or "
                       "--older-than (not both)", 2)
    if not bulk:
        ids = list(dict.fromkeys(args.ids))
        return ids, _located(queue, ids)
    entries = _filtered(queue, args, statuses, time.time())
    return [e.id for e in entries], {e.id: e for e in entries}


def _bulk_report(args: argparse.Namespace, verb: str, outcomes: list[Outcome]) -> int:
    """A selection's summary line, then only the messages not handled (text); or every
    outcome (JSON)."""
    done = sum(o.result == "done" for o in outcomes)
    if args.json:
        return _report(args, outcomes, {verb: done})
    print(f"{done} message(s) {verb}"
          + (f", {len(outcomes) - done} not (see below)" if len(outcomes) > done else ""))
    return _report(args, [o for o in outcomes if not o.ok])


def cmd_hold(args: argparse.Namespace) -> int:
    queue = open_queue(args)
    ids, before = _selection(args, queue, ["pending", "deferred", "active"])
    outcomes = _each(args, "hold", "messages held", ids,
                     lambda i: queue.hold(i, force=args.force, wait=args.wait))
    queue.sync()
    _audit_changes(args, "held", outcomes, before)
    if not args.ids:
        return _bulk_report(args, "held", outcomes)
    return _report(args, outcomes)


def cmd_release(args: argparse.Namespace) -> int:
    queue = open_queue(args)
    ids, before = _selection(args, queue, ["held"])
    outcomes = _each(args, "release", "messages released", ids, queue.release)
    queue.sync()
    _audit_changes(args, "released", outcomes, before)
    if any(o.result == "done" for o in outcomes):
        queue.wake()
    if not args.ids:
        return _bulk_report(args, "released", outcomes)
    return _report(args, outcomes)


def cmd_freeze(args: argparse.Namespace) -> int:
    queue = open_queue(args)
    queue.freeze(args.frozen)
    if not args.frozen:
        queue.wake()
    if args.json:
        emit_json({"frozen": args.frozen})
    elif args.frozen:
        print("delivery frozen: workers start no new attempts (attempts in progress finish; "
              "new mail is still accepted)")
    else:
        print("delivery resumed")
    return EXIT_OK
