"""Store a whole message durably in incoming/ from blocking code.

Used where a message is made outside a receiver (bounces and delay notices by the delivery
workers, local submission by ``empath sendmail``): write ``tmp/<pid>-<id>``, fdatasync, rename
into ``incoming/`` — the receivers' own ``store_file`` — then fsync ``incoming/`` and wake the
delivery workers. The same file format and the same guarantees as the receivers' path, one
message at a time. Run as root on a spool owned by another user, the file is that user's.
"""

from __future__ import annotations

import contextlib
import os

from empath._speedups import store_file
from empath.spool import fileformat
from empath.spool.layout import Spool
from empath.spool.records import Envelope
from empath.spool.wake import wake_workers


def store_message(spool: Spool, data: bytes, envelope: Envelope,
                  wake: bool = True) -> str:
    """Make ``data`` with ``envelope`` durable in incoming/; returns the queue id."""
    message_id = str(envelope["id"])
    envelope["data_size"] = len(data)
    tail = fileformat.encode_tail(envelope, len(data))
    tmp = os.fsencode(spool.tmp_path(message_id))
    try:
        fd = _open_as_spool_owner(spool, tmp)
        store_file(fd, tmp, [data, tail], os.fsencode(spool.path("incoming", message_id)),
                   None, -1.0)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    spool.sync_dir("incoming")
    if wake:
        wake_workers(spool, ids=[message_id])
    return message_id


def _open_as_spool_owner(spool: Spool, tmp: bytes) -> int:
    """Run as root (``empath sendmail`` from a root cron job, an embedding program) on a spool
    handed over to ``user``: the new file, opened here, already belongs to the spool's owner
    when it is renamed into incoming/, so a delivery worker can read it and the start-up
    hand-over need not look for it (master/privileges.py). Otherwise -1: ``store_file``
    creates it as the running user."""
    if os.geteuid() != 0:
        return -1
    st = os.stat(spool.state_dir("incoming"))
    if st.st_uid == 0:
        return -1
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    except BaseException:
        os.close(fd)
        raise
    return fd
