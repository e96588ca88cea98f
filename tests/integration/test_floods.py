"""Connection floods and slow clients against the real daemon.

10,000 idle connections from 50 loopback addresses: new clients are still answered within the
limits (421 beyond them), the receivers' memory stays bounded, nothing crashes. Slow clients
(slowloris: a byte at a time) are cut by the command timeout measured from the last complete
command, and a stalled DATA by the data_block timeout.
"""

from __future__ import annotations

import resource
import select
import selectors
import socket
import time
from typing import Any

import psutil

from tests.support.daemon import EmpathDaemon

IDLE = 10_000
SOURCES = [f"127.0.0.{i}" for i in range(10, 60)]  # 200 connections from each


def raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def open_idle(d: EmpathDaemon, count: int) -> list[socket.socket]:
    """``count`` connections, spread over SOURCES, opened without waiting for greetings."""
    socks = []
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((SOURCES[i % len(SOURCES)], 0))
        s.setblocking(False)
        try:
            s.connect(d.address)
        except BlockingIOError:
            pass
        socks.append(s)
    return socks


def read_first_lines(socks: list[socket.socket], timeout: float) -> dict[int, bytes]:
    """The first reply line of every socket (b"" for one closed without a reply), via epoll."""
    sel = selectors.DefaultSelector()
    partial: dict[int, bytes] = {}
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
        partial[s.fileno()] = b""
    done: dict[int, bytes] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                chunk = sock.recv(512)
            except OSError:
                chunk = b""
            data = partial[sock.fileno()] + chunk
            if b"\r\n" in data or not chunk:
                done[sock.fileno()] = data
                sel.unregister(sock)
            else:
                partial[sock.fileno()] = data
    sel.close()
    missing = len(socks) - len(done)
    assert not missing, f"{missing} connections got no reply within {timeout}s"
    return done


def greeting(sock: socket.socket, timeout: float = 20.0) -> bytes:
    sock.setblocking(True)
    sock.settimeout(timeout)
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(512)
        if not chunk:
            break
        data += chunk
    return data


def test_ten_thousand_idle_connections(daemon_factory: Any) -> None:
    raise_fd_limit(IDLE + 4096)  # inherited by the daemon started below
    d: EmpathDaemon = daemon_factory({
        "processes": {"receivers": 2, "delivery": 1},
        "smtp": {"max_connections": 6000, "max_connections_per_ip": 80,
                 "timeouts": {"command": "5m"}},
    })
    receivers = [psutil.Process(pid) for pid in d.child_pids("receiver")]
    before = sum(p.memory_info().rss for p in receivers)
    socks = open_idle(d, IDLE)
    try:
        # Every connection is answered: 220 while under the per-IP limit, 421 beyond it.
        replies = read_first_lines(socks, timeout=120)
        codes = [r[:3] for r in replies.values()]
        assert b"" not in codes, "a connection was dropped without a reply"
        assert set(codes) <= {b"220", b"421"}
        # 200 connections per source address; the limit is 80 per address per receiver, and
        # two receivers share the listening socket: 80 to 160 accepted per source, the rest 421.
        per_source = IDLE // len(SOURCES)
        assert 80 * len(SOURCES) <= codes.count(b"220") <= 160 * len(SOURCES)
        assert codes.count(b"421") >= (per_source - 160) * len(SOURCES)
        # A new client from a fresh address is still served while the flood holds.
        fresh = socket.create_connection(d.address, timeout=20, source_address=("127.0.0.200", 0))
        assert greeting(fresh).startswith(b"220")
        fresh.sendall(b"EHLO fresh\r\n")
        assert fresh.recv(4096).startswith(b"250")
        fresh.close()
        after = sum(p.memory_info().rss for p in receivers)
        grown = (after - before) / 2**20
        print(f"receivers' RSS grew by {grown:.1f} MiB for {IDLE} connections")
        assert grown < 400, f"receivers grew by {grown:.0f} MiB"
        assert all(p.is_running() for p in receivers), "a receiver died under the flood"
    finally:
        for s in socks:
            s.close()


def test_slowloris_is_cut_by_the_command_timeout(daemon_factory: Any) -> None:
    d: EmpathDaemon = daemon_factory({"smtp": {"timeouts": {"command": "2s"}}})
    s = socket.create_connection(d.address, timeout=10)
    assert greeting(s).startswith(b"220")
    started = time.monotonic()
    cut = None
    for ch in b"EHLO slow.example.org and a very long tail of arguments\r\n":
        try:
            s.sendall(bytes([ch]))
        except OSError:
            cut = time.monotonic() - started
            break
        r, _, _ = select.select([s], [], [], 0.3)
        if r:
            data = s.recv(512)
            assert data.startswith(b"421 4.4.2") or data == b"", data
            cut = time.monotonic() - started
            break
    assert cut is not None, "a byte-at-a-time client was never cut"
    assert cut < 6, f"cut after {cut:.1f}s, the command timeout is 2s"


def at_data(d: EmpathDaemon) -> tuple[socket.socket, Any]:
    """A raw connection whose transaction has just been answered 354."""
    s = socket.create_connection(d.address, timeout=10)
    f = s.makefile("rb")
    assert f.readline().startswith(b"220")
    s.sendall(b"HELO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
    for _ in range(3):
        f.readline()
    assert f.readline().startswith(b"354")
    return s, f


def test_stalled_data_is_cut_by_the_data_block_timeout(daemon_factory: Any) -> None:
    d: EmpathDaemon = daemon_factory({"smtp": {"timeouts": {"data_block": "2s",
                                                            "data_init": "2s"}}})
    s, f = at_data(d)
    s.sendall(b"Subject: stalled\r\n\r\npart of a body")
    started = time.monotonic()
    line = f.readline()
    assert line.startswith(b"421 4.4.2"), line
    assert 1.5 < time.monotonic() - started < 6
    spool_tmp = d.spool_path / "tmp"
    assert not any(spool_tmp.iterdir()), "the unfinished message left a file behind"


def test_silence_after_354_is_cut_by_the_data_init_timeout(daemon_factory: Any) -> None:
    d: EmpathDaemon = daemon_factory({"smtp": {"timeouts": {"data_init": "1s",
                                                            "data_block": "60s"}}})
    s, f = at_data(d)
    started = time.monotonic()
    line = f.readline()  # nothing sent: data_init (1s), not data_block (60s), applies
    assert line.startswith(b"421 4.4.2") and b"timeout exceeded" in line, line
    assert 0.8 < time.monotonic() - started < 6
    s.close()


def test_busy_connection_is_cut_at_the_end_of_its_lifetime(daemon_factory: Any) -> None:
    d: EmpathDaemon = daemon_factory({"smtp": {"timeouts": {"connection": "2s"}}})
    s = socket.create_connection(d.address, timeout=10)
    f = s.makefile("rb")
    started = time.monotonic()
    assert f.readline().startswith(b"220")
    s.sendall(b"EHLO c\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    last = b""
    for _ in range(40):  # a NOOP every 0.25 s keeps every other timeout from firing
        try:
            s.sendall(b"NOOP\r\n")
        except OSError:
            break
        last = f.readline()
        if not last.startswith(b"250"):
            break
        time.sleep(0.25)
    assert last.startswith(b"421 4.4.2") and b"connection time limit exceeded" in last, last
    assert 1.8 < time.monotonic() - started < 8
    s.close()
