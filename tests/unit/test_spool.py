"""The spool: file format, group-committed writes, claims, rewrites and recovery."""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import os

import pytest

from empath.spool import (
    CorruptFile,
    Spool,
    WakeListener,
    id_time,
    is_valid_id,
    new_message_id,
    read_data,
    read_queue_file,
)


@pytest.fixture
def spool(tmp_path) -> Spool:
    sp = Spool(str(tmp_path / "spool"))
    sp.create_tree()
    return sp


async def slots_ready(writer) -> None:
    """Wait (at most 10 s) for the writer's first batch of slots."""
    for _ in range(1000):
        if writer.slots is None or writer.slots.ready():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no slot was made ready")


def store(spool: Spool, chunks: list[bytes], envelope: dict | None = None) -> str:
    async def go() -> str:
        writer = spool.open_receiver_writer()
        await slots_ready(writer)
        msg = writer.begin(new_message_id())
        for c in chunks:
            msg.write(c)
        env = {"id": msg.id, "sender": "a@example.org", "recipients": [{"address": "b@x"}]}
        env.update(envelope or {})
        await msg.commit(env)
        writer.close()
        return msg.id

    return asyncio.run(go())


def test_ids_sort_by_time_and_validate():
    a = new_message_id(1_700_000_000.0)
    b = new_message_id(1_700_000_000.5)
    assert a < b and len(a) == 26 and is_valid_id(a)
    assert abs(id_time(a) - 1_700_000_000.0) < 0.001
    assert not is_valid_id("../etc/passwd") and not is_valid_id(a.lower())


def test_ids_are_the_ulid_encoding_of_time_and_80_random_bits(monkeypatch):
    """Crockford base32 of (milliseconds << 80 | random), 26 digits: checked digit by digit
    against the plain definition, for many times and random parts."""
    import random

    from empath.spool import ids

    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

    def plain(ms: int, rnd: int) -> str:
        value, out = (ms << 80) | rnd, []
        for _ in range(26):
            out.append(alphabet[value & 31])
            value >>= 5
        return "".join(reversed(out))

    rng = random.Random(7)
    for _ in range(2000):
        ms = rng.choice([0, 1, 2**48 - 1, rng.randrange(2**48)])
        rnd = rng.choice([0, 2**80 - 1, rng.randrange(2**80)])
        monkeypatch.setattr(ids.os, "urandom", lambda n, rnd=rnd: rnd.to_bytes(n, "big"))
        monkeypatch.setattr(ids, "_last", (-1, "", 0))  # a millisecond of its own
        # 79 of the random bits: room to count up within the millisecond.
        assert ids.new_message_id((ms + 0.5) / 1000) == plain(ms, rnd >> 1)


def test_ids_of_one_millisecond_keep_the_order_they_were_made_in(monkeypatch):
    """A session's messages may come within one millisecond; their ids (and so their order in
    incoming/ when mtimes tie) must follow the order they arrived in, not random parts."""
    from empath.spool import ids

    made = [new_message_id(1_700_000_000.0004) for _ in range(500)]
    assert made == sorted(made) and len(set(made)) == 500
    assert {id_time(m) for m in made} == {1_700_000_000.0}
    later = new_message_id(1_700_000_000.0014)  # the next millisecond: random again
    assert later > made[-1]
    monkeypatch.setattr(ids, "_last", (-1, "", 0))
    first = [new_message_id(1_700_000_000.0004) for _ in range(2)]
    assert first[0][10:] != made[0][10:]  # a new random start, not a fixed sequence


def test_commit_makes_a_complete_file_in_incoming(spool):
    mid = store(spool, [b"Received: by test\r\n", b"Subject: hi\r\n\r\nbody\r\n"])
    assert spool.list_ids("incoming") == [mid]
    assert os.listdir(spool.tmp) == []
    env, src = read_queue_file(spool.path("incoming", mid))
    assert env["id"] == mid and env["data_size"] == src.length
    assert read_data(src) == b"Received: by test\r\nSubject: hi\r\n\r\nbody\r\n"
    assert os.stat(spool.path("incoming", mid)).st_mode & 0o777 == 0o600


def test_large_message_spills_and_round_trips(spool):
    chunk = bytes(range(256)) * 1024  # 256 KiB
    mid = store(spool, [chunk] * 5)
    _, src = read_queue_file(spool.path("incoming", mid))
    assert src.length == 5 * len(chunk)
    assert read_data(src) == chunk * 5


def test_many_concurrent_commits_are_all_durable(spool):
    async def go() -> list[str]:
        writer = spool.open_receiver_writer()

        async def one(i: int) -> str:
            msg = writer.begin(new_message_id())
            msg.write(b"m%d\r\n" % i)
            await msg.commit({"id": msg.id, "sender": "", "recipients": []})
            return msg.id

        ids = await asyncio.gather(*(one(i) for i in range(200)))
        writer.close()
        return list(ids)

    ids = asyncio.run(go())
    assert sorted(ids) == spool.list_ids("incoming")


