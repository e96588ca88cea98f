"""Slots: the receive path whose 250 waits for one flush (the file's fdatasync), and the
recovery that tells a complete message in a slot from whatever a power cut left there."""

from __future__ import annotations

import asyncio
import os
import zlib
from pathlib import Path

import pytest

from empath.spool import Spool, fileformat, new_message_id, read_data, read_queue_file
from empath.spool import writer as writer_module
from empath.spool.slots import CHECK_KEY, check_slot, recover_slots, slot_seed
from tests.unit.test_spool import slots_ready


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    sp = Spool(str(tmp_path / "spool"), 100)
    sp.create_tree()
    return sp


def slot_file(spool: Spool, pid: int, data: bytes, *, seed_name: str | None = None,
              zero_first_block: bool = False) -> tuple[str, str]:
    """A slot of writer ``pid`` holding ``data`` as a message, as the writer writes it
    (its check seeded with ``seed_name``, by default its own name); (path, message id)."""
    mid = new_message_id()
    name = f"{pid}-{new_message_id()}"
    check = zlib.crc32(data, slot_seed(seed_name or name))
    tail = fileformat.encode_tail({"id": mid, "sender": "", "recipients": [],
                                   "data_size": len(data), CHECK_KEY: check}, len(data))
    if zero_first_block:
        data = bytes(4096) + data[4096:]
    path = os.path.join(spool.root, "slots", name)
    with open(path, "wb") as fh:
        fh.write(data + tail)
    return path, mid


def test_a_slot_message_is_acknowledged_after_one_flush(spool: Spool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit fdatasyncs the file and fsyncs no directory: the slot's name was made
    durable before, by the slot thread's fsync of slots/."""
    from empath._speedups import spoolio_py

    flushes: list[tuple[str, str]] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync

    def where(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    monkeypatch.setattr(writer_module, "store_file", spoolio_py.store)  # os.* calls, visible
    monkeypatch.setattr(os, "fdatasync", lambda fd: (flushes.append(("fdatasync", where(fd))),
                                                     real_fdatasync(fd))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (flushes.append(("fsync", where(fd))),
                                                 real_fsync(fd))[1])

    async def go() -> tuple[str, int, list[tuple[str, str]]]:
        writer = spool.open_receiver_writer(4)
        try:
            await slots_ready(writer)
            assert writer.slots is not None
            slots_before = set(os.listdir(writer.slots.dir))
            flushes.clear()
            msg = writer.begin(new_message_id())
            msg.write(b"Subject: x\r\n\r\nbody\r\n")
            await msg.commit({"id": msg.id, "sender": "", "recipients": []})
            during = list(flushes)
            used = slots_before - set(os.listdir(writer.slots.dir))
            return msg.id, len(used), during
        finally:
            writer.close()

    mid, used, flushes_during = asyncio.run(go())
    file_flushes = [f for f in flushes_during if f[0] == "fdatasync"]
    assert len(file_flushes) == 1 and "/slots/" in file_flushes[0][1]
    assert not any(f[1].endswith("/incoming") for f in flushes_during), flushes_during
    assert used == 1
    env, src = read_queue_file(spool.path("incoming", mid))
    assert read_data(src) == b"Subject: x\r\n\r\nbody\r\n" and isinstance(env[CHECK_KEY], int)


def test_recovery_moves_complete_slots_and_recycles_the_rest(spool: Spool) -> None:
    data = b"Subject: kept\r\n\r\n" + b"line of the body\r\n" * 1000
    complete, kept = slot_file(spool, 999_999, data)
    torn, lost = slot_file(spool, 999_999, data, zero_first_block=True)
    # a recycled file's old message, complete, under a new slot's name
    stale, old = slot_file(spool, 999_999, data, seed_name="999999-" + new_message_id())
    empty = os.path.join(spool.root, "slots", f"999999-{new_message_id()}")
    open(empty, "wb").close()
    live, _ = slot_file(spool, os.getpid(), data)

    assert check_slot(complete) is not None
    assert check_slot(torn) is None and check_slot(stale) is None and check_slot(empty) is None
    moved = recover_slots(spool, lambda pid: pid == 999_999)
    assert moved == 1
    assert spool.list_ids("incoming") == [kept]
    assert read_data(read_queue_file(spool.path("incoming", kept))[1]) == data
    assert os.listdir(os.path.join(spool.root, "slots")) == [os.path.basename(live)]
    # the others went back to recycle/, to be overwritten by new messages
    assert len(os.listdir(spool.recycle)) == 3
    assert lost not in spool.list_ids("incoming") and old not in spool.list_ids("incoming")


def test_start_up_recovery_takes_slots_of_dead_writers(spool: Spool) -> None:
    _, mid = slot_file(spool, 999_999, b"Subject: x\r\n\r\nx\r\n")
    spool.recover_all(lambda pid: pid != 999_999)
    assert spool.list_ids("incoming") == [mid]
    assert os.listdir(os.path.join(spool.root, "slots")) == []


def test_a_slot_already_in_the_queue_is_not_delivered_twice(spool: Spool) -> None:
    path, mid = slot_file(spool, 999_999, b"Subject: x\r\n\r\nx\r\n")
    with open(path, "rb") as src, open(spool.path("deferred", mid), "wb") as dst:
        dst.write(src.read())
    assert recover_slots(spool, lambda pid: True) == 0
    assert spool.list_ids("incoming") == [] and spool.list_ids("deferred") == [mid]


def test_spilled_message_in_small_writes_with_a_header_added(spool: Spool,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """300 KiB in 200-byte writes (more buffers than one writev takes), spilled to its slot,
    then a header put on top after reading the spilled part back (as DKIM signing does): the
    file is the header and every byte, and its check proves it (the message left in its slot
    by the lose-rename fault, as a power cut would leave it)."""
    monkeypatch.setattr(writer_module, "_FAULT", "lose-rename")
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
            await msg.commit({"id": msg.id, "sender": "", "recipients": []})
            return msg.id
        finally:
            writer.close()

    mid = asyncio.run(go())
    assert seen == [len(body)]
    assert spool.list_ids("incoming") == []  # the rename was "lost"
    [name] = [n for n in os.listdir(os.path.join(spool.root, "slots"))
              if check_slot(os.path.join(spool.root, "slots", n)) is not None]
    assert recover_slots(spool, lambda pid: True) == 1
    data = read_data(read_queue_file(spool.path("incoming", mid))[1])
    assert data == b"X-Signed: %d\r\n" % zlib.crc32(body) + body
    assert name.startswith(f"{os.getpid()}-")
