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

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

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
