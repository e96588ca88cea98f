"""The SMTP client's protocol core, sans I/O: replies in, commands and verdicts out.

Owns the client side of the SMTP grammar: parsing replies (multi-line, RFC 2034 enhanced status
codes), reading EHLO keywords, building MAIL/RCPT/BDAT commands with their ESMTP parameters
(SIZE, BODY, SMTPUTF8, DSN), sequencing one transaction's envelope in lock-step or pipelined
(RFC 2920) order, dot-stuffing message data across block boundaries, and classifying the
outcome per recipient: from one reply after the data (SMTP) or from one reply per accepted
recipient (LMTP, RFC 2033 §4.2). The session set-up before the first transaction (greeting,
EHLO or HELO, STARTTLS under the TLS policy and DANE) is ``handshake.py``'s, built on this
module's ``Reply`` and ``Extensions``. ``empath/delivery/connection.py`` and ``lmtp.py`` feed
it bytes from a socket and carry out its steps; ``tests/unit/test_client_pair.py`` drives it
against the receiver's ``ServerSession`` in memory.

Replies are matched to commands strictly, as Postfix does: ``ReplyChannel`` counts the replies
the client asked for, and a reply nobody asked for, or any byte still unread when the next
command goes out, is a ProtocolError (the connection is then closed, never reused, and the
message deferred). Message content follows only a 3xx reply to DATA; a 3xx reply to MAIL or
RCPT, a 2xx reply to DATA, or a 3xx reply after the final dot is a ProtocolError; a recipient
is delivered only on a 2xx reply after the final dot (or to ``BDAT ... LAST``).

Reply text is made safe once, here, where it enters (``printable``): invalid UTF-8 and every
character that is not printable (C0 and C1 controls, DEL, line and paragraph separators, bidi
overrides) become ``?`` and a line is cut at ``LINE_LENGTH_LIMIT`` octets, so bounces, log
lines, the attempt history and ``empathctl`` output only ever see clean text.

Message data leaves here with CRLF line ends only (``DotStuffer``): a bare LF or a bare CR in
the stored message is sent as CRLF, so nothing stored can smuggle an end of data downstream.

Never touches a socket, a file or a clock, so every rule here is unit-testable with bytes.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from empath._speedups import dot_stuff, encode_xtext
from empath.delivery.errors import DeliveryError, TemporaryError, error_for_reply
from empath.delivery.state import DELIVERED, RecipientOutcome

# RFC 5321 §4.5.3.1.5 caps a reply line at 512 octets; real servers exceed it, so a line is
# kept up to Postfix's line_length_limit (2048) and the rest of it is skipped; a reply larger
# than MAX_REPLY_BYTES in all (skipped octets included) is a reply bomb and a ProtocolError.
LINE_LENGTH_LIMIT = 2048
MAX_REPLY_LINE = LINE_LENGTH_LIMIT
MAX_REPLY_BYTES = 64 * 1024
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


class ProtocolError(ValueError):
    """The server sent something that is not an SMTP reply, or a reply out of turn."""


def printable(raw: bytes | str, limit: int = LINE_LENGTH_LIMIT) -> str:
    """``raw`` as text safe for a log line, a bounce or a terminal: invalid UTF-8 and every
    character Python does not call printable (C0/C1 controls, DEL, U+2028/U+2029, bidi and
    other format characters) become ``?``; at most ``limit`` characters are kept."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text[:limit]
    if text.isprintable() and "\ufffd" not in text:
        return text
    return "".join(ch if ch.isprintable() and ch != "\ufffd" else "?" for ch in text)


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete (possibly multi-line) server reply."""

    code: int
    enhanced: str | None
    lines: tuple[str, ...]  # text of each line, enhanced code removed

    @property
    def text(self) -> str:
        return " ".join(line for line in self.lines if line)

    @property
    def is_positive(self) -> bool:
        """2xx: the command succeeded (a 3xx is positive only as the answer to DATA)."""
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        return 300 <= self.code < 400

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced + ' ' if self.enhanced else ''}{self.text}".strip()


def _strip_enhanced(code: int, text: str) -> tuple[str | None, str]:
    """RFC 2034 §4: an enhanced code starts the text; its class must match the reply's."""
    match = _ENHANCED.match(text)
    if match is None or int(match.group(1)) != code // 100:
        return None, text
    return f"{match.group(1)}.{int(match.group(2))}.{int(match.group(3))}", text[match.end():]


