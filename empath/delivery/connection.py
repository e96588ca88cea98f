"""One SMTP client connection: asyncio around the sans-IO ``handshake.py`` and ``client.py``.

Moves the bytes of a session with one server address: connect; the set-up that
``handshake.Handshake`` decides (greeting, EHLO/HELO, STARTTLS per the TLS policy and DANE: here
its commands are sent, its replies read and the TLS handshake run when it says so; a DANE-TA
match connects once more, the matched certificates the only trust anchors, RFC 7672 §3.1.2);
then transactions (RSET before one on a connection idle for a while: pool.py) and QUIT.
Every wait has its own timeout from ``delivery.timeouts`` (RFC 5321 §4.5.3.2). Message data
is streamed from the queue file in blocks, dot-stuffed on the way, never held whole in
memory. Completed TLS handshakes are counted in ``empath_tls_sessions_out_total``.

``open_connection`` raises a DeliveryError when the session cannot be set up (the caller tries
the next host); ``SMTPConnection.deliver`` never raises for a server's verdict or a broken
connection: it returns one outcome per recipient and marks the connection ``broken``.

Every byte the server sends goes into the connection's ``ReplyChannel`` the moment it arrives
(``_ChannelReader``), whether or not a reply is being waited for; each command declares how
many replies it asks for. A reply out of turn, or unread data when a command is sent, is a
``ProtocolFailure``: the connection is closed, never pooled, and every recipient of the
transaction is deferred. A recipient counts as delivered only on the 2xx reply to the final
dot (or to ``BDAT ... LAST``).

Reads the queue file only through the MessageSource it is given; never builds a spool path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from empath.config.typed import DeliveryTimeoutsConfig
from empath.delivery.client import (
    QUIT,
    RSET,
    DotStuffer,
    Extensions,
    ProtocolError,
    ProtocolFailure,
    Reply,
    ReplyChannel,
    Transaction,
    bdat_command,
    check_chunk_reply,
    mail_command,
    needs_smtputf8,
    outcomes_after_error,
    rcpt_command,
)
from empath.delivery.dane import DaneRequirement, Verdict
from empath.delivery.errors import (
    DeliveryError,
    LocalSystemError,
    PermanentError,
    TemporaryError,
    error_for_reply,
)
from empath.delivery.handshake import (
    BeginTLS,
    Command,
    Handshake,
    Ready,
    Reconnect,
    Step,
)
from empath.delivery.state import RecipientOutcome
from empath.delivery.tls import TLSContexts, TLSPolicy, describe, peer_chain, warn_unverified
from empath.observe import deliveries, metrics, tracing
from empath.spool import MessageSource

log = logging.getLogger("empath.delivery.smtp")

BLOCK_SIZE = 64 * 1024  # bytes read from the queue file and written per step
READ_SIZE = 64 * 1024


class ConnectFailure(TemporaryError):
    """No TCP connection could be made (refused, unreachable, timed out): no session."""


class StaleConnection(Exception):
    """A connection taken from the pool without RSET (``unverified``) failed before the first
    reply of its transaction: the server had closed it (or spoke while it was idle), and took
    nothing of this message. The caller delivers on a new connection."""


class _ChannelReader(asyncio.StreamReader):
    """A StreamReader whose bytes go straight into a ReplyChannel as they arrive.

    The stream's own buffer is never used: what the server sent and the client has not
    read is known to the sans-IO channel, which is how an unsolicited reply is caught even
    while the connection waits idle in the pool."""

    def __init__(self) -> None:
        super().__init__(limit=READ_SIZE * 4)
        self.channel = ReplyChannel()
        self.lost: BaseException | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self.on_trouble: Callable[[], None] | None = None  # the pool's, while idle

    def feed_data(self, data: Any) -> None:
        try:
            self.channel.feed(bytes(data))
        except ProtocolError:  # kept in channel.error
            self._wake(trouble=True)
        else:
            self._wake()

    def feed_eof(self) -> None:
        self.channel.eof = True
        self._wake(trouble=True)

    def set_exception(self, exc: BaseException) -> None:
        self.lost = exc
        self._wake(trouble=True)

    def _wake(self, trouble: bool = False) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)
        if trouble and self.on_trouble is not None:
            callback, self.on_trouble = self.on_trouble, None
            callback()

    async def arrival(self, deadline: float) -> None:
        """Until more bytes, the end of the stream or an error arrive; TimeoutError at
        ``deadline`` (loop time). One timer, not an ``asyncio.timeout`` scope: this is
        awaited for every reply of every message."""
        loop = asyncio.get_running_loop()
        wakeup = self._wakeup = loop.create_future()
        timer = loop.call_at(deadline, _time_out, wakeup)
        try:
            await wakeup
        finally:
            self._wakeup = None
            timer.cancel()


def _time_out(wakeup: asyncio.Future[None]) -> None:
    if not wakeup.done():
        wakeup.set_exception(TimeoutError())


async def connect_stream(ip: str, port: int) -> tuple[_ChannelReader, asyncio.StreamWriter]:
    """A TCP connection whose reader feeds a ReplyChannel (``asyncio.open_connection``
    with our reader)."""
    loop = asyncio.get_running_loop()
    reader = _ChannelReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.create_connection(lambda: protocol, ip, port)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


@tracing.connect
async def open_connection(*, server: str, ip: str, port: int, helo: str, domain: str,
                          policy: TLSPolicy, contexts: TLSContexts,
                          timeouts: DeliveryTimeoutsConfig,
                          try_tls: bool = True,
                          dane: DaneRequirement | None = None,
                          verify_error: str | None = None) -> SMTPConnection:
    """Connect to ``ip``:``port`` (the MX ``server``) and bring the session to MAIL-ready.

    ``verify_error``: the certificate is known not to verify (a first connection said why);
    the session is encrypted without verification and records the reason."""

    def handshake(anchors: tuple[bytes, ...]) -> Handshake:
        return Handshake(helo, policy, server=server, domain=domain, try_tls=try_tls,
                         dane=dane, anchors=anchors, verify_error=verify_error)

    conn, again = await _open(handshake(()), ip, port, contexts, timeouts)
    if again is None:
        return conn
    await conn.quit()  # over TLS already; nothing else was said
    # DANE-TA: the same server again, the matched certificates as the only anchors (a
    # handshake that trusts anchors never asks for others).
    conn, _ = await _open(handshake(again.anchors), ip, port, contexts, timeouts)
    return conn


async def _open(hs: Handshake, ip: str, port: int, contexts: TLSContexts,
                timeouts: DeliveryTimeoutsConfig) -> tuple[SMTPConnection, Reconnect | None]:
    try:
        async with asyncio.timeout(timeouts.connect):
            reader, writer = await connect_stream(ip, port)
    except OSError as exc:  # TimeoutError included
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ConnectFailure.make("connect", server=f"{hs.server}[{ip}]:{port}",
                                  reason=reason) from None
    conn = SMTPConnection(reader, writer, server=hs.server, ip=ip, port=port,
                          timeouts=timeouts)
    conn.tls_verify_error = hs.verify_error
    try:
        return conn, await conn.handshake(hs, contexts)
    except BaseException:
        conn.abort()
        raise


class SMTPConnection:
    """A live session with one server, ready for transactions after ``handshake``."""

    def __init__(self, reader: _ChannelReader, writer: asyncio.StreamWriter, *,
                 server: str, ip: str, port: int, timeouts: DeliveryTimeoutsConfig) -> None:
        self.reader = reader
        self.writer = writer
        self.channel = reader.channel
        self.server = server
        self.ip = ip
        self.port = port
        self.timeouts = timeouts
        self.extensions = Extensions()
        self.tls: dict[str, str] | None = None
        self.dane: Verdict | None = None  # the DANE verdict of this session, when DANE applied
        self.tls_failure: str | None = None  # why a session that wanted TLS is in plain
        self.tls_verify_error: str | None = None  # why the certificate did not verify
        self._broken = False
        self.messages = 0
        self.idle_since = time.monotonic()
        self.replies_read = 0
        self.last_code = 0
        # Taken from the pool without RSET: until a reply of its next transaction arrives,
        # a failure means the server was gone (StaleConnection), not that it refused.
        self.unverified = False
        self.gauge_entry = deliveries.connection_opened(server)  # open connections gauge

    @property
    def label(self) -> str:
        return f"{self.server}[{self.ip}]:{self.port}"

    @property
    def broken(self) -> bool:
        """Not reusable: failed, closed by the server, or it said something out of turn."""
        return self._broken or self.channel.error is not None or self.channel.eof

    @broken.setter
    def broken(self, value: bool) -> None:
        self._broken = value

    # -- reading and writing --------------------------------------------------------------
    async def _read(self, stage: str) -> Reply:
        """The next reply, within the timeout of ``stage``; failures mark the connection."""
        try:
            reply = self.channel.next()  # already here (pipelined replies come together)
            if reply is None:
                reply = await self._wait_reply(stage)
        except ProtocolError as exc:
            raise self._protocol_failure(exc) from None
        self.replies_read += 1
        self.last_code = reply.code
        deliveries.remote_reply(stage, reply.code, reply.enhanced)
        if reply.code == 421:
            self.broken = True  # RFC 5321 §3.8: the server is closing the channel
        return reply

    async def _wait_reply(self, stage: str) -> Reply:
        deadline = asyncio.get_running_loop().time() + getattr(self.timeouts, stage)
        try:
            while (reply := self.channel.next()) is None:
                if self.reader.lost is not None:
                    raise self.reader.lost
                if self.channel.eof:
                    raise TemporaryError.make("lost", server=self.label, stage=stage,
                                              reason="closed by the server")
                await self.reader.arrival(deadline)
        except TimeoutError:
            self.broken = True
            raise TemporaryError.make("timeout", server=self.label, stage=stage) from None
        except ProtocolError as exc:
            raise self._protocol_failure(exc) from None
        except OSError as exc:
            self.broken = True
            raise TemporaryError.make("lost", server=self.label, stage=stage,
                                      reason=exc.strerror or str(exc)) from None
        except DeliveryError:
            self.broken = True
            raise
        return reply

    def _protocol_failure(self, exc: ProtocolError) -> ProtocolFailure:
        self.broken = True
        return ProtocolFailure.make("protocol", server=self.label, reason=str(exc))

    async def _send(self, data: bytes, stage: str, replies: int = 1) -> None:
        """Write a command (or the end of data) that asks for ``replies`` replies; refused
        while anything the server sent is unread (ProtocolFailure)."""
        try:
            self.channel.expect(replies, stage)
        except ProtocolError as exc:
            raise self._protocol_failure(exc) from None
        await self._write(data, stage)

    async def _write(self, data: bytes, stage: str) -> None:
        if self.channel.error is not None:  # the server spoke out of turn meanwhile
            raise self._protocol_failure(self.channel.error)
        try:
            self.writer.write(data)
            if not self.writer.transport.get_write_buffer_size():
                await self.writer.drain()  # all sent: returns at once (or raises if lost)
                return
            async with asyncio.timeout(getattr(self.timeouts, stage)):
                await self.writer.drain()
        except TimeoutError:
            self.broken = True
            raise TemporaryError.make("timeout", server=self.label, stage=stage) from None
        except OSError as exc:
            self.broken = True
            raise TemporaryError.make("lost", server=self.label, stage=stage,
                                      reason=exc.strerror or str(exc)) from None

    async def _command(self, line: bytes, stage: str) -> Reply:
        await self._send(line, stage)
        return await self._read(stage)

    # -- session set-up: handshake.Handshake decides, this moves the bytes ---------------
    async def handshake(self, hs: Handshake, contexts: TLSContexts) -> Reconnect | None:
        """Carry out ``hs`` until the session is ready for MAIL (None), or must be made again
        (``Reconnect``: DANE-TA); a DeliveryError when there is no session."""
        step = self._decide(hs, await self._read(hs.expecting))
        while not isinstance(step, Ready):
            if isinstance(step, Command):
                await self._send(step.command, step.stage)
                step = self._decide(hs, await self._read(step.stage))
            elif isinstance(step, BeginTLS):
                step = await self._start_tls(hs, step, contexts)
            elif isinstance(step, Reconnect):
                return step
            else:
                self.broken = True
                raise step.error
        self.extensions = step.extensions
        self.tls_failure = hs.tls_failure
        self.dane = hs.verdict
        if self.dane is not None:
            log.debug("%s: DANE %s", self.label, self.dane.description)
        return None

    def _decide(self, hs: Handshake, reply: Reply) -> Step:
        # Anything still unread after a reply arrived unasked (after a 220 to STARTTLS, in
        # plain text: a possible injected reply).
        unread = self.channel.pending or self.channel.error is not None
        try:
            return hs.receive(reply, unread=unread)
        except ProtocolError as exc:
            raise self._protocol_failure(exc) from None

    async def _start_tls(self, hs: Handshake, step: BeginTLS, contexts: TLSContexts) -> Step:
        """The TLS handshake on this connection, its result reported to ``hs``. SNI, and the
        name checked when the context checks one, is the MX host (RFC 7672 §8.1 for DANE)."""
        try:
            context = (contexts.dane_context(step.anchors) if step.dane
                       else contexts.context(hs.policy))
        except (OSError, ssl.SSLError) as exc:
            raise LocalSystemError.make("local", reason=f"TLS context: {exc}") from None
        if step.warn_unverified:
            warn_unverified(hs.domain, self.server, self.ip)
        plain = self.writer.transport
        try:
            async with asyncio.timeout(self.timeouts.starttls):
                await self.writer.start_tls(context, server_hostname=self.server,
                                            ssl_handshake_timeout=self.timeouts.starttls)
        except ssl.SSLCertVerificationError as exc:
            reason, unverified = exc.verify_message or str(exc), True
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError, AttributeError) as exc:
            # AttributeError: the stock asyncio loop's start_tls returns None when the peer
            # hangs up mid-handshake and StreamWriter.start_tls trips over it (uvloop does
            # not); either way the plain transport must still be closed.
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            unverified = False
        else:
            ssl_object = self.writer.get_extra_info("ssl_object")
            self.tls = describe(ssl_object)
            if self.tls is not None:
                metrics.current().tls_sessions_out.labels(self.tls["version"]).inc()
                self.tls.update(hs.tls_notes)  # for the attempt history
            chain = peer_chain(ssl_object, verified=bool(step.anchors)) if step.dane else []
            return hs.tls_established(chain)
        if self.writer.transport is None:
            plain.abort()
        self.broken = True
        return hs.tls_failed(reason, unverified=unverified)

    # -- transactions ---------------------------------------------------------------------
    async def reset(self) -> bool:
        """RSET before reusing the connection (RFC 5321 §4.1.1.5); False if it is unusable."""
        try:
            reply = await self._command(RSET, "mail")
        except DeliveryError:
            return False
        except BaseException:
            self.abort()  # cancelled while waiting: the reply may still come, unread
            raise
        return reply.code == 250

    def _precheck(self, envelope: Mapping[str, Any], rcpts: Sequence[Mapping[str, Any]],
                  size: int) -> tuple[DeliveryError | None, dict[str, RecipientOutcome]]:
        """Verdicts reached from the EHLO keywords alone, before any command is sent."""
        ext = self.extensions
        limit = ext.size_limit
        if limit is not None and size > limit:
            return PermanentError.make("too_big", server=self.server, size=size,
                                       limit=limit), {}
        if needs_smtputf8(envelope) and not ext.has("SMTPUTF8"):
            return PermanentError.make("needs_smtputf8", server=self.server), {}
        params = envelope.get("params") or {}
        if params.get("body") == "BINARYMIME" and not (
                ext.has("BINARYMIME") and ext.has("CHUNKING")):
            return PermanentError.make("needs_binarymime", server=self.server), {}
        # A UTF-8 recipient address alone, in an otherwise ASCII message, fails only itself.
        refused = {}
        if not ext.has("SMTPUTF8"):
            for rcpt in rcpts:
                if not rcpt["address"].isascii():
                    refused[rcpt["address"]] = PermanentError.make(
                        "needs_smtputf8", server=self.server).outcome()
        return None, refused

    @tracing.transaction
    async def deliver(self, envelope: Mapping[str, Any], rcpts: Sequence[Mapping[str, Any]],
                      source: MessageSource) -> dict[str, RecipientOutcome]:
        """One transaction for ``rcpts``; one outcome per recipient, never an exception."""
        size = source.length
        everyone, outcomes = self._precheck(envelope, rcpts, size)
        if everyone is not None:
            return {r["address"]: everyone.outcome() for r in rcpts}
        todo = [r for r in rcpts if r["address"] not in outcomes]
        if not todo:
            return outcomes
        self.messages += 1
        seen = self.replies_read
        ext = self.extensions
        binary = (envelope.get("params") or {}).get("body") == "BINARYMIME"
        txn = Transaction(mail_command(envelope, size, ext),
                          [(r["address"], rcpt_command(r, ext)) for r in todo],
                          pipelining=ext.has("PIPELINING"), use_data=not binary)
        try:
            outcomes.update(await self._transaction(txn, source))
        except (ProtocolError, DeliveryError) as exc:
            err = (self._protocol_failure(exc) if isinstance(exc, ProtocolError) else exc)
            self.broken = True
            # Nothing heard, or only a 421 to MAIL (the server closing the idle channel):
            # nothing of this message was taken.
            if self.unverified and (self.replies_read == seen or (
                    self.replies_read == seen + 1 and self.last_code == 421)):
                raise StaleConnection(f"{self.label}: {err}") from None
            outcomes.update(outcomes_after_error(txn, err, self.server))
        except BaseException:
            self.abort()  # cancelled mid-transaction: the session is in no reusable state
            raise
        finally:
            self.unverified = False
            self.idle_since = time.monotonic()
        return outcomes

    async def _transaction(self, txn: Transaction,
                           source: MessageSource) -> dict[str, RecipientOutcome]:
        await self._envelope(txn)
        final: Reply | None = None
        if txn.use_data and txn.data_accepted:
            if txn.accepted:
                await self._send_data(source)
                final = await self._read("data_termination")
            else:
                # RFC 2920 §3.1: 354 although every RCPT failed; end the empty data at once.
                await self._send(b".\r\n", "data_block")
                await self._read("data_termination")
        elif not txn.use_data and txn.accepted:
            final = await self._send_bdat(source)
        return txn.outcomes(final, self.server)

    async def _envelope(self, txn: Transaction) -> None:
        """MAIL, each RCPT and DATA (pipelined when offered), until the envelope is decided;
        each reply is matched to its command by ``txn`` (ProtocolError when it cannot be)."""
        await self._send(txn.start(), "mail", txn.start_replies)
        while not txn.finished:
            reply = await self._read(txn.expecting)
            if reply.code == 421:
                raise error_for_reply(reply.code, reply.enhanced, reply.text, self.server)
            follow = txn.receive(reply)
            if follow:
                await self._send(follow, txn.expecting)

    def _blocks(self, source: MessageSource) -> Any:
        """The message in BLOCK_SIZE pieces. Plain reads: the file was just written and is in
        the page cache, cheaper to read here than through a thread."""
        try:
            with open(source.path, "rb", buffering=0) as f:
                f.seek(source.offset)
                remaining = source.length
                while remaining > 0:
                    block = f.read(min(BLOCK_SIZE, remaining))
                    if not block:
                        raise OSError("queue file shorter than its recorded length")
                    remaining -= len(block)
                    yield block, remaining == 0
        except OSError as exc:
            self.broken = True
            raise LocalSystemError.make("local", reason=f"reading the message: {exc}") from None

    async def _send_data(self, source: MessageSource, finals: int = 1) -> None:
        """The message, dot-stuffed, then the final dot, which asks for ``finals`` replies
        (one for SMTP, one per accepted recipient for LMTP)."""
        stuffer = DotStuffer()
        last = b""
        for block, final in self._blocks(source):
            out = stuffer.feed(block)
            if final:
                last = out  # sent with the final dot: one write for a small message
            elif out:
                await self._write(out, "data_block")
        await self._send(last + stuffer.finish(), "data_block", finals)  # ends with the dot

    async def _send_bdat(self, source: MessageSource) -> Reply:
        """RFC 3030 §2: BINARYMIME data as BDAT chunks, each answered before the next."""
        if source.length == 0:
            return await self._command(bdat_command(0, True), "data_termination")
        reply: Reply | None = None
        for block, last in self._blocks(source):
            await self._send(bdat_command(len(block), last) + block, "data_block")
            reply = await self._read("data_termination" if last else "data_block")
            check_chunk_reply(reply)
            if not reply.is_positive:
                return reply
        assert reply is not None
        return reply

    # -- ending ---------------------------------------------------------------------------
    async def quit(self) -> None:
        """QUIT politely (RFC 5321 §4.1.1.10), then close; never raises."""
        if not self.broken:
            with contextlib.suppress(DeliveryError):
                await self._send(QUIT, "quit")
                await self._read("quit")
        self.abort()

    def abort(self) -> None:
        self.broken = True
        self.gauge_entry.close()
        with contextlib.suppress(Exception):
            self.writer.transport.abort()
