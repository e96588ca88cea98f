"""Checks on message content while it streams in: the hop count of the header section and the
line endings of BDAT chunks.

Both are fed the octets the session emits, piece by piece as the network delivers them, and
keep only a few octets of state between pieces (never the message). ``HopCounter`` stops
looking at the end of the header section, so the body costs nothing; ``LineEndings`` costs
three C-level scans of each BDAT piece. Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["HopCounter", "LineEndings"]

_FIELD = b"\r\nreceived:"  # a Received: field at a line start
_END = b"\r\n\r\n"  # the empty line that ends the header section
_KEEP = len(_FIELD) - 1  # octets carried between pieces
_ANY_EOL = re.compile(rb"\r\n|\r|\n")


class HopCounter:
    """Counts the ``Received:`` fields of a message's header section (RFC 5321 §6.3: a
    message that has passed too many relays is in a loop).

    ``count`` is the number seen so far; counting stops once it passes ``limit`` (the verdict
    is known: ``over``) or at the empty line that ends the header section (``done``).
    The stream is read as if it began with CRLF, so a field is an occurrence of
    ``CRLF received:`` (any case) before the first ``CRLF CRLF``; both are found with C-level
    bytes searches, never octet by octet. Between pieces only the last ten octets are kept,
    fewer than either pattern is long, so an occurrence split across pieces is counted once.
    """

    __slots__ = ("count", "done", "limit", "_carry")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.done = False
        self._carry = b"\r\n"  # the last octets so far, lower-cased (a virtual CRLF first)

    @property
    def over(self) -> bool:
        return self.count > self.limit

    def feed(self, data: bytes) -> None:
        if self.done or not data:
            return
        # Occurrences that start in the carried octets and end in this piece.
        joint = (self._carry + data[:_KEEP]).lower()
        end = joint.find(_END)
        if end >= 0:
            self._found(joint.count(_FIELD, 0, end + 2))
            self.done = True
            return
        self._found(joint.count(_FIELD))
        # Occurrences within this piece (none of those fits in the joint's share of it).
        end = data.find(_END)
        stop = len(data) if end < 0 else end + 2
        if stop > len(_FIELD) - 1:
            self._found(data[:stop].lower().count(_FIELD))
        if end >= 0:
            self.done = True
        elif len(data) >= _KEEP:
            self._carry = data[-_KEEP:].lower()
        else:
            self._carry = (self._carry + data)[-_KEEP:].lower()

    def _found(self, n: int) -> None:
        self.count += n
        if self.count > self.limit:
            self.done = True


class LineEndings:
    """The bare-CR / bare-LF rule (``smtp.bare_eol``) for BDAT content, which the DATA decoder
    never sees (RFC 3030 chunks are not dot-stuffed). ``has_bare_eol`` is the speedups' scan
    (``empath._speedups.has_bare_eol``, memchr in the compiled twin).

    ``feed`` returns the piece to store: unchanged with ``normalize=False`` (the session
    refuses the message at its end when ``bad`` is set), every bare CR or LF rewritten to
    CRLF with ``normalize=True``. A CR that ends a piece is held back until the next octet
    says whether it starts a CRLF; ``end`` releases it at the last chunk.
    """

    __slots__ = ("bad", "normalize", "_cr", "_scan")

    def __init__(self, normalize: bool, has_bare_eol: Callable[[bytes], bool]) -> None:
        self.normalize = normalize
        self._scan = has_bare_eol
        self.bad = False
        self._cr = False

    def feed(self, data: bytes) -> bytes:
        if self._cr:
            data = b"\r" + data
        self._cr = data[-1:] == b"\r"
        if self._cr:
            data = data[:-1]
        if not self._scan(data):
            return data
        self.bad = True
        return _ANY_EOL.sub(b"\r\n", data) if self.normalize else data

    def end(self) -> bytes:
        """What is still held at the end of the content (a final bare CR, or nothing)."""
        if not self._cr:
            return b""
        self._cr = False
        self.bad = True
        return b"\r\n" if self.normalize else b"\r"
