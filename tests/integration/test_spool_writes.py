"""The receivers' spool write path through the real daemon: large messages spilled to disk
(arriving in small pieces, or signed with DKIM after they were spilled), and power cuts
simulated on the one-flush slot path (EMPATH_SPOOL_FAULT, see empath/spool/writer.py): an
acknowledged message is complete after the crash, one never acknowledged is not there."""

from __future__ import annotations

import collections
import os
import smtplib
import socket
import time
from pathlib import Path
from typing import Any

import dkim
import pytest

from empath.spool import Spool, read_data, read_queue_file
from empath.spool.ids import shard_of
from empath.spool.slots import SLOTS_BATCH
from tests.integration.test_dkim import dns_txt, keygen
from tests.integration.test_observability import ctl
from tests.support.daemon import EmpathDaemon
from tests.support.dnsserver import DNSServer

# 1536 lines of 200 octets: 300 KiB, past the 256 KiB spill threshold
BODY = b"".join(b"%0198d\r\n" % i for i in range(1536))
HEAD = (b"From: Alice <alice@example.org>\r\nTo: bob@far.example\r\nSubject: large\r\n"
        b"Date: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <big@example.org>\r\n\r\n")
STATES = ("incoming", "deferred", "hold", "failed", "corrupt")


def frozen(daemon_factory: Any, overrides: dict[str, Any] | None = None,
           env: dict[str, str] | None = None) -> EmpathDaemon:
    d: EmpathDaemon = daemon_factory(overrides, start=False)
    Spool(str(d.spool_path)).create_tree()
    Spool(str(d.spool_path)).set_frozen(True)
    d.start(env=env)
    return d


def power_cut(d: EmpathDaemon) -> None:
    """kill -9 of every process of the daemon; then it can be started again."""
    d.kill()
    d.proc = None


def queued(d: EmpathDaemon) -> list[tuple[str, bytes]]:
    """(state, data) of every message in the queue."""
    spool = Spool(str(d.spool_path))
    out = []
    for state in STATES:
        for mid in spool.list_ids(state):
            out.append((state, read_data(read_queue_file(spool.path(state, mid))[1])))
    return out


def reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def test_message_arriving_in_200_byte_writes_is_stored(daemon_factory: Any) -> None:
    """More than 1,024 pieces before the spill: once answered 451 every time (one writev of
    every piece, EINVAL)."""
    d = frozen(daemon_factory)
    with socket.create_connection(d.address, timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert reply(sock).startswith(b"220")
        for command in (b"EHLO client.example", b"MAIL FROM:<a@example.org>",
                        b"RCPT TO:<b@localhost>", b"DATA"):
            sock.sendall(command + b"\r\n")
            answer = reply(sock)
            assert answer[:1] in (b"2", b"3"), (command, answer)
        message = HEAD + BODY
        for i in range(0, len(message), 200):
            sock.sendall(message[i:i + 200])
            time.sleep(0.0005)  # one read per piece on the receiver's side
        sock.sendall(b".\r\n")
        answer = reply(sock)
        assert answer.startswith(b"250"), answer
        sock.sendall(b"QUIT\r\n")
    [(state, data)] = queued(d)
    assert state == "incoming" and data.endswith(HEAD + BODY)


def test_large_message_from_a_trusted_client_is_signed(daemon_factory: Any,
                                                        tmp_path: Path) -> None:
    """A spilled message is read back for its DKIM signature: once EBADF (the file was opened
    write-only) and 451 for every such message."""
    key, txt = keygen(tmp_path, "rsa-sha256", "big")
    d = frozen(daemon_factory, {"dkim": {"domains": {"example.org": {
        "selector": "big", "key": key}}}})
    with d.smtp(timeout=30) as s:  # 127.0.0.1 is in mynetworks: a trusted client
        assert s.sendmail("alice@example.org", ["bob@far.example"], HEAD + BODY) == {}
    [(_, data)] = queued(d)
    assert data.startswith(b"DKIM-Signature: ") and data.endswith(HEAD + BODY)
    with DNSServer({"big._domainkey.example.org": {"TXT": [txt]}}) as server:
        assert dkim.verify(data, dnsfunc=dns_txt(server))


def slots_ready(d: EmpathDaemon) -> None:
    """Wait until every receiver has slots ready (else a message takes the tmp/ path): more
    than one batch (SLOTS_BATCH) of files, as a batch is handed out only after its fsync, and
    the next is begun only after that."""
    slots = d.spool_path / "slots"

    def ready() -> bool:
        owners = collections.Counter(name.partition("-")[0] for name in os.listdir(slots))
        pids = d.child_pids("receiver")
        return bool(pids) and all(owners[str(pid)] > SLOTS_BATCH for pid in pids)

    d.wait_for(ready, 20, message="every receiver to have slots")


def test_power_cut_after_the_flush_keeps_the_acknowledged_message(daemon_factory: Any) -> None:
    """The 250 follows the file's fdatasync; the link into incoming/ is not flushed. A power
    cut that loses that link (the fault removes it and keeps the slot's name), kill -9 of
    every process, and a start as after a restart of the machine: the message is in the
    queue, complete, once."""
    d = frozen(daemon_factory, env={"EMPATH_SPOOL_FAULT": "lose-link"})
    slots_ready(d)
    message = HEAD + b"acknowledged before the power cut\r\n"
    with d.smtp() as s:
        assert s.sendmail("alice@example.org", ["bob@localhost"], message) == {}
    assert queued(d) == []  # acknowledged, and only in its slot
    power_cut(d)
    d.start(env={"EMPATH_SPOOL_FAULT": "reboot"})
    d.wait_for(lambda: queued(d), 20, message="the message to be recovered")
    [(state, data)] = queued(d)
    assert state == "incoming" and data.endswith(message)
    assert "recovered from its slot" in d.log_text()


def test_power_cut_during_the_write_leaves_no_message(daemon_factory: Any) -> None:
    """A power cut before the flush completes: the file's size and tail may be on disk with a
    data block missing (the fault writes it so, then kills every process of the daemon before
    any 250). After a start as after a restart of the machine the client has had no 250 and
    the queue has no message: the slot's check refuses the torn file."""
    d = frozen(daemon_factory, env={"EMPATH_SPOOL_FAULT": "torn"})
    slots_ready(d)
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)), d.smtp() as s:
        s.sendmail("alice@example.org", ["bob@localhost"], HEAD + BODY[:20000])
    assert d.proc is not None and d.proc.wait(10) != 0
    torn = [n for n in os.listdir(d.spool_path / "slots")
            if (d.spool_path / "slots" / n).stat().st_size > 20000]
    assert len(torn) == 1  # the size and the tail were written
    power_cut(d)
    d.start(env={"EMPATH_SPOOL_FAULT": "reboot"})
    d.wait_settled()
    assert queued(d) == []
    assert "recovered from its slot" not in d.log_text()
    assert torn[0] not in os.listdir(d.spool_path / "slots")


def test_kill_9_of_the_daemon_requeues_nothing_from_slots(daemon_factory: Any) -> None:
    """The machine stays up: every message whose 250 was sent is in incoming/ (the slot only
    a second name, maybe not yet removed), and after kill -9 and a start each is there once."""
    d = frozen(daemon_factory)
    slots_ready(d)
    with d.smtp() as s:
        for i in range(20):
            assert s.sendmail("alice@example.org", ["bob@localhost"],
                              HEAD + b"message %d\r\n" % i) == {}
    power_cut(d)
    d.start()
    d.wait_settled()
    bodies = sorted(data.rpartition(b"\r\n\r\n")[2] for _, data in queued(d))
    assert bodies == sorted(b"message %d\r\n" % i for i in range(20))
    assert all(state == "incoming" for state, _ in queued(d))


