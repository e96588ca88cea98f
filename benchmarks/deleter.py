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

    python benchmarks/deleter.py DIR [DIR ...] [--complete-mode 0o100]

Runs until SIGTERM; prints how many files it removed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def sweep(directory: str, mode: int) -> int:
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
            os.unlink(path)
            removed += 1
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
    return removed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--complete-mode", type=lambda s: int(s, 0), default=0)
    ap.add_argument("--interval", type=float, default=0.01)
    args = ap.parse_args()
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    total = 0
    while not stopping:
        for d in args.dirs:
            total += sweep(d, args.complete_mode)
        time.sleep(args.interval)
    print(total, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
