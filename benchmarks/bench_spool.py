"""Spool write path: messages per second made durable by one receiver process's writer.

Runs the real ReceiverWriter (thread-pool fdatasync, rename into incoming/, group-committed
directory fsync) with N concurrent in-process "sessions", each committing 1 KiB messages in a
loop, while a deleter thread removes committed files (as delivery would), so that the
filesystem is measured in steady state rather than on a fresh directory.

    .venv/bin/python benchmarks/bench_spool.py [--sessions 20] [--seconds 5] [--size 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from empath.spool import Spool, new_message_id  # noqa: E402


async def run(spool: Spool, sessions: int, seconds: float, size: int,
              threads: int) -> dict[str, float]:
    writer = spool.open_receiver_writer(threads)
    body = b"x" * (size - 2) + b"\r\n"
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    count = 0

    async def session() -> None:
        nonlocal count
        while time.monotonic() < deadline:
            mid = new_message_id()
            msg = writer.begin(mid)
            msg.write(body)
            t0 = time.perf_counter()
            await msg.commit({"id": mid, "sender": "a@b", "recipients": [{"address": "c@d"}]})
            latencies.append(time.perf_counter() - t0)
            count += 1

    started = time.monotonic()
    await asyncio.gather(*(session() for _ in range(sessions)))
    elapsed = time.monotonic() - started
    writer.close()
    latencies.sort()
    return {"sessions": sessions, "messages": count, "seconds": round(elapsed, 3),
            "msg_per_s": round(count / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3)}


def deleter(spool: Spool, stop: threading.Event) -> None:
    d = spool.state_dir("incoming")
    while not stop.is_set():
        names = os.listdir(d)
        for n in names:
            try:
                spool.retire(os.path.join(d, n))
            except FileNotFoundError:
                pass
        time.sleep(0.01)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, nargs="*", default=[1, 20, 100])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--recycle-files", type=int, default=1000,
                    help="spool.recycle_files (0: every message gets a new inode)")
    ap.add_argument("--sync", choices=("file", "filesystem"), default="file",
                    help="spool.sync: fdatasync per file, or one syncfs per batch")
    ap.add_argument("--dir", default=None, help="where to make the spool (default: ./var)")
    args = ap.parse_args()
    base = args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "var")
    os.makedirs(base, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(dir=base, prefix="bench-spool-") as root:
        spool = Spool(root, args.recycle_files, args.sync)
        spool.create_tree()
        stop = threading.Event()
        t = threading.Thread(target=deleter, args=(spool, stop), daemon=True)
        t.start()
        try:
            for n in args.sessions:
                r = asyncio.run(run(spool, n, args.seconds, args.size, args.threads))
                results.append(r)
                print(f"sessions={n:4d}  {r['msg_per_s']:8.1f} msg/s  p50 {r['p50_ms']:7.2f} ms"
                      f"  p99 {r['p99_ms']:7.2f} ms  ({r['messages']} messages)", flush=True)
        finally:
            stop.set()
            t.join()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "spool.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
