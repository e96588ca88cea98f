"""Local delivery over LMTP (RFC 2033): one transaction per message, one verdict per recipient.

With ``local_delivery.lmtp`` set, the recipients of local domains go to that LMTP server
(Dovecot, Cyrus, ...) over TCP instead of into Maildir. LMTP is SMTP with two differences,
and those are what this module owns:

- the session opens with LHLO (RFC 2033 §4.1); there is no HELO fallback and no STARTTLS:
  the server is our own message store;
- after the final dot (or ``BDAT ... LAST``) the server sends one reply for each recipient
  it accepted, in RCPT order (RFC 2033 §4.2), and each decides its own recipient only: 2xx
  delivered, 4xx deferred, 5xx failed.

Everything else (reply parsing, MAIL and RCPT with their parameters, pipelining,
dot-stuffing, streaming the queue file in blocks, a timeout per wait) is the SMTP client's:
the sans-IO core in ``client.py`` and the socket layer of ``connection.py``.

A server that cannot be reached, times out, or refuses the session (greeting or LHLO,
whatever the code) defers every recipient of the message: the store is ours, and its outage
or misconfiguration must never bounce mail. A connection lost after some recipients had their
final reply keeps those verdicts and defers only the others, so nobody gets a copy twice.

Each message gets its own connection, closed with QUIT after it (the server is near and
cheap to reach); at most ``delivery.max_connections`` are open at once per worker. Never
builds a spool path: the message is read through the MessageSource it is given.
"""

from __future__ import annotations

import asyncio
import logging
import time

from empath.config.typed import Config, DeliveryTimeoutsConfig
from empath.delivery.client import (
    Extensions,
    ProtocolError,
    Reply,
    Transaction,
    check_chunk_reply,
    check_final_reply,
    mail_command,
    rcpt_command,
)
from empath.delivery.connection import SMTPConnection, connect_stream
from empath.delivery.errors import (
    DeliveryError,
    LocalSystemError,
    PermanentError,
    TemporaryError,
)
from empath.delivery.state import RecipientOutcome
from empath.spool import MessageSource
from empath.spool.records import Envelope, Recipient, Route, new_route

log = logging.getLogger("empath.delivery.lmtp")


