"""Pure-Python twin of ``datareader.pyx``: the DATA-phase decoder and the client's dot-stuffing.

Owns the transparency procedure of RFC 5321 §4.5.2 on both sides, and the server's defence
against SMTP smuggling: only ``CRLF . CRLF`` ends the data (or ``. CRLF`` as the very first
line), never a dot reached through a bare CR or bare LF. The reader is a small state machine fed
network chunks; between chunks it carries only its state (which of a pending CR, a held
line-start dot or a held dot-CR it is in), never message bytes. Behaves exactly like its
compiled twin, attribute for attribute after every ``feed``.

Line model: a line starts at the beginning of the data and after every real CRLF. A bare CR
(not followed by LF) or a bare LF (not preceded by CR) never starts a line for the purposes of
the terminator or of unstuffing; with ``bare_eol="normalize"`` it is rewritten to CRLF in the
output and ends the line for the purposes of the length limit, but the next line still does not
count as starting after a CRLF (a dot there is content).
"""

from __future__ import annotations

import operator
import sys

__all__ = ["DataReader", "dot_stuff", "has_bare_eol"]

# Reader states, carried across chunks.
_BOL = 0  # at a line start (after a real CRLF, or at the very beginning)
_MID = 1  # inside a line
_CR = 2  # the previous octet was a CR (already output); is it a CRLF or a bare CR?
_DOT = 3  # a line-start "." is held back: stuffing dot, terminator, or content?
_DOTCR = 4  # a line-start "." and a CR are held back: terminator unless no LF follows

_BARE_EOL_MODES = ("reject", "normalize")


def _as_bytes(data: object) -> bytes:
    if type(data) is bytes:
        return data
    return bytes(memoryview(data))  # type: ignore[arg-type]


