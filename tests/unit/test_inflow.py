"""The saturation side of in-flow control (empath/smtp/inflow.py): which MAIL FROM waits, and
what lets it go on. Real event loop, real timers; no daemon (the daemon's side is
tests/integration/test_inflow.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from empath.smtp import inflow
from empath.smtp.inflow import InFlow


async def turns(n: int = 5) -> None:
    """Let the loop run a few turns (a released waiter's task wakes over more than one)."""
    for _ in range(n):
        await asyncio.sleep(0)


def make(tmp_path: Path, lag: float = 0.003, delay: float = 5.0) -> InFlow:
    return InFlow(str(tmp_path), delay, 1000, lag)


def test_a_loop_that_keeps_up_holds_nothing(tmp_path: Path) -> None:
    async def go() -> float:
        flow = make(tmp_path)
        for _ in range(50):
            flow.store_settled(0.001)  # under the 3 ms limit
        assert not flow.congested
        return await flow.wait()

    assert asyncio.run(go()) == 0.0


def test_while_saturated_two_finished_stores_let_one_waiter_go(tmp_path: Path,
                                                               monkeypatch: Any) -> None:
    monkeypatch.setattr(inflow, "IDLE_RELEASE", 60.0)  # only finished stores release here
    async def go() -> list[int]:
        flow = make(tmp_path)
        for _ in range(100):
            flow.store_settled(0.05)
        assert flow.saturated and flow.congested
        waiters = [asyncio.ensure_future(flow.wait()) for _ in range(4)]
        await turns()  # all four are waiting now
        done_after = []
        for _ in range(4):
            flow.store_settled(0.05)  # still saturated: one waiter per two stores
            await turns()
            done_after.append(sum(w.done() for w in waiters))
        for w in waiters:
            w.cancel()
        return done_after

    assert asyncio.run(go()) == [0, 1, 1, 2]


def test_once_the_lateness_drops_every_waiter_goes_on(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(inflow, "IDLE_RELEASE", 60.0)
    async def go() -> bool:
        flow = make(tmp_path)
        for _ in range(100):
            flow.store_settled(0.05)
        waiters = [asyncio.ensure_future(flow.wait()) for _ in range(5)]
        await turns()
        for _ in range(200):  # prompt settling again: the average falls under the limit
            flow.store_settled(0.0)
            if not flow.saturated:
                break
        await turns()
        return all(w.done() for w in waiters)

    assert asyncio.run(go())


def test_with_no_store_under_way_a_waiter_is_not_left_waiting(tmp_path: Path) -> None:
    """Nothing finishes (every session waits at MAIL FROM, say): after IDLE_RELEASE the
    waiters go on, well before in_flow_delay."""
    async def go() -> float:
        flow = make(tmp_path, delay=5.0)
        for _ in range(100):
            flow.store_settled(0.05)
        return await asyncio.wait_for(flow.wait(), 2.0)

    waited = asyncio.run(go())
    assert inflow.IDLE_RELEASE <= waited < 1.0


def test_in_flow_lag_zero_ignores_the_loop(tmp_path: Path) -> None:
    async def go() -> float:
        flow = make(tmp_path, lag=0.0)
        for _ in range(100):
            flow.store_settled(1.0)
        assert not flow.saturated
        return await flow.wait()

    assert asyncio.run(go()) == 0.0
