"""SMTP load generator: N concurrent sessions send a fixed number of messages of a fixed size.

Each session opens one connection, says EHLO, and sends its share of messages back to back
(optionally pipelining MAIL/RCPT/DATA as one write, RFC 2920), then QUIT. Every message carries
a unique token (``X-Loadgen-Token``) so a sink can match what arrived with what was accepted.
Reports messages/second and the accept latency (final dot sent → 250 received) percentiles;
``accepted_at`` keeps the wall-clock time of each 250 (same order as ``accepted_tokens``) so the
delivery latency (250 → arrival at a sink) can be computed from the sink's arrival times.

    .venv/bin/python benchmarks/loadgen.py --port 2525 --messages 5000 --sessions 20 --size 1024

Importable: ``await run_load(host, port, messages=..., sessions=..., size=...)`` returns a
``LoadResult``; the pipeline benchmark and the chaos harness use it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    accepted_tokens: list[str] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)  # wall clock (time.time()) of each 250
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(len(data) * p))]

    def summary(self) -> dict[str, float]:
        return {"accepted": self.accepted, "rejected": self.rejected, "errors": self.errors,
                "seconds": round(self.seconds, 3), "msg_per_s": round(self.rate, 1),
                "p50_ms": round(self.percentile(0.50) * 1000, 2),
                "p95_ms": round(self.percentile(0.95) * 1000, 2),
                "p99_ms": round(self.percentile(0.99) * 1000, 2),
                "mean_ms": round(statistics.fmean(self.latencies) * 1000, 2)
                if self.latencies else 0.0}


def make_message(size: int, token: str, rcpt: str) -> bytes:
    head = (f"From: <loadgen@example.org>\r\nTo: <{rcpt}>\r\nSubject: load {token}\r\n"
            f"X-Loadgen-Token: {token}\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopq\r\n"
    body = (line * (max(size - len(head), 0) // len(line) + 1))[: max(size - len(head), 2)]
    if not body.endswith(b"\r\n"):
        body = body[:-2] + b"\r\n"
    return head + body


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)


async def _session(host: str, port: int, count: int, size: int, rcpt: str, pipelining: bool,
                   result: LoadResult, session_no: int, timeout: float) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        code, _ = await asyncio.wait_for(_reply(reader), timeout)
        if code != 220:
            raise ConnectionError(f"greeting {code}")
        writer.write(b"EHLO loadgen.example\r\n")
        code, _ = await asyncio.wait_for(_reply(reader), timeout)
        for i in range(count):
            token = f"{os.getpid()}-{session_no}-{i}-{time.monotonic_ns()}"
            data = make_message(size, token, rcpt)
            envelope = [b"MAIL FROM:<loadgen@example.org>\r\n", f"RCPT TO:<{rcpt}>\r\n".encode(),
                        b"DATA\r\n"]
            result.sent += 1
            if pipelining:
                writer.write(b"".join(envelope))
                codes = [(await asyncio.wait_for(_reply(reader), timeout))[0] for _ in range(3)]
            else:
                codes = []
                for cmd in envelope:
                    writer.write(cmd)
                    codes.append((await asyncio.wait_for(_reply(reader), timeout))[0])
                    if codes[-1] >= 400:
                        break
            if codes[-1] != 354:
                result.rejected += 1
                writer.write(b"RSET\r\n")
                await _reply(reader)
                continue
            writer.write(data + b".\r\n")
            started = time.perf_counter()
            code, text = await asyncio.wait_for(_reply(reader), timeout)
            if code == 250:
                result.latencies.append(time.perf_counter() - started)
                result.accepted += 1
                result.accepted_tokens.append(token)
                result.accepted_at.append(time.time())
            else:
                result.rejected += 1
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()


async def run_load(host: str, port: int, *, messages: int, sessions: int, size: int = 1024,
                   rcpt: str = "sink@example.net", pipelining: bool = True,
                   timeout: float = 60.0) -> LoadResult:
    """Send ``messages`` messages over ``sessions`` concurrent connections."""
    result = LoadResult()
    share = [messages // sessions + (1 if i < messages % sessions else 0)
             for i in range(sessions)]

    async def guarded(n: int, count: int) -> None:
        try:
            await _session(host, port, count, size, rcpt, pipelining, result, n, timeout)
        except (TimeoutError, OSError, ConnectionError) as exc:
            result.errors += 1
            result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"

    started = time.perf_counter()
    await asyncio.gather(*(guarded(n, c) for n, c in enumerate(share) if c))
    result.seconds = time.perf_counter() - started
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description="SMTP load generator")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2525)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rcpt", default="sink@example.net")
    ap.add_argument("--no-pipelining", action="store_true")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run_load(args.host, args.port, messages=args.messages,
                                  sessions=args.sessions, size=args.size, rcpt=args.rcpt,
                                  pipelining=not args.no_pipelining))
    s = result.summary()
    print(f"{s['accepted']} accepted, {s['rejected']} rejected, {s['errors']} errors in "
          f"{s['seconds']} s: {s['msg_per_s']} msg/s; accept latency p50 {s['p50_ms']} ms, "
          f"p95 {s['p95_ms']} ms, p99 {s['p99_ms']} ms")
    if result.first_error:
        print("first error:", result.first_error)
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
