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


class _Session(asyncio.Protocol):
    """One connection's messages, as a protocol: replies are parsed in ``data_received``, so
    a 250 is timed when its bytes reach the client, not a loop turn later when a coroutine
    would resume; and the client costs less CPU on the machine it shares with the server."""

    def __init__(self, count: int, size: int, rcpt: str, pipelining: bool, result: LoadResult,
                 session_no: int, timeout: float, done: asyncio.Future[None]) -> None:
        self.count, self.size, self.rcpt, self.pipelining = count, size, rcpt, pipelining
        self.result, self.session_no, self.timeout, self.done = result, session_no, timeout, done
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.expect: list[str] = []  # what each awaited reply answers, in order
        self.codes: list[int] = []  # the replies to this message's envelope commands
        self.sent_no = 0
        self.token = ""
        self.started = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.envelope = [b"MAIL FROM:<loadgen@example.org>\r\n",
                         f"RCPT TO:<{rcpt}>\r\n".encode(), b"DATA\r\n"]

    # -- asyncio callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.expect = ["greeting"]
        self._arm()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf + data
        while not self.done.done():
            end = buf.find(b"\n")
            if end < 0:
                break
            line, buf = buf[:end + 1], buf[end + 1:]
            if line[3:4] == b"-":
                continue  # a multiline reply goes on
            try:
                code = int(line[:3])
            except ValueError:
                self._fail(ConnectionError(f"not an SMTP reply: {line[:80]!r}"))
                return
            self._arm()
            self._reply(code, now)
        self.buf = buf

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("server closed the connection"))

    # -- the conversation -----------------------------------------------------------------
    def _reply(self, code: int, now: float) -> None:
        if not self.expect:
            self._fail(ConnectionError(f"a reply nobody asked for: {code}"))
            return
        kind = self.expect.pop(0)
        result = self.result
        if kind == "greeting":
            if code != 220:
                self._fail(ConnectionError(f"greeting {code}"))
                return
            self._send(b"EHLO loadgen.example\r\n", "ehlo")
        elif kind == "ehlo":
            self._next_message()
        elif kind == "envelope":
            self.codes.append(code)
            if self.expect:  # pipelined: the rest of the envelope's replies are still due
                return
            if not self.pipelining and code < 400 and len(self.codes) < 3:
                self._send(self.envelope[len(self.codes)], "envelope")
                return
            if self.codes[-1] != 354:
                result.rejected += 1
                self._send(b"RSET\r\n", "rset")
                return
            self._send(make_message(self.size, self.token, self.rcpt) + b".\r\n", "dot")
            self.started = time.perf_counter()
        elif kind == "dot":
            if code == 250:
                result.latencies.append(now - self.started)
                result.accepted += 1
                result.accepted_tokens.append(self.token)
                result.accepted_at.append(time.time())
            else:
                result.rejected += 1
            self._next_message()
        elif kind == "rset":
            self._next_message()

    def _next_message(self) -> None:
        if self.sent_no == self.count:
            assert self.transport is not None
            self.transport.write(b"QUIT\r\n")
            self._finish()
            return
        self.token = f"{os.getpid()}-{self.session_no}-{self.sent_no}-{time.monotonic_ns()}"
        self.sent_no += 1
        self.result.sent += 1
        self.codes = []
        if self.pipelining:
            self._send(b"".join(self.envelope), "envelope", "envelope", "envelope")
        else:
            self._send(self.envelope[0], "envelope")

    def _send(self, data: bytes, *kinds: str) -> None:
        assert self.transport is not None
        self.expect.extend(kinds)
        self.transport.write(data)

    # -- the end --------------------------------------------------------------------------
    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(self.timeout, self._fail,
                                          TimeoutError("no reply in time"))

    def _finish(self) -> None:
        self._close()
        if not self.done.done():
            self.done.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._close()
        if not self.done.done():
            self.done.set_exception(exc)

    def _close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def _session(host: str, port: int, count: int, size: int, rcpt: str, pipelining: bool,
                   result: LoadResult, session_no: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    transport, _ = await asyncio.wait_for(loop.create_connection(
        lambda: _Session(count, size, rcpt, pipelining, result, session_no, timeout, done),
        host, port), timeout)
    try:
        await done
    finally:
        transport.close()


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
