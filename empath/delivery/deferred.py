"""A delivery worker's view of ``deferred/``: which messages come due when.

A deferred file's mtime is its due time (docs/SPOOL.md). ``DeferredQueue`` keeps the due times
of ``deferred/`` in a compact schedule (``schedule.py``, ~34 bytes a message), rebuilt from a
listing every ``queue_scan_interval`` (or at once when an operator asks: ``rescan``). The
listing is read in slices of ``SCAN_SLICE`` files between other work (``advance``), so a
worker started on a deferred queue of a million messages claims and delivers new mail while
it is still reading ``deferred/``; the entries read so far come due meanwhile. Like the
listing of ``incoming/``, it takes no more than ``LISTING_SHARE`` of the worker's time.

Two rules about the due times live here too: a due time further ahead than any retry delay
(``horizon``) was set by a clock that has since moved back, and counts as due now; and when
the wall clock jumps back against the monotonic clock by more than ``CLOCK_JUMP``
(``check_clock``), the due times of this worker's deferred files are moved back by the jump,
so the jump does not stall them.

It never claims a message (the worker does, with what ``schedule.pop_due`` gives it) and
never builds a spool path: the listing and the shift of due times are the spool's.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator

from empath.delivery.schedule import DueSchedule
from empath.spool import Spool

log = logging.getLogger("empath.delivery")

# Listing a directory costs time in proportion to its size: never more than this share of a
# worker's time goes to listing (a backlog of 800,000 files takes about a second to list).
LISTING_SHARE = 0.1
SCAN_SLICE = 2000  # files of deferred/ read between two turns of the event loop
CLOCK_JUMP = 5.0  # a wall-clock step (against the monotonic clock) beyond this is a jump


class DeferredQueue:
    """The due times of ``deferred/`` as one worker knows them."""

    def __init__(self, spool: Spool, *, scan_interval: float, horizon: float,
                 own: Callable[[str], bool], foreign_delay: float) -> None:
        self.spool = spool
        self.scan_interval = scan_interval
        # No due time a worker sets lies further ahead than this; one that does counts as
        # due now (see the module docstring).
        self.horizon = horizon
        self.own = own  # whether a queue id is of this worker's shard
        self.foreign_delay = foreign_delay  # added to the due time of another shard's file
        self.schedule = DueSchedule()  # deferred/ as last listed (entries not yet claimed)
        self.next_scan = 0.0  # monotonic time of the next listing
        # The listing being read (slice by slice), and the time it has cost.
        self._scan: Iterator[os.DirEntry[str]] | None = None
        self._scan_cost = 0.0
        self._scan_read = 0
        self.clock_offset = time.time() - time.monotonic()

    @property
    def scanning(self) -> bool:
        return self._scan is not None

    def rescan(self) -> None:
        """List ``deferred/`` again at once (an operator made messages due, the clock jumped)."""
        self.next_scan = 0.0

    def advance(self) -> bool:
        """Start a listing when one is due (a new one replaces one being read), then read
        one slice of it; True while the listing is unfinished."""
        if time.monotonic() >= self.next_scan:
            self._start()
        if self._scan is None:
            return False
        return not self._read_slice(time.time(), SCAN_SLICE)

    def scan_all(self, now: float) -> None:
        """Rebuild the schedule from ``deferred/`` at once."""
        self._start()
        while self._scan is not None and not self._read_slice(now, SCAN_SLICE):
            pass

    def stop(self) -> None:
        """Close a listing being read."""
        if self._scan is not None:
            close = getattr(self._scan, "close", None)
            if close is not None:
                close()
            self._scan = None

    def _start(self) -> None:
        self.stop()
        self.schedule.clear()
        self._scan_cost = 0.0
        self._scan_read = 0
        self.next_scan = math.inf  # until this listing ends (or a rescan is asked)
        try:
            self._scan = os.scandir(self.spool.state_dir("deferred"))
        except FileNotFoundError:
            self._end()

    def _end(self) -> None:
        self.stop()
        # Listing a huge deferred/ costs seconds: never more than LISTING_SHARE of the time.
        wait = max(self.scan_interval, self._scan_cost / LISTING_SHARE)
        self.next_scan = time.monotonic() + wait
        log.log(logging.INFO if self._scan_read > SCAN_SLICE else logging.DEBUG,
                "deferred/ listed: %d message(s) in %.2fs of work; next listing in %.0fs",
                self._scan_read, self._scan_cost, wait)

    def _read_slice(self, now: float, count: int) -> bool:
        """Read up to ``count`` more files of the listing into the schedule (due time =
        mtime); True when the listing is finished."""
        started = time.monotonic()
        entries = self._scan
        assert entries is not None
        batch: list[tuple[float, str]] = []
        finished = True
        for entry in entries:
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if mtime - now > self.horizon:
                log.warning("%s: due %s, further ahead than any retry delay (the "
                            "clock moved back?); due now", entry.name,
                            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime)))
                mtime = now
            if not self.own(entry.name):
                mtime += self.foreign_delay
            batch.append((mtime, entry.name))
            if len(batch) >= count:
                finished = False
                break
        self.schedule.add(batch)
        self._scan_read += len(batch)
        self._scan_cost += time.monotonic() - started
        if finished:
            self._end()
        return finished

    def check_clock(self) -> None:
        """Detect a wall-clock jump against the monotonic clock; after a backward one, move
        this shard's future due times back by the jump (they were set by the old clock)."""
        offset = time.time() - time.monotonic()
        jump = offset - self.clock_offset
        if abs(jump) <= CLOCK_JUMP:
            return
        self.clock_offset = offset
        log.warning("the wall clock jumped by %+.0fs; re-reading deferred due times", jump)
        self.rescan()
        if jump < 0:
            try:
                moved = self.spool.shift_due_times(jump, time.time(), self.own)
            except OSError as exc:
                log.error("cannot move due times back: %s", exc)
                return
            if moved:
                log.warning("moved the due times of %d deferred message(s) back by %.0fs",
                            moved, -jump)
