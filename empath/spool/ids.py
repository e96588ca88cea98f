"""Queue ids: 26-character, time-ordered, never reused.

An id is a ULID-style string: 48 bits of milliseconds since the epoch and 80 random bits, in
Crockford base32. Sorting ids sorts messages by arrival, so directory listings need no stat() to
come out in order, and an id is never reused (postsuper documents the races that reused ids cause).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_VALID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


def new_message_id(now: float | None = None) -> str:
    """Return a fresh id; ``now`` (seconds) fixes the time part, for tests."""
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    out = []
    for _ in range(26):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def is_valid_id(text: str) -> bool:
    """True when ``text`` is a well-formed queue id (and so safe inside a path)."""
    return bool(_VALID.match(text))


def valid_ids(names: Iterable[str]) -> list[str]:
    """The names that are well-formed queue ids (as ``is_valid_id``), in their order: one C
    call per name, for listings of a million."""
    return list(filter(_VALID.match, names))


def id_time(message_id: str) -> float:
    """The arrival time encoded in an id, in seconds since the epoch."""
    value = 0
    for ch in message_id[:10]:
        value = (value << 5) | _ALPHABET.index(ch)
    return value / 1000.0
