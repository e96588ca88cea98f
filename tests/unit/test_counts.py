"""control/counts (empath/spool/counts.py): a count is reused only while its directory's stamp
is the one it was listed under, and recorded only from a listing no change could overlap."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from empath.spool import Spool, new_message_id
from empath.spool import counts as counts_mod
from empath.spool.counts import DirCount, StateCounts
from empath.spool.ids import valid_ids


def _spool(tmp_path: Path) -> Spool:
    spool = Spool(str(tmp_path / "spool"))
    spool.create_tree()
    return spool


def _add(spool: Spool, state: str, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        mid = new_message_id()
        with open(spool.path(state, mid), "wb") as fh:
            fh.write(b"x")
        ids.append(mid)
    return ids


@pytest.fixture
def quick_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    # A directory changed more than 0.2 s ago counts as settled (the default is 2 s).
    monkeypatch.setattr(counts_mod, "SETTLE", 0.2)


def _wait_settle() -> None:
    time.sleep(counts_mod.SETTLE + 0.05)


def _recorded_spool(tmp_path: Path, n: int) -> Spool:
    """A spool with ``n`` deferred messages whose count is recorded in control/counts."""
    spool = _spool(tmp_path)
    _add(spool, "deferred", n)
    _wait_settle()
    c = StateCounts(spool)
    c.count("deferred")
    c.save()
    assert os.path.exists(spool.counts_file)
    return spool


def test_valid_ids_keeps_only_queue_ids() -> None:
    good = [new_message_id() for _ in range(3)]
    names = [good[0], "stray", good[1], good[2].lower(), good[2], good[2] + "X", ".counts-1"]
    assert valid_ids(names) == [good[0], good[1], good[2]]


def test_a_settled_listing_is_recorded_and_reused_until_the_directory_changes(
        tmp_path: Path, quick_settle: None) -> None:
    spool = _spool(tmp_path)
    ids = _add(spool, "deferred", 5)
    (Path(spool.state_dir("deferred")) / "stray-name").write_bytes(b"")
    _wait_settle()

    first = StateCounts(spool)
    assert first.count("deferred") == DirCount(5, min(ids))
    assert first.listed == ["deferred"]
    first.save()
    doc = json.loads(Path(spool.counts_file).read_text())
    assert doc["states"]["deferred"]["messages"] == 5
    assert not [n for n in os.listdir(spool.control) if n.startswith(".counts-")]

    again = StateCounts(spool)
    assert again.count("deferred") == DirCount(5, min(ids))
    assert again.listed == []  # reused, not listed

    # A message renamed in: a new stamp, so a new listing with the right number.
    os.rename(spool.path("deferred", ids[0]), spool.path("hold", ids[0]))
    moved = StateCounts(spool)
    assert moved.count("deferred") == DirCount(4, min(ids[1:]))
    assert moved.count("hold") == DirCount(1, ids[0])
    assert moved.listed == ["deferred", "hold"]
    # ... and an unlink.
    os.unlink(spool.path("deferred", ids[1]))
    assert StateCounts(spool).count("deferred") == DirCount(3, min(ids[2:]))


def test_a_reset_mtime_does_not_make_a_changed_directory_look_unchanged(
        tmp_path: Path, quick_settle: None) -> None:
    spool = _recorded_spool(tmp_path, 3)
    st = os.stat(spool.state_dir("deferred"))
    os.unlink(spool.path("deferred", spool.list_ids("deferred")[0]))
    # Someone sets the mtime back to the recorded one: the ctime still tells.
    os.utime(spool.state_dir("deferred"), ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(spool.state_dir("deferred")).st_mtime_ns == st.st_mtime_ns
    again = StateCounts(spool)
    assert again.count("deferred").messages == 2
    assert again.listed == ["deferred"]


def test_a_directory_changed_lately_is_counted_but_not_recorded(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    _add(spool, "deferred", 4)  # just now: within SETTLE (2 s)
    c = StateCounts(spool)
    assert c.count("deferred").messages == 4
    c.save()
    assert not os.path.exists(spool.counts_file)
    assert StateCounts(spool).count("deferred").messages == 4


def test_a_change_during_the_listing_is_not_recorded(
        tmp_path: Path, quick_settle: None, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = _spool(tmp_path)
    _add(spool, "deferred", 4)
    _wait_settle()
    real_listdir = counts_mod.list_names

    def listdir_then_change(path: str, limit: int = -1) -> list[str]:
        names = real_listdir(path, limit)
        _add(spool, "deferred", 1)  # a worker defers a message right after the listing
        return names

    monkeypatch.setattr(counts_mod, "list_names", listdir_then_change)
    c = StateCounts(spool)
    assert c.count("deferred").messages == 4  # what the listing saw
    c.save()
    monkeypatch.setattr(counts_mod, "list_names", real_listdir)
    assert not os.path.exists(spool.counts_file)
    assert StateCounts(spool).count("deferred").messages == 5


def test_a_recorded_count_is_believed_only_with_its_exact_stamp(
        tmp_path: Path, quick_settle: None) -> None:
    """The file is trusted for a directory whose stamp it names (that is the point of it),
    and for nothing else: a doctored count with a stale stamp is ignored."""
    spool = _recorded_spool(tmp_path, 2)
    doc = json.loads(Path(spool.counts_file).read_text())
    doc["states"]["deferred"]["messages"] = 777
    Path(spool.counts_file).write_text(json.dumps(doc))
    assert StateCounts(spool).count("deferred").messages == 777  # same stamp: reused
    doc["states"]["deferred"]["stamp"][2] -= 1  # another mtime
    Path(spool.counts_file).write_text(json.dumps(doc))
    assert StateCounts(spool).count("deferred").messages == 2


@pytest.mark.parametrize("content", [
    b"", b"not json", b"[]", b'{"version": 2, "states": {}}', b'{"version": 1, "states": []}',
    b'{"version": 1, "states": {"deferred": {"stamp": [1, 2, 3], "messages": 9, '
    b'"oldest": null}}}',
    b'{"version": 1, "states": {"deferred": {"stamp": "STAMP", "messages": -1, '
    b'"oldest": null}}}',
    b'{"version": 1, "states": {"deferred": {"stamp": "STAMP", "messages": 9, '
    b'"oldest": "../../etc/passwd"}}}',
    b'{"version": 1, "states": {"deferred": {"stamp": "STAMP", "messages": true, '
    b'"oldest": null}}}',
])
def test_a_malformed_counts_file_is_ignored(tmp_path: Path, content: bytes) -> None:
    spool = _spool(tmp_path)
    ids = _add(spool, "deferred", 3)
    st = os.stat(spool.state_dir("deferred"))
    stamp = json.dumps([st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size])
    Path(spool.counts_file).write_bytes(content.replace(b'"STAMP"', stamp.encode()))
    c = StateCounts(spool)
    assert c.count("deferred") == DirCount(3, min(ids))
    assert c.listed == ["deferred"]


def test_a_spool_that_refuses_the_write_still_gets_its_counts(
        tmp_path: Path, quick_settle: None) -> None:
    spool = _spool(tmp_path)
    _add(spool, "deferred", 2)
    _wait_settle()
    os.rmdir(spool.wake_dir)
    os.rmdir(os.path.join(spool.control, "auth-failures"))
    os.rmdir(spool.control)  # nowhere to write: save() says nothing
    c = StateCounts(spool)
    assert c.count("deferred").messages == 2
    c.save()
    assert not os.path.exists(spool.control)
    os.rmdir(spool.state_dir("hold"))
    assert c.count("hold") == DirCount(0, None)  # a missing state directory holds nothing


def test_state_counts_of_metrics_and_health_reuse_unchanged_directories(
        tmp_path: Path, quick_settle: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """queue.state_counts (every metrics scrape, health check and fleet heartbeat) lists only
    the directories that changed, and its numbers stay exact as messages move."""
    from empath.spool.queue import state_counts

    spool = _spool(tmp_path)
    deferred = _add(spool, "deferred", 6)
    held = _add(spool, "hold", 2)
    _wait_settle()
    listed: list[str] = []
    real_listdir = counts_mod.list_names

    def spy(path: str, limit: int = -1) -> list[str]:
        if os.path.basename(path) != "active":  # (active/ is listed for its slots)
            listed.append(os.path.basename(path))
        return real_listdir(path, limit)

    monkeypatch.setattr(counts_mod, "list_names", spy)
    want = {"pending": 0, "active": 0, "deferred": 6, "held": 2, "failed": 0, "corrupt": 0}
    assert state_counts(spool) == (want, min(deferred))
    assert sorted(listed) == ["corrupt", "deferred", "failed", "hold", "incoming"]
    listed.clear()
    assert state_counts(spool) == (want, min(deferred))
    assert listed == []
    os.rename(spool.path("hold", held[0]), spool.path("incoming", held[0]))
    want.update(pending=1, held=1)
    assert state_counts(spool) == (want, min(deferred + held[:1]))
    assert sorted(listed) == ["hold", "incoming"]


def test_links_and_fifos_planted_in_control_are_neither_followed_nor_waited_for(
        tmp_path: Path, quick_settle: None) -> None:
    """The spool's user may plant names in control/ for root's empathctl: a FIFO or a symlink
    at control/counts is not read (a FIFO would hang the command), and a symlink or hard
    link at the temporary name is replaced, never written through."""
    import threading

    spool = _spool(tmp_path)
    ids = _add(spool, "deferred", 3)
    _wait_settle()
    st = os.stat(spool.state_dir("deferred"))
    doctored = {"version": 1, "states": {"deferred": {
        "stamp": [st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size],
        "messages": 999, "oldest": ids[0]}}}
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(doctored))

    os.symlink(elsewhere, spool.counts_file)
    assert StateCounts(spool).count("deferred").messages == 3  # not read through the link
    os.unlink(spool.counts_file)

    os.mkfifo(spool.counts_file)
    result: list[int] = []
    reader = threading.Thread(
        target=lambda: result.append(StateCounts(spool).count("deferred").messages))
    reader.start()
    reader.join(10)
    assert not reader.is_alive() and result == [3]
    os.unlink(spool.counts_file)

    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file\n")
    tmp = Path(spool.control) / f".counts-{os.getpid()}-{threading.get_ident()}"
    for plant in (os.symlink, os.link):
        plant(victim, tmp)
        c = StateCounts(spool)
        assert c.count("deferred").messages == 3
        c.save()
        assert victim.read_bytes() == b"root's file\n"
        assert not tmp.exists()
        assert Path(spool.counts_file).is_file() and not Path(spool.counts_file).is_symlink()
        assert StateCounts(spool).count("deferred") == DirCount(3, min(ids))
        os.unlink(spool.counts_file)
