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

_RECEIVED = b"received:"
_ANY_EOL = re.compile(rb"\r\n|\r|\n")


class HopCounter:
    """Counts the ``Received:`` fields of a message's header section (RFC 5321 §6.3: a
    message that has passed too many relays is in a loop).

    ``count`` is the number seen so far; it stops growing once it passes ``limit`` (the
    verdict is known) and ``done`` is set at the empty line that ends the header section.
    A line is classified by its first nine octets, which may arrive in several pieces.
    """

    __slots__ = ("count", "done", "limit", "_head")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.done = False
        # The first octets of the current line (fewer than nine, no LF), or None once the
        # line is classified and only its end is looked for.
        self._head: bytes | None = b""

    @property
    def over(self) -> bool:
        return self.count > self.limit

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        pos, n = 0, len(data)
        while pos < n:
            head = self._head
            if head is None:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    return
                pos = nl + 1
                self._head = b""
                continue
            have = len(head)
            piece = head + data[pos:pos + len(_RECEIVED) - have]
            if piece[:1] == b"\n" or piece[:2] == b"\r\n":
                self.done = True  # the empty line: the body follows
                return
            if len(piece) < len(_RECEIVED) and b"\n" not in piece:
                self._head = piece  # this line's start continues in the next piece
                return
            if piece.lower() == _RECEIVED:
                self.count += 1
                if self.count > self.limit:
                    self.done = True
                    return
            self._head = None  # ``pos`` stays: the LF search starts inside this line


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
