"""A fast SMTP sink for the end-to-end benchmark: accepts everything, remembers when each
message arrived.

Minimal ESMTP (EHLO with PIPELINING, 8BITMIME, SIZE; MAIL, RCPT, DATA, RSET, NOOP, QUIT) on one
uvloop event loop. It keeps nothing but, for every message, the value of its ``X-Loadgen-Token``
header (``-`` when there is none, e.g. from smtp-source) and the wall-clock arrival time (the
final dot received). Those are appended to ``--out`` as ``token time`` lines, flushed every
50 ms, so the benchmark can count deliveries while the run goes on and match each arrival with
the 250 its load generator saw. Replies to a pipelined batch go out as one write.

    python benchmarks/sink.py --listen 127.0.0.1:0 --out FILE   # prints the bound port

Unlike tests/support/sink.py (which records whole transcripts for assertions), this one is
built to stay out of the way: per message it does one search for the terminator and one for
the token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

TOKEN = b"\r\nX-Loadgen-Token: "
EHLO_REPLY = (b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
              b"250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n")
OK = b"250 2.0.0 ok\r\n"


class Recorder:
    def __init__(self, path: str) -> None:
        self.fh = open(path, "ab", buffering=0)
        self.pending: list[bytes] = []

    def arrived(self, token: bytes) -> None:
        self.pending.append(b"%s %.6f\n" % (token, time.time()))

    def flush(self) -> None:
        if self.pending:
            lines, self.pending = self.pending, []
            self.fh.write(b"".join(lines))


class SinkProtocol(asyncio.Protocol):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.buf = bytearray()
        self.in_data = False
        self.scanned = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(b"220 sink.bench.test ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        closing = False
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n", self.scanned)
                if end < 0:
                    self.scanned = max(0, len(self.buf) - 4)
                    break
                message = bytes(self.buf[: end + 2])
                del self.buf[: end + 5]
                self.in_data, self.scanned = False, 0
                at = message.find(TOKEN)
                if at >= 0:
                    start = at + len(TOKEN)
                    token = message[start : message.find(b"\r\n", start)]
                else:
                    token = b"-"
                self.recorder.arrived(token)
                out.append(OK)
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                break
            line = bytes(self.buf[:end])
            del self.buf[: end + 2]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                out.append(EHLO_REPLY if verb == b"EHLO" else b"250 sink.bench.test\r\n")
            elif verb == b"DATA":
                out.append(b"354 go ahead\r\n")
                # "\r\n" in front so a "." alone on the first line is found like any other.
                self.buf[:0] = b"\r\n"
                self.in_data, self.scanned = True, 0
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 bye\r\n")
                closing = True
                break
            else:
                out.append(OK)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        if closing and self.transport is not None:
            self.transport.close()


async def serve(host: str, port: int, out: str) -> None:
    recorder = Recorder(out)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(recorder), host, port, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        recorder.flush()
        try:
            await asyncio.wait_for(stop.wait(), 0.05)
        except TimeoutError:
            pass
    server.close()
    recorder.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    asyncio.run(serve(host or "127.0.0.1", int(port or 0), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