class DataReader:
    """Server side of DATA: turns the dot-stuffed stream back into the message.

    ``feed(chunk)`` returns the message octets carried by ``chunk`` (unstuffed; normalized when
    ``bare_eol="normalize"``), ``b""`` once the message is over ``max_size``. Attributes:

    - ``done``: ``CRLF . CRLF`` was seen (its first CRLF ends the message's last line and is
      part of the output); ``rest``: what followed it in the same chunk (pipelined commands).
    - ``size``: message octets so far as they would be stored, counting those past
      ``max_size``; ``too_big``: ``size > max_size``. The reader keeps scanning for the
      terminator after that, so the session can answer 552 at the right time (RFC 5321 §4.5.3.1.10).
    - ``bad_eol``: a bare CR or bare LF was seen. With ``bare_eol="reject"`` they are passed
      through unchanged and the session refuses the message after the terminator; with
      ``"normalize"`` each becomes CRLF in the output.
    - ``line_too_long``: an output line, its CRLF included, was longer than ``max_line`` octets
      (RFC 5321 §4.5.3.1.6: 1000, not counting a stuffing dot).

    A line-start dot is removed when anything but a line ending follows it (RFC 5321 §4.5.2); a
    dot followed by a bare CR or LF is kept, since such a line is not a terminator attempt this
    reader would honour, and dropping the dot would turn it into an empty line.
    """

    __slots__ = (
        "max_size", "max_line", "bare_eol", "done", "rest", "size", "too_big", "bad_eol",
        "line_too_long", "_normalize", "_state", "_lstart",
    )

    def __init__(self, max_size: int, bare_eol: str = "reject", max_line: int = 1000) -> None:
        # Integers no larger than the compiled twin's Py_ssize_t fields.
        max_size = operator.index(max_size)
        max_line = operator.index(max_line)
        if max_size > sys.maxsize or max_line > sys.maxsize:
            raise OverflowError("max_size and max_line must fit in a Py_ssize_t")
        if bare_eol not in _BARE_EOL_MODES:
            raise ValueError(f"bare_eol must be 'reject' or 'normalize', not {bare_eol!r}")
        if max_size < 0 or max_line < 0:
            raise ValueError("max_size and max_line must not be negative")
        self.max_size = max_size
        self.max_line = max_line
        self.bare_eol = bare_eol
        self.done = False
        self.rest = b""
        self.size = 0
        self.too_big = False
        self.bad_eol = False
        self.line_too_long = False
        self._normalize = bare_eol == "normalize"
        self._state = _BOL
        self._lstart = 0  # output offset at which the current line started

    def feed(self, chunk: bytes) -> bytes:
        """Consume ``chunk``; return the message octets it carried (see the class docstring)."""
        if self.done:
            raise ValueError("DataReader.feed() after the end of the data")
        data = _as_bytes(chunk)
        n = len(data)
        normalize = self._normalize
        max_line = self.max_line
        state = self._state
        lstart = self._lstart
        keep = not self.too_big
        out: list[bytes] = []
        # The output is ``data`` with a few octets dropped (held dots and CRs) or inserted
        # (released held octets, normalized line endings). ``seg`` is where the current
        # unchanged run of ``data`` starts, ``base`` the output offset at which it starts.
        seg = 0
        base = self.size
        pos = 0
        while pos < n:
            if state == _MID:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    nl = n
                cr = data.find(b"\r", pos, nl)
                if cr < 0:
                    if nl == n:
                        pos = n
                        break
                    # A bare LF.
                    self.bad_eol = True
                    pos = nl + 1
                    if normalize:
                        if keep:
                            out.append(data[seg:nl])
                            out.append(b"\r")
                        base += nl - seg + 1
                        seg = nl
                        end = base + pos - seg
                        if end - lstart > max_line:
                            self.line_too_long = True
                        lstart = end
                elif cr + 1 == nl < n:
                    # CRLF: the end of an ordinary line.
                    pos = nl + 1
                    end = base + pos - seg
                    if end - lstart > max_line:
                        self.line_too_long = True
                    lstart = end
                    if pos < n and data[pos] != 0x2E:
                        continue  # still _MID: the next line starts with an ordinary octet
                    state = _BOL
                else:
                    pos = cr + 1
                    state = _CR
            elif state == _BOL:
                if data[pos] == 0x2E:
                    # Hold the dot back until the next octet says what it is.
                    if keep:
                        out.append(data[seg:pos])
                    base += pos - seg
                    pos += 1
                    seg = pos
                    state = _DOT
                else:
                    state = _MID
            elif state == _CR:
                if data[pos] == 0x0A:
                    pos += 1
                    end = base + pos - seg
                    if end - lstart > max_line:
                        self.line_too_long = True
                    lstart = end
                    state = _BOL
                else:
                    # A bare CR; the octet after it is looked at again in _MID.
                    self.bad_eol = True
                    if normalize:
                        if keep:
                            out.append(data[seg:pos])
                            out.append(b"\n")
                        base += pos - seg + 1
                        seg = pos
                        if base - lstart > max_line:
                            self.line_too_long = True
                        lstart = base
                    state = _MID
            elif state == _DOT:
                c = data[pos]
                if c == 0x0D:
                    # Hold the CR too: ". CRLF" would be the terminator.
                    pos += 1
                    seg = pos
                    state = _DOTCR
                elif c == 0x0A:
                    # ". LF": not a terminator, and the dot is content, not stuffing.
                    if keep:
                        out.append(b".")
                    base += 1
                    state = _MID
                else:
                    # A stuffing dot (RFC 5321 §4.5.2): it stays dropped.
                    state = _MID
            else:  # _DOTCR
                if data[pos] == 0x0A:
                    # CRLF . CRLF: the end of the data.
                    self.done = True
                    self.rest = data[pos + 1 :]
                    n = pos
                    break
                # ". CR" + something else: a bare CR after a content dot.
                if keep:
                    out.append(b".\r")
                base += 2
                state = _CR
        if keep:
            out.append(data[seg:n])
        base += n - seg
        self._state = state
        self._lstart = lstart
        self.size = base
        if base > self.max_size:
            self.too_big = True
            return b""
        return b"".join(out)


def has_bare_eol(data: bytes) -> bool:
    """Whether ``data`` holds a bare CR or a bare LF: a CR not followed by LF or an LF not
    preceded by CR, within ``data`` (so a CR at its end and an LF at its start are bare; a
    caller that feeds pieces holds a trailing CR back for the next one). The BDAT side of
    the smuggling defence, where there is no dot-stuffing to decode."""
    data = _as_bytes(data)
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def dot_stuff(data: bytes, at_line_start: bool = True, crlf: bool = False) -> bytes:
    """Client side of RFC 5321 §4.5.2: double the leading dot of every line.

    Lines are separated by CRLF only; a dot at offset 0 counts when ``at_line_start`` (the data
    begins a line). The terminator is not appended. To stuff a message in pieces, pass
    ``at_line_start=previous.endswith(b"\\r\\n")`` and do not split a CRLF between pieces.

    With ``crlf`` every bare LF and every bare CR first becomes CRLF (a line end of its own),
    so the output holds no bare line end at all: what the SMTP client sends (Postfix sends
    stored lines CRLF-terminated the same way). A CR at the very end counts as bare.
    """
    data = _as_bytes(data)
    if crlf:
        lf = data.count(b"\n")
        if not lf == data.count(b"\r") == data.count(b"\r\n"):
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    out = data.replace(b"\r\n.", b"\r\n..")
    if at_line_start and out[:1] == b".":
        out = b"." + out
    return out