class ReplyParser:
    """Turns the byte stream from a server into Replies (RFC 5321 §4.2.1)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[tuple[int, str]] = []
        self._size = 0
        self._cut: bytes | None = None  # the kept head of an over-long line being skipped

    @property
    def pending(self) -> bool:
        """Bytes or lines of a reply not yet complete (STARTTLS must start with nothing)."""
        return bool(self._buffer or self._lines or self._cut is not None)

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies: list[Reply] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                self._skip_long(len(self._buffer))
                return replies
            if self._cut is not None or end > LINE_LENGTH_LIMIT:
                self._skip_long(end)  # the buffer now starts at the line feed
                raw, self._cut = self._cut or b"", None
                self._buffer = self._buffer[1:]
            else:
                raw, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            reply = self._line(raw.rstrip(b"\r"))
            if reply is not None:
                replies.append(reply)

    def _skip_long(self, length: int) -> None:
        """Past LINE_LENGTH_LIMIT octets without a line end, keep the head and drop the rest
        (counted against MAX_REPLY_BYTES)."""
        if self._cut is None and length > LINE_LENGTH_LIMIT:
            self._cut = self._buffer[:LINE_LENGTH_LIMIT]
            self._size += length - LINE_LENGTH_LIMIT
            self._buffer = self._buffer[length:]
        elif self._cut is not None and length:
            self._size += length
            self._buffer = self._buffer[length:]
        if self._size > MAX_REPLY_BYTES:
            raise ProtocolError("reply too long")

    def _line(self, raw: bytes) -> Reply | None:
        self._size += len(raw)
        if self._size > MAX_REPLY_BYTES:
            raise ProtocolError("reply too long")
        line = printable(raw)
        # "250", "250 text" or "250-text"; the code is three digits 2-5 (RFC 5321 §4.2).
        if len(line) < 3 or not line[:3].isdigit() or line[0] not in "2345" or (
                len(line) > 3 and line[3] not in " -"):
            raise ProtocolError(f"malformed reply line {line[:80]!r}")
        code = int(line[:3])
        if self._lines and self._lines[0][0] != code:
            raise ProtocolError("reply code changed within a multi-line reply")
        self._lines.append((code, line[4:]))
        if len(line) > 3 and line[3] == "-":
            return None
        lines, self._lines, self._size = self._lines, [], 0
        enhanced = None
        texts = []
        for index, (_, text) in enumerate(lines):
            found, rest = _strip_enhanced(code, text)
            if index == 0:
                enhanced = found
            texts.append(rest if found else text)
        return Reply(code, enhanced, tuple(texts))


class ReplyChannel:
    """The replies of one connection, matched to the commands that asked for them.

    Every byte the server sends is fed here as it arrives (not when the client happens to
    read), so the channel knows at any moment whether the server said something nobody asked
    for. ``expect(n)`` is called as a command that wants ``n`` replies is sent: it refuses
    (ProtocolError) while any byte or reply is still unread, since the next reply would
    then be matched to the wrong command. A complete reply arriving while none is expected
    is a ProtocolError at once. After an error the channel stays failed: nothing it holds
    can be trusted, and the connection must be closed.
    """

    def __init__(self, expected: int = 1) -> None:
        self.parser = ReplyParser()
        self.replies: deque[Reply] = deque()
        self.expected = expected  # replies asked for and not yet arrived (1: the greeting)
        self.error: ProtocolError | None = None
        self.eof = False

    @property
    def pending(self) -> bool:
        """Unread bytes or replies."""
        return bool(self.replies) or self.parser.pending

    def feed(self, data: bytes) -> None:
        """Bytes from the server; a protocol violation is kept in ``error`` (and raised)."""
        if self.error is not None:
            return
        try:
            for reply in self.parser.feed(data):
                if self.expected <= 0:
                    raise ProtocolError(f"unexpected reply {str(reply)[:80]!r}")
                self.expected -= 1
                self.replies.append(reply)
        except ProtocolError as exc:
            self.error = exc
            raise

    def expect(self, count: int, what: str) -> None:
        """``count`` replies are asked for by the command ``what`` about to be sent."""
        if self.error is not None:
            raise self.error
        if self.pending or self.expected:
            self.error = ProtocolError(f"unexpected data from the server before {what}")
            raise self.error
        self.expected = count

    def next(self) -> Reply | None:
        """The oldest unread reply, or None. Replies that came in their turn are handed out
        before a later violation is raised: the reply to the final dot is the server's
        verdict even when a stray one follows it (the connection is closed all the same)."""
        if self.replies:
            return self.replies.popleft()
        if self.error is not None:
            raise self.error
        return None


@dataclass(frozen=True, slots=True)
class Extensions:
    """The ESMTP keywords of an EHLO reply (upper-case keyword → parameter text)."""

    keywords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, reply: Reply) -> Extensions:
        # The first line is the server's greeting, each further line one keyword.
        keywords: dict[str, str] = {}
        for line in reply.lines[1:]:
            word, _, params = line.strip().partition(" ")
            if word:
                keywords[word.upper()] = params.strip()
        return cls(keywords)

    def has(self, keyword: str) -> bool:
        return keyword in self.keywords

    @property
    def size_limit(self) -> int | None:
        """RFC 1870 §4: ``SIZE n`` is the server's fixed limit; no number or 0 means none."""
        value = self.keywords.get("SIZE")
        if value is None or not value.isdigit() or int(value) == 0:
            return None
        return int(value)


