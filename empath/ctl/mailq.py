"""``empath mailq`` (and ``sendmail -bp``): the queue in the traditional mailq layout.

    -Queue ID-                  --Size-- ----Arrival Time---- -Sender/Recipient-------
    01KB3X6Y5Q7ZPR0E2CQ8W4H2N9*      563 Tue Nov 25 09:00:00  alice@example.org
                                                              bob@example.net

    -- 1 Kbytes in 1 Request.

A mark after the id gives the state: ``*`` being delivered, ``!`` held, ``#`` failed (kept
for the operator), ``?`` corrupt; none for pending and deferred. Only recipients still waiting
are listed (all of them for a failed message), under the reason of their last failed attempt
in parentheses, as Postfix does. Read-only.
"""

from __future__ import annotations

import argparse
import sys
import time

from empath.ctl.common import EXIT_FAILED, EXIT_OK, CtlError, add_spool_options, error, open_queue
from empath.spool.queue import QueueEntry, QueueError
from empath.spool.records import Recipient, open_recipients

MARKS = {"active": "*", "held": "!", "failed": "#", "corrupt": "?"}
HEADER = (f"{'-Queue ID-':<27} {'--Size--':>8} {'----Arrival Time----':<20}  "
          "-Sender/Recipient-------")
INDENT = " " * (27 + 1 + 8 + 1 + 20 + 2)


def reason(rcpt: Recipient) -> str | None:
    last = rcpt.get("last")
    if not isinstance(last, dict) or rcpt.get("status", "pending") == "pending":
        return None
    words = " ".join(str(w) for w in (last.get("code"), last.get("enhanced"), last.get("text"))
                     if w not in (None, ""))
    server = last.get("server")
    return f"host {server} said: {words}" if server and server != "maildir" else words


def entry_lines(entry: QueueEntry) -> list[str]:
    env = entry.envelope
    size = int(env.get("data_size", entry.file_size)) if env else entry.file_size
    arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(entry.arrival))
    sender = env.get("sender", "?") if env is not None else "(unreadable)"
    first = (f"{entry.id + MARKS.get(entry.status, ''):<27} {size:>8} {arrival:<20}  "
             f"{sender or 'MAILER-DAEMON'}")
    lines = [first]
    if env is None:
        lines.append(f"({entry.error})")
        return lines
    waiting = env["recipients"] if entry.status == "failed" else open_recipients(env)
    groups: dict[str | None, list[str]] = {}
    for r in waiting:
        groups.setdefault(reason(r), []).append(str(r.get("address", "")))
    for why, addresses in groups.items():
        if why:
            lines.append(f"({why})")
        lines.extend(INDENT + a for a in addresses)
    return lines


def render(entries: list[QueueEntry]) -> str:
    if not entries:
        return "Mail queue is empty\n"
    out = [HEADER]
    for entry in entries:
        out.extend(entry_lines(entry))
        out.append("")
    total = sum(int(e.envelope.get("data_size", e.file_size)) if e.envelope else e.file_size
                for e in entries)
    n = len(entries)
    out.append(f"-- {(total + 1023) // 1024} Kbytes in {n} Request{'s' if n != 1 else ''}.")
    return "\n".join(out) + "\n"


def build_parser(prog: str = "mailq") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Print Empath's mail queue.")
    add_spool_options(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "mailq") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        queue = open_queue(args)
        sys.stdout.write(render(queue.scan()))
        sys.stdout.flush()
    except (CtlError, QueueError) as exc:
        error(prog, str(exc))
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_OK
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
