"""Duplicate suppression: one small file per recently accepted message, under control/dedup/.

The receiver derives a key from the message's Message-ID, envelope sender, recipients and a
hash of the data, and claims it here before storing the message: creating ``<key>`` with
O_EXCL wins for exactly one receiver process, so two copies arriving at once through two
receivers are still caught. A file younger than the window means "already accepted": the
receiver answers 250 and stores nothing. The file holds the original queue id (for the log and
the audit trail); its mtime is the time of acceptance, so the window survives restarts.
"""

from __future__ import annotations

import contextlib
import os
import time

from empath.spool.layout import Spool


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

    def release(self, key: str) -> None:
        """Forget a claim whose message was not stored after all."""
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