def server_label(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets, as logs and the history show it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_lmtp(host: str, port: int, *, name: str,
                    timeouts: DeliveryTimeoutsConfig) -> LMTPConnection:
    """Connect to the LMTP server and bring the session to MAIL-ready (greeting, LHLO).

    Raises TemporaryError for anything that goes wrong: refused, timed out, or a greeting
    or LHLO reply other than the expected 220 and 250.
    """
    label = server_label(host, port)
    try:
        async with asyncio.timeout(timeouts.connect):
            reader, writer = await connect_stream(host, port)
    except TimeoutError:
        raise TemporaryError.make("connect", server=label, reason="timed out") from None
    except OSError as exc:
        raise TemporaryError.make("connect", server=label,
                                  reason=exc.strerror or str(exc)) from None
    conn = LMTPConnection(reader, writer, server=label, ip=host, port=port, timeouts=timeouts)
    try:
        await conn.greet(name)
    except BaseException:
        conn.abort()
        raise
    return conn


class LMTPConnection(SMTPConnection):
    """One LMTP session: the SMTP connection's I/O with LMTP's greeting and final replies."""

    @property
    def label(self) -> str:
        return self.server

    async def greet(self, name: str) -> None:
        """Greeting, then LHLO; the LHLO reply lists the server's extensions."""
        banner = await self._read("banner")
        if banner.code != 220:
            raise self._refused(banner)
        reply = await self._command(f"LHLO {name}\r\n".encode(), "ehlo")
        if reply.code != 250:
            raise self._refused(reply)
        self.extensions = Extensions.from_reply(reply)

    def _refused(self, reply: Reply) -> TemporaryError:
        # Even a 5xx here says nothing about the recipients: it is our store's set-up.
        self.broken = True
        return TemporaryError.make("connect", server=self.server,
                                   reason=f"session refused: {reply}")

    def _not_transferable(self, envelope: Envelope, size: int) -> DeliveryError | None:
        """A verdict for the whole message from the LHLO keywords, before any command.

        Unlike SMTP, a message declared SMTPUTF8 is not refused when the server lacks the
        keyword (Dovecot 2.3 does not offer it): the store is ours and takes UTF-8 headers,
        and a UTF-8 address gets the server's own verdict at MAIL or RCPT.
        """
        limit = self.extensions.size_limit
        if limit is not None and size > limit:
            return PermanentError.make("too_big", server=self.server, size=size, limit=limit)
        body = envelope.get("params", {}).get("body")
        if body == "BINARYMIME" and not (
                self.extensions.has("BINARYMIME") and self.extensions.has("CHUNKING")):
            return PermanentError.make("needs_binarymime", server=self.server)
        return None

    async def deliver(self, envelope: Envelope, rcpts: list[Recipient],
                      source: MessageSource) -> dict[str, RecipientOutcome]:
        """One transaction for ``rcpts``; one outcome per recipient, never an exception."""
        refused = self._not_transferable(envelope, source.length)
        if refused is not None:
            return {r["address"]: refused.outcome() for r in rcpts}
        self.messages += 1
        ext = self.extensions
        binary = envelope.get("params", {}).get("body") == "BINARYMIME"
        txn = Transaction(mail_command(envelope, source.length, ext),
                          [(r["address"], rcpt_command(r, ext)) for r in rcpts],
                          pipelining=ext.has("PIPELINING"), use_data=not binary)
        finals: list[Reply] = []
        try:
            await self._envelope(txn)
            if txn.send_message:
                await self._transfer(txn, source, finals)
            elif txn.use_data and txn.data_accepted:
                # 354 although nobody was accepted (RFC 2033 §4.2 wants 503 here): how many
                # replies an empty message would get is anyone's guess, so the session ends.
                self.broken = True
            return txn.per_recipient_outcomes(finals, self.server)
        except ProtocolError as exc:
            # A reply out of turn: the envelope's replies are not trusted (no data was sent,
            # everyone is deferred); after the data, final replies that came in their turn
            # stand (those recipients have their copy) and the rest are deferred.
            err = self._protocol_failure(exc)
            if not finals:
                return {r["address"]: err.outcome() for r in rcpts}
            return txn.per_recipient_outcomes(finals, self.server, missing=err.outcome())
        except DeliveryError as err:
            self.broken = True
            return txn.per_recipient_outcomes(finals, self.server, missing=err.outcome())
        except BaseException:
            self.abort()  # cancelled mid-transaction: the session is in no reusable state
            raise
        finally:
            self.idle_since = time.monotonic()

    async def _transfer(self, txn: Transaction, source: MessageSource,
                        finals: list[Reply]) -> None:
        """Send the message, then collect one final reply per accepted recipient into
        ``finals`` (in place: on a failure the caller keeps those that arrived)."""
        expected = len(txn.accepted)
        if txn.use_data:
            await self._send_data(source, expected)
        else:
            refusal = await self._send_chunks(source, expected)
            if refusal is not None:
                # RFC 3030 §2: a refused chunk fails the whole transaction, for everyone.
                finals.extend([refusal] * expected)
                self.broken = True
                return
        for _ in range(expected):
            final = await self._read("data_termination")
            check_final_reply(final)
            finals.append(final)

    async def _send_chunks(self, source: MessageSource, finals: int) -> Reply | None:
        """BINARYMIME data as BDAT chunks; every chunk but the last is answered on its own.

        Returns the reply that refused a chunk, or None once ``BDAT ... LAST`` is sent (its
        ``finals`` replies, one per recipient, are the caller's to read)."""
        if source.length == 0:
            await self._send(b"BDAT 0 LAST\r\n", "data_block", finals)
            return None
        for block, last in self._blocks(source):
            head = b"BDAT %d%s\r\n" % (len(block), b" LAST" if last else b"")
            await self._send(head + block, "data_block", finals if last else 1)
            if last:
                return None
            reply = await self._read("data_block")
            check_chunk_reply(reply)
            if not reply.is_positive:
                return reply
        return None


class LMTPTransport:
    """Delivery of local recipients to the configured LMTP server, for one worker."""

    def __init__(self, cfg: Config) -> None:
        address = cfg.local_delivery.lmtp
        assert address is not None  # made only when local_delivery.lmtp is set
        self.host: str = address.host
        self.port: int = address.port
        self.label = server_label(self.host, self.port)
        self.name: str = cfg.delivery.helo_name or cfg.hostname
        self.timeouts = cfg.delivery.timeouts
        self._slots = asyncio.Semaphore(cfg.delivery.max_connections)

    async def deliver(self, domain: str, envelope: Envelope, rcpts: list[Recipient],
                      source: MessageSource
                      ) -> tuple[dict[str, RecipientOutcome], Route]:
        """Deliver ``source`` to ``rcpts``; one outcome each, and a route record."""
        started = time.monotonic()
        try:
            async with self._slots:
                outcomes = await self._deliver(envelope, rcpts, source)
        except DeliveryError as err:
            log.info("%s: LMTP %s: %s", envelope.get("id"), self.label, err)
            outcomes = {r["address"]: err.outcome() for r in rcpts}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must defer, never fail, the recipients
            log.exception("%s: LMTP delivery failed unexpectedly", envelope.get("id"))
            local = LocalSystemError.make("local", reason=type(exc).__name__)
            outcomes = {r["address"]: local.outcome() for r in rcpts}
        info = new_route(domain, "lmtp", round(time.monotonic() - started, 6),
                         server=self.label)
        return outcomes, info

    async def _deliver(self, envelope: Envelope, rcpts: list[Recipient],
                       source: MessageSource) -> dict[str, RecipientOutcome]:
        conn = await open_lmtp(self.host, self.port, name=self.name, timeouts=self.timeouts)
        try:
            return await conn.deliver(envelope, rcpts, source)
        finally:
            await conn.quit()
