"""The spool's file write (``store_file``), both twins, against the real file system: a new
file or a recycled one, every octet written, the mtime, and each failure closing the
descriptor, naming the tmp file and leaving it for the caller to remove."""

from __future__ import annotations

import errno
import os
import time
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import empath._speedups as pkg

NO_EXTENSIONS = os.environ.get("EMPATH_NO_EXTENSIONS", "") not in ("", "0")
LEGS = ["python"] if NO_EXTENSIONS else ["python", "cython"]


@pytest.fixture(params=LEGS)
def store(request: pytest.FixtureRequest):
    return pkg.implementations()[request.param].store_file


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    for name in ("tmp", "incoming", "recycle"):
        (tmp_path / name).mkdir()
    return tmp_path / "tmp", tmp_path / "incoming", tmp_path / "recycle"


def b(p: Path) -> bytes:
    return os.fsencode(str(p))


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def test_new_file_gets_every_part_and_mode_0600(store, dirs) -> None:
    tmp, incoming, _ = dirs
    parts = [b"Subject: x\r\n", b"", b"\r\n", b"body\r\n" * 1000, b"tail"]
    assert store(-1, b(tmp / "1-a"), parts, b(incoming / "a"), None, -1.0) is False
    assert (incoming / "a").read_bytes() == b"".join(parts)
    assert stat.S_IMODE((incoming / "a").stat().st_mode) == 0o600
    assert os.listdir(tmp) == []


def test_more_parts_than_one_writev_takes(store, dirs) -> None:
    tmp, incoming, _ = dirs
    parts = [bytes([65 + i % 26]) * (i % 7 + 1) for i in range(5000)]
    store(-1, b(tmp / "1-a"), parts, b(incoming / "a"), None, -1.0)
    assert (incoming / "a").read_bytes() == b"".join(parts)


def test_recycled_file_is_reused_and_truncated(store, dirs) -> None:
    tmp, incoming, recycle = dirs
    old = recycle / "old"
    old.write_bytes(b"an earlier, longer message " * 100)
    os.chmod(old, 0o600)
    inode = old.stat().st_ino
    assert store(-1, b(tmp / "1-a"), [b"new\r\n"], b(incoming / "a"), b(old), -1.0) is True
    assert (incoming / "a").read_bytes() == b"new\r\n"
    assert (incoming / "a").stat().st_ino == inode
    assert not old.exists() and os.listdir(tmp) == []


def test_recycled_file_taken_by_someone_else_means_a_new_file(store, dirs) -> None:
    tmp, incoming, recycle = dirs
    gone = recycle / "gone"
    assert store(-1, b(tmp / "1-a"), [b"m\r\n"], b(incoming / "a"), b(gone), -1.0) is False
    assert (incoming / "a").read_bytes() == b"m\r\n"


def test_mtime_is_set_when_given(store, dirs) -> None:
    tmp, incoming, _ = dirs
    store(-1, b(tmp / "1-a"), [b"m"], b(incoming / "a"), None, 2_000_000_000.25)
    assert (incoming / "a").stat().st_mtime == pytest.approx(2_000_000_000.25, abs=1e-6)


def test_open_descriptor_of_a_spilled_message_is_continued_and_closed(store, dirs) -> None:
    tmp, incoming, _ = dirs
    fd = os.open(tmp / "1-a", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"first half, ")
    store(fd, b(tmp / "1-a"), [b"second half"], b(incoming / "a"), None, -1.0)
    assert closed(fd)
    assert (incoming / "a").read_bytes() == b"first half, second half"


def test_existing_tmp_name_fails_with_eexist_naming_it(store, dirs) -> None:
    tmp, incoming, _ = dirs
    (tmp / "1-a").write_bytes(b"someone's")
    with pytest.raises(OSError) as info:
        store(-1, b(tmp / "1-a"), [b"m"], b(incoming / "a"), None, -1.0)
    assert info.value.errno == errno.EEXIST and info.value.filename == str(tmp / "1-a")
    assert (tmp / "1-a").read_bytes() == b"someone's" and os.listdir(incoming) == []


