"""Connection limits are the daemon's, not one receiver's (empath/smtp/capacity.py).

Which receiver the kernel hands a connection to is not up to the test, so the tests stop one
receiver with SIGSTOP: a stopped process accepts nothing, and every connection goes to the other.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import psutil

from empath.spool import Spool
from tests.support.daemon import EmpathDaemon, wait_for


def frozen(daemon_factory: Any, smtp: dict[str, Any], receivers: int = 2) -> EmpathDaemon:
    d: EmpathDaemon = daemon_factory({"processes": {"receivers": receivers}, "smtp": smtp},
                                     start=False)
    spool = Spool(str(d.spool_path))
    spool.create_tree()
    spool.set_frozen(True)
    return d.start()


class Client:
    def __init__(self, d: EmpathDaemon, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(d.address, timeout=10, source_address=(source, 0))
        self.port = self.sock.getsockname()[1]

    def greeting(self, timeout: float = 10.0) -> bytes:
        self.sock.settimeout(timeout)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def holder(d: EmpathDaemon, client: Client) -> int:
    """The pid of the receiver that holds the client's connection."""
    for pid in d.child_pids("receiver"):
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == client.port and conn.status == "ESTABLISHED":
                return pid
    raise AssertionError(f"no receiver holds the connection from port {client.port}")


def test_a_full_receiver_leaves_new_clients_to_one_with_room(daemon_factory: Any) -> None:
    """max_connections 4 over two receivers: one at its share (2) stops accepting, so the next
    clients wait for the other instead of getting 421; only a full daemon answers 421."""
    d = frozen(daemon_factory, {"max_connections": 4, "max_connections_per_ip": 100})
    first, second = d.child_pids("receiver")
    clients = []
    try:
        with stopped(second):
            clients = [Client(d) for _ in range(2)]
            assert all(c.greeting().startswith(b"220 ") for c in clients)
            assert {holder(d, c) for c in clients} == {first}
            # The first receiver is at its share: these two wait in the accept queue.
            clients += [Client(d) for _ in range(2)]
        # The second receiver runs again and takes them.
        assert all(c.greeting().startswith(b"220 ") for c in clients[2:])
        assert [holder(d, c) for c in clients[2:]] == [second, second]
        # The whole daemon is at max_connections now: the next client is refused at once.
        extra = Client(d)
        assert extra.greeting().startswith(b"421 4.7.0")
        extra.close()
        clients.pop().close()
        wait_for(lambda: Client(d).greeting().startswith(b"220 "), 10, message="a free slot")
    finally:
        for c in clients:
            c.close()


def test_connections_arriving_one_at_a_time_are_shared_between_receivers(
        daemon_factory: Any) -> None:
    """Every receiver is woken for each new connection and the first to run took it, so one
    receiver could end up with all of a client's long sessions (100 against 0 was seen) and
    carry all of their mail on one core. A receiver with more connections than another
    leaves the next ones to it (capacity.Acceptor)."""
    d = frozen(daemon_factory, {"max_connections": 200, "max_connections_per_ip": 200})
    first, second = d.child_pids("receiver")
    clients: list[Client] = []
    try:
        for _ in range(30):  # one at a time: each is accepted and greeted before the next
            clients.append(Client(d))
            assert clients[-1].greeting().startswith(b"220 ")
        held = [holder(d, c) for c in clients]
        counts = {pid: held.count(pid) for pid in (first, second)}
        assert min(counts.values()) >= 10, counts
    finally:
        for c in clients:
            c.close()


def test_a_stopped_receiver_does_not_hold_back_new_clients(daemon_factory: Any) -> None:
    """The receiver with more connections stands back only for a moment: with the other
    receiver stopped (as a stuck one would be) every new client is still greeted, by the
    one that runs."""
    d = frozen(daemon_factory, {"max_connections": 200, "max_connections_per_ip": 200})
    first, second = d.child_pids("receiver")
    clients: list[Client] = []
    try:
        with stopped(second):
            for _ in range(12):
                clients.append(Client(d))
                assert clients[-1].greeting(timeout=5).startswith(b"220 ")
            assert {holder(d, c) for c in clients} == {first}
    finally:
        for c in clients:
            c.close()


