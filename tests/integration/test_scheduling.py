"""Which scheduling policy each of the daemon's threads runs under (Linux): the receivers'
event loops as ordinary threads; the receivers' spool store threads and every thread of the
delivery workers as SCHED_BATCH (the same CPU share, no wake-up preemption), so that neither a
store handed over nor a worker woken by a reply pushes a receiver's loop off its CPU while a
client waits for its 250."""

from __future__ import annotations

import os
from typing import Any

from tests.support.daemon import EmpathDaemon


def policies(pid: int) -> dict[int, int]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = os.sched_getscheduler(int(tid))
        except OSError:
            continue  # a thread that just ended
    return out


def test_delivery_workers_and_store_threads_run_as_batch_receivers_loops_do_not(
        daemon_factory: Any) -> None:
    d: EmpathDaemon = daemon_factory({"processes": {"receivers": 2, "delivery": 2}})
    with d.smtp() as s:  # a message stored: the store threads have worked
        assert s.sendmail("a@example.org", ["alice@localhost"], b"Subject: x\r\n\r\nx\r\n") == {}
    workers, receivers = d.child_pids("delivery"), d.child_pids("receiver")
    assert len(workers) == 2 and len(receivers) == 2
    for pid in workers:
        assert set(policies(pid).values()) == {os.SCHED_BATCH}, pid
    for pid in receivers:
        threads = policies(pid)
        assert threads[pid] == os.SCHED_OTHER  # the event loop
        assert sum(1 for p in threads.values() if p == os.SCHED_BATCH) >= 1  # store threads
    assert os.sched_getscheduler(d.master_pid) == os.SCHED_OTHER


def test_a_policy_the_administrator_chose_is_kept(daemon_factory: Any) -> None:
    """Started under SCHED_IDLE (as `chrt --idle 0 empath run` or systemd's
    CPUSchedulingPolicy=idle would), no thread of the daemon is moved to SCHED_BATCH."""
    d: EmpathDaemon = daemon_factory({"processes": {"receivers": 1, "delivery": 1}},
                                     start=False)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        d.start()
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    with d.smtp() as s:
        assert s.sendmail("a@example.org", ["alice@localhost"], b"Subject: x\r\n\r\nx\r\n") == {}
    for pid in [*d.child_pids("delivery"), *d.child_pids("receiver"), d.master_pid]:
        assert set(policies(pid).values()) == {os.SCHED_IDLE}, pid
