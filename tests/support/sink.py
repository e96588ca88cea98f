"""A scriptable SMTP sink on loopback for delivery tests: it receives, records and misbehaves.

In-process (the server runs its own asyncio loop in a background thread)::

    sink = SinkServer(Behaviour(pipelining=False), host="127.0.0.2").start()
    ...deliver to 127.0.0.2:sink.port...
    sink.wait_for_messages(1)
    msg = sink.messages[0]                 # .mail_from .mail_params .rcpts .data (unstuffed)
    sink.commands()                        # every command line, all sessions, in order
    sink.sessions[0].batches()             # command lines grouped by the read that brought them
    sink.sessions[0].tls                   # {"version", "cipher"} once STARTTLS succeeded
    sink.behaviour = PRESETS["tempfail"]   # change behaviour for the next commands
    sink.stop()

    sinks = start_sinks(["127.0.0.2", "127.0.0.3"])   # several hosts, one shared port

As a process (for end-to-end tests of the daemon)::

    python -m tests.support.sink --listen 127.0.0.1:0 --behaviour accept --out DIR

prints the bound port on its first line, then stores every message as ``DIR/<n>.eml`` (data)
and ``DIR/<n>.json`` (envelope, transcript, TLS) until SIGTERM. ``--help`` lists the knobs.

Behaviours (``Behaviour`` fields, or the named ``PRESETS``): accept everything; reject MAIL
(5xx or 4xx); reject given recipients (by address, any code); 4xx to everything; 421 or 554 at
the greeting; EHLO refused (HELO fallback); slow replies; drop the connection mid-DATA;
STARTTLS with a given certificate, advertised or not, or refused; each of PIPELINING, DSN,
SMTPUTF8, 8BITMIME, CHUNKING/BINARYMIME and SIZE (with a limit) on or off. The sink parses
commands itself and undoes dot-stuffing with its own code, so it checks the client rather than
agreeing with it. It counts concurrent sessions and transactions.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import ssl
import sys
import threading
import time

from tests.support.sink_model import (
    PRESETS,
    Behaviour,
    Command,
    ReceivedMessage,
    ReplySpec,
    SessionRecord,
    split_path,
    unstuff,
)

__all__ = ["PRESETS", "Behaviour", "Command", "ReceivedMessage", "SessionRecord", "SinkServer",
           "start_sinks", "unstuff"]


class _Session:
    def __init__(self, sink: SinkServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, record: SessionRecord) -> None:
        self.sink, self.reader, self.writer, self.record = sink, reader, writer, record
        self.buffer = bytearray()
        self.batch = 0
        self.tls = False
        self.mails = 0  # MAIL commands in this session
        self.reset()

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_params = ""
        self.rcpts: list[tuple[str, str]] = []
        self.chunks = bytearray()

    @property
    def b(self) -> Behaviour:
        return self.sink.behaviour

    async def _fill(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            return False
        self.batch += 1
        self.buffer += data
        return True

    async def _line(self) -> str | None:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                raw = bytes(self.buffer[:end])
                del self.buffer[:end + 2]
                return raw.decode("utf-8", "replace")
            if not await self._fill():
                return None

    async def reply(self, spec: ReplySpec, *lines: str, delay: float | None = None) -> None:
        delay = self.b.delay if delay is None else delay
        if delay:
            await asyncio.sleep(delay)
        code, text = spec
        texts = [*lines, text]
        out = "".join(f"{code}-{t}\r\n" for t in texts[:-1]) + f"{code} {texts[-1]}\r\n"
        self.writer.write(out.encode())
        await self.writer.drain()

    async def run(self) -> None:
        await self.reply(self.b.greeting)
        if not 200 <= self.b.greeting[0] < 300:
            return
        while True:
            line = await self._line()
            if line is None:
                return
            self.record.commands.append(Command(line, self.batch, self.tls))
            verb, _, arg = line.partition(" ")
            handler = getattr(self, "do_" + verb.upper(), None)
            if handler is None:
                await self.reply((502, "5.5.2 command not recognized"))
                continue
            if await handler(arg) is False:
                return

    async def do_EHLO(self, arg: str) -> bool:
        if self.b.ehlo_reply is not None:
            await self.reply(self.b.ehlo_reply)
            return self.b.ehlo_reply[0] != 421
        self.reset()
        lines = ["sink.test greets you", *self.b.extensions(self.tls)]
        await self.reply((250, lines[-1]), *lines[:-1])
        return True

    async def do_HELO(self, arg: str) -> bool:
        self.reset()
        await self.reply(self.b.helo_reply)
        return True

    async def do_STARTTLS(self, arg: str) -> bool:
        if not self.b.offers_starttls or self.tls:
            await self.reply((502, "5.5.1 STARTTLS not available"))
            return True
        await self.reply(self.b.starttls_reply)
        if self.b.starttls_inject:
            self.writer.write(self.b.starttls_inject)
            await self.writer.drain()
        if self.b.starttls_reply[0] != 220:
            return True
        if self.b.tls_cert is None:
            return False  # advertised without a certificate: the handshake cannot happen
        ctx = self.sink.ssl_context()
        plain = self.writer.transport
        try:
            await self.writer.start_tls(ctx)
        except (ssl.SSLError, OSError, ConnectionError, AttributeError):
            # AttributeError: asyncio's loop.start_tls returns None when the client hangs up
            # during the handshake, and StreamWriter.start_tls trips over it; put the plain
            # transport back so the writer can still be closed and collected.
            if self.writer.transport is None:
                self.writer._transport = plain  # type: ignore[attr-defined]
            return False
        ssl_object = self.writer.get_extra_info("ssl_object")
        self.tls = True
        cipher = ssl_object.cipher() if ssl_object else None
        self.record.tls = {"version": str(ssl_object.version()) if ssl_object else "",
                           "cipher": cipher[0] if cipher else ""}
        self.buffer.clear()  # RFC 3207 §4.2: nothing from before the handshake counts
        self.reset()
        return True

    async def do_MAIL(self, arg: str) -> bool:
        self.mails += 1
        if self.b.drop_at_mail and self.mails == self.b.drop_at_mail:
            if self.b.drop_reply is not None:
                await self.reply(self.b.drop_reply)
            return False  # closed
        addr, params = split_path(arg)
        limit = self.b.size
        declared = [p for p in params.split() if p.upper().startswith("SIZE=")]
        if limit and declared and int(declared[0][5:]) > limit:
            await self.reply((552, "5.3.4 message size exceeds fixed limit"))
            return True
        await self.reply(self.b.mail_reply)
        if 200 <= self.b.mail_reply[0] < 300:
            self.reset()
            self.mail_from, self.mail_params = addr, params
            self.sink.transaction_started()
        return True

    async def do_RCPT(self, arg: str) -> bool:
        addr, params = split_path(arg)
        if self.mail_from is None:
            await self.reply((503, "5.5.1 need MAIL first"))
            return True
        spec = self.b.rcpt_replies.get(addr.lower(), self.b.rcpt_default)
        await self.reply(spec)
        if 200 <= spec[0] < 300:
            self.rcpts.append((addr, params))
        return True

    async def do_DATA(self, arg: str) -> bool:
        if self.mail_from is None or not self.rcpts:
            await self.reply((503, "5.5.1 no valid recipients"))
            return True
        await self.reply(self.b.data_reply)
        if self.b.data_reply[0] != 354:
            return True
        body = bytearray(b"\r\n")  # so a "." on the very first line is found like any other
        body += self.buffer
        self.buffer.clear()
        scanned = 0
        while True:
            end = body.find(b"\r\n.\r\n", scanned)
            if end >= 0:
                break
            scanned = max(0, len(body) - 4)
            cut = self.b.disconnect_after_data_bytes
            if cut is not None and len(body) - 2 >= cut:
                self.record.dropped = True
                self.writer.transport.abort()
                return False
            data = await self.reader.read(65536)
            if not data:
                return False
            body += data
        self.buffer[:0] = body[end + 5:]
        content = unstuff(bytes(body[2:end + 2]))
        return await self._finish(content, "DATA")

    async def do_BDAT(self, arg: str) -> bool:
        parts = arg.split()
        size, last = int(parts[0]), len(parts) > 1 and parts[1].upper() == "LAST"
        while len(self.buffer) < size:
            if not await self._fill():
                return False
        self.chunks += self.buffer[:size]
        del self.buffer[:size]
        if self.mail_from is None or not self.rcpts:
            await self.reply((503, "5.5.1 no valid recipients"))
            return True
        if not last:
            await self.reply((250, f"2.0.0 {size} octets received"))
            return True
        return await self._finish(bytes(self.chunks), "BDAT")

    async def _finish(self, content: bytes, via: str) -> bool:
        spec = self.b.final_reply
        if self.b.size and len(content) > self.b.size:
            spec = (552, "5.3.4 message size exceeds fixed limit")
        if 200 <= spec[0] < 300:
            n = self.sink.store(ReceivedMessage(
                0, self.record.id, self.mail_from or "", self.mail_params, list(self.rcpts),
                content, self.tls, via), self.record)
            spec = (spec[0], spec[1].replace("{n}", str(n)))
        if self.b.final_delay:
            await asyncio.sleep(self.b.final_delay)
        await self.reply(spec)
        if 200 <= spec[0] < 300:
            self.sink.note("replied", n)
        if self.b.after_final:
            self.writer.write(self.b.after_final)
            await self.writer.drain()
        self.sink.transaction_ended()
        self.reset()
        return True

    async def do_RSET(self, arg: str) -> bool:
        if self.mail_from is not None:
            self.sink.transaction_ended()
        self.reset()
        await self.reply(self.b.rset_reply)
        return True

    async def do_NOOP(self, arg: str) -> bool:
        await self.reply((250, "2.0.0 OK"))
        return True

    async def do_QUIT(self, arg: str) -> bool:
        await self.reply((221, "2.0.0 bye"), delay=self.b.quit_delay)
        return False


class SinkServer:
    """The sink, serving on ``host``:``port`` from a thread of its own."""

    def __init__(self, behaviour: Behaviour | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, out_dir: str | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.host = host
        self.port = port
        self.out_dir = out_dir
        self.sessions: list[SessionRecord] = []
        self.messages: list[ReceivedMessage] = []
        # (time.monotonic(), "stored" | "replied", message number): the order of arrivals
        # (the final dot) and of their final replies, comparable across sinks of one process.
        self.journal: list[tuple[float, str, int]] = []
        self.active_sessions = 0
        self.max_concurrent_sessions = 0
        self.active_transactions = 0
        self.max_concurrent_transactions = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ssl: tuple[tuple[str | None, str | None], ssl.SSLContext] | None = None

    # -- accounting (called on the sink's loop) -------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        key = (self.behaviour.tls_cert, self.behaviour.tls_key)
        if self._ssl is None or self._ssl[0] != key:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.behaviour.tls_cert or "", self.behaviour.tls_key)
            self._ssl = (key, ctx)
        return self._ssl[1]

    def transaction_started(self) -> None:
        with self._lock:
            self.active_transactions += 1
            self.max_concurrent_transactions = max(self.max_concurrent_transactions,
                                                   self.active_transactions)

    def transaction_ended(self) -> None:
        with self._lock:
            self.active_transactions = max(0, self.active_transactions - 1)

    def note(self, event: str, n: int) -> None:
        with self._lock:
            self.journal.append((time.monotonic(), event, n))

    def store(self, message: ReceivedMessage, record: SessionRecord) -> int:
        """Keep (and maybe write out) a message; its number, 1-based."""
        with self._lock:
            message.n = len(self.messages) + 1
            self.messages.append(message)
            self.journal.append((time.monotonic(), "stored", message.n))
        if self.out_dir:
            base = os.path.join(self.out_dir, str(message.n))
            with open(base + ".eml.tmp", "wb") as f:
                f.write(message.data)
            meta = {k: v for k, v in dataclasses.asdict(message).items() if k != "data"}
            meta["transcript"] = [c.line for c in record.commands]
            meta["session_tls"] = record.tls
            with open(base + ".json", "w") as f:
                json.dump(meta, f)
            os.rename(base + ".eml.tmp", base + ".eml")  # the .eml appears last, complete
        return message.n

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            record = SessionRecord(len(self.sessions), writer.get_extra_info("peername"))
            self.sessions.append(record)
            self.active_sessions += 1
            self.max_concurrent_sessions = max(self.max_concurrent_sessions,
                                               self.active_sessions)
        self._writers.add(writer)
        session = _Session(self, reader, writer, record)
        try:
            await session.run()
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            if session.mail_from is not None:
                self.transaction_ended()
            record.closed = True
            with self._lock:
                self.active_sessions -= 1
            self._writers.discard(writer)
            if record.dropped:
                writer.transport.abort()
            else:
                writer.close()

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> SinkServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, self.host, self.port))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            for writer in list(self._writers):
                writer.transport.abort()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name=f"sink-{self.host}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> SinkServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- for assertions -------------------------------------------------------------------
    def commands(self) -> list[str]:
        return [c.line for s in list(self.sessions) for c in s.commands]

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.messages)


def start_sinks(hosts: list[str], behaviours: list[Behaviour] | None = None,
                attempts: int = 20) -> list[SinkServer]:
    """One sink per host, all on one port (the first host's free port, retried if taken)."""
    for _ in range(attempts):
        first = SinkServer(behaviours[0] if behaviours else None, host=hosts[0]).start()
        sinks = [first]
        try:
            for i, host in enumerate(hosts[1:], start=1):
                sinks.append(SinkServer(behaviours[i] if behaviours else None, host=host,
                                        port=first.port).start())
            return sinks
        except OSError:
            for sink in sinks:
                sink.stop()
    raise OSError(f"no common free port for {hosts}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="SMTP test sink")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any)")
    parser.add_argument("--behaviour", default="accept", choices=sorted(PRESETS))
    parser.add_argument("--out", help="directory for <n>.eml and <n>.json")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--size", type=int, help="advertised and enforced SIZE limit")
    parser.add_argument("--delay", type=float, help="seconds before each reply")
    for word in ("pipelining", "dsn", "smtputf8", "8bitmime", "chunking"):
        parser.add_argument(f"--no-{word}", action="store_true")
    parser.add_argument("--reject-rcpt", action="append", default=[], metavar="ADDR=CODE",
                        help="reply CODE to RCPT TO:<ADDR> (repeatable)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    behaviour = dataclasses.replace(PRESETS[args.behaviour], rcpt_replies={})
    behaviour.tls_cert, behaviour.tls_key = args.tls_cert, args.tls_key
    if args.size is not None:
        behaviour.size = args.size
    if args.delay is not None:
        behaviour.delay = args.delay
    behaviour.pipelining &= not args.no_pipelining
    behaviour.dsn &= not args.no_dsn
    behaviour.smtputf8 &= not args.no_smtputf8
    behaviour.eightbitmime &= not args.no_8bitmime
    behaviour.chunking &= not args.no_chunking
    for spec in args.reject_rcpt:
        addr, _, code = spec.partition("=")
        text = "5.1.1 no such user" if code.startswith("5") else "4.2.1 try later"
        behaviour.rcpt_replies[addr.lower()] = (int(code or 550), text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    sink = SinkServer(behaviour, host=host.strip("[]") or "127.0.0.1", port=int(port or 0),
                      out_dir=args.out).start()
    stop = threading.Event()
    # Before the port is printed: whoever reads it may send SIGTERM at once.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(sink.port, flush=True)
    while not stop.wait(0.5):
        pass
    sink.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