def test_failed_rename_leaves_the_tmp_file_and_closes_the_descriptor(store, dirs) -> None:
    tmp, incoming, _ = dirs
    fd = os.open(tmp / "1-a", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with pytest.raises(OSError) as info:
        store(fd, b(tmp / "1-a"), [b"m"], b(incoming / "missing" / "a"), None, -1.0)
    assert info.value.errno == errno.ENOENT
    assert closed(fd)
    assert (tmp / "1-a").read_bytes() == b"m"


def test_parts_must_be_bytes(store, dirs) -> None:
    tmp, incoming, _ = dirs
    fd = os.open(tmp / "1-a", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with pytest.raises(TypeError):
        store(fd, b(tmp / "1-a"), [b"m", None], b(incoming / "a"), None, -1.0)
    assert closed(fd)
    assert os.listdir(incoming) == []


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the suite runs as root): {made.stderr}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_fails_with_enospc(store, small_fs: Path) -> None:
    (small_fs / "tmp").mkdir()
    (small_fs / "incoming").mkdir()
    with pytest.raises(OSError) as info:
        store(-1, b(small_fs / "tmp" / "1-a"), [b"x" * 65536] * 32,
              b(small_fs / "incoming" / "a"), None, -1.0)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(small_fs / "tmp" / "1-a")
    assert os.listdir(small_fs / "incoming") == []


@pytest.fixture(params=LEGS)
def write_all(request: pytest.FixtureRequest):
    return pkg.implementations()[request.param].write_all


def test_slot_is_written_in_place_cut_to_length_and_linked(store, dirs) -> None:
    """A slot keeps its (durable) name: the message gets a second one in incoming/."""
    tmp, incoming, _ = dirs
    slot = tmp / "1-slot"
    slot.write_bytes(b"an older, longer message " * 100)
    inode = slot.stat().st_ino
    assert store(-1, b(slot), [b"new\r\n", b"tail"], b(incoming / "a"), b(slot), -1.0) is True
    assert (incoming / "a").read_bytes() == b"new\r\ntail"
    assert (incoming / "a").stat().st_ino == inode and slot.stat().st_nlink == 2


def test_spilled_slot_descriptor_is_continued_and_linked(store, dirs) -> None:
    tmp, incoming, _ = dirs
    slot = tmp / "1-slot"
    slot.write_bytes(b"")
    fd = os.open(slot, os.O_RDWR)
    os.write(fd, b"first half, ")
    assert store(fd, b(slot), [b"second half"], b(incoming / "a"), b(slot), -1.0) is False
    assert closed(fd)
    assert (incoming / "a").read_bytes() == b"first half, second half"
    assert slot.stat().st_nlink == 2


def test_missing_slot_fails_without_creating_one(store, dirs) -> None:
    """A slot's name was made durable before use: a new file in its place would have a name
    nobody flushed, so a vanished slot is an error, never a silent creation."""
    tmp, incoming, _ = dirs
    slot = tmp / "1-gone"
    with pytest.raises(FileNotFoundError) as info:
        store(-1, b(slot), [b"m"], b(incoming / "a"), b(slot), -1.0)
    assert info.value.filename == str(slot)
    assert os.listdir(tmp) == [] and os.listdir(incoming) == []


def test_write_all_continues_at_the_offset_past_iov_max(write_all, dirs) -> None:
    tmp, _, _ = dirs
    parts = [b"%05d" % i for i in range(3000)]  # more buffers than one writev takes
    fd = os.open(tmp / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"head:")
        write_all(fd, parts + [b""])
        assert os.lseek(fd, 0, os.SEEK_CUR) == 5 + 15000
    finally:
        os.close(fd)
    assert (tmp / "f").read_bytes() == b"head:" + b"".join(parts)


def test_write_all_failure_is_an_oserror_with_its_errno(write_all) -> None:
    r, w = os.pipe()
    os.close(w)
    try:
        with pytest.raises(OSError) as info:
            write_all(r, [b"x"])
        assert info.value.errno == errno.EBADF
    finally:
        os.close(r)


@pytest.fixture(params=LEGS)
def twin(request: pytest.FixtureRequest):
    return pkg.implementations()[request.param]


def test_make_slots_takes_sources_or_creates_and_fsyncs(twin, dirs) -> None:
    tmp, _, recycle = dirs
    (recycle / "r1").write_bytes(b"old message")
    paths = [b(tmp / f"1-b-{i}") for i in range(3)]
    sources = [b(recycle / "r1"), b(recycle / "gone"), None]
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        twin.make_slots(fd, paths, sources)
    finally:
        os.close(fd)
    assert os.listdir(recycle) == []
    assert (tmp / "1-b-0").read_bytes() == b"old message"
    assert (tmp / "1-b-1").read_bytes() == b"" and (tmp / "1-b-2").read_bytes() == b""
    assert stat.S_IMODE((tmp / "1-b-2").stat().st_mode) == 0o600


def test_make_slots_skips_candidates_taken_by_others_and_returns_how_many_it_tried(
        twin, dirs) -> None:
    tmp, _, recycle = dirs
    for name in ("r1", "r2", "r3", "r4"):
        (recycle / name).write_bytes(name.encode())
    # "gone" was taken by another receiver between its listing and this rename.
    sources = [b(recycle / n) for n in ("gone", "r1", "gone2", "r2", "r3", "r4")]
    paths = [b(tmp / f"1-b-{i}") for i in range(2)]
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        used = twin.make_slots(fd, paths, sources)
    finally:
        os.close(fd)
    assert used == 4  # gone, r1, gone2, r2: r3 and r4 were not tried
    assert (tmp / "1-b-0").read_bytes() == b"r1" and (tmp / "1-b-1").read_bytes() == b"r2"
    assert sorted(os.listdir(recycle)) == ["r3", "r4"]


def test_make_slots_failure_names_the_path(twin, dirs) -> None:
    tmp, _, _ = dirs
    (tmp / "1-b-1").write_bytes(b"")  # taken already: O_EXCL fails
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError) as info:
            twin.make_slots(fd, [b(tmp / "1-b-0"), b(tmp / "1-b-1")], [None, None])
    finally:
        os.close(fd)
    assert info.value.filename == str(tmp / "1-b-1")
    assert (tmp / "1-b-0").exists()  # made before the failure: the caller's to remove


