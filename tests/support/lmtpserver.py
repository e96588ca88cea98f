"""A small LMTP server (RFC 2033) on loopback for local-delivery tests: receives and records.

It runs its own asyncio loop in a background thread, so both plain tests and the real daemon
(another process, through ``local_delivery.lmtp``) can talk to it::

    server = LMTPServer(verdicts={"later@localhost": (452, "4.2.2 mailbox full"),
                                  "gone@localhost": (550, "5.1.1 no such user")}).start()
    ...deliver to 127.0.0.1:server.port...
    [msg] = server.wait_for_messages(1)
    msg.mail_from, msg.recipients, msg.data     # accepted at RCPT; data unstuffed
    msg.results                                  # {address: (code, text)} after the dot
    server.delivered_to("u@localhost")          # data of every message that reached u
    server.commands()                            # every command line, all sessions, in order
    server.sessions, server.most_active          # connections so far, most open at once
    server.stop()

Verdicts are per recipient address (lower-cased): ``verdicts`` answer after the final dot
(accept unless listed), ``rcpt_verdicts`` answer the RCPT command itself. Other knobs
(``Behaviour``): the greeting; PIPELINING, CHUNKING and SIZE advertised or not; a delay before
the final replies; closing the connection after a number of final replies. It speaks LMTP
only: EHLO and HELO are refused, MAIL before LHLO is 503, and DATA with no accepted recipient
is 503 (RFC 2033 §4.2). It parses commands and undoes dot-stuffing with its own code, so it
checks the client instead of agreeing with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

Verdict = tuple[int, str]


@dataclasses.dataclass
class Behaviour:
    greeting: Verdict = (220, "lmtp.test LMTP ready")
    lhlo_reply: Verdict | None = None  # None: 250 with the extensions below
    pipelining: bool = True
    chunking: bool = False
    size: int | None = None
    final_delay: float = 0.0  # seconds before the replies after the final dot
    close_after_finals: int | None = None  # hang up after this many final replies


@dataclasses.dataclass
class Message:
    mail_from: str
    mail_params: str
    recipients: list[str]
    data: bytes
    results: dict[str, Verdict] = dataclasses.field(default_factory=dict)


def split_path(arg: str) -> tuple[str, str]:
    """``FROM:<a@b> PARAMS`` -> ("a@b", "PARAMS")."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    if not rest.startswith("<"):
        addr, _, params = rest.partition(" ")
        return addr, params.strip()
    addr, _, params = rest[1:].partition(">")
    return addr, params.strip()


def unstuff(lines: list[bytes]) -> bytes:
    """Message lines (each with its CRLF) before the lone dot, leading dots undone."""
    return b"".join(line[1:] if line.startswith(b".") else line for line in lines)


