"""Queue ids: 26-character, time-ordered, never reused.

An id is a ULID-style string: 48 bits of milliseconds since the epoch and 80 random bits, in
Crockford base32. Sorting ids sorts messages by arrival, so directory listings need no stat() to
come out in order, and an id is never reused (postsuper documents the races that reused ids cause).
Within one millisecond a process counts up from its first random part (ULID's monotonic mode),
so its ids of that millisecond sort in the order they were made too: a session's messages keep
their order in incoming/ however fast they come.
"""

from __future__ import annotations

import os
import re
import time
import zlib
from collections.abc import Iterable

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_VALID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


# Every pair of base32 digits, indexed by the 10 bits they encode.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
# The last id's millisecond, its digits and its random part: one object, swapped whole.
_last: tuple[int, str, int] = (-1, "", 0)


def new_message_id(now: float | None = None) -> str:
    """Return a fresh id; ``now`` (seconds) fixes the time part, for tests."""
    global _last
    ms = int((time.time() if now is None else now) * 1000)
    pairs = _PAIRS
    last_ms, time_part, r = _last
    if ms != last_ms:  # the time part: 48 bits as ten digits, the first two bits zero
        time_part = "".join([pairs[(ms >> 40) & 1023], pairs[(ms >> 30) & 1023],
                             pairs[(ms >> 20) & 1023], pairs[(ms >> 10) & 1023],
                             pairs[ms & 1023]])
        # 79 random bits: the count up within the millisecond never wraps.
        r = int.from_bytes(os.urandom(10), "big") >> 1
    else:
        r += 1
    _last = (ms, time_part, r)
    return "".join([time_part, pairs[r >> 70], pairs[(r >> 60) & 1023],
                    pairs[(r >> 50) & 1023], pairs[(r >> 40) & 1023], pairs[(r >> 30) & 1023],
                    pairs[(r >> 20) & 1023], pairs[(r >> 10) & 1023], pairs[r & 1023]])


def is_valid_id(text: str) -> bool:
    """True when ``text`` is a well-formed queue id (and so safe inside a path)."""
    return bool(_VALID.match(text))


def valid_ids(names: Iterable[str]) -> list[str]:
    """The names that are well-formed queue ids (as ``is_valid_id``), in their order: one C
    call per name, for listings of a million."""
    return list(filter(_VALID.match, names))


def id_hash(message_id: str) -> int:
    """The number that places a message in one delivery worker's share: worker ``i`` of
    ``n`` (from 0) takes the messages whose ``id_hash % n == i`` (``shard_of``)."""
    return zlib.crc32(message_id.encode())


def shard_of(message_id: str, shards: int) -> int:
    """Which of ``shards`` delivery workers (from 0) a message belongs to."""
    return id_hash(message_id) % shards


def id_time(message_id: str) -> float:
    """The arrival time encoded in an id, in seconds since the epoch."""
    value = 0
    for ch in message_id[:10]:
        value = (value << 5) | _ALPHABET.index(ch)
    return value / 1000.0
