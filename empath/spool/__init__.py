"""The spool: durable queue files in state directories, changed only by rename.

Only this package knows paths, file names and states (docs/SPOOL.md). The receivers, the
delivery workers, the master and empathctl all go through it.
"""

from __future__ import annotations

from empath.spool.fileformat import (
    CorruptFile,
    MessageSource,
    read_data,
    read_envelope,
    read_queue_file,
)
from empath.spool.ids import id_time, is_valid_id, new_message_id
from empath.spool.layout import QUEUE_STATES, Spool, SpoolError, pid_alive
from empath.spool.wake import WakeListener, Waker
from empath.spool.writer import IncomingMessage, ReceiverWriter

__all__ = [
    "QUEUE_STATES", "CorruptFile", "IncomingMessage", "MessageSource", "ReceiverWriter",
    "Spool", "SpoolError", "WakeListener", "Waker", "id_time", "is_valid_id", "new_message_id",
    "pid_alive", "read_data", "read_envelope", "read_queue_file",
]
