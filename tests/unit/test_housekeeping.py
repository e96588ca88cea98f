"""The master's housekeeping (empath/master/housekeeping.py) on a real spool directory: a gone
delivery worker's claims go back to incoming/ and only its tmp/ files go; a live worker's
claims stay; a failing file system is logged once per kind and retried soon."""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import pytest

from empath.master.housekeeping import FAULT_RETRY, LogThrottle, SpoolKeeper
from empath.spool import Spool
from empath.spool.ids import new_message_id


def spool_at(tmp_path: Path) -> Spool:
    spool = Spool(str(tmp_path / "spool"))
    spool.create_tree()
    return spool


def claimed(spool: Spool, slot: int) -> str:
    message_id = new_message_id()
    os.makedirs(spool.active_dir(slot), exist_ok=True)
    Path(spool.active_path(slot, message_id)).write_bytes(b"claimed")
    return message_id


def test_a_gone_workers_claims_are_requeued_and_only_its_tmp_files_removed(
        tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    gone = claimed(spool, 4242)
    for name in ("4242-a", "4243-b"):
        Path(spool.tmp, name).write_bytes(b"half")
    keeper = SpoolKeeper(spool, LogThrottle())
    keeper.child_gone(4242, delivery=True)
    assert os.path.exists(spool.path("incoming", gone))
    assert sorted(os.listdir(spool.tmp)) == ["4243-b"]
    # A receiver has no claims: only its tmp/ files go.
    keeper.child_gone(4243, delivery=False)
    assert os.listdir(spool.tmp) == []


def test_the_orphan_sweep_requeues_unowned_claims_but_not_a_live_workers(
        tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    orphan = claimed(spool, 7001)
    held = claimed(spool, 7002)
    lock = spool.lock_active(7002)  # a live worker (this process) owns 7002
    try:
        keeper = SpoolKeeper(spool, LogThrottle())
        keeper.sweep_orphans({7002})
        assert os.path.exists(spool.path("incoming", orphan))
        assert os.path.exists(spool.active_path(7002, held))
        # Not again before the interval: a claim made now stays until the next sweep.
        again = claimed(spool, 7003)
        keeper.sweep_orphans({7002})
        assert os.path.exists(spool.active_path(7003, again))
    finally:
        os.close(lock)


def test_a_failing_file_system_is_logged_once_per_kind_and_retried_soon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    spool = spool_at(tmp_path)
    claim = claimed(spool, 5150)

    def broken(slot: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(spool, "recover_unowned", broken)
    throttle = LogThrottle()
    keeper = SpoolKeeper(spool, throttle)
    with caplog.at_level(logging.ERROR, logger="empath.master"):
        for _ in range(3):
            keeper.next_sweep = 0.0
            keeper.sweep_orphans(set())
            # The next try is due within FAULT_RETRY, not the normal interval.
            assert keeper.next_sweep <= time.monotonic() + FAULT_RETRY
        lines = [r.getMessage() for r in caplog.records]
        assert lines == ["cannot requeue the claims of delivery worker 5150: Input/output "
                         f"error; retrying every {FAULT_RETRY:g}s"]
        # The claim stays where it is meanwhile.
        assert os.path.exists(spool.active_path(5150, claim))
        # A minute on, the next line says how many were held back.
        kind = "requeue the claims of delivery worker 5150"
        throttle.last[kind] -= throttle.interval + 1
        keeper.next_sweep = 0.0
        keeper.sweep_orphans(set())
        assert caplog.records[-1].getMessage().endswith("(2 more like it not logged)")
    monkeypatch.undo()
    keeper.next_sweep = 0.0
    keeper.sweep_orphans(set())
    assert os.path.exists(spool.path("incoming", claim))
