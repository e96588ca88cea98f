"""A spool seeded with many deferred messages, fast: queue files written straight into
``deferred/`` with the spool's own paths and file format (no fsync, no daemon), each with its
due time as its mtime, as a delivery worker leaves them."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from empath.spool import Spool, new_message_id
from empath.spool.fileformat import encode_tail

DATA = b"From: <seed@client.test>\r\nTo: <rcpt@remote.test>\r\nSubject: seed\r\n\r\nHello.\r\n"


def seed_deferred(spool: Spool, count: int, due: float, threads: int = 4) -> None:
    """Write ``count`` deferred messages, all due at ``due``."""
    now = time.time()

    def write(n: int) -> None:
        for _ in range(n):
            mid = new_message_id()
            envelope = {"id": mid, "sender": "seed@client.test", "received_at": now,
                        "recipients": [{"address": "rcpt@remote.test", "orcpt": None,
                                        "notify": None, "status": "deferred", "attempts": 1}],
                        "params": {}, "data_size": len(DATA), "attempt_count": 1,
                        "next_retry_at": due}
            fd = os.open(spool.path("deferred", mid), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o600)
            try:
                os.write(fd, DATA + encode_tail(envelope, len(DATA)))
                os.utime(fd, (due, due))
            finally:
                os.close(fd)

    spool.create_tree()
    share = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, share))
