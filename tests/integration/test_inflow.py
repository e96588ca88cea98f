"""In-flow control through the real daemon (empath/smtp/inflow.py, Postfix's in_flow_delay):
while more than ``smtp.in_flow_backlog`` messages wait unclaimed in incoming/, a MAIL FROM is
answered only once the backlog drops, or after ``smtp.in_flow_delay`` at the latest; a message
already past MAIL FROM is not held."""

from __future__ import annotations

import socket
import time
from typing import Any

from empath.spool import Spool
from tests.integration.test_observability import ctl
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