def test_sync_and_unlink_skips_missing_and_needs_the_sync(twin, dirs) -> None:
    tmp, incoming, _ = dirs
    for name in ("a", "b"):
        (tmp / name).write_bytes(b"")
    fd = os.open(incoming, os.O_RDONLY | os.O_DIRECTORY)
    try:
        twin.sync_and_unlink(fd, [b(tmp / "a"), b(tmp / "missing"), b(tmp / "b")])
    finally:
        os.close(fd)
    assert os.listdir(tmp) == []
    (tmp / "c").write_bytes(b"")
    closed_fd = os.open(incoming, os.O_RDONLY | os.O_DIRECTORY)
    os.close(closed_fd)
    with pytest.raises(OSError) as info:
        twin.sync_and_unlink(closed_fd, [b(tmp / "c")])  # the fsync fails: nothing is removed
    assert info.value.errno == errno.EBADF and (tmp / "c").exists()


def _drain(pool, count: int) -> list[tuple[int, int, bool, float]]:
    """Wait on the pool's eventfd until ``count`` calls have been reported (at most 10 s)."""
    import selectors

    got: list[tuple[int, int, bool, float]] = []
    with selectors.DefaultSelector() as sel:
        sel.register(pool.fileno(), selectors.EVENT_READ)
        deadline = time.monotonic() + 10
        while len(got) < count and time.monotonic() < deadline:
            sel.select(1)
            got += pool.completed()
    return got


