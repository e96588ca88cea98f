"""Every SMTP reply the receiver sends: code, RFC 3463 enhanced status code and text.

No other module spells a reply code. A reply is pre-encoded once (``Reply.line``) so the hot
path only concatenates bytes. Texts that need a value (a queue id, a size) are formatted with
``Reply.format``. Multi-line replies (EHLO, HELP) are built with ``multiline``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str  # "" for replies that carry none (220 greeting, 221/354 per RFC 2034 §3)
    text: str

    @property
    def line(self) -> bytes:
        sep = " " + self.enhanced if self.enhanced else ""
        return f"{self.code}{sep} {self.text}\r\n".encode()

    def format(self, **values: object) -> Reply:
        return Reply(self.code, self.enhanced, self.text.format(**values))

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    @property
    def closes(self) -> bool:
        """421 and 221 end the session (RFC 5321 §3.8, §4.1.1.10)."""
        return self.code in (421, 221)


def multiline(code: int, lines: list[str]) -> bytes:
    """``250-first`` ... ``250 last`` (RFC 5321 §4.2.1)."""
    out = [f"{code}-{text}\r\n" for text in lines[:-1]]
    out.append(f"{code} {lines[-1]}\r\n")
    return "".join(out).encode()


# -- connection --------------------------------------------------------------------------
GREETING = Reply(220, "", "{hostname} {banner}")
EARLY_TALKER = Reply(554, "5.5.0", "{hostname} protocol error: talked before the greeting")
BYE = Reply(221, "2.0.0", "{hostname} closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "{hostname} service shutting down, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "{hostname} too many connections, try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0",
                         "{hostname} too many connections from your address, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "{hostname} too many errors, closing connection")
TIMEOUT = Reply(421, "4.4.2", "{hostname} timeout exceeded, closing connection")
LOCAL_ERROR_CLOSING = Reply(421, "4.3.0", "{hostname} local error, closing connection")
LIFETIME = Reply(421, "4.4.2", "{hostname} connection time limit exceeded")

# -- simple commands ---------------------------------------------------------------------
OK = Reply(250, "2.0.0", "OK")
HELO_OK = Reply(250, "", "{hostname} greets {helo}")
RESET = Reply(250, "2.0.0", "Reset state")
NOOP = Reply(250, "2.0.0", "OK")
VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP "
                           "STARTTLS; see RFC 5321")

# -- syntax and sequence -----------------------------------------------------------------
UNRECOGNIZED = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
SYNTAX = Reply(501, "5.5.4", "Syntax error: {why}")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: {verb} hostname")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands: {why}")
PARAM_UNKNOWN = Reply(555, "5.5.4", "Parameter {name} not recognized or not implemented")
PARAM_BAD = Reply(501, "5.5.4", "Bad value for parameter {name}")

# -- envelope ----------------------------------------------------------------------------
SENDER_OK = Reply(250, "2.1.0", "Sender <{address}> OK")
SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address: {why}")
RCPT_OK = Reply(250, "2.1.5", "Recipient <{address}> OK")
RCPT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address: {why}")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
RELAY_DENIED = Reply(554, "5.7.1", "<{address}>: Relay access denied")
UNKNOWN_USER = Reply(550, "5.1.1", "<{address}>: Recipient address rejected: no such user")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed limit of {limit} octets")
NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")

# -- data --------------------------------------------------------------------------------
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
NO_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
QUEUED = Reply(250, "2.0.0", "OK queued as {queue_id}")
DUPLICATE = Reply(250, "2.0.0", "OK already queued as {queue_id}")
BDAT_OK = Reply(250, "2.0.0", "{size} octets received")
BARE_EOL = Reply(550, "5.6.0",
                 "Message contains bare CR or LF line endings (not accepted: SMTP smuggling)")
DATA_LINE_TOO_LONG = Reply(550, "5.6.0", "Message contains a line longer than {limit} octets")
# RFC 3463 X.4.6: routing loop detected (Postfix's hopcount_limit answer).
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops ({count} Received: header fields): mail loop")
SPOOL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
MODULE_ERROR = Reply(451, "4.3.5", "Local policy error, try again later")

# -- TLS ---------------------------------------------------------------------------------
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")

# -- AUTH (RFC 4954) ---------------------------------------------------------------------
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication "
                                      "mechanism")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode the response")
AUTH_BAD_PLAIN = Reply(501, "5.5.2", "Malformed credentials")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_NOT_OFFERED = Reply(502, "5.5.1", "AUTH not available on this port")
AUTH_TOO_MANY = Reply(421, "4.7.0", "{hostname} too many authentication failures")
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address <{address}> not owned by user {user}")