@pytest.mark.parametrize("cut", [1, 10, 38, 60])
def test_truncated_file_is_corrupt(spool, cut):
    mid = store(spool, [b"Subject: x\r\n\r\nbody\r\n"])
    path = spool.path("incoming", mid)
    size = os.path.getsize(path)
    os.truncate(path, size - cut)
    with pytest.raises(CorruptFile):
        read_queue_file(path)


def test_garbage_file_is_corrupt(spool):
    path = os.path.join(spool.state_dir("incoming"), new_message_id())
    with open(path, "wb") as fh:
        fh.write(b"not a queue file at all, but long enough to have a trailer\n")
    with pytest.raises(CorruptFile):
        read_queue_file(path)


def _race(root: str, mid: str, q) -> None:  # runs in a child process
    spool = Spool(root)
    os.makedirs(spool.active_dir(os.getpid()), exist_ok=True)
    q.put(spool.claim(mid, "incoming", os.getpid()) is not None)


def test_claim_is_won_by_exactly_one_process(spool):
    mid = store(spool, [b"x\r\n"])
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = []
    for _ in range(4):
        p = ctx.Process(target=_race, args=(spool.root, mid, q))
        procs.append(p)
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    results = [q.get(timeout=5) for _ in procs]
    assert results.count(True) == 1
    assert spool.list_ids("incoming") == []
    assert len(spool.list_active()) == 1


def test_rewrite_replaces_envelope_keeps_data_and_sets_due_time(spool):
    mid = store(spool, [b"Subject: x\r\n\r\n" + b"y" * 100_000 + b"\r\n"])
    path = spool.path("incoming", mid)
    env, src = read_queue_file(path)
    before = read_data(src)
    env["recipients"][0]["status"] = "deferred"
    spool.rewrite(path, env, mtime=2_000_000_000.0)
    env2, src2 = read_queue_file(path)
    assert env2["recipients"][0]["status"] == "deferred"
    assert read_data(src2) == before
    assert os.stat(path).st_mtime == 2_000_000_000.0
    assert os.listdir(spool.tmp) == []


def test_recover_all_requeues_dead_slots_and_sweeps_tmp(spool):
    mid = store(spool, [b"x\r\n"])
    dead = 999_999_999  # beyond pid_max: never alive
    os.makedirs(spool.active_dir(dead))
    assert spool.claim(mid, "incoming", dead)
    with open(spool.tmp_path(new_message_id(), dead), "wb") as fh:
        fh.write(b"partial")
    live_tmp = spool.tmp_path(new_message_id())
    with open(live_tmp, "wb") as fh:
        fh.write(b"being written by us")
    moved = spool.recover_all(lambda pid: pid == os.getpid())
    assert moved == 1
    assert spool.list_ids("incoming") == [mid]
    assert os.listdir(spool.tmp) == [os.path.basename(live_tmp)]
    assert not os.path.exists(spool.active_dir(dead))


def test_sweep_tmp_removes_only_files_of_dead_writers(spool):
    dead, live = 999_999_998, os.getpid()
    for pid in (dead, live):
        with open(spool.tmp_path(new_message_id(), pid), "wb") as fh:
            fh.write(b"x")
    probe = os.path.join(spool.tmp, f".health-{live}")
    open(probe, "wb").close()
    assert spool.sweep_tmp(lambda pid: pid == dead) == 1
    names = sorted(os.listdir(spool.tmp))
    assert len(names) == 2 and names[0] == f".health-{live}"
    assert names[1].startswith(f"{live}-")


def test_freeze_flag(spool):
    assert not spool.is_frozen()
    spool.set_frozen(True)
    assert spool.is_frozen()
    spool.set_frozen(False)
    assert not spool.is_frozen()


def test_commit_wakes_a_listening_worker(spool):
    async def go() -> bool:
        woke = asyncio.Event()
        listener = WakeListener(spool, woke.set)
        writer = spool.open_receiver_writer()
        msg = writer.begin(new_message_id())
        msg.write(b"x\r\n")
        await msg.commit({"id": msg.id, "sender": "", "recipients": []})
        await asyncio.wait_for(woke.wait(), 5)
        writer.close()
        listener.close()
        return woke.is_set()

    assert asyncio.run(go())
    assert [path for path, _ in spool.wake_sockets()] == []


def test_failed_write_leaves_no_file(spool):
    async def go() -> None:
        writer = spool.open_receiver_writer()
        msg = writer.begin(new_message_id())
        msg.write(b"x\r\n")
        # The rename into incoming/ fails: the file was written and synced, then nowhere to go.
        os.rename(spool.state_dir("incoming"), spool.state_dir("incoming") + ".away")
        try:
            await msg.commit({"id": msg.id, "sender": "", "recipients": []})
        finally:
            writer.close()
            os.rename(spool.state_dir("incoming") + ".away", spool.state_dir("incoming"))

    from empath.spool import SpoolError

    with pytest.raises(SpoolError) as info:
        asyncio.run(go())
    assert info.value.errno == errno.ENOENT
    assert spool.list_ids("incoming") == [] and os.listdir(spool.tmp) == []