def test_store_pool_runs_stores_and_reports_each_under_its_token(twin, dirs) -> None:
    tmp, incoming, _ = dirs
    pool = twin.StorePool(3)
    try:
        for i in range(20):
            pool.submit(i, -1, b(tmp / f"t{i}"), [b"line %d\r\n" % i, b"end"],
                        b(incoming / f"m{i}"), None, -1.0, True)
        # a store that fails: its directory does not exist
        pool.submit(99, -1, b(tmp / "nodir" / "x"), [b"x"], b(incoming / "y"), None, -1.0)
        got = _drain(pool, 21)
    finally:
        pool.close()
    assert sorted(t for t, *_ in got) == [*range(20), 99]
    errors = {t: err for t, err, _, seconds in got if err}
    assert errors == {99: errno.ENOENT}
    assert all(seconds >= 0 for *_, seconds in got)
    assert sorted(os.listdir(incoming)) == sorted(f"m{i}" for i in range(20))
    assert (incoming / "m7").read_bytes() == b"line 7\r\nend"
    assert os.listdir(tmp) == []  # every file renamed into incoming/


def test_store_pool_links_a_slot_and_closes_a_given_descriptor(twin, dirs) -> None:
    tmp, incoming, _ = dirs
    slot = tmp / "1-b-slot"
    slot.write_bytes(b"an older, longer message in a recycled file")
    spilled = tmp / "1-b-spilled"
    fd = os.open(spilled, os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"first part, ")
    pool = twin.StorePool(1)
    try:
        pool.submit(1, -1, b(slot), [b"new"], b(incoming / "m"), b(slot), -1.0, True)
        pool.submit(2, fd, b(spilled), [b"second"], b(incoming / "n"), b(spilled), -1.0)
        got = sorted(_drain(pool, 2))
    finally:
        pool.close()
    assert [(t, err) for t, err, *_ in got] == [(1, 0), (2, 0)]
    # opened in place and cut to the new message; linked, keeping the slot's name
    assert (incoming / "m").read_bytes() == b"new" and slot.stat().st_nlink == 2
    assert (incoming / "n").read_bytes() == b"first part, second"
    with pytest.raises(OSError) as info:
        os.fstat(fd)  # closed by the store
    assert info.value.errno == errno.EBADF


def test_store_pool_close_finishes_queued_stores(twin, dirs) -> None:
    tmp, incoming, _ = dirs
    pool = twin.StorePool(2)
    for i in range(50):
        pool.submit(i, -1, b(tmp / f"t{i}"), [b"x"], b(incoming / f"m{i}"), None, -1.0, False)
    pool.close()
    assert len(pool.completed()) == 50 and len(os.listdir(incoming)) == 50
    with pytest.raises(RuntimeError):
        pool.submit(51, -1, b(tmp / "late"), [b"x"], b(incoming / "late"), None, -1.0)
    assert not (incoming / "late").exists()


def test_list_names_is_os_listdir_bounded(twin, tmp_path: Path) -> None:
    """Every name (a name that is not UTF-8 too, as os.listdir gives it), no . nor .., at
    most ``limit``; a missing directory is FileNotFoundError naming it."""
    names = {"a", "01ABCDEF", "caf\u00e9", os.fsdecode(b"raw-\xff"), "x" * 255}
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert sorted(twin.list_names(str(tmp_path))) == sorted(os.listdir(tmp_path))
    assert set(twin.list_names(os.fsencode(tmp_path))) == names | {"sub"}
    part = twin.list_names(str(tmp_path), 2)
    assert len(part) == 2 and set(part) <= names | {"sub"}
    assert twin.list_names(str(tmp_path), 0) == []
    with pytest.raises(FileNotFoundError) as err:
        twin.list_names(str(tmp_path / "gone"))
    assert err.value.filename == str(tmp_path / "gone")


def test_store_pool_threads_never_preempt_the_thread_that_hands_stores_over(twin) -> None:
    """The pool's threads run as SCHED_BATCH (no wake-up preemption, same CPU share): a
    store handed over from the event loop does not push the loop thread off its CPU. The
    thread that made the pool keeps its own policy."""
    def batch_threads() -> int:
        count = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                if os.sched_getscheduler(int(tid)) == os.SCHED_BATCH:
                    count += 1
            except OSError:
                continue  # a thread that just ended
        return count

    before = batch_threads()
    pool = twin.StorePool(3)
    try:
        deadline = time.monotonic() + 5
        while batch_threads() < before + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batch_threads() == before + 3
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        pool.close()
