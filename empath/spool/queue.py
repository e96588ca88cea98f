"""Operator-side queue operations: what ``empathctl`` and ``mailq`` do to the spool.

Listing messages with their envelopes, finding one by id, making deferred messages due now,
hold and release, delete, freeze, and the numbers behind ``empathctl queue stats``. There is no
state of its own: every answer is read from the spool, every change is one ``utime``, rename or
unlink of a queue file, through ``Spool``'s paths, so it works the same whether the daemon runs
or not.

Operator names of the states (docs/OPERATIONS.md): ``pending`` is incoming/, ``active`` is
active/<pid>/, ``deferred``, ``held`` is hold/, ``failed``, ``corrupt``.

Races with the delivery workers are normal. Any rename or unlink may meet ENOENT because a
worker claimed, deferred or finished the message meanwhile; the operation then looks the message
up again and decides anew, and says what happened. A message in active/<pid>/ of a live worker
is never touched unless the operator forces it (see ``Queue.delete`` and ``Queue.hold`` for what
forcing does and why it is safe). This module must never rewrite an envelope: the delivery
workers own delivery state.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from empath.spool.counts import StateCounts
from empath.spool.fileformat import CorruptFile, read_queue_file
from empath.spool.ids import id_time, is_valid_id
from empath.spool.layout import Spool, pid_alive
from empath.spool.records import Envelope, open_recipients, recipient_domain

# operator name -> directory of Spool.state_dir ("active" is per worker, handled apart)
STATE_DIRS = {"pending": "incoming", "deferred": "deferred", "held": "hold",
              "failed": "failed", "corrupt": "corrupt"}
STATUS_OF_DIR = {d: status for status, d in STATE_DIRS.items()}
STATUSES = ("pending", "active", "deferred", "held", "failed", "corrupt")

FORCE_WAIT = 60.0  # default seconds `hold --force` waits for an attempt in progress to end
BURY_GRACE = 1.0  # seconds a forced delete of a claimed message watches for its return
BURY_MAX = 60.0  # ... and at most this long while the worker is still rewriting it
_POLL = 0.02


class QueueError(Exception):
    """The spool cannot be used (missing, not a spool, unreadable); the text says why."""


@dataclass
class QueueEntry:
    """One queue file as found: where it is, its size and due time, and its envelope."""

    id: str
    status: str
    path: str
    worker: int | None  # pid of the claiming worker (active messages only)
    file_size: int
    mtime: float  # for a deferred message, the due time of its next attempt
    ctime: float  # last rename or rewrite: for an active message, about when it was claimed
    envelope: Envelope | None
    error: str | None = None  # why the envelope could not be read

    @property
    def arrival(self) -> float:
        if self.envelope is not None and "received_at" in self.envelope:
            return float(self.envelope["received_at"])
        return id_time(self.id)

    @property
    def claimed_by_live_worker(self) -> bool:
        return self.status == "active" and self.worker is not None and pid_alive(self.worker)


@dataclass
class Outcome:
    """What one operation did to one message.

    ``result``: ``done`` (changed as asked), ``unchanged`` (already so), ``refused`` (left as
    it is, ``message`` says why), ``unknown`` (no such message), ``gone`` (it left the queue
    while we acted: delivered or removed by someone else)."""

    id: str
    result: str
    status: str | None  # where the message is now (None when it is not in the queue)
    message: str

    @property
    def ok(self) -> bool:
        return self.result in ("done", "unchanged", "gone")


class Queue:
    """Operator operations on one spool directory."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._dirty: set[str] = set()

    # -- checks ---------------------------------------------------------------------------
    def check(self) -> None:
        """Raise QueueError unless the spool's root is a readable Empath spool."""
        root = self.spool.root
        try:
            os.listdir(root)
            incoming = self.spool.state_dir("incoming")
            if not os.path.isdir(incoming):
                raise QueueError(f"{root} is not an Empath spool (it has no incoming/ "
                                 "directory; the daemon creates the tree when it starts)")
            os.listdir(incoming)
        except FileNotFoundError:
            raise QueueError(f"no spool at {root}") from None
        except NotADirectoryError:
            raise QueueError(f"{root} is not a directory, so it cannot be a spool") from None
        except PermissionError:
            raise QueueError(f"permission denied reading the spool {root} (run as the "
                             "spool's owner or root)") from None

    # -- reading ---------------------------------------------------------------------------
    def scan(self, statuses: Iterable[str] | None = None,
             cache: dict[tuple[str, int, int, int], QueueEntry] | None = None
             ) -> list[QueueEntry]:
        """Every message in the given states (all by default), ordered by arrival.

        A message that moves between states while the scan runs is listed once (where it was
        first seen). ``cache`` (optional, kept by the caller between scans) reuses envelopes of
        files that have not changed since the last scan (same path, inode, size and mtime).
        """
        wanted = list(statuses) if statuses is not None else list(STATUSES)
        seen: set[str] = set()
        out: list[QueueEntry] = []
        fresh: dict[tuple[str, int, int, int], QueueEntry] = {}
        # The order follows the usual flow (incoming -> active -> deferred), so a message
        # claimed mid-scan is more likely seen twice (deduplicated) than missed.
        for status in STATUSES:
            if status not in wanted:
                continue
            for path, worker, message_id in self._files(status):
                if message_id in seen:
                    continue
                entry = self._read(status, path, worker, message_id, cache, fresh)
                if entry is not None:
                    seen.add(message_id)
                    out.append(entry)
        if cache is not None:
            cache.clear()
            cache.update(fresh)
        out.sort(key=lambda e: e.id)
        return out

    def locate(self, message_id: str) -> QueueEntry | None:
        """The message with this id wherever it is, with its envelope; None if not queued."""
        if not is_valid_id(message_id):
            return None
        for _ in range(5):  # each retry follows a move made by a worker meanwhile
            found = self.spool.find(message_id)
            if found is None:
                return None
            state, path = found
            worker = int(os.path.basename(os.path.dirname(path))) if state == "active" else None
            status = "active" if state == "active" else STATUS_OF_DIR[state]
            entry = self._read(status, path, worker, message_id, None, None)
            if entry is not None:
                return entry
        return None

    def _files(self, status: str) -> list[tuple[str, int | None, str]]:
        try:
            if status == "active":
                return [(self.spool.active_path(slot, mid), slot, mid)
                        for slot, mid in self.spool.list_active()]
            return [(self.spool.path(STATE_DIRS[status], mid), None, mid)
                    for mid in self.spool.list_ids(STATE_DIRS[status])]
        except PermissionError as exc:
            raise QueueError(f"permission denied reading {exc.filename or self.spool.root} "
                             "(run as the spool's owner or root)") from None
        except NotADirectoryError as exc:
            raise QueueError(f"{exc.filename} is not a directory: the spool is damaged") from None

    def _read(self, status: str, path: str, worker: int | None, message_id: str,
              cache: dict[tuple[str, int, int, int], QueueEntry] | None,
              fresh: dict[tuple[str, int, int, int], QueueEntry] | None) -> QueueEntry | None:
        """Stat and read one file; None when it is gone (moved by a worker: a normal race)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        if cache is not None and key in cache:
            entry = cache[key]
        else:
            envelope: Envelope | None = None
            error: str | None = None
            if status == "corrupt":
                error = "moved to corrupt/ as unreadable"
            else:
                try:
                    envelope = read_queue_file(path)[0]
                except FileNotFoundError:
                    return None
                except CorruptFile as exc:
                    error = f"unreadable queue file: {exc}"
                except PermissionError:
                    raise QueueError(f"permission denied reading {path} (run as the spool's "
                                     "owner or root)") from None
            entry = QueueEntry(message_id, status, path, worker, st.st_size, st.st_mtime,
                               st.st_ctime, envelope, error)
        if fresh is not None:
            fresh[key] = entry
        return entry

    # -- changes ---------------------------------------------------------------------------
    def make_due(self, message_id: str, now: float | None = None) -> Outcome:
        """Make a deferred message due now (its file's mtime is its due time).

        Not fsynced: after a crash the message is simply retried at its old due time.
        The caller wakes the workers once (``wake``) after a batch."""
        entry = self.locate(message_id)
        if entry is None:
            return _unknown(message_id)
        return self.make_entry_due(entry, now)

    def make_entry_due(self, entry: QueueEntry, now: float | None = None) -> Outcome:
        for _ in range(5):
            if entry.status != "deferred":
                return _not_deferred(entry)
            when = time.time() if now is None else now
            try:
                os.utime(entry.path, (when, when))
                return Outcome(entry.id, "done", "deferred", "due now")
            except FileNotFoundError:
                again = self.locate(entry.id)
                if again is None:
                    return Outcome(entry.id, "gone", None, "left the queue meanwhile")
                entry = again
        return _not_deferred(entry)

    def deferred_ids(self) -> list[str]:
        """Ids in deferred/, oldest first, without reading their envelopes (``flush``)."""
        return self.spool.list_ids("deferred")

    def touch_deferred(self, message_id: str, now: float) -> bool:
        """Set one deferred file's due time to ``now``; False when a worker took it first."""
        try:
            os.utime(self.spool.path("deferred", message_id), (now, now))
        except FileNotFoundError:
            return False
        return True

    def hold(self, message_id: str, force: bool = False, wait: float = FORCE_WAIT) -> Outcome:
        """Move a pending or deferred message to hold/, where no worker looks.

        A message claimed by a live worker is refused, because renaming it away mid-attempt
        cannot stop the attempt: the worker would then record the attempt in a new file
        beside the held one (two copies), or the recipients it just reached would get it again
        on release. With ``force`` we wait (at most ``wait`` seconds) for the attempt to end,
        then hold the message wherever the worker put it; if it was delivered meanwhile there
        is nothing left to hold (result ``gone``).
        """
        deadline = time.monotonic() + wait
        waited = False
        for _ in range(1000):
            entry = self.locate(message_id)
            if entry is None:
                if waited:
                    return Outcome(message_id, "gone", None,
                                   "the attempt in progress finished it (delivered or "
                                   "bounced) before it could be held")
                return _unknown(message_id)
            if entry.status == "held":
                return Outcome(message_id, "unchanged", "held", "already held")
            if entry.status in ("failed", "corrupt"):
                return Outcome(message_id, "refused", entry.status,
                               f"{entry.status} messages are not delivered anyway; "
                               "there is nothing to hold")
            if entry.claimed_by_live_worker:
                if not force:
                    return _claimed(entry, "hold")
                if time.monotonic() >= deadline:
                    return Outcome(message_id, "refused", "active",
                                   f"still being delivered by worker {entry.worker} after "
                                   f"{wait:g}s; not held")
                waited = True
                time.sleep(_POLL * 2.5)
                continue
            if not self._move(entry, "hold"):
                continue  # a worker moved it first: look again
            self._dirty.add("hold")
            return Outcome(message_id, "done", "held",
                           f"held (was {entry.status})" + (" after its attempt ended"
                                                            if waited else ""))
        return Outcome(message_id, "refused", None, "kept moving; not held")

    def release(self, message_id: str) -> Outcome:
        """Move a held message to incoming/, where the workers take it at once (on ``wake``)."""
        entry = self.locate(message_id)
        if entry is None:
            return _unknown(message_id)
        if entry.status != "held":
            return Outcome(message_id, "refused", entry.status,
                           f"not held (it is {entry.status})")
        if not self._move(entry, "incoming"):
            return Outcome(message_id, "gone", None, "removed from hold/ meanwhile")
        self._dirty.add("incoming")
        return Outcome(message_id, "done", "pending", "released for delivery")

    def _move(self, entry: QueueEntry, state: str) -> bool:
        """Rename a message into ``state``; False when the file was gone (a worker's move)."""
        try:
            self.spool.move(entry.path, state, entry.id)
        except FileNotFoundError:
            if os.path.exists(entry.path):  # the source is there: the destination is not
                raise QueueError(f"{self.spool.state_dir(state)} is missing: the spool is "
                                 "damaged") from None
            return False
        return True

    def delete(self, message_id: str, force: bool = False) -> Outcome:
        """Remove a message from the queue (no bounce is sent).

        A message claimed by a live worker is refused unless ``force``: the attempt in
        progress cannot be recalled, so recipients may still receive it. Forced, the active
        file is unlinked; the worker's later rename, unlink or rewrite of that path then
        fails with ENOENT and the message stays gone (the worker logs that its attempt
        failed). One window remains in the worker: a rewrite that had already opened the file
        recreates it under its old name; ``_bury`` watches for that and deletes it again.
        """
        for _ in range(20):
            entry = self.locate(message_id)
            if entry is None:
                return _unknown(message_id)
            claimed = entry.claimed_by_live_worker
            if claimed and not force:
                return _claimed(entry, "delete")
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue  # a worker moved or finished it first: look again
            if entry.status != "active":
                self._dirty.add(STATE_DIRS[entry.status])
            if claimed and entry.worker is not None:
                self._bury(message_id, entry.worker)
                return Outcome(message_id, "done", None,
                               f"deleted while worker {entry.worker} was delivering it (an "
                               "attempt already under way may still reach its recipients)")
            return Outcome(message_id, "done", None, f"deleted (was {entry.status})")
        return Outcome(message_id, "refused", None, "kept moving; not deleted")

    def _bury(self, message_id: str, worker: int,
              grace: float = BURY_GRACE, longest: float = BURY_MAX) -> int:
        """After unlinking a claimed file: delete it again if the worker's rewrite brings it
        back. Such a rewrite holds ``tmp/<worker>-<id>`` from before it opens the file until
        it renames it into place, so we watch for ``grace`` seconds and for as long as that
        tmp file exists (at most ``longest``). Returns how many copies were removed."""
        tmp = self.spool.tmp_path(message_id, worker)
        start = time.monotonic()
        removed = 0
        while True:
            again = self.locate(message_id)
            if again is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(again.path)
                    removed += 1
            elapsed = time.monotonic() - start
            if elapsed >= longest or (elapsed >= grace and again is None
                                      and not os.path.exists(tmp)):
                return removed
            if again is None:
                time.sleep(_POLL)

    def freeze(self, frozen: bool = True) -> None:
        """Set or clear control/freeze; workers check it before each claim."""
        self.spool.set_frozen(frozen)

    def is_frozen(self) -> bool:
        return self.spool.is_frozen()

    def wake(self) -> None:
        """One datagram to every delivery worker: look at the spool now, deferred/ included."""
        from empath.spool.wake import RESCAN, wake_workers  # asyncio: only commands that wake

        wake_workers(self.spool, RESCAN)

    def sync(self) -> None:
        """fsync the state directories changed so far, making the renames durable."""
        for state in sorted(self._dirty):
            with contextlib.suppress(FileNotFoundError):
                self.spool.sync_dir(state)
        self._dirty.clear()


# -- pure helpers ----------------------------------------------------------------------------
def state_counts(spool: Spool) -> tuple[dict[str, int], str | None]:
    """Messages per operator state (all six keys) from the directory listings alone, without
    reading a file, and the oldest id waiting for delivery (pending, active, deferred).
    Cheap enough for every metrics scrape and health check: a directory unchanged since it
    was last listed is not listed again (``control/counts``, empath/spool/counts.py)."""
    counts = dict.fromkeys(STATUSES, 0)
    waiting: list[str] = []
    known = StateCounts(spool)
    for status, directory in STATE_DIRS.items():
        try:
            found = known.count(directory)
        except NotADirectoryError:
            continue
        counts[status] = found.messages
        if status in ("pending", "deferred") and found.oldest is not None:
            waiting.append(found.oldest)
    known.save()
    for slot in spool.active_slots():
        ids = [n for n in _names(spool.active_dir(slot)) if is_valid_id(n)]
        counts["active"] += len(ids)
        if ids:
            waiting.append(min(ids))
    return counts, min(waiting) if waiting else None


def _names(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def matches(entry: QueueEntry, domain: str | None = None, sender: str | None = None,
            older_than: float | None = None, now: float | None = None) -> bool:
    """The ``list``/``retry``/``delete`` filters. ``domain``: some recipient still waiting is
    at that domain (any recipient for finished messages); ``sender``: an address (exact, ``<>``
    for the null sender) or, without ``@``, the sender's domain; ``older_than``: seconds."""
    env = entry.envelope
    if domain is not None:
        if env is None:
            return False
        rcpts = open_recipients(env) or env.get("recipients", [])
        if domain.lower() not in {recipient_domain(r.get("address", "")) for r in rcpts}:
            return False
    if sender is not None:
        if env is None:
            return False
        actual = str(env.get("sender", "")).lower()
        want = sender.lower()
        if want in ("<>", ""):
            if actual != "":
                return False
        elif "@" in want:
            if actual != want.strip("<>"):
                return False
        elif recipient_domain(actual) != want:
            return False
    if older_than is not None:
        if (time.time() if now is None else now) - entry.arrival < older_than:
            return False
    return True


def queue_stats(entries: list[QueueEntry], now: float, frozen: bool) -> dict[str, Any]:
    """Counts by state and by destination domain, bytes, and the oldest message."""
    states = {s: {"messages": 0, "bytes": 0} for s in STATUSES}
    domains: dict[str, dict[str, int]] = {}
    oldest: QueueEntry | None = None
    for e in entries:
        states[e.status]["messages"] += 1
        states[e.status]["bytes"] += e.file_size
        if oldest is None or e.arrival < oldest.arrival:
            oldest = e
        rcpts = [r for r in (e.envelope["recipients"] if e.envelope else [])
                 if r.get("status", "pending") != "delivered"]
        per_message: set[str] = set()
        for r in rcpts:
            d = recipient_domain(str(r.get("address", ""))) or "(local)"
            slot = domains.setdefault(d, {"messages": 0, "recipients": 0})
            slot["recipients"] += 1
            if d not in per_message:
                per_message.add(d)
                slot["messages"] += 1
    ordered = dict(sorted(domains.items(), key=lambda kv: (-kv[1]["recipients"], kv[0])))
    return {
        "generated_at": now,
        "frozen": frozen,
        "total": {"messages": len(entries), "bytes": sum(e.file_size for e in entries)},
        "states": states,
        "domains": ordered,
        "oldest": None if oldest is None else {
            "id": oldest.id, "status": oldest.status, "age": max(0.0, now - oldest.arrival)},
    }


def _unknown(message_id: str) -> Outcome:
    if not is_valid_id(message_id):
        return Outcome(message_id, "unknown", None,
                       "not a queue id (26 characters of Crockford base32, upper case)")
    return Outcome(message_id, "unknown", None, "no such message in the queue")


def _not_deferred(entry: QueueEntry) -> Outcome:
    if entry.status in ("pending", "active"):
        what = "waiting for a worker" if entry.status == "pending" else (
            f"being delivered by worker {entry.worker}")
        return Outcome(entry.id, "unchanged", entry.status, f"already due ({what})")
    hint = {"held": "release it first", "failed": "failed messages are finished",
            "corrupt": "its file is unreadable"}[entry.status]
    return Outcome(entry.id, "refused", entry.status, f"not deferred (it is {entry.status}: "
                   f"{hint})")


def _claimed(entry: QueueEntry, verb: str) -> Outcome:
    since = max(0.0, time.time() - entry.ctime)
    why = (f"being delivered right now by delivery worker {entry.worker} (claimed "
           f"about {since:.0f}s ago); an attempt in progress cannot be recalled")
    if verb == "delete":
        hint = ("wait for the attempt to end and try again, or use --force to delete it "
                "anyway (recipients the attempt reaches still get it)")
    else:
        hint = "use --force to wait for the attempt to end and hold it then"
    return Outcome(entry.id, "refused", "active", f"{why}; {hint}")
