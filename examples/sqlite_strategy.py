"""Example delivery strategy: store each message in an SQLite database.

    delivery:
      domains:
        archive.example:
          strategy: sqlite_strategy:SQLiteStore     # this file on the PYTHONPATH
          strategy_options: {path: /var/lib/empath/archive.db}

One row per recipient: queue id, sender, recipient, the message, the time stored. The queue id
and recipient are the table's key, so a retry after a crash stores nothing twice. A database
that cannot be opened or written (a missing directory, a full disk, a lock held too long) is a
temporary failure: the recipients are deferred and retried on the normal schedule. A recipient
whose local part is listed in ``refuse`` fails permanently (and is bounced).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Mapping
from typing import Any

from empath.delivery.strategy import DeliveryRequest, DeliveryResult, DeliveryStrategy

SCHEMA = """CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    message BLOB NOT NULL, stored_at REAL NOT NULL, PRIMARY KEY (queue_id, recipient))"""


class SQLiteStore(DeliveryStrategy):
    name = "sqlite"

    def __init__(self, cfg: Any, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(cfg, options)
        if "path" not in self.options:
            raise ValueError("strategy_options.path is required")
        self.path = str(self.options["path"])
        self.refuse = {str(x).lower() for x in self.options.get("refuse") or []}

    async def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        message = await self.read_message(request.source)
        outcomes = {}
        wanted = []
        for address in request.addresses:
            if address.rpartition("@")[0].lower() in self.refuse:
                outcomes[address] = self.failed(f"<{address}> does not exist in the archive",
                                                code=550, enhanced="5.1.1")
            else:
                wanted.append(address)
        try:
            await asyncio.to_thread(self._store, request, wanted, message)
        except sqlite3.Error as exc:
            for address in wanted:
                outcomes[address] = self.deferred(f"archive database: {exc}")
        else:
            for address in wanted:
                outcomes[address] = self.delivered(f"stored in {self.path}")
        return DeliveryResult(outcomes, {"server": self.path})

    def _store(self, request: DeliveryRequest, recipients: list[str], message: bytes) -> None:
        with sqlite3.connect(self.path, timeout=5) as db:
            db.execute(SCHEMA)
            db.executemany(
                "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?)",
                [(request.queue_id, request.sender, r, message, time.time())
                 for r in recipients])
        db.close()
