"""The delivery worker's schedule of deferred messages: due times and ids, compactly.

A worker keeps one entry per file of ``deferred/`` (its due time is the file's mtime) and
claims entries as they come due, earliest first. With a million deferred messages a tuple of
(float, str) per entry would cost ~150 bytes and a list slot besides; here an entry is one
34-byte record inside a larger ``bytes`` block: the due time in whole microseconds (8 bytes,
big-endian, so that records sort by due time, then id, as plain bytes) and the 26-character
queue id.

Entries arrive in batches (``add``: one batch per slice of a listing of ``deferred/``, so the
listing can be read in slices between other work); each batch is sorted into one block, and
the blocks are merged lazily by a heap holding the next record of each block. Taking due
entries (``pop_due``) therefore costs O(log blocks) each, and a block is freed once taken.
There is no removal of single entries: an entry whose file is gone (claimed by another
worker, deleted by an operator) is taken like any other and its claim finds nothing
(ENOENT, the normal outcome of a lost race). ``clear`` forgets everything, before a new
listing.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

from empath.spool.ids import is_valid_id

ID_SIZE = 26
RECORD = 8 + ID_SIZE
_SCALE = 1_000_000  # due times are kept in whole microseconds
_MAX_DUE = (1 << 64) - 1


def _encode(due: float, message_id: str) -> bytes:
    micros = min(max(int(due * _SCALE), 0), _MAX_DUE)
    return micros.to_bytes(8, "big") + message_id.encode("ascii")


def _due(record: bytes) -> float:
    return int.from_bytes(record[:8], "big") / _SCALE


class DueSchedule:
    """Deferred messages by due time (then id); see the module docstring."""

    def __init__(self) -> None:
        self._blocks: list[bytes] = []
        # (next record, block index, offset of the record after it) for each unfinished block.
        self._heads: list[tuple[bytes, int, int]] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def clear(self) -> None:
        self._blocks = []
        self._heads = []
        self._count = 0

    def add(self, entries: Iterable[tuple[float, str]]) -> int:
        """Add (due time, id) entries as one block; names that are no queue ids are left out
        (they are never claimed). How many were added."""
        records = sorted(_encode(due, mid) for due, mid in entries if is_valid_id(mid))
        if not records:
            return 0
        block = b"".join(records)
        del records
        index = len(self._blocks)
        self._blocks.append(block)
        heapq.heappush(self._heads, (block[:RECORD], index, RECORD))
        self._count += len(block) // RECORD
        return len(block) // RECORD

    def next_due(self) -> float | None:
        """The earliest due time, or None when empty."""
        return _due(self._heads[0][0]) if self._heads else None

    def pop_due(self, now: float) -> str | None:
        """Take the earliest entry if it is due at ``now``; its id, else None."""
        if not self._heads or _due(self._heads[0][0]) > now:
            return None
        return self._pop()

    def _pop(self) -> str:
        record, index, offset = self._heads[0]
        block = self._blocks[index]
        if offset < len(block):
            heapq.heapreplace(self._heads, (block[offset:offset + RECORD], index,
                                            offset + RECORD))
        else:
            heapq.heappop(self._heads)
            self._blocks[index] = b""  # taken in full: free it
        self._count -= 1
        return record[8:].decode("ascii")

    def entries(self) -> Iterator[tuple[float, str]]:
        """Every (due time, id) in due order, without taking them (for inspection)."""
        heads = list(self._heads)
        while heads:
            record, index, offset = heads[0]
            block = self._blocks[index]
            if offset < len(block):
                heapq.heapreplace(heads, (block[offset:offset + RECORD], index,
                                          offset + RECORD))
            else:
                heapq.heappop(heads)
            yield _due(record), record[8:].decode("ascii")

    def nbytes(self) -> int:
        """Bytes held in blocks (records not yet taken, and the rest of their blocks)."""
        return sum(len(b) for b in self._blocks)
