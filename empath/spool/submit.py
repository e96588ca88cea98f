"""Store a whole message durably in incoming/ from blocking code.

Used where a message is made outside a receiver (bounces and delay notices by the delivery
workers, local submission by ``empath sendmail``): write ``tmp/<pid>-<id>``, fdatasync, rename
into ``incoming/`` — the receivers' own ``store_file`` — then fsync ``incoming/`` and wake the
delivery workers. The same file format and the same guarantees as the receivers' path, one
message at a time.
"""

from __future__ import annotations

import contextlib
import os

from empath._speedups import store_file
from empath.spool import fileformat
from empath.spool.layout import Spool
from empath.spool.records import Envelope
from empath.spool.wake import Waker


def store_message(spool: Spool, data: bytes, envelope: Envelope,
                  wake: bool = True) -> str:
    """Make ``data`` with ``envelope`` durable in incoming/; returns the queue id."""
    message_id = str(envelope["id"])
    envelope["data_size"] = len(data)
    tail = fileformat.encode_tail(envelope, len(data))
    tmp = os.fsencode(spool.tmp_path(message_id))
    try:
        store_file(-1, tmp, [data, tail], os.fsencode(spool.path("incoming", message_id)),
                   None, -1.0)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    spool.sync_dir("incoming")
    if wake:
        waker = Waker(spool)
        try:
            waker.wake()
        finally:
            waker.close()
    return message_id
