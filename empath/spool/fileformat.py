"""The on-disk format of one queue file (see docs/SPOOL.md).

A queue file is ``DATA ENVELOPE TRAILER``: the raw RFC 5322 message (``Received:`` header
first), then the envelope as JSON, then a fixed-size trailer that records both lengths. Data comes
first so a large message can be streamed to disk before its envelope is known; the trailer comes
last so a truncated file (a crash mid-write) never parses: its lengths no longer add up to the
file's size. This module only encodes and decodes; it never renames anything.

The envelope's last member is always ``"done":"<one byte per recipient>"`` (``DONE_KEY``), the
recipients' done marks: ``-`` open, ``D`` delivered, in the order of ``recipients``. It sits at a
fixed distance from the trailer (``done_region``), so a worker records a recipient delivered by
overwriting one byte in place (``pwrite``, no new blocks, no rename: it works on a full disk),
and a reader treats a ``D`` as authoritative whatever the recipient's status says
(``apply_done_marks``). docs/SPOOL.md, "Done marks".
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from empath.spool import records

MAGIC = b"EMPATH1"
# "\n" MAGIC " " envelope-length(10) " " data-length(16) "\n"
TRAILER_SIZE = 1 + len(MAGIC) + 1 + 10 + 1 + 16 + 1
# One pread of this many bytes from the end usually returns trailer and envelope together.
_TAIL_READ = 8192
DONE_KEY = "done"
MARK_OPEN, MARK_DELIVERED = b"-", b"D"
_DONE_PREFIX = b',"' + DONE_KEY.encode() + b'":"'
_DONE_SUFFIX = b'"}'


class CorruptFile(Exception):
    """The file is not a complete queue file; the message says why."""


@dataclass(frozen=True, slots=True)
class MessageSource:
    """Where a message's raw data lives: ``length`` bytes of ``path`` from ``offset``."""

    path: str
    offset: int
    length: int


def done_marks(envelope: Mapping[str, Any]) -> bytes:
    """The done marks of ``envelope``'s recipients as they stand (``D`` for delivered)."""
    recipients = envelope.get("recipients")
    if not isinstance(recipients, list):
        return b""
    return b"".join(MARK_DELIVERED if isinstance(r, dict) and r.get("status") == "delivered"
                    else MARK_OPEN for r in recipients)


def encode_envelope(envelope: Mapping[str, Any]) -> bytes:
    """The envelope as JSON, its done marks as the last member (whatever ``envelope`` holds
    under DONE_KEY is replaced by the marks of its recipients' statuses)."""
    fields = {k: v for k, v in envelope.items() if k != DONE_KEY}
    body = orjson.dumps(fields)
    marks = done_marks(envelope)
    if not fields:
        return b"{" + _DONE_PREFIX[1:] + marks + _DONE_SUFFIX
    return body[:-1] + _DONE_PREFIX + marks + _DONE_SUFFIX


def done_region(tail: bytes, recipients: int) -> int | None:
    """Where the done marks start within ``tail`` (bytes that end with the envelope's last
    byte, trailer excluded), or None when the envelope does not end with ``recipients``
    marks (a file written before done marks existed)."""
    end = len(tail) - len(_DONE_SUFFIX)
    start = end - recipients
    if start - len(_DONE_PREFIX) < 0 or tail[end:] != _DONE_SUFFIX:
        return None
    if tail[start - len(_DONE_PREFIX):start] != _DONE_PREFIX:
        return None
    marks = tail[start:end]
    if marks.strip(MARK_OPEN + MARK_DELIVERED):
        return None
    return start


def apply_done_marks(envelope: dict[str, Any]) -> None:
    """Make a recipient marked ``D`` delivered (a mark written after the envelope was);
    drops DONE_KEY from ``envelope``. A marks string of the wrong length is ignored."""
    marks = envelope.pop(DONE_KEY, None)
    recipients = envelope.get("recipients")
    if not isinstance(marks, str) or not isinstance(recipients, list):
        return
    if len(marks) != len(recipients):
        return
    for mark, rcpt in zip(marks, recipients, strict=True):
        if mark == "D" and isinstance(rcpt, dict) and rcpt.get("status") != "delivered":
            rcpt["status"] = "delivered"
            rcpt["marked_done"] = True


