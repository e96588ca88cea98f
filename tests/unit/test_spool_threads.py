"""The spool's thread pool and its group commit: every call submitted with ``sync_dir`` is
answered only after a directory fsync that began after the call returned; fsyncs are shared
by batches; a failed fsync fails its whole batch and the writer takes those messages back."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
import time
from pathlib import Path

import pytest

from empath.spool import Spool, SpoolError, new_message_id
from empath.spool import threads as threads_module
from empath.spool.threads import SpoolThreads


def test_each_answer_follows_an_fsync_that_began_after_its_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    finished: set[int] = set()
    covered: set[int] = set()
    fsyncs = []
    lock = threading.Lock()
    synced_calls = []

    def fake_fsync(fd: int) -> None:
        with lock:
            snapshot = set(finished)
        fsyncs.append(len(snapshot))
        time.sleep(0.003)  # a directory fsync takes a while: calls pile up meanwhile
        with lock:
            covered.update(snapshot)

    monkeypatch.setattr(threads_module.os, "fsync", fake_fsync)

    def call(n: int) -> int:
        time.sleep(random.random() / 1000)
        with lock:
            finished.add(n)
        return n * 2

    async def go() -> list[int]:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        pool = SpoolThreads(asyncio.get_running_loop(), 8, sync_fd=fd,
                            on_synced=lambda: synced_calls.append(1))

        async def one(n: int) -> int:
            result = await pool.submit(call, n, sync_dir=True)
            with lock:
                assert n in covered, f"call {n} answered before an fsync covered it"
            return int(result)

        try:
            return await asyncio.gather(*(one(n) for n in range(300)))
        finally:
            pool.shutdown()
            os.close(fd)

    assert asyncio.run(go()) == [n * 2 for n in range(300)]
    assert 1 <= len(fsyncs) < 300  # shared by batches
    assert len(synced_calls) == len(fsyncs)


def test_calls_without_sync_dir_are_answered_without_an_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsyncs = []
    monkeypatch.setattr(threads_module.os, "fsync", lambda fd: fsyncs.append(fd))

    async def go() -> list[int]:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        pool = SpoolThreads(asyncio.get_running_loop(), 4, sync_fd=fd)
        try:
            with pytest.raises(ZeroDivisionError):
                await pool.submit(lambda: 1 / 0, sync_dir=True)  # errors skip the fsync
            return list(await asyncio.gather(*(pool.submit(abs, -n) for n in range(50))))
        finally:
            pool.shutdown()
            os.close(fd)

    assert asyncio.run(go()) == list(range(50))
    assert fsyncs == []


def test_failed_directory_fsync_takes_the_messages_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(str(tmp_path / "spool"))
    spool.create_tree()

    def broken(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    # No slot can be made either (their directory fsync fails too): every message takes the
    # tmp/ path, whose rename waits for the group commit's fsync of incoming/.
    from empath.spool import slots as slots_module

    monkeypatch.setattr(slots_module, "make_slots", broken)
    monkeypatch.setattr(threads_module.os, "fsync", broken)

    async def go() -> list[BaseException | None]:
        writer = spool.open_receiver_writer(4)
        msgs = []
        for _ in range(5):
            msg = writer.begin(new_message_id())
            msg.write(b"Subject: x\r\n\r\nbody\r\n")
            msgs.append(msg)
        try:
            results = await asyncio.gather(
                *(m.commit({"id": m.id, "sender": "", "recipients": []}) for m in msgs),
                return_exceptions=True)
        finally:
            writer.close()
        return list(results)

    results = asyncio.run(go())
    assert all(isinstance(r, SpoolError) and r.errno == errno.EIO for r in results), results
    assert spool.list_ids("incoming") == [] and os.listdir(spool.tmp) == []


@pytest.mark.parametrize("mode", ["file", "filesystem"])
def test_sync_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """file: every message file is fdatasynced (and incoming/ fsynced per batch for those
    that found no slot ready: tests/unit/test_spool_slots.py has the slot path); filesystem:
    no fdatasync at all, one syncfs per batch instead."""
    from empath._speedups import spoolio_py
    from empath.spool import layout
    from empath.spool import writer as writer_module

    calls: list[str] = []
    real_fdatasync, real_fsync, real_syncfs = os.fdatasync, os.fsync, layout.syncfs
    monkeypatch.setattr(writer_module, "store_file", spoolio_py.store)  # os.* calls, visible
    monkeypatch.setattr(writer_module, "StorePool", spoolio_py.StorePool)
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append("fdatasync"),
                                                     real_fdatasync(fd))[1])
    monkeypatch.setattr(threads_module.os, "fsync", lambda fd: (calls.append("fsync"),
                                                                real_fsync(fd))[1])
    monkeypatch.setattr(writer_module, "syncfs", lambda fd: (calls.append("syncfs"),
                                                             real_syncfs(fd))[1])
    spool = Spool(str(tmp_path / "spool"), 0, mode)
    spool.create_tree()

    async def go() -> None:
        writer = spool.open_receiver_writer(4)
        msgs = [writer.begin(new_message_id()) for _ in range(10)]
        for m in msgs:
            m.write(b"Subject: x\r\n\r\nbody\r\n")
        try:
            await asyncio.gather(*(m.commit({"id": m.id, "sender": "", "recipients": []})
                                   for m in msgs))
        finally:
            writer.close()

    asyncio.run(go())
    assert len(spool.list_ids("incoming")) == 10
    if mode == "file":
        assert calls.count("fdatasync") == 10 and "syncfs" not in calls
        assert calls.count("fsync") <= 10
    else:
        assert "fdatasync" not in calls and "fsync" not in calls
        assert 1 <= calls.count("syncfs") <= 10


def test_syncfs_failure_is_an_oserror(tmp_path: Path) -> None:
    from empath.spool.layout import syncfs

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)  # a real one succeeds
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        syncfs(fd)  # closed descriptor
    assert info.value.errno == errno.EBADF