QUIT = b"QUIT\r\n"
RSET = b"RSET\r\n"


# -- transactions ---------------------------------------------------------------------------
def _is_ascii(text: str) -> bool:
    return text.isascii()


def needs_smtputf8(envelope: Mapping[str, Any]) -> bool:
    """Whether the message itself needs SMTPUTF8: declared at submission, or a UTF-8 sender.

    The declaration is trusted rather than scanning the headers: a client asks for SMTPUTF8
    because its headers carry UTF-8 (RFC 6531 §3.4), and a downgrade is not ours to make.
    """
    params = envelope.get("params") or {}
    return bool(params.get("smtputf8")) or not _is_ascii(envelope.get("sender") or "")


def mail_command(envelope: Mapping[str, Any], size: int, ext: Extensions) -> bytes:
    """``MAIL FROM:<sender>`` with the parameters this server understands."""
    params = envelope.get("params") or {}
    args = []
    if ext.has("SIZE"):
        args.append(f"SIZE={size}")  # RFC 1870 §3: the declared size of the message
    body = params.get("body")
    if body == "BINARYMIME" and ext.has("BINARYMIME"):
        args.append("BODY=BINARYMIME")
    elif body in ("8BITMIME", "7BIT") and ext.has("8BITMIME"):
        # Without 8BITMIME at the server an 8-bit body is sent anyway, without BODY=: what
        # Postfix and Exim do, since nearly every server takes 8-bit data (RFC 6152 §3
        # would have us convert or bounce, which loses mail that would have arrived).
        args.append(f"BODY={body}")
    if needs_smtputf8(envelope) and ext.has("SMTPUTF8"):
        args.append("SMTPUTF8")
    if ext.has("DSN"):
        # RFC 3461 §4.3, §4.4: RET and ENVID only to a server that offers DSN.
        if params.get("ret") in ("FULL", "HDRS"):
            args.append(f"RET={params['ret']}")
        envid = params.get("envid")
        if envid and _is_ascii(envid):
            args.append(f"ENVID={encode_xtext(envid)}")
    sender = envelope.get("sender") or ""
    return _command(f"MAIL FROM:<{sender}>", args)


def rcpt_command(rcpt: Mapping[str, Any], ext: Extensions) -> bytes:
    """``RCPT TO:<address>`` with NOTIFY and ORCPT when the server offers DSN (RFC 3461 §4)."""
    args = []
    if ext.has("DSN"):
        notify = rcpt.get("notify")
        if notify:
            args.append("NOTIFY=" + ",".join(notify))
        orcpt = rcpt.get("orcpt")
        if orcpt and ";" in orcpt:
            kind, _, original = orcpt.partition(";")
            # An internationalized ORCPT would need RFC 6533's utf-8 form; it is dropped
            # rather than sent mangled (the DSN then names the final recipient only).
            if _is_ascii(original) and kind.strip():
                args.append(f"ORCPT={kind.strip()};{encode_xtext(original)}")
    return _command(f"RCPT TO:<{rcpt['address']}>", args)


def bdat_command(size: int, last: bool) -> bytes:
    """``BDAT size`` (``LAST`` on the final chunk), the chunk's octets to follow (RFC 3030 §2)."""
    return b"BDAT %d%s\r\n" % (size, b" LAST" if last else b"")


def _command(head: str, args: list[str]) -> bytes:
    return (" ".join([head, *args]) + "\r\n").encode("utf-8")


