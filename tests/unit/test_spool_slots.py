"""Slots: the receive path whose 250 waits for one flush (the file's fdatasync), and the
recovery that tells, after a restart of the machine, a complete message in a slot from
whatever a power cut left there."""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from pathlib import Path

import pytest

from empath.spool import Spool, fileformat, new_message_id, read_data, read_queue_file
from empath.spool import slots as slots_module
from empath.spool import writer as writer_module
from empath.spool.slots import (
    CHECK_KEY,
    SLOTS_HIGH,
    SLOTS_LOW,
    SLOTS_MAX,
    SlotPool,
    boot_tag,
    check_slot,
    forget_recycled_after_restart,
    recover_slots,
    slot_seed,
)
from tests.unit.test_spool import slots_ready

EARLIER = "0123456789ab"  # the boot tag of a machine that has restarted since


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    sp = Spool(str(tmp_path / "spool"), 100)
    sp.create_tree()
    return sp


def slots_dir(spool: Spool) -> str:
    return os.path.join(spool.root, "slots")


def slot_file(spool: Spool, pid: int, data: bytes, *, boot: str = EARLIER,
              seed_name: str | None = None, zero_first_block: bool = False) -> tuple[str, str]:
    """A slot of writer ``pid`` holding ``data`` as a message, as the writer writes it
    (its check seeded with ``seed_name``, by default its own name); (path, message id)."""
    mid = new_message_id()
    name = f"{pid}-{boot}-{new_message_id()}"
    check = zlib.crc32(data, slot_seed(seed_name or name))
    tail = fileformat.encode_tail({"id": mid, "sender": "", "recipients": [{"address": "a@x"}],
                                   "data_size": len(data), CHECK_KEY: check}, len(data))
    if zero_first_block:
        data = bytes(4096) + data[4096:]
    path = os.path.join(slots_dir(spool), name)
    with open(path, "wb") as fh:
        fh.write(data + tail)
    return path, mid


