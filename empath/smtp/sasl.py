"""SASL exchanges of SMTP AUTH (RFC 4954): the PLAIN (RFC 4616) and LOGIN mechanisms.

Pure: an exchange is fed the client's (base64) responses and returns either the next 334
challenge or the decoded credentials. Checking them is the protocol layer's job (slow argon2
hashing, failure throttling); the session only carries the dialogue.
"""

from __future__ import annotations

import base64
import binascii

from empath.smtp import replies as R
from empath.smtp.replies import Reply

MECHANISMS = ("PLAIN", "LOGIN")
MAX_RESPONSE = 12288  # RFC 4954 §4: a server must accept responses of at least 12288 octets


class SaslError(Exception):
    """The exchange failed; ``reply`` says how to answer."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def _decode(data: bytes) -> str:
    if data == b"=":  # RFC 4954 §4: "=" is an empty initial response
        return ""
    try:
        return base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise SaslError(R.AUTH_BAD_BASE64) from None


def _challenge(text: str) -> Reply:
    return Reply(334, "", base64.b64encode(text.encode()).decode())


class SaslExchange:
    """One AUTH command's dialogue."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism.upper()
        if self.mechanism not in MECHANISMS:
            raise SaslError(R.AUTH_MECHANISM)
        self.user: str | None = None

    def step(self, response: bytes | None) -> Reply | tuple[str, str]:
        """Feed the initial response (None when absent) or one response line.

        Returns the next challenge to send, or ``(user, password)`` once complete.
        """
        if response is not None and response.strip() == b"*":
            raise SaslError(R.AUTH_CANCELLED)
        if self.mechanism == "PLAIN":
            if response is None:
                return Reply(334, "", "")
            # authzid NUL authcid NUL passwd; an authzid other than the user is not supported.
            parts = _decode(response.strip()).split("\x00")
            if len(parts) != 3 or not parts[1] or (parts[0] and parts[0] != parts[1]):
                raise SaslError(R.AUTH_BAD_PLAIN)
            return parts[1], parts[2]
        if self.user is None:
            if response is None:
                return _challenge("Username:")
            self.user = _decode(response.strip())
            if not self.user:
                raise SaslError(R.AUTH_BAD_PLAIN)
            return _challenge("Password:")
        if response is None:
            return _challenge("Password:")
        return self.user, _decode(response.strip())
