"""Wake-up sockets under a spool whose path is too long for a Unix socket address."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path

import pytest

from empath.spool import Spool
from empath.spool.ids import new_message_id, shard_of
from empath.spool.wake import RESCAN, SUN_PATH_MAX, WakeListener, Waker


def test_a_deep_spool_still_wakes_its_workers(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "spool"
    spool = Spool(str(deep))
    spool.create_tree()
    assert len(os.fsencode(spool.wake_socket_path(os.getpid()))) > SUN_PATH_MAX

    async def scenario() -> list[str]:
        woken: list[str] = []
        got = asyncio.Event()

        def callback() -> None:
            woken.append("wake")
            got.set()

        listener = WakeListener(spool, callback)
        waker = Waker(spool)
        try:
            assert [path for path, _ in spool.wake_sockets()] == [spool.wake_socket_path(os.getpid())]
            waker.wake()
            await asyncio.wait_for(got.wait(), 5)
        finally:
            waker.close()
            listener.close()
        return woken

    assert asyncio.run(scenario()) == ["wake"]
    # The socket was bound at its real place, and is gone after close.
    assert [path for path, _ in spool.wake_sockets()] == []


def _ear(path: str) -> socket.socket:
    ear = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ear.bind(path)
    ear.setblocking(False)
    return ear


def _heard(ear: socket.socket) -> list[bytes]:
    got: list[bytes] = []
    with contextlib.suppress(BlockingIOError):
        while True:
            got.append(ear.recv(16))
    return got


def _id_of_share(share: int, shares: int) -> str:
    for _ in range(1000):
        message_id = new_message_id()
        if shard_of(message_id, shares) == share:
            return message_id
    raise AssertionError("no id of that share")


def test_a_receiver_wakes_only_the_worker_whose_share_holds_the_message(
        tmp_path: Path) -> None:
    """Woken for mail it will not take, a worker would list incoming/ for nothing: a wake-up
    with ids reaches the worker of each id's share (and the sockets of no share), not the
    others; one without ids (empathctl) reaches every worker."""
    spool = Spool(str(tmp_path / "spool"))
    spool.create_tree()
    ears = [_ear(spool.wake_socket_path(4000 + i, (i, 3))) for i in range(3)]
    every = _ear(spool.wake_socket_path(4100))  # no share: woken for all mail
    waker = Waker(spool)
    try:
        for share in range(3):
            waker.wake(ids=[_id_of_share(share, 3)])
            assert [bool(_heard(ear)) for ear in ears] == [i == share for i in range(3)]
            assert _heard(every) == [b"!"]
        waker.wake(ids=[_id_of_share(0, 3), _id_of_share(2, 3)])
        assert [bool(_heard(ear)) for ear in ears] == [True, False, True]
        assert _heard(every) == [b"!"]
        waker.wake(RESCAN)
        assert [_heard(ear) for ear in ears + [every]] == [[RESCAN]] * 4
        waker.wake(ids=[])
        assert [_heard(ear) for ear in ears + [every]] == [[]] * 4
    finally:
        waker.close()
        for ear in ears + [every]:
            ear.close()


def test_a_worker_restarted_under_a_new_pid_is_woken_from_its_first_message(
        tmp_path: Path) -> None:
    """The list of sockets is read every few seconds; a socket that refuses (its worker is
    gone) makes the waker read it again at once, so the replacement is not left asleep."""
    spool = Spool(str(tmp_path / "spool"))
    spool.create_tree()
    old_path = spool.wake_socket_path(5000, (0, 1))
    old = _ear(old_path)
    waker = Waker(spool)
    try:
        waker.wake(ids=[new_message_id()])
        assert _heard(old) == [b"!"]
        old.close()  # killed: its socket file stays and refuses
        new = _ear(spool.wake_socket_path(5001, (0, 1)))
        time.sleep(0.2)  # re-reads after a refusal are spaced out
        waker.wake(ids=[new_message_id()])
        assert _heard(new) == [b"!"]
        os.unlink(old_path)
        new.close()
        os.unlink(spool.wake_socket_path(5001, (0, 1)))
        newer = _ear(spool.wake_socket_path(5002, (0, 1)))
        time.sleep(0.2)
        waker.wake(ids=[new_message_id()])  # the old socket vanished: read again
        assert _heard(newer) == [b"!"]
        newer.close()
    finally:
        waker.close()


def test_start_up_removes_the_wake_sockets_of_workers_that_are_gone(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    spool.create_tree()
    gone = 5555
    for path in (spool.wake_socket_path(gone, (1, 2)), spool.wake_socket_path(gone)):
        _ear(path).close()
    mine = _ear(spool.wake_socket_path(os.getpid(), (0, 2)))
    try:
        spool.recover_all(lambda pid: pid == os.getpid())
        assert list(spool.wake_sockets()) == [(spool.wake_socket_path(os.getpid(), (0, 2)),
                                               (0, 2))]
    finally:
        mine.close()


def test_a_share_without_a_live_worker_wakes_every_worker(tmp_path: Path) -> None:
    """Worker 0 of 2 killed and not yet replaced: a message of its share would wake nobody
    and wait for a scan. Every worker is woken instead; worker 1 takes the message once its
    grace for another's share is over. A refusing socket is dropped from the list, so later
    messages of the live share do not wake worker 1 for nothing."""
    spool = Spool(str(tmp_path / "spool"))
    spool.create_tree()
    dead_path = spool.wake_socket_path(6000, (0, 2))
    _ear(dead_path).close()  # killed: the socket file stays and refuses
    live = _ear(spool.wake_socket_path(6001, (1, 2)))
    waker = Waker(spool)
    try:
        waker.wake(ids=[_id_of_share(1, 2)])
        assert _heard(live) == [b"!"]
        waker.wake(ids=[_id_of_share(0, 2)])  # the list is fresh: read again at most so often
        assert _heard(live) == [b"!"]
        time.sleep(0.2)
        waker.wake(ids=[_id_of_share(0, 2)])  # read again: still nobody for share 0
        assert _heard(live) == [b"!"]
        replacement = _ear(spool.wake_socket_path(6002, (0, 2)))
        time.sleep(0.2)
        waker.wake(ids=[_id_of_share(0, 2)])
        assert _heard(replacement) == [b"!"] and _heard(live) == []
        for _ in range(3):  # the dead socket is out of the list: nothing refuses, no re-read
            waker.wake(ids=[_id_of_share(1, 2)])
            assert _heard(live) == [b"!"] and _heard(replacement) == []
        replacement.close()
    finally:
        waker.close()
        live.close()


def test_the_master_removes_a_reaped_workers_socket(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    spool.create_tree()
    for pid, share in ((7000, (0, 2)), (7001, (1, 2)), (70001, None)):
        _ear(spool.wake_socket_path(pid, share)).close()
    spool.remove_wake_sockets(7000)
    assert sorted(os.path.basename(p) for p, _ in spool.wake_sockets()) == ["70001",
                                                                               "7001.1.2"]


def test_a_worker_started_after_the_list_was_read_is_woken_for_the_next_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The receivers' list of sockets is read again when control/wake/ changes (its mtime),
    not only every two seconds: a worker that binds its socket just after a receiver read
    the list (at start, after a restart or a reload) is woken for the next message of its
    share. An unchanged directory is not listed again at every wake-up."""
    spool = Spool(str(tmp_path / "spool"))
    spool.create_tree()
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(spool.wake_dir, ns=(an_hour_ago, an_hour_ago))
    reads = []
    real = spool.wake_sockets
    monkeypatch.setattr(spool, "wake_sockets", lambda: reads.append(1) or real())
    first = _ear(spool.wake_socket_path(8000, (1, 2)))
    os.utime(spool.wake_dir, ns=(an_hour_ago, an_hour_ago))
    waker = Waker(spool)
    try:
        waker.wake(ids=[_id_of_share(1, 2)])
        assert _heard(first) == [b"!"] and len(reads) == 1
        for _ in range(5):
            waker.wake(ids=[_id_of_share(1, 2)])
        assert len(_heard(first)) == 5 and len(reads) == 1  # no change, no listing
        late = _ear(spool.wake_socket_path(8001, (0, 2)))  # changes control/wake/'s mtime
        waker.wake(ids=[_id_of_share(0, 2)])  # at once: no sleep past any interval
        assert _heard(late) == [b"!"] and _heard(first) == []
        late.close()
    finally:
        waker.close()
        first.close()
