"""The spool: durable queue files in state directories, changed only by rename.

Only this package knows paths, file names and states (docs/SPOOL.md). The receivers, the
delivery workers, the master and empathctl all go through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from empath.spool.fileformat import (
    CorruptFile,
    MessageSource,
    read_data,
    read_envelope,
    read_queue_file,
)
from empath.spool.ids import id_time, is_valid_id, new_message_id
from empath.spool.layout import QUEUE_STATES, Spool, SpoolError, pid_alive

if TYPE_CHECKING:
    from empath.spool.wake import WakeListener, Waker
    from empath.spool.writer import IncomingMessage, ReceiverWriter

# Loaded on first use: they bring asyncio, ssl and the metrics, which empathctl's queue
# commands do not need (a tenth of a second of every command's start).
_LAZY = {"WakeListener": "empath.spool.wake", "Waker": "empath.spool.wake",
         "IncomingMessage": "empath.spool.writer", "ReceiverWriter": "empath.spool.writer"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "QUEUE_STATES", "CorruptFile", "IncomingMessage", "MessageSource", "ReceiverWriter",
    "Spool", "SpoolError", "WakeListener", "Waker", "id_time", "is_valid_id", "new_message_id",
    "pid_alive", "read_data", "read_envelope", "read_queue_file",
]
