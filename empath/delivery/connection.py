"""One SMTP client connection: the asyncio layer around the protocol core in ``client.py``.

Owns the socket side of a session with one server address: connect, greeting, EHLO (HELO when
EHLO is refused), STARTTLS as the TLS policy says, then any number of transactions (RSET
between them) and QUIT. Every wait has its own timeout from ``delivery.timeouts`` (RFC 5321
§4.5.3.2). Message data is streamed from the queue file in blocks, dot-stuffed on the way, so a
large message is never held in memory.

With a DANE requirement (``dane.py``) STARTTLS is mandatory and the server's certificate chain
is matched against the TLSA records right after the handshake, before any transaction; a
DANE-TA match makes ``open_connection`` connect once more, with the matched certificates as
the only trust anchors, so that OpenSSL verifies the chain up to them (RFC 7672 §3.1.2).

Under an enforced MTA-STS policy (``TLSPolicy`` mode ``mta-sts``) STARTTLS and a verified
certificate are mandatory, with texts that name the policy. Every completed handshake is
counted in ``empath_tls_sessions_out_total`` (a no-op call when metrics are off).

``open_connection`` raises a DeliveryError when the session cannot be set up (the caller tries
the next host); ``SMTPConnection.deliver`` never raises for a server's verdict or a broken
connection: it returns one outcome per recipient and marks the connection ``broken``.

Every byte the server sends goes into the connection's ``ReplyChannel`` (``client.py``) the
moment it arrives (``_ChannelReader``), whether or not a reply is being waited for; each
command declares how many replies it asks for. A reply out of turn, or unread data when a
command is sent, is a ``ProtocolFailure``: the connection is closed, never pooled, and every
recipient of the transaction is deferred, even one a reply seemed to refuse (replies out of
turn cannot be matched to recipients). A recipient counts as delivered only on the 2xx reply
to the final dot (or to ``BDAT ... LAST``).

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

from empath.delivery.client import (
    DotStuffer,
    Extensions,
    ProtocolError,
    Reply,
    ReplyChannel,
    Transaction,
    check_chunk_reply,
    mail_command,
    needs_smtputf8,
    rcpt_command,
    reply_outcome,
)
from empath.delivery.dane import (
    ENCRYPTED,
    NEEDS_ANCHOR,
    VERIFIED,
    DaneRequirement,
    Verdict,
    check_chain,
)
from empath.delivery.errors import (
    DeliveryError,
    LocalSystemError,
    PermanentError,
    TemporaryError,
    error_for_reply,
)
from empath.delivery.state import RecipientOutcome
from empath.delivery.tls import TLSContexts, TLSPolicy, describe, peer_chain, warn_unverified
from empath.observe import deliveries, metrics, tracing
from empath.spool import MessageSource

log = logging.getLogger("empath.delivery.smtp")

BLOCK_SIZE = 64 * 1024  # bytes read from the queue file and written per step
READ_SIZE = 64 * 1024


class TLSPolicyFailure(TemporaryError):
    """The TLS policy (required, MTA-STS enforce) was not met by a server that answered: no
    STARTTLS offered, STARTTLS refused, or (the subclass) a failed handshake."""


class TLSHandshakeError(TLSPolicyFailure):
    """STARTTLS was accepted but the handshake failed; the connection is unusable.

    Under an opportunistic policy the caller reconnects to the same host without TLS."""


class CertificateUnverified(TLSHandshakeError):
    """The handshake failed only because the certificate did not verify (untrusted issuer,
    wrong name, expired). Under an opportunistic policy the caller reconnects with TLS that
    does not verify, never in plain: opportunistic means encrypt whenever offered."""

    def __init__(self, code: int, enhanced: str | None, text: str,
                 server: str | None = None) -> None:
        super().__init__(code, enhanced, text, server)
        self.reason = ""


class DANEFailure(TemporaryError):
    """DANE applies to the host and was not satisfied (no STARTTLS, a failed handshake, a
    certificate matching no TLSA record). Never retried in plain: the next host is tried."""


class ConnectFailure(TemporaryError):
    """No TCP connection could be made (refused, unreachable, timed out): no session."""


class ProtocolFailure(TemporaryError):
    """The server broke the protocol (a malformed reply, a reply out of turn, data nobody
    asked for): nothing it said in this transaction is trusted, everyone is deferred."""


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

    async def arrival(self) -> None:
        """Until more bytes, the end of the stream or an error arrive."""
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None


async def connect_stream(ip: str, port: int) -> tuple[_ChannelReader, asyncio.StreamWriter]:
    """A TCP connection whose reader feeds a ReplyChannel (``asyncio.open_connection``
    with our reader)."""
    loop = asyncio.get_running_loop()
    reader = _ChannelReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.create_connection(lambda: protocol, ip, port)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class _HandshakeFailed(Exception):
    """The TLS handshake failed; the argument says why."""


class _VerifyFailed(_HandshakeFailed):
    """The TLS handshake failed on certificate verification alone."""


class _NeedsAnchor(Exception):
    """The chain holds certificates matching DANE-TA records: connect again trusting them."""

    def __init__(self, anchors: tuple[bytes, ...]) -> None:
        super().__init__("DANE-TA")
        self.anchors = anchors


@tracing.connect
async def open_connection(*, server: str, ip: str, port: int, helo: str, domain: str,
                          policy: TLSPolicy, contexts: TLSContexts, timeouts: Any,
                          try_tls: bool = True,
                          dane: DaneRequirement | None = None,
                          verify_error: str | None = None) -> SMTPConnection:
    """Connect to ``ip``:``port`` (the MX ``server``) and bring the session to MAIL-ready.

    ``verify_error``: the certificate is known not to verify (a first connection said why);
    the session is encrypted without verification and records the reason."""
    try:
        return await _open(server=server, ip=ip, port=port, helo=helo, domain=domain,
                           policy=policy, contexts=contexts, timeouts=timeouts,
                           try_tls=try_tls, dane=dane, anchors=(), verify_error=verify_error)
    except _NeedsAnchor as need:
        # DANE-TA: the same server again, the matched certificates as the only anchors.
        return await _open(server=server, ip=ip, port=port, helo=helo, domain=domain,
                           policy=policy, contexts=contexts, timeouts=timeouts,
                           try_tls=try_tls, dane=dane, anchors=need.anchors)


async def _open(*, server: str, ip: str, port: int, helo: str, domain: str,
                policy: TLSPolicy, contexts: TLSContexts, timeouts: Any, try_tls: bool,
                dane: DaneRequirement | None, anchors: tuple[bytes, ...],
                verify_error: str | None = None) -> SMTPConnection:
    try:
        async with asyncio.timeout(timeouts.connect):
            reader, writer = await connect_stream(ip, port)
    except TimeoutError:
        raise ConnectFailure.make("connect", server=f"{server}[{ip}]:{port}",
                                  reason="timed out") from None
    except OSError as exc:
        raise ConnectFailure.make("connect", server=f"{server}[{ip}]:{port}",
                                  reason=exc.strerror or str(exc)) from None
    conn = SMTPConnection(reader, writer, server=server, ip=ip, port=port, timeouts=timeouts)
    conn.tls_verify_error = verify_error
    try:
        await conn.handshake(helo, domain, policy, contexts, try_tls, dane, anchors)
    except _NeedsAnchor:
        await conn.quit()  # over TLS already; nothing else was said
        raise
    except BaseException:
        conn.abort()
        raise
    return conn


class SMTPConnection:
    """A live session with one server, ready for transactions after ``handshake``."""

    def __init__(self, reader: _ChannelReader, writer: asyncio.StreamWriter, *,
                 server: str, ip: str, port: int, timeouts: Any) -> None:
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
            async with asyncio.timeout(getattr(self.timeouts, stage)):
                while (reply := self.channel.next()) is None:
                    if self.reader.lost is not None:
                        raise self.reader.lost
                    if self.channel.eof:
                        raise TemporaryError.make("lost", server=self.label, stage=stage,
                                                  reason="closed by the server")
                    await self.reader.arrival()
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
        deliveries.remote_reply(stage, reply.code, reply.enhanced)
        if reply.code == 421:
            self.broken = True  # RFC 5321 §3.8: the server is closing the channel
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

    def _fail(self, reply: Reply) -> DeliveryError:
        return error_for_reply(reply.code, reply.enhanced, reply.text, self.server)

    # -- session set-up -------------------------------------------------------------------
    async def handshake(self, helo: str, domain: str, policy: TLSPolicy,
                        contexts: TLSContexts, try_tls: bool,
                        dane: DaneRequirement | None = None,
                        anchors: tuple[bytes, ...] = ()) -> None:
        banner = await self._read("banner")
        if banner.code != 220:
            # 421/554 greetings: this host will not talk to us; the caller tries the next.
            raise self._fail(banner)
        self.extensions = await self._ehlo(helo)
        if dane is None and not (policy.wants_tls and try_tls):
            return
        if not self.extensions.has("STARTTLS"):
            if dane is not None:  # RFC 7672 §2.2: TLSA records mean STARTTLS is a must
                raise DANEFailure.make("dane_no_starttls", server=self.server)
            if policy.requires_tls:
                kind = "mta_sts_no_starttls" if policy.is_mta_sts else "tls_not_offered"
                raise TLSPolicyFailure.make(kind, server=self.server, domain=domain)
            self.tls_failure = "STARTTLS not offered"
            return
        reply = await self._command(b"STARTTLS\r\n", "starttls")
        if reply.code != 220:
            if dane is not None:
                raise DANEFailure.make("dane_tls_failed", server=self.server,
                                       reason=f"STARTTLS refused: {reply}")
            if policy.requires_tls:
                kind = "mta_sts_tls_failed" if policy.is_mta_sts else "tls_failed"
                raise TLSPolicyFailure.make(kind, server=self.server, domain=domain,
                                            reason=f"STARTTLS refused: {reply}")
            self.tls_failure = f"STARTTLS refused: {reply}"
            return  # opportunistic: the session goes on in plain (RFC 3207 §4)
        if dane is not None:
            await self._start_dane(dane, contexts, anchors)
        else:
            await self._start_tls(domain, policy, contexts)
        # RFC 3207 §4.2: all knowledge from before TLS is discarded; EHLO again.
        self.extensions = await self._ehlo(helo)

    async def _ehlo(self, helo: str) -> Extensions:
        reply = await self._command(f"EHLO {helo}\r\n".encode(), "ehlo")
        if reply.code == 250:
            return Extensions.from_reply(reply)
        if not reply.is_permanent or reply.code == 421:
            raise self._fail(reply)
        # RFC 5321 §3.2: a server that refuses EHLO may still speak HELO.
        reply = await self._command(f"HELO {helo}\r\n".encode(), "ehlo")
        if reply.code != 250:
            raise self._fail(reply)
        return Extensions()

    def _injected(self) -> bool:
        """Anything the server sent after its 220 arrived in plain text and could be an
        injected reply (the STARTTLS command-injection class of bugs)."""
        return self.channel.pending or self.channel.error is not None

    async def _start_dane(self, dane: DaneRequirement, contexts: TLSContexts,
                          anchors: tuple[bytes, ...]) -> None:
        """The handshake under DANE, then the TLSA match, before anything else is said."""
        if self._injected():
            self.broken = True
            raise DANEFailure.make("dane_tls_failed", server=self.server,
                                   reason="data sent before the TLS handshake")
        try:
            context = contexts.dane_context(anchors)
        except (OSError, ssl.SSLError) as exc:
            raise LocalSystemError.make("local", reason=f"TLS context: {exc}") from None
        try:
            await self._handshake_tls(context)
        except _HandshakeFailed as exc:
            reason = str(exc)
            if anchors:
                reason = f"chain does not verify to its DANE-TA trust anchor: {reason}"
            raise DANEFailure.make("dane_tls_failed", server=self.server,
                                   reason=reason) from None
        ssl_object = self.writer.get_extra_info("ssl_object")
        chain = peer_chain(ssl_object, verified=bool(anchors))
        verdict = check_chain(dane, chain, anchored=bool(anchors))
        if verdict.status == NEEDS_ANCHOR:
            raise _NeedsAnchor(verdict.anchors)
        if verdict.status not in (VERIFIED, ENCRYPTED):
            self.broken = True
            raise DANEFailure.make("dane_mismatch", server=self.server, reason=verdict.reason)
        self.dane = verdict
        log.debug("%s: DANE %s", self.label, verdict.description)

    async def _start_tls(self, domain: str, policy: TLSPolicy, contexts: TLSContexts) -> None:
        # The STARTTLS command-injection class of bugs: refuse the session.
        kind = ("mta_sts_tls_failed" if policy.is_mta_sts
                else "tls_failed" if policy.requires_tls else "tls_handshake")
        if self._injected():
            self.broken = True
            raise TLSHandshakeError.make(kind, server=self.server, domain=domain,
                                         reason="data sent before the TLS handshake")
        try:
            context = contexts.context(policy)
        except (OSError, ssl.SSLError) as exc:
            raise LocalSystemError.make("local", reason=f"TLS context: {exc}") from None
        if not policy.verify and self.tls_verify_error is None:
            warn_unverified(domain, self.server, self.ip)
        try:
            await self._handshake_tls(context)
        except _VerifyFailed as exc:
            err = CertificateUnverified.make(kind, server=self.server, domain=domain,
                                             reason=str(exc))
            err.reason = str(exc)
            raise err from None
        except _HandshakeFailed as exc:
            raise TLSHandshakeError.make(kind, server=self.server, domain=domain,
                                         reason=str(exc)) from None
        if self.tls is not None:  # the verification result goes into the attempt history
            self.tls["verified"] = "yes" if policy.verify else "no"
            if self.tls_verify_error is not None:
                self.tls["verify_error"] = self.tls_verify_error

    async def _handshake_tls(self, context: ssl.SSLContext) -> None:
        """The TLS handshake on this connection (_HandshakeFailed when it fails; the connection
        is then unusable). SNI, and the name checked when the context checks one, is the MX
        host (RFC 7672 §8.1 for DANE)."""
        plain = self.writer.transport
        try:
            async with asyncio.timeout(self.timeouts.starttls):
                await self.writer.start_tls(context, server_hostname=self.server,
                                            ssl_handshake_timeout=self.timeouts.starttls)
        except ssl.SSLCertVerificationError as exc:
            if self.writer.transport is None:
                plain.abort()
            self.broken = True
            raise _VerifyFailed(exc.verify_message or str(exc)) from None
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError, AttributeError) as exc:
            # AttributeError: the stock asyncio loop's start_tls returns None when the peer
            # hangs up mid-handshake and StreamWriter.start_tls trips over it (uvloop does
            # not); either way the plain transport must still be closed.
            if self.writer.transport is None:
                plain.abort()
            self.broken = True
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            raise _HandshakeFailed(reason) from None
        self.tls = describe(self.writer.get_extra_info("ssl_object"))
        if self.tls is not None:
            metrics.current().tls_sessions_out.labels(self.tls["version"]).inc()

    # -- transactions ---------------------------------------------------------------------
    async def reset(self) -> bool:
        """RSET before reusing the connection (RFC 5321 §4.1.1.5); False if it is unusable."""
        try:
            reply = await self._command(b"RSET\r\n", "mail")
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
        ext = self.extensions
        binary = (envelope.get("params") or {}).get("body") == "BINARYMIME"
        txn = Transaction(mail_command(envelope, size, ext),
                          [(r["address"], rcpt_command(r, ext)) for r in todo],
                          pipelining=ext.has("PIPELINING"), use_data=not binary)
        try:
            outcomes.update(await self._transaction(txn, source))
        except ProtocolError as exc:
            outcomes.update(_outcomes_after_error(txn, self._protocol_failure(exc),
                                                  self.server))
        except DeliveryError as err:
            self.broken = True
            outcomes.update(_outcomes_after_error(txn, err, self.server))
        except BaseException:
            self.abort()  # cancelled mid-transaction: the session is in no reusable state
            raise
        finally:
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
                raise self._fail(reply)
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
        for block, _ in self._blocks(source):
            out = stuffer.feed(block)
            if out:
                await self._write(out, "data_block")
        await self._send(stuffer.finish(), "data_block", finals)  # ends with the final dot

    async def _send_bdat(self, source: MessageSource) -> Reply:
        """RFC 3030 §2: BINARYMIME data as BDAT chunks, each answered before the next."""
        if source.length == 0:
            return await self._command(b"BDAT 0 LAST\r\n", "data_termination")
        reply: Reply | None = None
        for block, last in self._blocks(source):
            head = b"BDAT %d%s\r\n" % (len(block), b" LAST" if last else b"")
            await self._send(head + block, "data_block")
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
                await self._send(b"QUIT\r\n", "quit")
                await self._read("quit")
        self.abort()

    def abort(self) -> None:
        self.broken = True
        self.gauge_entry.close()
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


def _outcomes_after_error(txn: Transaction, err: DeliveryError,
                          server: str) -> dict[str, RecipientOutcome]:
    """The connection failed mid-transaction: replies already final stand, the rest get ``err``.

    A 5xx to MAIL or to a recipient's RCPT is the server's last word for them; everyone else
    is retried (the message may or may not have arrived: RFC 1047's duplicate window). After
    a ProtocolFailure no reply is trusted and everyone is retried.
    """
    if isinstance(err, ProtocolFailure):
        return {addr: err.outcome() for addr, _ in txn.rcpts}
    out: dict[str, RecipientOutcome] = {}
    mail = txn.mail_reply
    for index, (addr, _) in enumerate(txn.rcpts):
        if mail is not None and mail.is_permanent:
            out[addr] = reply_outcome(mail, server)
        elif index < len(txn.rcpt_replies) and txn.rcpt_replies[index].is_permanent:
            out[addr] = reply_outcome(txn.rcpt_replies[index], server)
        else:
            out[addr] = err.outcome()
    return out
