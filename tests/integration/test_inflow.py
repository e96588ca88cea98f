"""In-flow control through the real daemon (empath/smtp/inflow.py, Postfix's in_flow_delay):
while more than ``smtp.in_flow_backlog`` messages wait unclaimed in incoming/, a MAIL FROM is
answered only once the backlog drops, or after ``smtp.in_flow_delay`` at the latest; a message
already past MAIL FROM is not held."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from empath.spool import Spool
from tests.integration.test_observability import ctl, scrape, value
from tests.integration.test_spool_writes import frozen
from tests.support.daemon import EmpathDaemon

BODY = b"Subject: x\r\n\r\nbody\r\n"


def frozen_with_backlog(daemon_factory: Any, delay: str) -> tuple[EmpathDaemon, Spool]:
    """A daemon with delivery frozen and three messages waiting: over a backlog limit of 2."""
    d = frozen(daemon_factory, {"smtp": {"in_flow_delay": delay, "in_flow_backlog": 2}})
    spool = Spool(str(d.spool_path))
    with d.smtp() as s:
        for _ in range(3):
            assert s.sendmail("a@example.org", ["alice@localhost"], BODY) == {}
    assert len(spool.list_ids("incoming")) == 3
    time.sleep(0.3)  # past the receivers' next look at incoming/
    return d, spool


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def open_session(d: EmpathDaemon) -> socket.socket:
    sock = socket.create_connection(d.address, timeout=10)
    assert read_reply(sock).startswith(b"220")
    sock.sendall(b"EHLO client.test\r\n")
    while not read_reply(sock).split(b"\r\n")[-2].startswith(b"250 "):
        pass
    return sock


def test_mail_from_waits_while_delivery_is_behind_and_goes_on_when_it_catches_up(
        daemon_factory: Any) -> None:
    d, spool = frozen_with_backlog(daemon_factory, "60s")
    sock = open_session(d)
    try:
        sock.sendall(b"MAIL FROM:<b@example.org>\r\n")
        sock.settimeout(1.5)
        try:
            early = sock.recv(4096)
        except TimeoutError:
            early = b""
        assert early == b""  # held: three messages wait, the limit is two
        sock.settimeout(30)
        assert ctl(d, "queue", "unfreeze").returncode == 0  # delivery catches up
        assert read_reply(sock).startswith(b"250")
        assert len(spool.list_ids("incoming")) <= 2
        sock.sendall(b"RCPT TO:<alice@localhost>\r\n")
        assert read_reply(sock).startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert read_reply(sock).startswith(b"354")
        sock.sendall(BODY + b".\r\n")
        assert read_reply(sock).startswith(b"250")
    finally:
        sock.close()


def test_mail_from_waits_at_most_the_delay_and_mail_is_still_accepted(
        daemon_factory: Any) -> None:
    """Delivery stays frozen: after in_flow_delay the transaction goes on regardless, so
    mail is still accepted (slowly) however far behind delivery is."""
    d, spool = frozen_with_backlog(daemon_factory, "1s")
    with d.smtp(timeout=30) as s:
        assert s.sendmail("b@example.org", ["alice@localhost"], BODY) == {}
    assert len(spool.list_ids("incoming")) == 4  # still behind: the wait ended by its cap


# A module whose on_data hook keeps the receiver's event loop busy (a blocking call, as a slow
# module would): the other sessions' finished stores are settled late, as on a receiver whose
# CPU share cannot keep up with its sessions.
BUSY_MODULE = '''
import time


class Busy:
    def __init__(self, options):
        self.seconds = float(options.get("seconds", 0.03))

    def on_data(self, ctx, envelope):
        time.sleep(self.seconds)


def setup(options):
    return Busy(options)
'''


def busy_receiver(daemon_factory: Any, tmp_path: Any, lag: str,
                  block: float = 0.03) -> EmpathDaemon:
    """One receiver whose loop a module blocks for ``block`` seconds per message."""
    (tmp_path / "busy_mod.py").write_text(BUSY_MODULE)
    d: EmpathDaemon = daemon_factory({
        "processes": {"receivers": 1},
        "metrics": {"listen_addr": "127.0.0.1:0"},
        "smtp": {"modules": [{"name": "busy_mod", "options": {"seconds": block}}],
                 "in_flow_lag": lag,
                 "in_flow_delay": "5s"}}, start=False)
    return d.start(env={"PYTHONPATH": str(tmp_path)})


def send_concurrently(d: EmpathDaemon, sessions: int, each: int) -> list[str]:
    """``each`` messages over each of ``sessions`` connections at once; the errors."""
    errors: list[str] = []

    def one(n: int) -> None:
        try:
            with d.smtp(timeout=60) as s:
                for i in range(each):
                    body = f"Subject: busy {n}.{i}\r\n\r\nbody\r\n".encode()
                    refused = s.sendmail("a@example.org", ["alice@localhost"], body)
                    if refused:
                        errors.append(f"{n}.{i}: {refused}")
        except Exception as exc:  # reported, and asserted empty below
            errors.append(f"{n}: {exc!r}")

    threads = [threading.Thread(target=one, args=(n,)) for n in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def waited_for_some(d: EmpathDaemon, received: int) -> None:
    """Once the metrics count the ``received`` messages (a child hands its counters over
    every quarter of a second), some MAIL FROM has waited."""
    seen: list[tuple[float, float]] = []

    def check() -> bool:
        m = scrape(d)
        seen.append((value(m, "empath_messages_received_total"),
                     value(m, "empath_smtp_in_flow_waits_total")))
        return seen[-1][0] == received and seen[-1][1] > 0

    try:
        d.wait_for(check, 10, f"{received} messages received, some after an in-flow wait")
    except TimeoutError as exc:
        raise AssertionError(f"(received, in-flow waits) last seen: {seen[-1:]}") from exc


def test_a_saturated_receiver_holds_new_transactions_at_mail_from(daemon_factory: Any,
                                                                   tmp_path: Any) -> None:
    """While the loop settles finished stores later than in_flow_lag, a new MAIL FROM waits for
    transactions under way to finish (counted as an in-flow wait); every message is still
    accepted, none refused or lost."""
    d = busy_receiver(daemon_factory, tmp_path, "1ms")
    assert send_concurrently(d, sessions=6, each=5) == []
    waited_for_some(d, received=30)


def test_with_in_flow_lag_off_a_busy_loop_holds_nothing(daemon_factory: Any,
                                                       tmp_path: Any) -> None:
    d = busy_receiver(daemon_factory, tmp_path, "0s")
    assert send_concurrently(d, sessions=6, each=5) == []
    assert value(scrape(d), "empath_smtp_in_flow_waits_total") == 0


def test_sessions_stalled_in_data_do_not_hold_the_others_back(daemon_factory: Any,
                                                              tmp_path: Any) -> None:
    """Six clients start a message and then send nothing (slow senders, or an attacker
    filling the receiver's messages under way) while the loop is late settling stores: the
    limit on messages under way comes down under them, yet the other sessions' MAIL FROMs
    still go on within milliseconds of a finished store or of an idle moment, not after
    in_flow_delay (5 s here, which a single MAIL FROM waiting it out exceeds). The module
    blocks the loop 30 ms per message and six sessions send at once: stores finish while it
    is blocked and are settled late, so the limit comes down, 0.1 per store, from the twelve
    under way to under the eleven that let the six sessions go on unheld."""
    d = busy_receiver(daemon_factory, tmp_path, "1ms")
    stalled = []
    try:
        for _ in range(6):
            sock = open_session(d)
            sock.settimeout(30)
            sock.sendall(b"MAIL FROM:<slow@example.org>\r\nRCPT TO:<alice@localhost>\r\n"
                         b"DATA\r\n")
            replies = b""
            while b"\r\n354" not in b"\r\n" + replies:
                replies += read_reply(sock)
            sock.sendall(b"Subject: slow\r\n\r\nstill typing")  # no end: under way
            stalled.append(sock)
        started = time.monotonic()
        assert send_concurrently(d, sessions=6, each=8) == []
        assert time.monotonic() - started < 5.0
        waited_for_some(d, received=48)  # the limit held some
    finally:
        for sock in stalled:
            sock.close()