class Transaction:
    """The envelope phase of one message: MAIL, each RCPT, then DATA.

    With pipelining (RFC 2920 §3.1) ``start()`` returns MAIL, every RCPT and DATA as one
    write, and the replies are matched to them in order; without, each command waits for the
    reply to the one before. ``receive()`` takes the next reply and returns what to write next
    (often nothing). ``use_data=False`` leaves DATA out, for a BDAT transfer.
    """

    def __init__(self, mail: bytes, rcpts: list[tuple[str, bytes]], *, pipelining: bool,
                 use_data: bool = True) -> None:
        if not rcpts:
            raise ValueError("a transaction needs at least one recipient")
        self.mail = mail
        self.rcpts = rcpts
        self.pipelining = pipelining
        self.use_data = use_data
        self.mail_reply: Reply | None = None
        self.rcpt_replies: list[Reply] = []
        self.data_reply: Reply | None = None
        self.finished = False

    @property
    def expecting(self) -> str:
        """Which reply comes next (``mail``, ``rcpt`` or ``data_init``), for its timeout."""
        if self.mail_reply is None:
            return "mail"
        if len(self.rcpt_replies) < len(self.rcpts):
            return "rcpt"
        return "data_init"

    def start(self) -> bytes:
        """The first write (``start_replies`` says how many replies it asks for)."""
        if not self.pipelining:
            return self.mail
        batch = [self.mail, *(cmd for _, cmd in self.rcpts)]
        if self.use_data:
            batch.append(b"DATA\r\n")
        return b"".join(batch)

    @property
    def start_replies(self) -> int:
        if not self.pipelining:
            return 1
        return 1 + len(self.rcpts) + (1 if self.use_data else 0)

    def receive(self, reply: Reply) -> bytes:
        """The next reply; what to write next (one command, or nothing).

        Raises ProtocolError for a reply that cannot answer the command it belongs to: a
        3xx to MAIL or RCPT, a 2xx to DATA (the content would never be sent), or any reply
        once the envelope is complete."""
        if self.finished:
            raise ProtocolError("reply after the envelope was complete")
        if self.mail_reply is None:
            _not_intermediate(reply, "MAIL")
            self.mail_reply = reply
            if self.pipelining:
                return b""
            if not reply.is_positive:
                self.finished = True
                return b""
            return self.rcpts[0][1]
        if len(self.rcpt_replies) < len(self.rcpts):
            _not_intermediate(reply, "RCPT")
            self.rcpt_replies.append(reply)
            if len(self.rcpt_replies) < len(self.rcpts):
                return b"" if self.pipelining else self.rcpts[len(self.rcpt_replies)][1]
            if not self.use_data:
                self.finished = True
                return b""
            if self.pipelining:
                return b""
            if not self.accepted:
                self.finished = True  # nobody to send to: no DATA at all
                return b""
            return b"DATA\r\n"
        if reply.is_positive:
            # RFC 5321 §4.3.2: DATA is answered 354 (or refused); a 2xx would have the
            # message counted as sent with no byte of it sent.
            raise ProtocolError(f"reply {str(reply)[:80]!r} to DATA")
        self.data_reply = reply
        self.finished = True
        return b""

    @property
    def accepted(self) -> list[str]:
        """Recipients the server took (MAIL and their RCPT positive)."""
        if self.mail_reply is None or not self.mail_reply.is_positive:
            return []
        return [addr for (addr, _), reply in zip(self.rcpts, self.rcpt_replies, strict=False)
                if reply.is_positive]

    @property
    def data_accepted(self) -> bool:
        """DATA got 3xx (354): the data (or, with nobody accepted, an empty one) must follow."""
        return self.data_reply is not None and self.data_reply.is_intermediate

    @property
    def send_message(self) -> bool:
        if not self.accepted:
            return False
        return self.data_accepted if self.use_data else True

    def outcomes(self, final: Reply | None, server: str | None) -> dict[str, RecipientOutcome]:
        """Per-recipient verdicts once the transaction is over.

        ``final`` is the reply after the end of data (None when no data was sent). A failed
        MAIL decides for everyone; a failed RCPT for its recipient; a failed DATA or end of
        data for every recipient the server had accepted (RFC 5321 §3.3). A 3xx after the
        data is a ProtocolError, never a delivery.
        """
        if final is not None:
            _not_intermediate(final, "the end of data")
        out: dict[str, RecipientOutcome] = {}
        for index, (addr, _) in enumerate(self.rcpts):
            reply = self._refusal(index)
            if reply is None:
                reply = final
            if reply is None:
                raise ProtocolError(f"no reply decides recipient {addr}")
            out[addr] = reply_outcome(reply, server)
        return out

    def _refusal(self, index: int) -> Reply | None:
        """The reply that refused recipient ``index`` before any data was sent, if one did."""
        if self.mail_reply is not None and not self.mail_reply.is_positive:
            return self.mail_reply
        if index < len(self.rcpt_replies) and not self.rcpt_replies[index].is_positive:
            return self.rcpt_replies[index]
        if self.use_data and not self.data_accepted:
            return self.data_reply
        return None

    def per_recipient_outcomes(self, finals: list[Reply], server: str | None,
                               missing: RecipientOutcome | None = None
                               ) -> dict[str, RecipientOutcome]:
        """Verdicts when the end of data is answered once per accepted recipient (LMTP).

        RFC 2033 §4.2: after the final dot an LMTP server sends one reply for each RCPT it
        accepted, in RCPT order; each decides its own recipient only. Refusals before the
        data decide as in ``outcomes``. ``missing`` stands in for replies that never came
        (the connection failed part-way); without it, a missing reply is a ProtocolError.
        """
        for answer in finals:
            _not_intermediate(answer, "the end of data")
        out: dict[str, RecipientOutcome] = {}
        waiting = iter(finals)
        for index, (addr, _) in enumerate(self.rcpts):
            reply = self._refusal(index)
            if reply is not None:
                out[addr] = reply_outcome(reply, server)
                continue
            final = next(waiting, None)
            if final is not None:
                out[addr] = reply_outcome(final, server)
            elif missing is not None:
                out[addr] = missing
            else:
                raise ProtocolError(f"no reply decides recipient {addr}")
        return out


