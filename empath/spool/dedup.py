"""Duplicate suppression: one small file per recently accepted message, under control/dedup/.

The receiver derives a key from the message's Message-ID, envelope sender, recipients and a
hash of the data, and claims it here before storing the message: creating ``<key>`` with
O_EXCL wins for exactly one receiver process, so two copies arriving at once through two
receivers are still caught. A file younger than the window means "already accepted": the
receiver answers 250 and stores nothing. The file holds the original queue id (for the log and
the audit trail); its mtime is the time of acceptance, so the window survives restarts.

Fleet mode (``cluster.url``): ``claim_shared`` also claims the key in Redis (``SET NX`` with
the window as expiry, through the backend ``set_backend`` installs; ``empath/cluster/``), so
a message accepted by one node and sent again to another is stored once. While Redis cannot
be reached the local claim alone decides (duplicates across nodes are then stored twice;
each is still delivered, nothing is lost).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Protocol

from empath.spool.layout import Spool


class SharedDedup(Protocol):
    """The fleet's duplicate window (fleet mode's backend)."""

    async def dedup_claim(self, key: str, queue_id: str, window: float) -> str | None:
        """None when ``key`` is ours now, else the original queue id; raises when the fleet
        cannot be asked."""

    def dedup_release(self, key: str, queue_id: str) -> None:
        """Forget our claim of ``key`` (in the background)."""


_backend: SharedDedup | None = None


def set_backend(backend: SharedDedup | None) -> None:
    """Install (or remove) the fleet's duplicate window for this process."""
    global _backend
    _backend = backend


class DedupStore:
    def __init__(self, spool: Spool, window: float) -> None:
        self.dir = os.path.join(spool.control, "dedup")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.window = window

    def _path(self, key: str) -> str:
        if not key.isalnum():
            raise ValueError(f"invalid dedup key {key!r}")
        return os.path.join(self.dir, key)

    def claim(self, key: str, queue_id: str) -> str | None:
        """Claim ``key`` for ``queue_id``; the original queue id when it is a duplicate."""
        path = self._path(key)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                try:
                    st = os.stat(path)
                    with open(path, encoding="ascii", errors="replace") as fh:
                        original = fh.read().strip()
                except FileNotFoundError:
                    continue  # swept meanwhile: claim again
                if time.time() - st.st_mtime < self.window:
                    return original or "?"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # an expired entry: take its place
                continue
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(queue_id)
            return None
        return None

    async def claim_shared(self, key: str, queue_id: str) -> str | None:
        """``claim`` here, then (in fleet mode) across the fleet; the original queue id when
        it is a duplicate on this node or any other."""
        original = self.claim(key, queue_id)
        shared = _backend
        if original is not None or shared is None:
            return original
        try:
            original = await shared.dedup_claim(key, queue_id, self.window)
        except Exception:  # Redis unreachable (the backend logs it): this node's word stands
            return None
        if original is not None:
            self._unlink(key)  # this copy is not stored here
        return original

    def release(self, key: str) -> None:
        """Forget a claim whose message was not stored after all."""
        path = self._path(key)
        shared = _backend
        if shared is not None:
            try:
                with open(path, encoding="ascii", errors="replace") as fh:
                    shared.dedup_release(key, fh.read().strip())
            except FileNotFoundError:
                pass
        self._unlink(key)

    def _unlink(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def sweep(self) -> int:
        """Remove entries older than the window; how many."""
        cutoff = time.time() - self.window
        removed = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self.dir) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        return removed
