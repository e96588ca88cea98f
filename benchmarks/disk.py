"""The disk's durable write limit, and a spool seeded with deferred messages.

``durable_ceiling`` measures what any MTA's receive path must pay per message at least: create
a file, write the message, fdatasync, close, rename it into a directory, fsync that directory.
N threads do it in a loop (Python releases the GIL in each system call) while the benchmark's
deleter removes the renamed files, so the filesystem is in the steady state a working MTA sees.
It is the ceiling the receive rates are compared with.

``seed_deferred`` fills an Empath spool's ``deferred/`` with messages as a delivery worker
leaves them after one failed attempt (envelope with the attempt history, mtime = next retry one
day ahead), using the spool's own file format and paths. Seeding skips fsync: only the daemon's
memory is measured on them.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from empath.spool import Spool, fileformat, new_message_id  # noqa: E402


def durable_ceiling(base: str, writers: int, seconds: float, size: int) -> dict[str, Any]:
    """Messages/second of write+fdatasync+rename+dir-fsync from ``writers`` threads."""
    tmp, dest = os.path.join(base, "tmp"), os.path.join(base, "incoming")
    os.makedirs(tmp, exist_ok=True)
    os.makedirs(dest, exist_ok=True)
    payload = b"x" * (size - 2) + b"\r\n"
    dir_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    counts = [0] * writers
    deadline = time.monotonic() + seconds
    start = threading.Barrier(writers)

    def writer(n: int) -> None:
        start.wait()
        i = 0
        while time.monotonic() < deadline:
            name = f"{n}-{i}"
            path = os.path.join(tmp, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, payload)
            os.fdatasync(fd)
            os.close(fd)
            os.rename(path, os.path.join(dest, name))
            os.fsync(dir_fd)
            i += 1
        counts[n] = i

    started = time.monotonic()
    try:
        threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.close(dir_fd)
    elapsed = time.monotonic() - started
    total = sum(counts)
    return {"writers": writers, "size": size, "operations": total,
            "seconds": round(elapsed, 3), "per_s": round(total / elapsed, 1)}


def deferred_envelope(message_id: str, now: float, size: int) -> dict[str, Any]:
    result = {"at": now - 60, "code": 451, "enhanced": "4.3.0",
              "text": "4.3.0 temporary failure (benchmark seed)", "server": "127.0.0.1"}
    return {
        "id": message_id,
        "sender": "loadgen@example.org",
        "recipients": [{"address": "sink@example.net", "orcpt": None, "notify": None,
                        "status": "deferred", "attempts": 1, "last": result}],
        "params": {"body": "7BIT", "smtputf8": False, "size": None, "ret": None,
                   "envid": None},
        "client": {"ip": "127.0.0.1", "port": 40000, "helo": "loadgen.example",
                   "esmtp": True, "tls": None, "listener": "127.0.0.1:2525", "auth": None},
        "received_at": now - 120,
        "metadata": {},
        "data_size": size,
        "attempt_count": 1,
        "attempts": [{"at": now - 60, "number": 1, "duration": 0.01,
                      "routes": [{"domain": "example.net", "transport": "smtp",
                                  "server": "127.0.0.1", "ip": "127.0.0.1", "tls": None,
                                  "duration": 0.01}],
                      "results": {"sink@example.net": result}}],
        "next_retry_at": now + 86400,
    }


def seed_deferred(spool_root: str, count: int, size: int = 1024, threads: int = 8) -> float:
    """Write ``count`` deferred messages; returns the seconds it took."""
    spool = Spool(spool_root)
    spool.create_tree()
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopq\r\n"
    head = (b"Received: from loadgen.example (127.0.0.1) by empath.bench.test\r\n"
            b"From: <loadgen@example.org>\r\nTo: <sink@example.net>\r\nSubject: seed\r\n\r\n")
    data = (head + line * (size // len(line) + 1))[: size - 2] + b"\r\n"
    now = time.time()
    due = now + 86400

    def write(n: int) -> None:
        for _ in range(n):
            mid = new_message_id()
            path = spool.path("deferred", mid)
            tail = fileformat.encode_tail(deferred_envelope(mid, now, len(data)), len(data))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data + tail)
            os.utime(fd, (due, due))
            os.close(fd)

    started = time.monotonic()
    share = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, share))
    return time.monotonic() - started
