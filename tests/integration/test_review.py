"""Regression tests of faults found by reviewing the integrated daemon: each one drives the
running daemon (real processes, real sockets) into the condition that used to fail."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from tests.integration.test_cluster import (  # noqa: F401 (dns, redis_server: fixtures)
    WAIT,
    dns,
    fleet,
    node_config,
    redis_server,
    spooled,
    subjects,
    thaw,
)
from tests.integration.test_limits_e2e import ids_per_worker, spool_messages
from tests.support.daemon import EmpathDaemon
from tests.support.dnsserver import DNSServer
from tests.support.redisserver import RedisServer
from tests.support.sink import Behaviour, SinkServer

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


def test_a_lease_is_held_until_a_slow_quit_is_over(daemon_factory: Any, dns: DNSServer,
                                                   redis_server: RedisServer) -> None:
    """Fleet leases without connection reuse were released half a second after the delivery
    (a timer), whether or not the connection's QUIT was over: a server slow to answer QUIT
    (or a loaded host) saw more connections than ``max_connections``."""
    with SinkServer(Behaviour(delay=0.05, quit_delay=1.2), host="127.0.0.2") as sink:
        nodes = fleet(daemon_factory, 2, lambda name: node_config(
            name, redis_server, dns, sink.port, workers=1,
            domains={"example.test": {"max_connections": 2}}))
        for node in nodes:
            spool_messages(node, ids_per_worker(1, 6), "example.test")
        thaw(nodes)
        for node in nodes:
            node.wait_for(lambda n=node: spooled(n) == 0, WAIT, "every message delivered")
    assert sink.max_concurrent_sessions <= 2
    assert sorted(subjects(sink)) == sorted(f"message {i}" for i in range(6) for _ in range(2))