def messages_in_recycle(spool: Spool, *ids: str) -> list[str]:
    """Which of these messages' files are in recycle/ (beside them: slots the writers gave
    back when they closed)."""
    return [n for n in os.listdir(spool.recycle) if n in ids]


def recycling(tmp_path, files: int) -> Spool:
    sp = Spool(str(tmp_path / "spool"), files)
    sp.create_tree()
    return sp


def test_retired_message_is_recycled_and_reused_by_the_next_one(tmp_path):
    spool = recycling(tmp_path, 10)
    first = store(spool, [b"Subject: one\r\n\r\n" + b"long body " * 500 + b"\r\n"])
    path = spool.path("incoming", first)
    inode = os.stat(path).st_ino
    spool.retire(path)
    assert not os.path.exists(path)
    assert messages_in_recycle(spool, first) == [first]
    # The first writer gave its unused slots back: only the message's file is there.
    for name in os.listdir(spool.recycle):
        if name != first:
            os.unlink(os.path.join(spool.recycle, name))
    # the first store found recycle/ empty: no relisting for 50 ms
    spool._relist_at = spool._candidates_at = 0.0
    second = store(spool, [b"Subject: two\r\n\r\nshort\r\n"])
    assert messages_in_recycle(spool, first) == [] and os.listdir(spool.tmp) == []
    new_path = spool.path("incoming", second)
    assert os.stat(new_path).st_ino == inode
    env, src = read_queue_file(new_path)
    assert env["id"] == second
    assert read_data(src) == b"Subject: two\r\n\r\nshort\r\n"
    assert os.stat(new_path).st_mode & 0o777 == 0o600


def test_large_messages_are_emptied_when_recycled_and_unrecycled_ones_unlinked(tmp_path):
    spool = recycling(tmp_path, 10)
    big = store(spool, [b"x" * 70_000 + b"\r\n"])
    inode = os.stat(spool.path("incoming", big)).st_ino
    spool.retire(spool.path("incoming", big))
    # The inode is kept (no allocation for the next message), its 70 kB are not.
    assert messages_in_recycle(spool, big) == [big]
    recycled = os.path.join(spool.recycle, big)
    assert os.stat(recycled).st_ino == inode and os.stat(recycled).st_size == 0
    assert not [n for n in os.listdir(spool.recycle) if n.endswith(".cut")]
    off = Spool(spool.root, 0)
    small = store(off, [b"x\r\n"])
    off.retire(off.path("incoming", small))
    assert messages_in_recycle(spool, small) == []
    assert spool.list_ids("incoming") == []
    with pytest.raises(FileNotFoundError):
        spool.retire(spool.path("incoming", small))
    # The caller's size (the envelope's data_size) decides without a stat.
    hinted = store(spool, [b"x\r\n"])
    spool.retire(spool.path("incoming", hinted), size=10**6)
    assert os.stat(os.path.join(spool.recycle, hinted)).st_size == 0
    kept = store(spool, [b"x\r\n"])
    spool.retire(spool.path("incoming", kept), size=3)
    assert messages_in_recycle(spool, kept) == [kept]
    assert os.stat(os.path.join(spool.recycle, kept)).st_size > 0


def test_a_cut_file_left_in_recycle_is_never_reused_and_trimmed(tmp_path):
    """A crash between the rename to ``<id>.cut`` and its truncation leaves a full file
    there: receivers never take it (not a queue id), and the next trim removes it."""
    spool = recycling(tmp_path, 10)
    leftover = os.path.join(spool.recycle, new_message_id() + ".cut")
    with open(leftover, "wb") as fh:
        fh.write(b"an old message " * 10_000)
    assert spool.take_recycled() is None and spool.recycled_candidates(4) == []
    assert spool.trim_recycled() == 1 and not os.path.exists(leftover)


def test_recycle_is_trimmed_to_its_size(tmp_path):
    spool = recycling(tmp_path, 4)
    for _ in range(11):
        spool.retire(spool.path("incoming", store(spool, [b"x\r\n"])))
        # store() reuses what is there: keep the pool from being drained by the next store
        spool._reusable.clear()
        spool._relist_at = float("inf")
    # Trimmed every 2 retirements back to 4: never more than 4 + 1 between trims.
    assert 4 <= len(os.listdir(spool.recycle)) <= 5
    assert Spool(spool.root, 0).trim_recycled() >= 4
    assert os.listdir(spool.recycle) == []


def test_start_up_recovery_empties_recycle_when_recycling_is_off(tmp_path):
    spool = recycling(tmp_path, 10)
    mid = store(spool, [b"x\r\n"])
    spool.retire(spool.path("incoming", mid))
    assert messages_in_recycle(spool, mid) == [mid]
    Spool(spool.root, 0).recover_all(lambda pid: False)
    assert os.listdir(spool.recycle) == []
