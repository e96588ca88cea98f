"""The on-disk format of one queue file (see docs/SPOOL.md).

A queue file is ``DATA ENVELOPE TRAILER``: the raw RFC 5322 message (``Received:`` header
first), then the envelope as JSON, then a fixed-size trailer that records both lengths. Data comes
first so a large message can be streamed to disk before its envelope is known; the trailer comes
last so a truncated file (a crash mid-write) never parses: its lengths no longer add up to the
file's size. This module only encodes and decodes; it never renames anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import orjson

MAGIC = b"EMPATH1"
# "\n" MAGIC " " envelope-length(10) " " data-length(16) "\n"
TRAILER_SIZE = 1 + len(MAGIC) + 1 + 10 + 1 + 16 + 1
# One pread of this many bytes from the end usually returns trailer and envelope together.
_TAIL_READ = 8192


class CorruptFile(Exception):
    """The file is not a complete queue file; the message says why."""


@dataclass(frozen=True, slots=True)
class MessageSource:
    """Where a message's raw data lives: ``length`` bytes of ``path`` from ``offset``."""

    path: str
    offset: int
    length: int


def encode_tail(envelope: dict[str, Any], data_length: int) -> bytes:
    """Envelope JSON plus trailer, to be written right after ``data_length`` bytes of data."""
    body = orjson.dumps(envelope)
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


def read_queue_file(path: str) -> tuple[dict[str, Any], MessageSource]:
    """Read the envelope of the queue file at ``path``.

    Raises FileNotFoundError when the file is gone (another process moved it) and CorruptFile
    when it is not a complete queue file.
    """
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
    return envelope, MessageSource(path, 0, data_len)


def read_envelope(path: str) -> dict[str, Any]:
    """The envelope dict of the queue file at ``path`` (see read_queue_file)."""
    return read_queue_file(path)[0]


def read_data(source: MessageSource) -> bytes:
    """The whole raw message. For tools and tests: delivery streams instead."""
    with open(source.path, "rb") as fh:
        fh.seek(source.offset)
        return fh.read(source.length)