class ProtocolFailure(TemporaryError):
    """The server broke the protocol (a malformed reply, a reply out of turn, data nobody
    asked for): nothing it said in this transaction is trusted, everyone is deferred."""


def outcomes_after_error(txn: Transaction, err: DeliveryError,
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


def _not_intermediate(reply: Reply, command: str) -> None:
    """Only DATA (and BDAT's chunk replies never) is answered 3xx; elsewhere it is a
    protocol error, not a success."""
    if reply.is_intermediate:
        raise ProtocolError(f"reply {str(reply)[:80]!r} to {command}")


def check_final_reply(reply: Reply) -> None:
    """A reply after the final dot is 2xx, 4xx or 5xx; a 3xx is a protocol error."""
    _not_intermediate(reply, "the end of data")


def check_chunk_reply(reply: Reply) -> None:
    """RFC 3030 §2: a BDAT chunk is answered 2xx, 4xx or 5xx; 3xx is a protocol error."""
    _not_intermediate(reply, "BDAT")


def reply_outcome(reply: Reply, server: str | None) -> RecipientOutcome:
    """2xx delivered, 4xx deferred, 5xx failed."""
    if 200 <= reply.code < 300:
        return RecipientOutcome(DELIVERED, reply.code, reply.enhanced, reply.text, server)
    return error_for_reply(reply.code, reply.enhanced, reply.text, server).outcome()


class DotStuffer:
    """Dot-stuffs message data fed in arbitrary blocks (RFC 5321 §4.5.2), CRLF lines only.

    Every line end goes out as CRLF (``dot_stuff(..., crlf=True)``: a bare LF or a bare CR
    becomes CRLF, as Postfix sends stored lines): no bare CR or LF is ever sent, so data
    stored with one cannot end the message early at the next hop (SMTP smuggling). A block
    is passed on only up to its last line feed (or a trailing CR is held back), so a CRLF
    never straddles two outputs and the line-start state carried between blocks is exact:
    a "." that begins a line in the next block is doubled even when that line started in this
    one. ``finish()`` ends the data with CRLF "." CRLF, adding the CRLF a message lacks.
    """

    def __init__(self) -> None:
        self._carry = b""
        self._at_line_start = True
        self.ends_with_crlf = True

    def feed(self, block: bytes) -> bytes:
        data = self._carry + block
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            cut = len(data) - 1 if data.endswith(b"\r") else len(data)
        self._carry = data[cut:]
        return self._emit(data[:cut])

    def _emit(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out: bytes = dot_stuff(chunk, self._at_line_start, True)
        self._at_line_start = chunk.endswith((b"\n", b"\r"))  # sent as CRLF either way
        self.ends_with_crlf = self._at_line_start
        return out

    def finish(self) -> bytes:
        tail = self._emit(self._carry)
        self._carry = b""
        if not self.ends_with_crlf:
            tail += b"\r\n"
        return tail + b".\r\n"
