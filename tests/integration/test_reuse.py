"""The spool and delivery paths that save work per message, through the real daemon: a
delivered message's file goes to recycle/ and the next message received is written into that
same inode (nothing of the old content left) and delivered intact (on the tmp/ path; with slots
the inode comes back as a slot, and nothing old reaches a delivered message) (with
``spool.recycle_files: 0`` nothing is kept); ``spool.sync: filesystem`` receives and delivers;
a delivery connection is reused for the next message."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from empath.spool import Spool, read_data, read_queue_file
from empath.spool.layout import RELIST_INTERVAL
from empath.spool.wake import Waker
from tests.support.daemon import EmpathDaemon

SENDER = "a@example.org"


def maildir_files(d: EmpathDaemon, user: str) -> list[Path]:
    new = d.dir / "mail" / user / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def send(d: EmpathDaemon, rcpt: str, body: bytes) -> None:
    """One message on its own SMTP connection."""
    with d.smtp() as s:
        assert s.sendmail(SENDER, [rcpt], body) == {}


def test_delivered_file_is_recycled_and_overwritten_by_the_next_message(
        daemon_factory: Any) -> None:
    # The tmp/ write path (with slots, the default, a recycled file becomes a slot: below).
    d: EmpathDaemon = daemon_factory({"spool": {"sync": "filesystem"}})
    spool = Spool(str(d.spool_path))
    first = b"Subject: first\r\n\r\n" + b"the first message, longer than the next.\r\n" * 200
    send(d, "alice@localhost", first)
    d.wait_for(lambda: len(maildir_files(d, "alice")) == 1, 20, "the first delivery")
    d.wait_for(lambda: len(os.listdir(spool.recycle)) == 1, 10, "the file in recycle/")
    [recycled] = os.listdir(spool.recycle)
    inode = os.stat(os.path.join(spool.recycle, recycled)).st_ino
    # A receiver that found recycle/ empty looks again only RELIST_INTERVAL later.
    time.sleep(2 * RELIST_INTERVAL)

    spool.set_frozen(True)  # keep the next message in incoming/ to look at it
    second = b"Subject: second\r\n\r\nshort\r\n"
    send(d, "bob@localhost", second)
    [mid] = spool.list_ids("incoming")
    path = spool.path("incoming", mid)
    assert os.stat(path).st_ino == inode
    assert os.listdir(spool.recycle) == []
    env, src = read_queue_file(path)
    assert env["recipients"][0]["address"] == "bob@localhost"
    assert read_data(src).endswith(second)
    assert b"the first message" not in open(path, "rb").read()

    spool.set_frozen(False)
    waker = Waker(spool)  # what `empathctl queue unfreeze` does after removing the flag
    waker.wake()
    waker.close()
    d.wait_for(lambda: len(maildir_files(d, "bob")) == 1, 20, "the second delivery")
    delivered = maildir_files(d, "bob")[0].read_bytes()
    assert delivered.endswith(second) and b"the first message" not in delivered


@pytest.mark.parametrize("lines", [200, 3000])  # about 9 kB, and 130 kB (emptied first)
def test_delivered_file_becomes_a_slot_and_holds_no_stale_message(
        daemon_factory: Any, lines: int) -> None:
    """With slots (``spool.sync: file``), a receiver's slot thread takes recycled files as the
    slots it prepares: the delivered message's inode comes back as a slot, and the messages
    written into slots afterwards carry nothing of the old content. A message over 64 KiB
    comes back too, its file emptied in recycle/."""
    d: EmpathDaemon = daemon_factory()
    spool = Spool(str(d.spool_path))
    slots = os.path.join(spool.root, "slots")
    spool.set_frozen(True)
    first = b"Subject: first\r\n\r\n" + b"the first message, longer than the next.\r\n" * lines
    send(d, "alice@localhost", first)
    [mid] = spool.list_ids("incoming")
    inode = os.stat(spool.path("incoming", mid)).st_ino
    spool.set_frozen(False)
    waker = Waker(spool)
    waker.wake()
    d.wait_for(lambda: len(maildir_files(d, "alice")) == 1, 20, "the first delivery")

    def reused() -> bool:
        names = [os.path.join(slots, n) for n in os.listdir(slots)]
        names += [os.path.join(spool.recycle, n) for n in os.listdir(spool.recycle)]
        return any(os.stat(n).st_ino == inode for n in names if os.path.exists(n))

    # Into recycle/, and from there the slot threads take it (either place is reuse).
    d.wait_for(reused, 10, "the delivered file's inode in recycle/ or slots/")
    for i in range(5):
        send(d, "bob@localhost", f"Subject: second {i}\r\n\r\nshort\r\n".encode())
    d.wait_for(lambda: len(maildir_files(d, "bob")) == 5, 20, "the next deliveries")
    for delivered in maildir_files(d, "bob"):
        assert b"the first message" not in delivered.read_bytes()
    waker.close()


def test_recycling_off_keeps_nothing(daemon_factory: Any) -> None:
    d: EmpathDaemon = daemon_factory({"spool": {"recycle_files": 0}})
    spool = Spool(str(d.spool_path))
    for i in range(3):
        send(d, "carol@localhost", f"Subject: {i}\r\n\r\nbody\r\n".encode())
    d.wait_for(lambda: len(maildir_files(d, "carol")) == 3, 20, "three deliveries")
    d.wait_for(lambda: spool.list_ids("incoming") == [] and not spool.list_active(), 10,
               "an empty queue")
    assert os.listdir(spool.recycle) == []


def test_filesystem_sync_mode_receives_and_delivers(daemon_factory: Any) -> None:
    d: EmpathDaemon = daemon_factory({"spool": {"sync": "filesystem"}})
    bodies = [f"Subject: {i}\r\n\r\nbody {i}\r\n".encode() for i in range(5)]
    with d.smtp() as s:
        for body in bodies:
            assert s.sendmail(SENDER, ["dave@localhost"], body) == {}
    d.wait_for(lambda: len(maildir_files(d, "dave")) == 5, 20, "five deliveries")
    delivered = sorted(p.read_bytes() for p in maildir_files(d, "dave"))
    assert all(any(m.endswith(b) for m in delivered) for b in bodies)


def test_delivery_connection_is_reused_for_the_next_message(daemon_factory: Any) -> None:
    from tests.support.sink import Behaviour, SinkServer

    sink = SinkServer(Behaviour()).start()
    try:
        d: EmpathDaemon = daemon_factory({
            "processes": {"delivery": 1}, "relay_domains": ["example.net"],
            "delivery": {"smarthost": f"127.0.0.1:{sink.port}",
                         "tls": {"default_policy": "disabled"},
                         "connection_reuse": {"max_idle": "30s", "max_messages": 3}}})
        for i in range(5):
            send(d, f"ann{i}@example.net", f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())
            sink.wait_for_messages(i + 1, timeout=20)
        # Five messages, one after the other: two connections (max_messages 3), each with one
        # EHLO (RSET between transactions only after a pause: tests/integration/test_remote.py).
        verbs = [s.verbs() for s in sink.sessions]
        assert len(verbs) == 2, verbs
        assert [v.count("MAIL") for v in verbs] == [3, 2]
        assert [v.count("EHLO") for v in verbs] == [1, 1]
    finally:
        sink.stop()
