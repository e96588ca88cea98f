"""Removes finished queue files as they appear, so a receive-only run sees a steady state.

A receive-only benchmark holds delivery (Empath frozen, Postfix without its queue manager), so
without this the queue directory would only grow, and the filesystem would be measured on a
fresh, ever-growing directory instead of the steady state of a working MTA, where every
received file is soon deleted again (on ext4 without a journal, creating files right after
deletions costs several times more). This process stands in for delivery: every 10 ms it
lists each directory and unlinks what it finds.

``--complete-mode`` restricts it to files whose permission bits include that mode: Postfix's
cleanup creates a queue file 0600 and sets the owner-execute bit once the file is complete
(fsynced), so ``--complete-mode 0o100`` never touches a file that is still being written.
Empath renames only complete files into ``incoming/``, so its directory needs no check.

``--spool PATH`` makes it finish Empath's messages the way a delivery worker does
(``Spool.retire``: a rename into ``recycle/`` while the worker has put fewer than
``--recycle-files`` (default 1000, the default of ``spool.recycle_files``) there, else an unlink).

    python benchmarks/deleter.py DIR [DIR ...] [--complete-mode 0o100] [--spool PATH]

Runs until SIGTERM; prints how many files it removed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sweep(directory: str, mode: int, finish: Callable[[str], None] = os.unlink) -> int:
    removed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        path = os.path.join(directory, name)
        try:
            if mode and not os.stat(path).st_mode & mode:
                continue
            finish(path)
            removed += 1
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
    return removed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--complete-mode", type=lambda s: int(s, 0), default=0)
    ap.add_argument("--interval", type=float, default=0.01)
    ap.add_argument("--spool", help="Empath's spool: finish files as a delivery worker does")
    ap.add_argument("--recycle-files", type=int, default=1000)
    args = ap.parse_args()
    finish: Callable[[str], None] = os.unlink
    if args.spool:
        from empath.spool import Spool

        finish = Spool(args.spool, args.recycle_files).retire
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    total = 0
    while not stopping:
        for d in args.dirs:
            total += sweep(d, args.complete_mode, finish)
        time.sleep(args.interval)
    print(total, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
