"""The sans-IO SMTP server session (RFC 5321 with PIPELINING, SIZE, 8BITMIME, SMTPUTF8,
ENHANCEDSTATUSCODES, STARTTLS, DSN and CHUNKING).

A session is fed bytes and returns events; it never touches a socket, a file or a clock, so the
whole grammar is testable without a network. The protocol layer (``server.py``) sends the bytes
of ``Send`` events, begins TLS on ``StartTLS``, streams ``Data`` into the spool between
``DataStart`` and ``DataEnd``/``DataAbort``, and answers the two pauses:

- ``DataEnd(envelope)``: the message is complete. The session processes no further input until
  ``message_stored(queue_id)`` or ``message_failed(reply)`` is called (250 only once durable).
- ``Check(stage, value)``: a module hook wants a say (``helo``, ``mail_from``, ``rcpt_to``);
  the session waits for ``check_done(reply_or_None)`` (None: the default reply).

Replies to a pipelined batch (RFC 2920) are gathered into one ``Send`` per call, in order.

All state changes are in this module; which command is allowed in which phase is the table
``ALLOWED`` below, not a chain of ifs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from empath._speedups import (
    CommandSyntaxError,
    DataReader,
    has_bare_eol,
    parse_path,
    split_command,
)
from empath.smtp import params
from empath.smtp import replies as R
from empath.smtp.content import HopCounter, LineEndings
from empath.smtp.events import (
    Authenticate,
    Check,
    Close,
    Data,
    DataAbort,
    DataEnd,
    DataStart,
    Envelope,
    Event,
    Send,
    Settings,
    StartTLS,
)
from empath.smtp.params import client_is_trusted
from empath.smtp.replies import Reply
from empath.smtp.sasl import MAX_RESPONSE, SaslError, SaslExchange
from empath.spool.records import Recipient

__all__ = ["ALLOWED", "Authenticate", "Check", "Close", "Data", "DataAbort", "DataEnd", "DataStart",
           "Envelope", "Event", "Send", "ServerSession", "Settings", "StartTLS",
           "client_is_trusted"]

# -- phases --------------------------------------------------------------------------------
GREET = "greet"  # connected, no HELO/EHLO yet
READY = "ready"  # HELO/EHLO done, no transaction
MAIL = "mail"  # MAIL accepted, no recipient accepted yet
RCPT = "rcpt"  # at least one recipient accepted
DATA = "data"  # receiving DATA content
CHUNK = "chunk"  # receiving the octets of one BDAT chunk
CHUNKED = "chunked"  # between BDAT chunks of one transaction
AUTH = "auth"  # in an AUTH dialogue, waiting for the client's next SASL response
WAIT = "wait"  # paused: storing a message, checking credentials, or a module check
CLOSED = "closed"

ANY = frozenset({GREET, READY, MAIL, RCPT, CHUNKED})
# verb -> phases in which it is accepted; anything else is 503 (bad sequence).
ALLOWED: dict[str, frozenset[str]] = {
    "EHLO": ANY, "HELO": ANY, "RSET": ANY, "NOOP": ANY, "QUIT": ANY, "VRFY": ANY,
    "HELP": ANY,
    "STARTTLS": frozenset({READY}),
    "AUTH": frozenset({READY}),
    "MAIL": frozenset({READY}),
    "RCPT": frozenset({MAIL, RCPT}),
    "DATA": frozenset({MAIL, RCPT}),
    "BDAT": frozenset({READY, MAIL, RCPT, CHUNKED}),
}
SEQUENCE_HINTS = {
    "MAIL": "send HELO/EHLO first, and one MAIL per transaction",
    "RCPT": "need MAIL before RCPT",
    "DATA": "need MAIL before DATA",
    "STARTTLS": "STARTTLS needs EHLO first and no transaction in progress",
    "BDAT": "need MAIL before BDAT",
    "AUTH": "AUTH needs EHLO first and no transaction in progress",
}


def _never() -> bool:
    return False


class ServerSession:
    """One SMTP connection's protocol state. See the module docstring for the contract."""

    def __init__(self, settings: Settings, *, trusted: bool = False) -> None:
        self.settings = settings
        self.trusted = trusted  # the client may relay anywhere (mynetworks, or authenticated)
        self.phase = GREET
        self.helo: str | None = None
        self.esmtp = False
        self.tls_active = False
        self.envelope: Envelope | None = None
        self.errors = 0
        self.commands = 0  # complete command lines seen (the server's command timeout)
        # Asked at each MAIL FROM (the server gives its in-flow control's answer,
        # smtp/inflow.py): True pauses it with a Check, as for a module's on_mail_from.
        self.hold_mail: Callable[[], bool] = _never
        self.auth_user: str | None = None
        self._sasl: SaslExchange | None = None
        self._buf = b""
        self._pos = 0
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._skipping_long_line = False
        self._reader: Any = None
        self._chunk_left = 0
        self._chunk_last = False
        self._chunk_size = 0  # octets of this transaction's BDAT chunks so far
        self._chunk_failed: Reply | None = None
        self._hops: HopCounter | None = None  # Received: fields of the message coming in
        self._eol: LineEndings | None = None  # bare CR/LF in BDAT content
        self._pending_rcpt: Recipient | None = None

    # -- public API ------------------------------------------------------------------------
    def start(self) -> list[Event]:
        """The greeting."""
        self._reply(R.GREETING.format(hostname=self.settings.hostname,
                                      banner=self.settings.banner))
        return self._flush()

    def feed(self, data: bytes) -> list[Event]:
        """Consume bytes from the client; ``b""`` means the client closed the connection."""
        if self.phase == CLOSED:
            return []
        if not data:
            if self.phase in (DATA, CHUNK):
                self._emit(DataAbort())
            self.phase = CLOSED
            return self._flush()
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos:] + data
        else:
            self._buf = data
        self._pos = 0
        self._run()
        return self._flush()

    def message_stored(self, queue_id: str) -> list[Event]:
        """The message of the last DataEnd is durable: 250, then carry on with buffered input."""
        self._reply(R.QUEUED.format(queue_id=queue_id))
        return self._resume()

    def message_failed(self, reply: Reply) -> list[Event]:
        """The message of the last DataEnd was not stored (spool error, module rejection)."""
        self._reply(reply)
        return self._resume()

    def check_done(self, reply: Reply | None) -> list[Event]:
        """Answer to the last Check; None accepts with the default reply."""
        stage, self._check_stage = self._check_stage, ""
        self.phase = self._check_phase
        if stage == "helo":
            self._finish_helo(reply)
        elif stage == "mail_from":
            self._finish_mail(reply)
        elif stage == "rcpt_to":
            self._finish_rcpt(reply)
        self._run()
        return self._flush()

    def auth_done(self, user: str, reply: Reply | None) -> list[Event]:
        """Answer to Authenticate: None accepts ``user``; otherwise the refusal to send."""
        self.phase = READY
        if reply is None:
            self.auth_user = user
            self.trusted = True  # RFC 4954 §1: authenticated clients may relay
            self._reply(R.AUTH_OK)
        else:
            self._reply(reply)
        self._run()
        return self._flush()

    def tls_established(self) -> None:
        """The TLS handshake after StartTLS completed."""
        self.tls_active = True

    def timeout_reply(self) -> bytes:
        self.phase = CLOSED
        return R.TIMEOUT.format(hostname=self.settings.hostname).line

    # -- internals -------------------------------------------------------------------------
    def _resume(self) -> list[Event]:
        self.envelope = None
        self.phase = READY
        self._run()
        return self._flush()

    def _reply(self, reply: Reply) -> None:
        self._out.append(reply.line)
        if reply.code >= 500:
            self.errors += 1
        if reply.closes:
            self.phase = CLOSED
            self._emit(Close())

    def _emit(self, event: Event) -> None:
        if self._out:
            self._events.append(Send(b"".join(self._out)))
            self._out = []
        self._events.append(event)

    def _flush(self) -> list[Event]:
        if self._out:
            self._events.append(Send(b"".join(self._out)))
            self._out = []
        events, self._events = self._events, []
        return events

    def _run(self) -> None:
        while True:
            phase = self.phase
            if phase == DATA:
                if not self._consume_data():
                    return
            elif phase == CHUNK:
                if not self._consume_chunk():
                    return
            elif phase in (WAIT, CLOSED):
                return
            elif phase == AUTH:
                line = self._next_line(MAX_RESPONSE)
                if line is None:
                    return
                self._auth_step(line)
            else:
                line = self._next_line()
                if line is None:
                    return
                self._command(line)
                if self.errors >= self.settings.max_errors and self.phase != CLOSED:
                    self._reply(R.TOO_MANY_ERRORS.format(hostname=self.settings.hostname))

    def _next_line(self, limit: int = 0) -> bytes | None:
        """The next complete command line without its line ending, or None for more input.

        Lines over max_command_line are answered 500 here and skipped; their bytes are never
        buffered beyond the limit, whatever the client sends.
        """
        limit = limit or self.settings.max_command_line
        while True:
            buf, pos = self._buf, self._pos
            end = buf.find(b"\n", pos)
            if end < 0:
                if len(buf) - pos > limit:
                    self._skipping_long_line = True
                    self._buf, self._pos = b"", 0
                return None
            self._pos = end + 1
            if self._skipping_long_line or end + 1 - pos > limit:
                self._skipping_long_line = False
                self._reply(R.LINE_TOO_LONG)
                continue
            if end > pos and buf[end - 1] == 13:  # CRLF; a bare LF is tolerated in commands
                return buf[pos:end - 1]
            return buf[pos:end]

    def _command(self, line: bytes) -> None:
        self.commands += 1
        try:
            verb, arg = split_command(line)
        except CommandSyntaxError:
            verb, arg = "?", b""
        handler = _HANDLERS.get(verb)
        if handler is None:
            self._reply(R.UNRECOGNIZED if verb not in ("EXPN", "TURN", "ETRN")
                        else R.NOT_IMPLEMENTED)
            return
        if self.phase not in ALLOWED[verb]:
            if verb == "DATA" and self.phase == CHUNKED:
                self._reply(R.BAD_SEQUENCE.format(why="DATA during a BDAT transaction"))
            elif verb == "STARTTLS" and self.tls_active:
                self._reply(R.TLS_ALREADY)
            elif verb == "MAIL" and self.phase == GREET and not self.settings.require_helo:
                handler(self, arg)
            else:
                self._reply(R.BAD_SEQUENCE.format(why=SEQUENCE_HINTS.get(verb, verb)))
            return
        handler(self, arg)

    # -- commands --------------------------------------------------------------------------
    def _helo(self, arg: bytes, esmtp: bool) -> None:
        name = arg.strip()
        if not name or b" " in name and not esmtp:
            self._reply(R.HELO_SYNTAX.format(verb="EHLO" if esmtp else "HELO"))
            return
        # RFC 5321 §4.1.4: HELO/EHLO in a session resets any transaction.
        if self.phase == CHUNKED:
            self._emit(DataAbort())
        self.envelope = None
        # The name is echoed in replies and Received headers: no control characters.
        text = "".join(c if c.isprintable() else "?" for c in name.decode("utf-8", "replace"))
        self._new_helo = (text, esmtp)
        if "helo" in self.settings.hooks:
            self._pause("helo", self._new_helo[0])
        else:
            self._finish_helo(None)

    def _finish_helo(self, reply: Reply | None) -> None:
        if reply is not None and reply.is_error:
            self._reply(reply)
            return
        self.helo, self.esmtp = self._new_helo
        self.phase = READY
        hostname = self.settings.hostname
        if not self.esmtp:
            self._reply(R.HELO_OK.format(hostname=hostname, helo=self.helo))
            return
        lines = [f"{hostname} greets {self.helo}", "PIPELINING",
                 f"SIZE {self.settings.max_message_size}", "8BITMIME", "SMTPUTF8",
                 "ENHANCEDSTATUSCODES"]
        if self.settings.tls_available and not self.tls_active:
            lines.append("STARTTLS")
        if self.settings.auth_offered and (self.tls_active or self.settings.auth_plaintext_ok):
            lines.append("AUTH PLAIN LOGIN")
        lines += ["DSN", "CHUNKING", "HELP"]
        self._out.append(R.multiline(250, lines))

    def _cmd_ehlo(self, arg: bytes) -> None:
        self._helo(arg, True)

    def _cmd_helo(self, arg: bytes) -> None:
        self._helo(arg, False)

    def _cmd_mail(self, arg: bytes) -> None:
        try:
            address, esmtp = parse_path(arg, b"FROM", False)
        except CommandSyntaxError as exc:
            if "SMTPUTF8" in exc.text:
                self._reply(R.NEEDS_SMTPUTF8)
            else:
                self._reply(R.SENDER_SYNTAX.format(why=exc.text))
            return
        s = self.settings
        if s.auth_required and self.auth_user is None:
            self._reply(R.AUTH_REQUIRED)
            return
        if s.require_sender_match and self.auth_user is not None \
                and not params.sender_owned(address, self.auth_user, s.local_domains):
            self._reply(R.SENDER_NOT_OWNED.format(address=address, user=self.auth_user))
            return
        env = Envelope(sender=address)
        for name, value in esmtp.items():
            if name == "AUTH" and s.auth_offered:
                continue  # RFC 4954 §5: the original submitter; we record our own identity
            problem = params.mail_param(env, name, value, self.settings.max_message_size)
            if problem is not None:
                self._reply(problem)
                return
        self._new_envelope = env
        if "mail_from" in self.settings.hooks or self.hold_mail():
            self._pause("mail_from", env)
        else:
            self._finish_mail(None)

    def _finish_mail(self, reply: Reply | None) -> None:
        if reply is not None and reply.is_error:
            self._reply(reply)
            return
        self.envelope = self._new_envelope
        self.phase = MAIL
        self._reply(reply or R.SENDER_OK.format(address=self.envelope.sender))

    def _cmd_rcpt(self, arg: bytes) -> None:
        env = self.envelope
        assert env is not None
        if len(env.recipients) >= self.settings.max_recipients:
            self._out.append(R.TOO_MANY_RECIPIENTS.line)
            return
        try:
            address, esmtp = parse_path(arg, b"TO", env.smtputf8)
        except CommandSyntaxError as exc:
            if "SMTPUTF8" in exc.text:
                self._reply(R.NEEDS_SMTPUTF8)
            else:
                self._reply(R.RCPT_SYNTAX.format(why=exc.text))
            return
        rcpt = params.recipient(address, esmtp)
        if isinstance(rcpt, Reply):
            self._reply(rcpt)
            return
        denied = self._relay_check(address)
        if denied is not None:
            self._reply(denied)
            return
        self._pending_rcpt = rcpt
        if "rcpt_to" in self.settings.hooks:
            self._pause("rcpt_to", rcpt)
        else:
            self._finish_rcpt(None)

    def _relay_check(self, address: str) -> Reply | None:
        """No open relay: local and relay domains from anyone, anything from trusted clients."""
        local, _, domain = address.rpartition("@")
        if not local:  # <postmaster> (RFC 5321 §4.5.1) is always local
            return None
        domain = domain.lower().rstrip(".")
        if domain in self.settings.local_domains:
            users = self.settings.local_users  # the rule is the container's (KnownUsers)
            if users is not None and local not in users:
                return R.UNKNOWN_USER.format(address=address)
            return None
        if self.trusted or domain in self.settings.relay_domains:
            return None
        return R.RELAY_DENIED.format(address=address)

    def _finish_rcpt(self, reply: Reply | None) -> None:
        rcpt, self._pending_rcpt = self._pending_rcpt, None
        assert rcpt is not None and self.envelope is not None
        if reply is not None and reply.is_error:
            self._reply(reply)
            return
        self.envelope.recipients.append(rcpt)
        self.phase = RCPT
        self._reply(reply or R.RCPT_OK.format(address=rcpt["address"]))

    def _cmd_data(self, arg: bytes) -> None:
        if arg:
            self._reply(R.SYNTAX.format(why="DATA takes no argument"))
            return
        if self.phase != RCPT:
            self._reply(R.NO_RECIPIENTS)
            return
        s = self.settings
        self._reader = DataReader(s.max_message_size, s.bare_eol, s.max_line_length)
        self._hops = HopCounter(s.hop_limit)
        self._reply(R.START_DATA)
        self.phase = DATA
        self._emit(DataStart(self.envelope))

    def _consume_data(self) -> bool:
        """Feed buffered bytes to the DATA decoder; False when more input is needed."""
        if self._pos >= len(self._buf):
            return False
        chunk = self._buf[self._pos:] if self._pos else self._buf
        self._buf, self._pos = b"", 0
        reader = self._reader
        out = reader.feed(chunk)
        if out:
            hops = self._hops
            if hops is not None and not hops.done:
                hops.feed(out)
            self._emit(Data(out))
        if not reader.done:
            return False
        self._buf = reader.rest
        self._reader = None
        s = self.settings
        if reader.too_big:
            self._fail_message(R.SIZE_EXCEEDED.format(limit=s.max_message_size))
        elif reader.bad_eol and s.bare_eol == "reject":
            self._fail_message(R.BARE_EOL)
        elif reader.line_too_long:
            self._fail_message(R.DATA_LINE_TOO_LONG.format(limit=s.max_line_length))
        else:
            self._end_message()
        return True

    def _too_many_hops(self) -> bool:
        """Whether the message just received has more Received: fields than hop_limit
        (RFC 5321 §6.3: a mail loop); refused with 554 5.4.6 and never stored."""
        hops, self._hops = self._hops, None
        if hops is None or not hops.over:
            return False
        self._fail_message(R.TOO_MANY_HOPS.format(count=hops.count))
        return True

    def _fail_message(self, reply: Reply) -> None:
        self._emit(DataAbort(reply))
        self.envelope = None
        self.phase = READY
        self._reply(reply)

    def _end_message(self) -> None:
        assert self.envelope is not None
        if self._too_many_hops():
            return
        self.phase = WAIT
        self._emit(DataEnd(self.envelope))

    def _cmd_bdat(self, arg: bytes) -> None:
        parts = arg.split()
        if not parts or len(parts) > 2 or not parts[0].isdigit() or len(parts[0]) > 18 or (
                len(parts) == 2 and parts[1].upper() != b"LAST"):
            self._reply(R.SYNTAX.format(why="BDAT chunk-size [LAST]"))
            return
        self._chunk_left = int(parts[0])
        self._chunk_last = len(parts) == 2
        self._chunk_failed = None
        if self.phase == READY:
            self._chunk_failed = R.BAD_SEQUENCE.format(why="need MAIL before BDAT")
        elif self.phase == MAIL:
            self._chunk_failed = R.NO_RECIPIENTS
        elif self.phase == RCPT:
            self._chunk_size = 0
            self._hops = HopCounter(self.settings.hop_limit)
            self._eol = LineEndings(self.settings.bare_eol == "normalize", has_bare_eol)
            self._emit(DataStart(self.envelope))
        self.phase = CHUNK
        self._consume_chunk()

    def _consume_chunk(self) -> bool:
        """Take this BDAT chunk's octets (binary, no dot-unstuffing: RFC 3030 §2)."""
        if self._chunk_left:
            available = len(self._buf) - self._pos
            if not available:
                return False
            take = min(available, self._chunk_left)
            piece = self._buf[self._pos:self._pos + take]
            self._pos += take
            self._chunk_left -= take
            if self._chunk_failed is None:
                self._chunk_size += take
                if self._chunk_size > self.settings.max_message_size:
                    self._chunk_failed = R.SIZE_EXCEEDED.format(
                        limit=self.settings.max_message_size)
                    self._emit(DataAbort(self._chunk_failed))
                    self.envelope = None
                else:
                    self._chunk_data(piece)
            if self._chunk_left:
                return False
        if self._chunk_failed is not None:
            # The chunk is consumed whatever happened: the client may have pipelined more.
            self.phase = READY if self.helo else GREET
            self._reply(self._chunk_failed)
        elif self._chunk_last:
            eol = self._eol
            assert eol is not None
            self._chunk_data(eol.end())
            if eol.bad and self.settings.bare_eol == "reject":
                self._fail_message(R.BARE_EOL)
            else:
                self._end_message()
        else:
            self.phase = CHUNKED
            self._out.append(R.BDAT_OK.format(size=self._chunk_size).line)
        return True

    def _chunk_data(self, piece: bytes) -> None:
        """BDAT octets to store, after the bare-CR/LF rule that DATA applies in its decoder
        (the same ``bare_eol``: no smuggling through chunks either)."""
        assert self._eol is not None and self._hops is not None
        piece = self._eol.feed(piece)
        if piece:
            if not self._hops.done:
                self._hops.feed(piece)
            self._emit(Data(piece))

    def _cmd_rset(self, arg: bytes) -> None:
        if self.phase == CHUNKED:
            self._emit(DataAbort())
        self.envelope = None
        if self.phase != GREET:
            self.phase = READY
        self._reply(R.RESET)

    def _cmd_noop(self, arg: bytes) -> None:
        self._reply(R.NOOP)

    def _cmd_quit(self, arg: bytes) -> None:
        if self.phase == CHUNKED:
            self._emit(DataAbort())
        self._reply(R.BYE.format(hostname=self.settings.hostname))

    def _cmd_vrfy(self, arg: bytes) -> None:
        self._reply(R.VRFY if arg.strip() else R.SYNTAX.format(why="VRFY address"))

    def _cmd_help(self, arg: bytes) -> None:
        self._reply(R.HELP)

    def _cmd_auth(self, arg: bytes) -> None:
        s = self.settings
        if not s.auth_offered:
            self._reply(R.AUTH_NOT_OFFERED)
            return
        if self.auth_user is not None:
            self._reply(R.AUTH_ALREADY)
            return
        if not (self.tls_active or s.auth_plaintext_ok):
            self._reply(R.AUTH_NEEDS_TLS)
            return
        mechanism, _, initial = arg.strip().partition(b" ")
        try:
            self._sasl = SaslExchange(mechanism.decode("ascii", "replace"))
            result = self._sasl.step(initial.strip() or None)
        except SaslError as exc:
            self._reply(exc.reply)
            return
        self._auth_result(result)

    def _auth_step(self, line: bytes) -> None:
        assert self._sasl is not None
        self.phase = READY
        try:
            result = self._sasl.step(line)
        except SaslError as exc:
            self._reply(exc.reply)
            return
        self._auth_result(result)

    def _auth_result(self, result: Reply | tuple[str, str]) -> None:
        if isinstance(result, Reply):
            self._out.append(result.line)
            self.phase = AUTH
            return
        self._sasl = None
        self.phase = WAIT
        self._emit(Authenticate(*result))

    def _cmd_starttls(self, arg: bytes) -> None:
        if arg:
            self._reply(R.SYNTAX.format(why="STARTTLS takes no argument"))
        elif self.tls_active:
            self._reply(R.TLS_ALREADY)
        elif not self.settings.tls_available:
            self._out.append(R.TLS_UNAVAILABLE.line)
        else:
            self._reply(R.READY_TLS)
            # RFC 3207 §4.2: forget everything, including pipelined plaintext already read.
            self._buf, self._pos = b"", 0
            self.phase = GREET
            self.helo, self.esmtp, self.envelope = None, False, None
            self.auth_user = None
            self._emit(StartTLS())

    # -- pausing for module checks ---------------------------------------------------------
    _check_stage = ""
    _check_phase = READY

    def _pause(self, stage: str, value: Any) -> None:
        self._check_stage = stage
        self._check_phase = self.phase
        self.phase = WAIT
        self._emit(Check(stage, value))


_HANDLERS = {
    "EHLO": ServerSession._cmd_ehlo, "HELO": ServerSession._cmd_helo,
    "MAIL": ServerSession._cmd_mail, "RCPT": ServerSession._cmd_rcpt,
    "DATA": ServerSession._cmd_data, "BDAT": ServerSession._cmd_bdat,
    "RSET": ServerSession._cmd_rset, "NOOP": ServerSession._cmd_noop,
    "QUIT": ServerSession._cmd_quit, "VRFY": ServerSession._cmd_vrfy,
    "HELP": ServerSession._cmd_help, "STARTTLS": ServerSession._cmd_starttls,
    "AUTH": ServerSession._cmd_auth,
}