def test_receivers_wake_no_worker_while_delivery_is_frozen(daemon_factory: Any) -> None:
    """A receipt wakes every delivery worker (a datagram to control/wake/<pid>), unless the
    queue is frozen: then nobody would deliver, and a wake-up per message only costs the
    workers CPU. ``empathctl queue unfreeze`` wakes them itself."""
    d: EmpathDaemon = daemon_factory()
    spool = Spool(str(d.spool_path))
    ear = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # stands in for a worker
    ear.bind(spool.wake_socket_path(os.getpid()))
    ear.settimeout(1.0)
    body = b"Subject: x\r\n\r\nbody\r\n"

    def woken(within: float) -> list[bytes]:
        got: list[bytes] = []
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                got.append(ear.recv(16))
            except TimeoutError:
                pass
        return got

    try:
        time.sleep(2.5)  # past the receivers' re-read of the list of worker sockets
        with d.smtp() as s:
            s.sendmail("a@example.org", ["alice@localhost"], body)
        assert b"!" in woken(3.0)  # a thawed queue: woken for new mail
        spool.set_frozen(True)
        time.sleep(0.5)  # past the receivers' trust in their last look at the flag
        with d.smtp() as s:
            for _ in range(3):
                s.sendmail("a@example.org", ["alice@localhost"], body)
        assert woken(1.5) == []
        assert len(spool.list_ids("incoming")) == 3  # received all the same
        assert ctl(d, "queue", "unfreeze").returncode == 0
        assert woken(3.0)  # by empathctl
        d.wait_for(lambda: spool.list_ids("incoming") == [], 20, "delivery after unfreeze")
    finally:
        ear.close()


@pytest.mark.parametrize("sync", ["file", "filesystem"])
def test_receivers_wake_only_the_worker_of_each_messages_share(daemon_factory: Any,
                                                               sync: str) -> None:
    """Worker i of n takes the messages whose id falls in its share; a receiver wakes that
    worker only (control/wake/<pid>.<i>.<n>), so the others do not list incoming/ for mail
    they will leave there. Two sockets stand in for the workers of shares 0 and 1 of 2. With
    ``spool.sync: filesystem`` (no slots: every message through tmp/ and a rename) too."""
    d: EmpathDaemon = daemon_factory({"spool": {"sync": sync}})
    spool = Spool(str(d.spool_path))
    ears = []
    wake_dir = os.open(spool.wake_dir, os.O_PATH | os.O_DIRECTORY)
    for share in range(2):
        ear = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = os.path.basename(spool.wake_socket_path(os.getpid(), (share, 2)))
        ear.bind(f"/proc/self/fd/{wake_dir}/{name}")  # a deep tmp_path passes sun_path
        ear.settimeout(0.5)
        ears.append(ear)
    os.close(wake_dir)

    def heard(ear: socket.socket) -> bool:
        try:
            ear.recv(16)
        except TimeoutError:
            return False
        while True:  # several wake-ups queued are one
            ear.settimeout(0.05)
            try:
                ear.recv(16)
            except TimeoutError:
                ear.settimeout(0.5)
                return True

    body = b"Subject: x\r\n\r\nbody\r\n"
    shares_seen = set()
    try:
        # No wait: binding changed control/wake/, and the receivers read the list again.
        with d.smtp() as s:
            s.ehlo()
            for _ in range(12):
                assert s.mail("a@example.org")[0] == 250
                assert s.rcpt("alice@localhost")[0] == 250
                code, text = s.data(body)
                assert code == 250
                queue_id = text.decode().rsplit(" ", 1)[1]
                share = shard_of(queue_id, 2)
                shares_seen.add(share)
                assert [heard(ear) for ear in ears] == [i == share for i in range(2)], \
                    queue_id
        assert shares_seen == {0, 1}  # 12 ids all of one share: 1 in 2048
    finally:
        for ear in ears:
            ear.close()
