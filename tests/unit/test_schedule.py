"""The delivery worker's schedule of deferred messages (empath/delivery/schedule.py) and the
worker's listing of deferred/ into it, slice by slice (empath/delivery/deferred.py)."""

from __future__ import annotations

import os
import random
import time
import tracemalloc
from pathlib import Path

import pytest

from empath.delivery import deferred as deferred_module
from empath.delivery import worker as worker_module
from empath.delivery.schedule import RECORD, DueSchedule
from empath.spool import new_message_id
from tests.unit.test_worker_state import _queue, _worker

NOW = 1_800_000_000.0


def _entries(n: int, rng: random.Random) -> list[tuple[float, str]]:
    return [(NOW + rng.uniform(-3600, 3600), new_message_id(NOW - rng.uniform(0, 1e5)))
            for _ in range(n)]


def _take_all(schedule: DueSchedule, now: float) -> list[str]:
    out = []
    while (mid := schedule.pop_due(now)) is not None:
        out.append(mid)
    return out


def test_entries_come_out_by_due_time_then_id_across_blocks() -> None:
    rng = random.Random(7)
    blocks = [_entries(n, rng) for n in (500, 1, 0, 1200, 37)]
    same = new_message_id(NOW), new_message_id(NOW + 1)  # one due time, two ids
    blocks.append([(NOW, same[1]), (NOW, same[0])])
    schedule = DueSchedule()
    for block in blocks:
        schedule.add(block)
    everything = sorted((round(due, 6), mid) for block in blocks for due, mid in block)
    assert len(schedule) == len(everything)
    assert [mid for _, mid in schedule.entries()] == [mid for _, mid in everything]
    assert len(schedule) == len(everything)  # entries() takes nothing
    taken = _take_all(schedule, NOW + 7200)
    assert taken == [mid for _, mid in everything]
    assert taken.index(same[0]) + 1 == taken.index(same[1])
    assert not schedule and schedule.next_due() is None


def test_only_due_entries_are_taken_and_next_due_is_the_earliest() -> None:
    schedule = DueSchedule()
    early, mid, late = (new_message_id() for _ in range(3))
    schedule.add([(NOW + 10, mid), (NOW + 100, late)])
    schedule.add([(NOW - 5, early)])
    assert schedule.next_due() == pytest.approx(NOW - 5, abs=1e-5)
    assert schedule.pop_due(NOW) == early
    assert schedule.pop_due(NOW) is None  # mid is not due yet, and stays
    assert len(schedule) == 2
    assert schedule.next_due() == pytest.approx(NOW + 10, abs=1e-5)
    assert schedule.pop_due(NOW + 10) == mid
    assert schedule.pop_due(NOW + 99.9) is None
    assert schedule.pop_due(NOW + 100) == late
    assert schedule.pop_due(NOW + 1e6) is None


def test_taken_entries_are_removed_and_finished_blocks_freed() -> None:
    schedule = DueSchedule()
    first = [(NOW + i, new_message_id()) for i in range(10)]
    second = [(NOW + 100 + i, new_message_id()) for i in range(10)]
    schedule.add(first)
    schedule.add(second)
    assert schedule.nbytes() == 20 * RECORD
    assert _take_all(schedule, NOW + 50) == [mid for _, mid in first]
    assert schedule.nbytes() == 10 * RECORD  # the first block is gone
    assert [mid for _, mid in schedule.entries()] == [mid for _, mid in second]
    schedule.clear()
    assert len(schedule) == 0 and schedule.pop_due(NOW + 1e6) is None and schedule.nbytes() == 0


def test_names_that_are_no_queue_ids_are_left_out() -> None:
    schedule = DueSchedule()
    good = new_message_id()
    assert schedule.add([(NOW, "not-an-id"), (NOW, "Ü" * 26), (NOW, good),
                         (NOW, good.lower())]) == 1
    assert _take_all(schedule, NOW) == [good]


