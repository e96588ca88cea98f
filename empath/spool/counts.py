"""Messages per state directory, counted from its listing, and remembered in ``control/counts``
for as long as the directory provably has not changed since.

Listing a directory of a million names costs about half a second of kernel time (getdents
of ~30 MB of entries) however it is done; ``empathctl queue stats`` asks for nothing more than
the number of ids in each state and the smallest id (the oldest message). So each count is
kept with the directory's *stamp*: device, inode, mtime, ctime and size, all of which a
creation, unlink or rename in the directory changes (mtime and ctime to the time of the
change). A later count whose ``stat`` of the directory gives the same stamp reuses the number
instead of listing again; any other stamp means a listing.

Why a same stamp means the same names. Timestamps are taken from a coarse clock (a few
milliseconds on ext4, a second or two on some filesystems), so two changes within one tick
can leave one mtime. A count is therefore recorded only when (1) the directory's mtime and
ctime were more than ``SETTLE`` seconds before the listing began, and (2) a ``stat`` after the
listing gives the same stamp as before it. Then no change happened during the listing (any
change from its start on would carry a later timestamp, so (2) would fail), and any change
afterwards carries a later timestamp too, so a reader sees a different stamp. A ``utime`` on
the directory sets its ctime to the present, so not even a reset mtime passes. What is not
covered: the wall clock set back by more than ``SETTLE`` and a change then landing on the very
same nanosecond as the recorded stamp.

The file is a cache, not a record: written by whoever counted (``empathctl``, as the spool's
owner or root) with a rename, never fsynced, ignored when missing, unreadable or malformed,
and never written when the spool refuses (read-only, full, another user's). It works the same
whether the daemon runs or not: nobody has to keep it up to date, a changed directory simply
is listed again.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson

from empath._speedups import list_names
from empath.spool.ids import is_valid_id, valid_ids
from empath.spool.layout import QUEUE_STATES, Spool

SETTLE = 2.0  # seconds a directory must have been unchanged before its listing is recorded
VERSION = 1

Stamp = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class DirCount:
    """The queue ids in one state directory: how many, and the smallest (the oldest)."""

    messages: int
    oldest: str | None


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


class StateCounts:
    """Counts of the state directories of one spool, reusing ``control/counts`` where the
    directory is unchanged; ``save`` records the new counts that may be reused."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._known: dict[str, tuple[Stamp, DirCount]] = _load(spool.counts_file)
        self._changed = False
        self.listed: list[str] = []  # states that had to be listed (not reused)

    def count(self, state: str) -> DirCount:
        """The ids in ``state`` (a directory of ``Spool.state_dir``). FileNotFoundError is a
        missing directory: nothing in it; PermissionError propagates."""
        path = self.spool.state_dir(state)
        began = time.time_ns()
        try:
            before = stamp_of(os.stat(path))
        except FileNotFoundError:
            return DirCount(0, None)
        known = self._known.get(state)
        if known is not None and known[0] == before:
            return known[1]
        self.listed.append(state)
        try:
            ids = valid_ids(list_names(path))
        except FileNotFoundError:
            return DirCount(0, None)
        found = DirCount(len(ids), min(ids) if ids else None)
        with contextlib.suppress(FileNotFoundError):
            settled = max(before[2], before[3]) < began - int(SETTLE * 1e9)
            if settled and stamp_of(os.stat(path)) == before:
                self._known[state] = (before, found)
                self._changed = True
        return found

    def save(self) -> None:
        """Write the counts to ``control/counts`` if any were recorded; quietly nothing when
        the spool does not take the write."""
        if not self._changed:
            return
        doc = {"version": VERSION, "states": {
            state: {"stamp": list(st), "messages": c.messages, "oldest": c.oldest}
            for state, (st, c) in sorted(self._known.items())}}
        target = self.spool.counts_file
        tmp = os.path.join(os.path.dirname(target),
                           f".counts-{os.getpid()}-{threading.get_ident()}")
        try:
            # A new file, never one found at that name (a link planted for root to write
            # through, or one left by a killed process with this pid): unlink, then O_EXCL.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, orjson.dumps(doc))
            finally:
                os.close(fd)
            os.rename(tmp, target)  # replaces the name, whatever it was: nothing is followed
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        self._changed = False


def _load(path: str) -> dict[str, tuple[Stamp, DirCount]]:
    """The recorded counts; empty when the file is missing, unreadable or malformed (each
    malformed state entry is dropped alone)."""
    try:
        # Only a regular file, not through a link: a FIFO there must not hang root's
        # empathctl, nor a symlink make it read another file.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        doc: Any = orjson.loads(os.read(fd, 1 << 20))
    except (OSError, orjson.JSONDecodeError):
        return {}
    finally:
        os.close(fd)
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        return {}
    states = doc.get("states")
    if not isinstance(states, dict):
        return {}
    out: dict[str, tuple[Stamp, DirCount]] = {}
    for state, entry in states.items():
        if state not in QUEUE_STATES or not isinstance(entry, dict):
            continue
        st, messages, oldest = entry.get("stamp"), entry.get("messages"), entry.get("oldest")
        if (not isinstance(st, list) or len(st) != 5
                or not all(type(v) is int for v in st)
                or type(messages) is not int or messages < 0
                or not (oldest is None or (isinstance(oldest, str) and is_valid_id(oldest)))
                or (oldest is None) != (messages == 0)):
            continue
        out[state] = ((st[0], st[1], st[2], st[3], st[4]), DirCount(messages, oldest))
    return out
