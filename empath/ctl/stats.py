"""``empathctl queue stats``: counts by state and destination domain, bytes, oldest message;
``--watch`` redraws them in place every ``--interval`` seconds.

In a terminal each refresh clears the screen and draws from the top; otherwise (a pipe, a log)
each refresh is appended, and with ``--json`` each is one line of JSON. The numbers come from
``empath.spool.queue.queue_stats``; envelopes of unchanged files are reused between refreshes.

Bytes and destinations cost a stat and a read of every queue file: a queue of a million
messages takes minutes to read. So a queue of more than ``FULL_LIMIT`` messages is counted
from its directory listings alone (names, no stat, no read: about half a second of kernel time
for a million), the oldest message found from its id (ids sort by arrival), and bytes and
destinations are left out (null) unless ``--full`` asks for them. The count of a directory
unchanged since it was last listed is reused from ``control/counts`` (empath/spool/counts.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from empath.ctl.common import (
    EXIT_OK,
    CtlError,
    emit_json,
    emit_json_line,
    format_age,
    format_size,
    open_queue,
)
from empath.ctl.records import stamp
from empath.spool.counts import DirCount, StateCounts
from empath.spool.ids import id_time
from empath.spool.queue import STATE_DIRS, STATUSES, Queue, QueueEntry, queue_stats

TOP_DOMAINS = 20  # destinations shown in text; --json has all of them
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen (ECMA-48)
FULL_LIMIT = 10_000  # larger queues are counted by name unless --full


def collect(queue: Queue, cache: dict[tuple[str, int, int, int], QueueEntry] | None = None,
            full: bool = False) -> dict[str, Any]:
    """The stats of the queue: in full (every file read) when asked or when the queue holds
    at most FULL_LIMIT messages, else counted from the directory listings."""
    counted = count_by_name(queue)
    if full or counted["total"]["messages"] <= FULL_LIMIT:
        return dict(queue_stats(queue.scan(cache=cache), time.time(), queue.is_frozen()),
                    detail="full")
    return counted


def count_by_name(queue: Queue) -> dict[str, Any]:
    """Messages per state from the directory listings alone (no stat, no read of any queue
    file); bytes and domains null. The count of a directory unchanged since it was last
    listed is taken from ``control/counts`` (empath.spool.counts) instead of listing it
    again. A message that moves while the states are counted may be counted twice or not at
    all."""
    spool = queue.spool
    now = time.time()
    counts = StateCounts(spool)
    states: dict[str, dict[str, int | None]] = {}
    oldest: tuple[str, str] | None = None  # (id, status)
    for status in STATUSES:
        try:
            if status == "active":
                names = [mid for _, mid in spool.list_active()]
                found = DirCount(len(names), min(names) if names else None)
            else:
                found = counts.count(STATE_DIRS[status])
        except PermissionError as exc:
            raise CtlError(f"permission denied reading {exc.filename or spool.root} (run as "
                           "the spool's owner or root)") from None
        states[status] = {"messages": found.messages, "bytes": None}
        if found.oldest is not None and (oldest is None or found.oldest < oldest[0]):
            oldest = (found.oldest, status)
    counts.save()
    total = sum(s["messages"] or 0 for s in states.values())
    return {
        "generated_at": now,
        "frozen": queue.is_frozen(),
        "detail": "counts",
        "total": {"messages": total, "bytes": None},
        "states": states,
        "domains": None,
        "oldest": None if oldest is None else {
            "id": oldest[0], "status": oldest[1], "age": max(0.0, now - id_time(oldest[0]))},
    }


def _size(value: int | None) -> str:
    return "-" if value is None else format_size(value)


def render(stats: dict[str, Any]) -> list[str]:
    total = stats["total"]
    size = ("bytes not counted" if total["bytes"] is None
            else f"{format_size(total['bytes'])} bytes")
    lines = [f"queue: {total['messages']} message(s), {size}"
             + ("   (delivery FROZEN)" if stats["frozen"] else "")]
    for status in STATUSES:
        s = stats["states"][status]
        lines.append(f"  {status:<9} {s['messages']:>8}  {_size(s['bytes']):>8}")
    oldest = stats["oldest"]
    if oldest is not None:
        lines.append(f"oldest: {oldest['id']} ({oldest['status']}), "
                     f"{format_age(oldest['age'])} old")
    domains = stats["domains"]
    if domains is None:
        lines.append(f"destinations and bytes: not counted (more than {FULL_LIMIT} messages; "
                     "--full reads every queue file)")
    elif domains:
        lines.append("destinations (recipients not yet delivered):")
        for name, d in list(domains.items())[:TOP_DOMAINS]:
            lines.append(f"  {name:<32} {d['messages']:>6} message(s) "
                         f"{d['recipients']:>6} recipient(s)")
        if len(domains) > TOP_DOMAINS:
            lines.append(f"  ... and {len(domains) - TOP_DOMAINS} more (see --json)")
    return lines


def cmd_stats(args: argparse.Namespace) -> int:
    queue = open_queue(args)
    if not args.watch:
        stats = collect(queue, full=args.full)
        if args.json:
            emit_json(stats)
        else:
            print("\n".join(render(stats)))
        return EXIT_OK
    return watch(queue, args.interval, args.json, args.count, args.full)


def watch(queue: Queue, interval: float, as_json: bool, count: int | None,
          full: bool = False) -> int:
    """Refresh until interrupted (Ctrl-C ends it with status 0) or ``count`` refreshes."""
    tty = sys.stdout.isatty()
    cache: dict[tuple[str, int, int, int], QueueEntry] = {}
    shown = 0
    try:
        while True:
            stats = collect(queue, cache, full)
            if as_json:
                emit_json_line(stats)
            else:
                head = f"every {interval:g}s   {stamp(stats['generated_at'])}"
                text = "\n".join([head, "", *render(stats)]) + "\n"
                sys.stdout.write((CLEAR + text) if tty else (text + "\n"))
                sys.stdout.flush()
            shown += 1
            if count is not None and shown >= count:
                return EXIT_OK
            time.sleep(interval)
    except KeyboardInterrupt:
        if tty and not as_json:
            sys.stdout.write("\n")
        return EXIT_OK