def test_a_slot_message_is_acknowledged_after_one_flush(spool: Spool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit fdatasyncs the file and fsyncs no directory: the slot's name was made
    durable before, by the slot thread's fsync of slots/, and it is removed only after an
    fsync of incoming/ that followed the message's link there."""
    from empath._speedups import spoolio_py

    events: list[tuple[str, str]] = []
    real_fdatasync, real_fsync, real_unlink = os.fdatasync, os.fsync, os.unlink

    def where(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    # the twins: their os.* calls are visible
    monkeypatch.setattr(writer_module, "store_file", spoolio_py.store)
    monkeypatch.setattr(writer_module, "StorePool", spoolio_py.StorePool)
    monkeypatch.setattr(slots_module, "sync_and_unlink", spoolio_py.sync_and_unlink)
    monkeypatch.setattr(slots_module, "make_slots", spoolio_py.make_slots)
    monkeypatch.setattr(os, "fdatasync", lambda fd: (events.append(("fdatasync", where(fd))),
                                                     real_fdatasync(fd))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", where(fd))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "unlink", lambda p: (events.append(("unlink", os.fsdecode(p))),
                                                 real_unlink(p))[1])

    async def go() -> tuple[str, list[tuple[str, str]], int]:
        writer = spool.open_receiver_writer(4)
        try:
            await slots_ready(writer)
            events.clear()
            msg = writer.begin(new_message_id())
            msg.write(b"Subject: x\r\n\r\nbody\r\n")
            await msg.commit({"id": msg.id, "sender": "", "recipients": [{"address": "a@x"}]})
            during = list(events)
            links = os.stat(spool.path("incoming", msg.id)).st_nlink
            return msg.id, during, links
        finally:
            writer.close()

    mid, during, links = asyncio.run(go())
    # The slot thread may be refilling meanwhile (its fsync of slots/ is its own, not the
    # commit's): of the flushes during the commit, one is of a file, the message's slot, and
    # none is of incoming/.
    [flush] = [e for e in during if e[0] in ("fdatasync", "fsync")
               and not os.path.isdir(e[1])]
    assert flush[0] == "fdatasync" and "/slots/" in flush[1]
    assert ("fsync", spool.state_dir("incoming")) not in during[:during.index(flush) + 1]
    assert links == 2  # the slot's name and incoming/<id>
    # Afterwards (by close at the latest): fsync of incoming/, then the slot's name removed.
    [slot_unlink] = [i for i, e in enumerate(events) if e[0] == "unlink" and flush[1] == e[1]]
    assert any(e == ("fsync", spool.state_dir("incoming")) for e in events[:slot_unlink])
    assert os.stat(spool.path("incoming", mid)).st_nlink == 1
    env, src = read_queue_file(spool.path("incoming", mid))
    assert read_data(src) == b"Subject: x\r\n\r\nbody\r\n" and isinstance(env[CHECK_KEY], int)


def test_after_a_restart_complete_slots_are_requeued_and_the_rest_removed(spool: Spool) -> None:
    data = b"Subject: kept\r\n\r\n" + b"line of the body\r\n" * 1000
    complete, kept = slot_file(spool, 999_999, data)
    torn, lost = slot_file(spool, 999_999, data, zero_first_block=True)
    # a recycled file's old message, complete, under a new slot's name
    stale, old = slot_file(spool, 999_999, data, seed_name=f"999999-{EARLIER}-{new_message_id()}")
    empty = os.path.join(slots_dir(spool), f"999999-{EARLIER}-{new_message_id()}")
    open(empty, "wb").close()
    # a complete message that also has its incoming/ name: the link was durable after all
    linked, twice = slot_file(spool, os.getpid(), data)  # an earlier boot: whatever the pid
    os.link(linked, spool.path("incoming", twice))

    assert check_slot(complete) is not None
    assert check_slot(torn) is None and check_slot(stale) is None and check_slot(empty) is None
    assert recover_slots(spool, lambda pid: False) == 1
    assert spool.list_ids("incoming") == sorted([kept, twice])
    assert read_data(read_queue_file(spool.path("incoming", kept))[1]) == data
    assert os.stat(spool.path("incoming", kept)).st_nlink == 1
    assert os.stat(spool.path("incoming", twice)).st_nlink == 1
    assert os.listdir(slots_dir(spool)) == []
    # nothing of an earlier boot is recycled: its link count may not be trusted
    assert os.listdir(spool.recycle) == []
    assert lost not in spool.list_ids("incoming") and old not in spool.list_ids("incoming")


def test_after_a_restart_a_recycled_slot_still_named_by_its_last_message(spool: Spool) -> None:
    """A message delivered soon after its receipt: its file recycled into a new slot and
    holding a new acknowledged message while the old slot's name was not yet removed. After a
    cut that lost the new message's link, the file has two slot names: the new one recovers
    the new message, the old one (its check fails for the new content) is removed."""
    data = b"Subject: new\r\n\r\nthe second message in this file\r\n"
    new, mid = slot_file(spool, 999_999, data)
    old = os.path.join(slots_dir(spool), f"999999-{EARLIER}-{new_message_id()}")
    os.link(new, old)
    assert recover_slots(spool, lambda pid: True) == 1
    assert spool.list_ids("incoming") == [mid] and os.listdir(slots_dir(spool)) == []
    assert read_data(read_queue_file(spool.path("incoming", mid))[1]) == data


def test_without_a_restart_a_slot_is_never_a_message(spool: Spool) -> None:
    """A dead receiver's slots on a machine that stayed up: a message whose store returned is
    linked into incoming/ (the slot is only a second name), one whose store did not was never
    acknowledged. Neither is put into the queue from its slot."""
    data = b"Subject: x\r\n\r\nx\r\n"
    unacknowledged, mid = slot_file(spool, 999_999, data, boot=boot_tag())
    linked, queued = slot_file(spool, 999_999, data, boot=boot_tag())
    os.link(linked, spool.path("incoming", queued))
    live, _ = slot_file(spool, os.getpid(), data, boot=boot_tag())
    assert recover_slots(spool, lambda pid: pid == 999_999) == 0
    assert spool.list_ids("incoming") == [queued]
    assert os.listdir(slots_dir(spool)) == [os.path.basename(live)]
    # the unacknowledged one (one name only) is recycled; the linked one only unlinked
    assert len(os.listdir(spool.recycle)) == 1
    assert os.stat(spool.path("incoming", queued)).st_nlink == 1
    assert mid not in spool.list_ids("incoming")


def test_start_up_recovery_takes_slots_of_an_earlier_boot(spool: Spool) -> None:
    _, mid = slot_file(spool, os.getpid(), b"Subject: x\r\n\r\nx\r\n")
    spool.recover_all(lambda pid: True)  # even a pid alive now: no process of then is
    assert spool.list_ids("incoming") == [mid]
    assert os.listdir(slots_dir(spool)) == []


def test_a_restart_of_the_machine_empties_recycle(spool: Spool) -> None:
    """After a power cut a recycled file may share its inode with a queued message."""
    open(os.path.join(spool.recycle, new_message_id()), "wb").close()
    assert forget_recycled_after_restart(spool) is True  # no boot recorded yet
    assert os.listdir(spool.recycle) == []
    open(os.path.join(spool.recycle, new_message_id()), "wb").close()
    assert forget_recycled_after_restart(spool) is False  # the same boot
    assert len(os.listdir(spool.recycle)) == 1
    with open(os.path.join(spool.control, "boot"), "w") as fh:
        fh.write(EARLIER + "\n")
    assert forget_recycled_after_restart(spool) is True
    assert os.listdir(spool.recycle) == []


def test_spilled_message_in_small_writes_with_a_header_added(spool: Spool,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """300 KiB in 200-byte writes (more buffers than one writev takes), spilled to its slot,
    then a header put on top after reading the spilled part back (as DKIM signing does): the
    file is the header and every byte, and its check proves it (the message left in its slot
    by the lose-link fault, as a power cut would leave it, and recovered after a "restart")."""
    monkeypatch.setattr(writer_module, "_FAULT", "lose-link")
    body = b"".join(b"%0198d\r\n" % i for i in range(1536))  # 1536 lines of 200 bytes
    seen: list[int] = []

    def header(whole: bytes) -> bytes:
        seen.append(len(whole))
        return b"X-Signed: %d\r\n" % zlib.crc32(whole)

    async def go() -> str:
        writer = spool.open_receiver_writer(4)
        try:
            await slots_ready(writer)
            msg = writer.begin(new_message_id())
            for i in range(0, len(body), 200):
                msg.write(body[i:i + 200])
            await msg.add_header(header)
            await msg.commit({"id": msg.id, "sender": "", "recipients": [{"address": "a@x"}]})
            return msg.id
        finally:
            writer.close()

    mid = asyncio.run(go())
    assert seen == [len(body)]
    assert spool.list_ids("incoming") == []  # the link was "lost"
    [name] = [n for n in os.listdir(slots_dir(spool))
              if check_slot(os.path.join(slots_dir(spool), n)) is not None]
    assert name.startswith(f"{os.getpid()}-{boot_tag()}-")
    monkeypatch.setattr(slots_module, "_BOOT", EARLIER)  # the machine restarted
    assert recover_slots(spool, lambda pid: True) == 1
    data = read_data(read_queue_file(spool.path("incoming", mid))[1])
    assert data == b"X-Signed: %d\r\n" % zlib.crc32(body) + body


def test_a_pool_that_runs_dry_grows_up_to_its_limit(spool: Spool) -> None:
    """A message that finds no ready slot takes the slower path; each such miss doubles the
    pool (up to SLOTS_MAX), which the slot thread then fills."""
    pool = SlotPool(spool)
    deadline = time.monotonic() + 60

    def filled() -> None:
        while pool.ready() < pool.high and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.ready() == pool.high

    try:
        assert (pool.low, pool.high) == (SLOTS_LOW, SLOTS_HIGH)
        sizes = []
        while len(sizes) < 4:
            filled()  # the thread is idle: nothing is added behind the test's back
            pool._ready.clear()  # as if a burst had taken every ready slot
            assert pool.take() is None
            sizes.append(pool.high)
        assert sizes == [min(SLOTS_HIGH * 2 ** (i + 1), SLOTS_MAX) for i in range(4)]
        assert pool.low == SLOTS_MAX // 2 and pool.batch == SLOTS_MAX // 4
        filled()  # the thread filled the grown pool
    finally:
        pool.close()


def test_the_slot_thread_flushes_in_batches_not_at_every_wake(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch of slots costs an fsync(slots/), each removal of linked names an
    fsync(incoming/): both commit the filesystem's journal, and a store's fdatasync that runs
    into a commit waits for it. So the thread makes slots only once fewer than ``low`` are
    ready (not a top-up at each wake) and removes linked names at most every
    UNLINK_INTERVAL, though it wakes every 10 ms."""
    makes: list[int] = []
    syncs: list[int] = []
    real_make, real_sync = slots_module.make_slots, slots_module.sync_and_unlink

    def make(dir_fd: int, names: list[bytes], sources: list[bytes]) -> None:
        makes.append(len(names))
        real_make(dir_fd, names, sources)

    def sync(fd: int, names: list[bytes]) -> None:
        syncs.append(len(names))
        real_sync(fd, names)

    monkeypatch.setattr(slots_module, "make_slots", make)
    monkeypatch.setattr(slots_module, "sync_and_unlink", sync)

    def ready(count: int) -> bool:
        deadline = time.monotonic() + 10
        while pool.ready() != count and time.monotonic() < deadline:
            time.sleep(0.005)
        return pool.ready() == count

    pool = SlotPool(spool, low=8, high=16, batch=16, interval=0.01)
    try:
        assert ready(16)
        before = len(makes)
        taken = []
        for _ in range(8):  # down to 8 ready: not below low, nothing made
            slot = pool.take()
            assert slot is not None
            taken.append(slot)
            time.sleep(0.02)  # the thread wakes meanwhile
        assert len(makes) == before and pool.ready() == 8
        taken.append(pool.take())  # 7 ready: one batch, back to 16
        assert ready(16) and len(makes) == before + 1
        for slot in taken:
            assert slot is not None
            os.link(slot, os.path.join(spool.state_dir("incoming"), new_message_id()))
            pool.linked(slot)
        started = time.monotonic()
        while any(os.path.exists(os.fsdecode(s)) for s in taken):
            assert time.monotonic() - started < 5
            time.sleep(0.01)
        time.sleep(0.3)
        # The nine names went in one or two removals, never one per wake (40 wakes here).
        assert sum(syncs) == 9 and len(syncs) <= 3
    finally:
        pool.close()