def at_the_address_limit(daemon_factory: Any, source: str
                         ) -> tuple[EmpathDaemon, int, int, list[Client]]:
    """A daemon whose per-address limit (2) ``source`` fills, both connections held by the
    first receiver (the second stopped meanwhile)."""
    d = frozen(daemon_factory, {"max_connections": 100, "max_connections_per_ip": 2})
    first, second = d.child_pids("receiver")
    with stopped(second):
        clients = [Client(d, source) for _ in range(2)]
        assert all(c.greeting().startswith(b"220 ") for c in clients)
    return d, first, second, clients


def test_the_per_address_limit_counts_every_receiver(daemon_factory: Any) -> None:
    d, first, second, clients = at_the_address_limit(daemon_factory, "127.0.0.7")
    try:
        with stopped(first):
            # The second receiver has no connection from 127.0.0.7 of its own: the limit is
            # the daemon's, so it refuses the third all the same.
            third = Client(d, "127.0.0.7")
            assert third.greeting().startswith(b"421 4.7.0")
            assert holder_or_closed(d, third) in (second, None)
            other = Client(d, "127.0.0.8")
            assert other.greeting().startswith(b"220 ")
            clients.append(other)
        clients[0].close()
        wait_for(lambda: Client(d, "127.0.0.7").greeting().startswith(b"220 "), 10,
                 message="a free slot for 127.0.0.7")
    finally:
        for c in clients:
            c.close()


def holder_or_closed(d: EmpathDaemon, client: Client) -> int | None:
    try:
        return holder(d, client)
    except AssertionError:
        return None


def test_a_killed_receiver_stops_counting(daemon_factory: Any) -> None:
    """A receiver killed outright leaves its row in the shared table; the survivors clear it,
    so its connections do not hold the per-address limit forever."""
    d, first, _second, clients = at_the_address_limit(daemon_factory, "127.0.0.9")
    try:
        os.kill(first, signal.SIGKILL)
        d.wait_for(lambda: first not in d.child_pids("receiver")
                   and len(d.child_pids("receiver")) == 2, message="a new receiver")
        wait_for(lambda: Client(d, "127.0.0.9").greeting().startswith(b"220 "), 10,
                 message="the dead receiver's connections to stop counting")
    finally:
        for c in clients:
            c.close()


def test_the_open_file_limit_is_raised_to_what_the_connections_need(
        daemon_factory: Any) -> None:
    d = frozen(daemon_factory, {"max_connections": 3000}, receivers=1)
    [pid] = d.child_pids("receiver")
    soft, _hard = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)
    assert soft >= 2 * 3000


def test_out_of_descriptors_a_receiver_pauses_accepting_and_takes_the_clients_later(
        daemon_factory: Any) -> None:
    """EMFILE from accept (the process at its open-file limit): the receiver logs it, stops
    accepting for a second instead of spinning on the ready socket, and the clients that
    waited in the accept queue are greeted once descriptors are free again."""
    d = frozen(daemon_factory, {"max_connections": 200, "max_connections_per_ip": 200},
               receivers=1)
    [pid] = d.child_pids("receiver")
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    clients: list[Client] = []
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use, hard))  # no descriptor left
        clients = [Client(d) for _ in range(3)]  # connected by the kernel, not accepted
        d.wait_for(lambda: "cannot accept connections" in d.log_text(), 10,
                   "the receiver to report it is out of descriptors")
        cpu_before = psutil.Process(pid).cpu_times()
        time.sleep(0.5)
        cpu = psutil.Process(pid).cpu_times()
        # Paused, not spinning on the readable listening socket.
        assert (cpu.user + cpu.system) - (cpu_before.user + cpu_before.system) < 0.25
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert all(c.greeting(timeout=10).startswith(b"220 ") for c in clients)
        assert {holder(d, c) for c in clients} == {pid}
    finally:
        with contextlib.suppress(OSError):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        for c in clients:
            c.close()
