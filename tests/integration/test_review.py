"""Regression tests of faults found by reviewing the integrated daemon: each one drives the
running daemon (real processes, real sockets) into the condition that used to fail."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from tests.support.daemon import EmpathDaemon

# A module whose only effect is to block the receiver's event loop for a second on SIGUSR2,
# so a test can order "stop requested" before "connection accepted" inside one receiver.
STALL_MODULE = '''
import asyncio, signal, time


class Stall:
    def __init__(self, options):
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, time.sleep, 1.0)


def setup(options):
    return Stall(options)
'''


def test_connection_accepted_as_a_receiver_stops_is_answered(daemon_factory: Any,
                                                            tmp_path: Path) -> None:
    """A receiver told to stop used to tear down (connection table released, process exit)
    without letting the connections accepted in its last loop turn run connection_made: the
    client saw the connection closed with no greeting (b'') during reloads under load."""
    (tmp_path / "stall_mod.py").write_text(STALL_MODULE)
    d: EmpathDaemon = daemon_factory({"processes": {"receivers": 1},
                                      "smtp": {"modules": [{"name": "stall_mod"}]}},
                                     start=False)
    d.start(env={"PYTHONPATH": str(tmp_path)})
    [pid] = d.child_pids("receiver")
    # Both signals are handled in one loop turn, SIGINT (stop) first; the stall that follows
    # lets the connections below arrive before the stopping task runs.
    os.kill(pid, signal.SIGSTOP)
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGUSR2)
    os.kill(pid, signal.SIGCONT)
    time.sleep(0.3)
    conns = [socket.create_connection(d.address, timeout=10) for _ in range(5)]
    try:
        lines = [c.recv(512) for c in conns]
    finally:
        for c in conns:
            c.close()
    assert all(line[:4] in (b"220 ", b"421 ") and line.endswith(b"\r\n") for line in lines), \
        lines
    d.wait_for(lambda: pid not in d.child_pids() and d.settled(), 10, "a new receiver")
    assert "Exception in callback" not in d.log_text()