def mark_delivered(path: str, recipients: int, indexes: list[int]) -> bool:
    """Record recipients ``indexes`` (of ``recipients``) of the queue file at ``path`` as
    delivered, in place: one pwrite per mark into bytes the file already has, then
    fdatasync. False when the file has no done marks for that many recipients (written by an
    older version); OSError when the write or the flush fails (a read-only file system,
    EIO); CorruptFile when the file is not a complete queue file."""
    if any(not 0 <= index < recipients for index in indexes):
        raise ValueError(f"recipient index out of range 0..{recipients - 1}: {indexes}")
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < TRAILER_SIZE:
            raise CorruptFile(f"file too short ({size} bytes)")
        env_len, data_len = decode_trailer(os.pread(fd, TRAILER_SIZE, size - TRAILER_SIZE),
                                           size)
        look = min(env_len, recipients + len(_DONE_PREFIX) + len(_DONE_SUFFIX))
        first = data_len + env_len - look
        start = done_region(os.pread(fd, look, first), recipients)
        if start is None:
            return False
        for index in sorted(set(indexes)):
            os.pwrite(fd, MARK_DELIVERED, first + start + index)
        os.fdatasync(fd)
        return True
    finally:
        os.close(fd)


def encode_tail(envelope: Mapping[str, Any], data_length: int) -> bytes:
    """Envelope JSON plus trailer, to be written right after ``data_length`` bytes of data."""
    body = encode_envelope(envelope)
    trailer = b"\n%s %010d %016d\n" % (MAGIC, len(body), data_length)
    return body + trailer


def decode_trailer(trailer: bytes, file_size: int) -> tuple[int, int]:
    """Return (envelope_length, data_length) or raise CorruptFile."""
    if len(trailer) != TRAILER_SIZE or not trailer.startswith(b"\n" + MAGIC + b" "):
        raise CorruptFile("missing end-of-file trailer (truncated or not a queue file)")
    try:
        env_len = int(trailer[9:19])
        data_len = int(trailer[20:36])
    except ValueError:
        raise CorruptFile("unreadable trailer lengths") from None
    if env_len + data_len + TRAILER_SIZE != file_size:
        raise CorruptFile(
            f"lengths do not add up: data {data_len} + envelope {env_len} + trailer "
            f"!= file size {file_size}"
        )
    return env_len, data_len


def read_queue_file(path: str) -> tuple[records.Envelope, MessageSource]:
    """Read the envelope of the queue file at ``path``, checked (``records.parse_envelope``).

    Raises FileNotFoundError when the file is gone (another process moved it) and CorruptFile
    when it is not a complete queue file or its envelope is not one delivery can use (the
    message names the key).
    """
    envelope, source = read_unchecked(path)
    try:
        return records.parse_envelope(envelope, source.length), source
    except records.EnvelopeError as exc:
        raise CorruptFile(str(exc)) from None


def read_unchecked(path: str) -> tuple[dict[str, Any], MessageSource]:
    """The envelope of the queue file at ``path`` as its JSON says, only known to be an
    object with an id: for the spool's own upkeep (slot recovery, ``rewrite``), which keeps
    a file whose values delivery would refuse and leaves it to the worker to set aside.
    Raises like read_queue_file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < TRAILER_SIZE:
            raise CorruptFile(f"file too short ({size} bytes)")
        start = max(0, size - _TAIL_READ)
        tail = os.pread(fd, size - start, start)
        env_len, data_len = decode_trailer(tail[-TRAILER_SIZE:], size)
        env_start = data_len
        if env_start >= start:
            body = tail[env_start - start : len(tail) - TRAILER_SIZE]
        else:
            body = os.pread(fd, env_len, env_start)
    finally:
        os.close(fd)
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise CorruptFile(f"envelope is not valid JSON: {exc}") from None
    if not isinstance(envelope, dict) or "id" not in envelope:
        raise CorruptFile("envelope is not an object with an id")
    apply_done_marks(envelope)
    return envelope, MessageSource(path, 0, data_len)


def read_envelope(path: str) -> records.Envelope:
    """The envelope of the queue file at ``path`` (see read_queue_file)."""
    return read_queue_file(path)[0]


def read_data(source: MessageSource) -> bytes:
    """The whole raw message. For tools and tests: delivery streams instead."""
    with open(source.path, "rb") as fh:
        fh.seek(source.offset)
        return fh.read(source.length)