class _Session:
    def __init__(self, server: LMTPServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server, self.reader, self.writer = server, reader, writer
        self.greeted = False
        self.reset()

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_params = ""
        self.rcpts: list[str] = []
        self.chunks = bytearray()

    @property
    def b(self) -> Behaviour:
        return self.server.behaviour

    async def send(self, verdict: Verdict, *lines: str) -> None:
        code, text = verdict
        texts = [*lines, text]
        out = "".join(f"{code}-{t}\r\n" for t in texts[:-1]) + f"{code} {texts[-1]}\r\n"
        self.writer.write(out.encode())
        await self.writer.drain()

    async def run(self) -> None:
        await self.send(self.b.greeting)
        if self.b.greeting[0] != 220:
            return
        while True:
            raw = await self.reader.readline()
            if not raw.endswith(b"\n"):
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            self.server.record_command(line)
            verb, _, arg = line.partition(" ")
            handler = getattr(self, "do_" + verb.upper(), None)
            if handler is None:
                await self.send((500, "5.5.1 command not recognized"))
            elif await handler(arg) is False:
                return

    async def do_LHLO(self, arg: str) -> bool:
        if self.b.lhlo_reply is not None:
            await self.send(self.b.lhlo_reply)
            return self.b.lhlo_reply[0] == 250
        self.greeted = True
        self.reset()
        lines = ["lmtp.test", "ENHANCEDSTATUSCODES", "8BITMIME"]
        if self.b.pipelining:
            lines.append("PIPELINING")
        if self.b.chunking:
            lines += ["CHUNKING", "BINARYMIME"]
        if self.b.size is not None:
            lines.append(f"SIZE {self.b.size}")
        await self.send((250, lines[-1]), *lines[:-1])
        return True

    async def do_EHLO(self, arg: str) -> bool:
        await self.send((500, "5.5.1 this is LMTP: LHLO, please"))
        return True

    do_HELO = do_EHLO

    async def do_MAIL(self, arg: str) -> bool:
        if not self.greeted:
            await self.send((503, "5.5.1 LHLO first"))
            return True
        if self.mail_from is not None:
            await self.send((503, "5.5.1 nested MAIL"))
            return True
        self.reset()
        self.mail_from, self.mail_params = split_path(arg)
        await self.send((250, "2.1.0 sender ok"))
        return True

    async def do_RCPT(self, arg: str) -> bool:
        if self.mail_from is None:
            await self.send((503, "5.5.1 MAIL first"))
            return True
        addr, _ = split_path(arg)
        verdict = self.server.rcpt_verdicts.get(addr.lower(), (250, "2.1.5 recipient ok"))
        await self.send(verdict)
        if 200 <= verdict[0] < 300:
            self.rcpts.append(addr)
        return True

    async def do_DATA(self, arg: str) -> bool:
        if self.mail_from is None or not self.rcpts:
            await self.send((503, "5.5.1 no valid recipients"))
            return True
        await self.send((354, "end data with <CR><LF>.<CR><LF>"))
        lines: list[bytes] = []
        while True:
            raw = await self.reader.readline()
            if not raw.endswith(b"\n"):
                return False
            if raw == b".\r\n":
                break
            lines.append(raw)
        return await self.finish(unstuff(lines))

    async def do_BDAT(self, arg: str) -> bool:
        words = arg.split()
        if not self.b.chunking or not words or not words[0].isdigit():
            await self.send((500, "5.5.1 no BDAT here"))
            return True
        self.chunks += await self.reader.readexactly(int(words[0]))
        if self.mail_from is None or not self.rcpts:
            await self.send((503, "5.5.1 no valid recipients"))
            self.reset()
            return True
        if len(words) < 2 or words[1].upper() != "LAST":
            await self.send((250, f"2.0.0 {words[0]} octets received"))
            return True
        return await self.finish(bytes(self.chunks))

    async def finish(self, data: bytes) -> bool:
        """One reply per accepted recipient, in RCPT order (RFC 2033 §4.2)."""
        assert self.mail_from is not None
        message = Message(self.mail_from, self.mail_params, list(self.rcpts), data)
        if self.b.final_delay:
            await asyncio.sleep(self.b.final_delay)
        sent = 0
        for addr in self.rcpts:
            if self.b.close_after_finals is not None and sent >= self.b.close_after_finals:
                self.server.record_message(message)
                return False
            verdict = self.server.verdicts.get(addr.lower(), (250, f"2.0.0 <{addr}> saved"))
            message.results[addr] = verdict
            await self.send(verdict)
            sent += 1
        self.server.record_message(message)
        self.reset()
        return True

    async def do_RSET(self, arg: str) -> bool:
        self.reset()
        await self.send((250, "2.0.0 ok"))
        return True

    async def do_NOOP(self, arg: str) -> bool:
        await self.send((250, "2.0.0 ok"))
        return True

    async def do_QUIT(self, arg: str) -> bool:
        await self.send((221, "2.0.0 bye"))
        return False


class LMTPServer:
    """The server and what it saw; every attribute may be read from the test's thread."""

    def __init__(self, behaviour: Behaviour | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, verdicts: dict[str, Verdict] | None = None,
                 rcpt_verdicts: dict[str, Verdict] | None = None) -> None:
        self.host = host
        self.port = port
        self.behaviour = behaviour or Behaviour()
        self.verdicts = {k.lower(): v for k, v in (verdicts or {}).items()}
        self.rcpt_verdicts = {k.lower(): v for k, v in (rcpt_verdicts or {}).items()}
        self.messages: list[Message] = []
        self.sessions = 0
        self.active = 0
        self.most_active = 0  # the most sessions open at once
        self._commands: list[str] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- recording (called on the server's loop) ---------------------------------------------
    def record_command(self, line: str) -> None:
        with self._lock:
            self._commands.append(line)

    def record_message(self, message: Message) -> None:
        with self._lock:
            self.messages.append(message)

    # -- reading (from the test) -------------------------------------------------------------
    def commands(self) -> list[str]:
        with self._lock:
            return list(self._commands)

    def delivered_to(self, address: str) -> list[bytes]:
        """The data of every message whose final reply for ``address`` was 2xx."""
        with self._lock:
            return [m.data for m in self.messages
                    if 200 <= m.results.get(address, (0, ""))[0] < 300]

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[Message]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(self.messages)} of {count} messages arrived")
            time.sleep(0.02)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> LMTPServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, self.host, self.port))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="lmtp-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self.sessions += 1
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            await _Session(self, reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with self._lock:
                self.active -= 1
            self._tasks.discard(task)
            writer.close()

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or self._thread is None:
            return

        async def shut() -> None:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> LMTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
