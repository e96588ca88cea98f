"""``empathctl queue stats``: counts by state and destination domain, bytes, oldest message;
``--watch`` redraws them in place every ``--interval`` seconds.

In a terminal each refresh clears the screen and draws from the top; otherwise (a pipe, a log)
each refresh is appended, and with ``--json`` each is one line of JSON. The numbers come from
``empath.spool.queue.queue_stats``; envelopes of unchanged files are reused between refreshes.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from empath.ctl.common import (
    EXIT_OK,
    emit_json,
    emit_json_line,
    format_age,
    format_size,
    open_queue,
)
from empath.ctl.records import stamp
from empath.spool.queue import STATUSES, Queue, QueueEntry, queue_stats

TOP_DOMAINS = 20  # destinations shown in text; --json has all of them
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen (ECMA-48)


def collect(queue: Queue, cache: dict[tuple[str, int, int, int], QueueEntry] | None = None
            ) -> dict[str, Any]:
    return queue_stats(queue.scan(cache=cache), time.time(), queue.is_frozen())


def render(stats: dict[str, Any]) -> list[str]:
    total = stats["total"]
    lines = [f"queue: {total['messages']} message(s), {format_size(total['bytes'])} bytes"
             + ("   (delivery FROZEN)" if stats["frozen"] else "")]
    for status in STATUSES:
        s = stats["states"][status]
        lines.append(f"  {status:<9} {s['messages']:>8}  {format_size(s['bytes']):>8}")
    oldest = stats["oldest"]
    if oldest is not None:
        lines.append(f"oldest: {oldest['id']} ({oldest['status']}), "
                     f"{format_age(oldest['age'])} old")
    domains = stats["domains"]
    if domains:
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
        stats = collect(queue)
        if args.json:
            emit_json(stats)
        else:
            print("\n".join(render(stats)))
        return EXIT_OK
    return watch(queue, args.interval, args.json, args.count)


def watch(queue: Queue, interval: float, as_json: bool, count: int | None) -> int:
    """Refresh until interrupted (Ctrl-C ends it with status 0) or ``count`` refreshes."""
    tty = sys.stdout.isatty()
    cache: dict[tuple[str, int, int, int], QueueEntry] = {}
    shown = 0
    try:
        while True:
            stats = collect(queue, cache)
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