def test_due_times_before_the_epoch_or_far_ahead_keep_their_order() -> None:
    schedule = DueSchedule()
    ids = [new_message_id() for _ in range(3)]
    schedule.add([(1e15, ids[2]), (-5.0, ids[0]), (NOW, ids[1])])
    assert [mid for _, mid in schedule.entries()] == ids


def test_an_entry_costs_under_100_bytes() -> None:
    rng = random.Random(1)
    entries = _entries(100_000, rng)
    slices = [entries[i:i + deferred_module.SCAN_SLICE]
              for i in range(0, len(entries), deferred_module.SCAN_SLICE)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        schedule = DueSchedule()
        for part in slices:
            schedule.add(part)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(schedule) == 100_000
    per_entry = (after - before) / 100_000
    assert per_entry < 40, per_entry  # 34-byte records, a few block headers
    # The tuples the worker kept before: (float, str) in a list, ~150 bytes each.


def _defer(worker: worker_module.DeliveryWorker, due: float) -> str:
    qid, path = _queue(worker)
    os.utime(path, (due, due))
    worker.spool.move(path, "deferred", qid)
    return qid


def test_the_listing_is_read_in_slices_and_read_entries_are_usable_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deferred_module, "SCAN_SLICE", 3)
    worker = _worker(tmp_path)
    now = time.time()
    due_ids = {_defer(worker, now - 60 - i) for i in range(7)}
    later = {_defer(worker, now + 3600) for _ in range(3)}
    worker.deferred.next_scan = 0.0
    slices = 0
    while worker.deferred.advance():  # True while unfinished
        slices += 1
        assert slices < 20
        # What has been read is already in the schedule, before the listing ends.
        assert len(worker.deferred.schedule) == 3 * slices
    assert slices == 3 and not worker.deferred.scanning and len(worker.deferred.schedule) == 10
    assert worker.deferred.next_scan > time.monotonic()  # next listing one interval later
    due = [worker.deferred.schedule.pop_due(time.time()) for _ in range(7)]
    assert set(due) == due_ids and worker.deferred.schedule.pop_due(time.time()) is None
    assert {mid for _, mid in worker.deferred.schedule.entries()} == later


def test_a_rescan_asked_for_during_a_listing_starts_it_again(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setattr(deferred_module, "SCAN_SLICE", 2)
    worker = _worker(tmp_path)
    now = time.time()
    ids = {_defer(worker, now + 600 + i) for i in range(5)}
    worker.deferred.next_scan = 0.0
    assert worker.deferred.advance() and len(worker.deferred.schedule) == 2
    made_due = sorted(ids)[0]
    os.utime(worker.spool.path("deferred", made_due), (now - 1, now - 1))
    worker._rescan_deferred()  # empathctl queue retry
    # Started again, one slice read.
    assert worker.deferred.advance() and len(worker.deferred.schedule) == 2
    while worker.deferred.advance():
        pass
    assert {mid for _, mid in worker.deferred.schedule.entries()} == ids
    assert worker.deferred.schedule.pop_due(time.time()) == made_due


def test_a_backward_clock_jump_moves_due_times_back_and_relists(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    now = time.time()
    soon = _defer(worker, now + 600)
    past = _defer(worker, now - 30)
    worker.deferred.scan_all(now)
    assert worker.deferred.schedule.next_due() == pytest.approx(now - 30, abs=1e-3)
    # The wall clock stood an hour ahead when these due times were set, and is now right.
    worker.deferred.clock_offset += 3600
    worker.deferred.check_clock()
    assert worker.deferred.next_scan == 0.0
    while worker.deferred.advance():
        pass
    due = {mid: at for at, mid in worker.deferred.schedule.entries()}
    assert due[past] == pytest.approx(now - 30, abs=1e-3)  # already due: untouched
    assert due[soon] == pytest.approx(now, abs=2)  # moved back by the jump, not before now
    assert worker.deferred.schedule.pop_due(time.time() + 1) == past
    assert worker.deferred.schedule.pop_due(time.time() + 1) == soon
