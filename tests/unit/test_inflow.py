"""The loop side of in-flow control (empath/smtp/inflow.py): the limit on messages under way
that a late-settling loop lowers, which MAIL FROM waits for it, and what lets a waiter go on.
Real event loop, real timers; no daemon (the daemon's side is
tests/integration/test_inflow.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from empath.smtp import inflow
from empath.smtp.inflow import InFlow


def make(tmp_path: Path, lag: float = 0.003, delay: float = 5.0) -> InFlow:
    return InFlow(str(tmp_path), delay, 1000, lag)


def under_way(flow: InFlow, n: int) -> None:
    for _ in range(n):
        flow.began()


def late_with_eight_under_way(tmp_path: Path) -> InFlow:
    """A loop that settled 100 stores late with 8 messages under way: its limit is down to
    the floor, so a new MAIL FROM waits."""
    flow = make(tmp_path)
    under_way(flow, 8)
    for _ in range(100):
        flow.store_settled(0.05)
    return flow


class Waiters:
    """MAIL FROMs put to ``admit``, numbered in arrival order: which were let go, in order."""

    def __init__(self, flow: InFlow) -> None:
        self.flow = flow
        self.gone: list[int] = []
        self.count = 0

    def add(self, n: int) -> None:
        for _ in range(n):
            number, self.count = self.count, self.count + 1

            def go_on(waited: float, number: int = number) -> None:
                self.gone.append(number)

            if self.flow.admit(go_on):
                self.gone.append(number)


@pytest.fixture(autouse=True)
def _no_idle_release(monkeypatch: Any) -> None:
    """Only finished stores let waiters go here, unless a test says otherwise."""
    monkeypatch.setattr(inflow, "IDLE_RELEASE", 60.0)


def test_a_loop_that_keeps_up_holds_nothing(tmp_path: Path) -> None:
    async def go() -> list[int]:
        flow = make(tmp_path)
        under_way(flow, 40)
        for _ in range(50):
            flow.store_settled(0.001)  # under the 3 ms limit
        assert not flow.congested()
        w = Waiters(flow)
        w.add(10)
        return w.gone

    assert asyncio.run(go()) == list(range(10))


def test_a_late_loop_lowers_its_limit_from_the_messages_under_way(tmp_path: Path) -> None:
    async def go() -> tuple[int, float, float, bool, bool]:
        flow = make(tmp_path)
        under_way(flow, 20)
        settled = 0
        while flow.limit == inflow.LIMIT_MAX:
            flow.store_settled(0.05)  # the running average climbs over the 3 ms limit
            settled += 1
        first = flow.limit
        for _ in range(100):
            flow.store_settled(0.05)
        return settled, first, flow.limit, flow.saturated, make(tmp_path).saturated

    settled, first, later, saturated, fresh = asyncio.run(go())
    assert 1 < settled < 10
    assert first == pytest.approx(20 - inflow.LIMIT_STEP)
    assert later == pytest.approx(20 - 101 * inflow.LIMIT_STEP)
    assert saturated and not fresh


def test_the_limit_never_goes_under_the_floor(tmp_path: Path) -> None:
    async def go() -> tuple[float, list[int]]:
        flow = make(tmp_path)
        under_way(flow, inflow.MIN_UNDER_WAY - 1)
        for _ in range(500):
            flow.store_settled(0.5)
        w = Waiters(flow)
        w.add(1)  # one more still fits under the floor
        return flow.limit, w.gone

    limit, gone = asyncio.run(go())
    assert limit == inflow.MIN_UNDER_WAY and gone == [0]


def test_finished_messages_let_waiters_go_in_order_a_few_at_a_time(tmp_path: Path) -> None:
    async def go() -> list[list[int]]:
        flow = late_with_eight_under_way(tmp_path)
        assert flow.limit == inflow.MIN_UNDER_WAY
        w = Waiters(flow)
        w.add(12)
        seen = [list(w.gone)]
        for _ in range(8):  # each: a message answered, its store still settled late
            flow.ended()
            flow.store_settled(0.05)
            seen.append(list(w.gone))
        return seen

    seen = asyncio.run(go())
    # Eight under way, four allowed: nobody goes until four have ended, then one for each
    # message that ends, first come first served.
    assert [len(s) for s in seen] == [0, 0, 0, 0, 0, 1, 2, 3, 4]
    assert seen[-1] == [0, 1, 2, 3]


def test_a_loop_in_time_again_never_lets_a_crowd_in_at_once(tmp_path: Path) -> None:
    async def go() -> list[int]:
        flow = late_with_eight_under_way(tmp_path)
        w = Waiters(flow)
        w.add(30)
        flow.lag = 0.0  # the loop keeps up again: the limit grows with each store
        flow.limit = 1000.0
        steps = []
        for _ in range(10):
            before = len(w.gone)
            flow.store_settled(0.0)
            steps.append(len(w.gone) - before)
        return steps

    assert asyncio.run(go()) == [inflow.RELEASE_MAX] * 10


def test_a_loop_back_in_time_raises_its_limit_again(tmp_path: Path) -> None:
    async def go() -> tuple[float, float]:
        flow = make(tmp_path)
        under_way(flow, 10)
        for _ in range(100):
            flow.store_settled(0.05)
        low = flow.limit
        for _ in range(400):
            flow.store_settled(0.0)  # the average falls back under the limit, then rises
        return low, flow.limit

    low, high = asyncio.run(go())
    assert high > low + 10


def test_with_no_store_under_way_a_waiter_is_not_left_waiting(tmp_path: Path,
                                                              monkeypatch: Any) -> None:
    """Nothing finishes (every session waits at MAIL FROM, say): after IDLE_RELEASE the
    waiters go on, well before in_flow_delay."""
    monkeypatch.setattr(inflow, "IDLE_RELEASE", 0.005)

    async def go() -> float:
        return await asyncio.wait_for(late_with_eight_under_way(tmp_path).wait(), 2.0)

    waited = asyncio.run(go())
    assert inflow.IDLE_RELEASE <= waited < 1.0


def test_while_backlogged_a_waiter_goes_on_after_the_delay(tmp_path: Path,
                                                           monkeypatch: Any) -> None:
    monkeypatch.setattr(inflow, "IDLE_RELEASE", 0.005)

    async def go() -> float:
        flow = make(tmp_path, delay=0.2)
        flow.backlogged = True
        for _ in range(10):
            flow.store_settled(0.0)  # finished stores do not release while backlogged
        return await asyncio.wait_for(flow.wait(), 2.0)

    waited = asyncio.run(go())
    assert 0.2 <= waited < 1.0


def test_in_flow_lag_zero_ignores_the_loop(tmp_path: Path) -> None:
    async def go() -> float:
        flow = make(tmp_path, lag=0.0)
        under_way(flow, 50)
        for _ in range(100):
            flow.store_settled(1.0)
        assert not flow.saturated
        return await flow.wait()

    assert asyncio.run(go()) == 0.0


def test_stop_lets_every_waiter_go(tmp_path: Path) -> None:
    async def go() -> list[int]:
        flow = late_with_eight_under_way(tmp_path)
        w = Waiters(flow)
        w.add(5)
        assert w.gone == []
        flow.stop()
        return w.gone

    assert asyncio.run(go()) == list(range(5))


def test_stalled_messages_under_way_do_not_keep_mail_from_waiting(tmp_path: Path,
                                                                  monkeypatch: Any) -> None:
    """Eight messages stall in DATA (slow clients) after the loop was late: the limit is at
    the floor, under what is under way. Once the loop is seen to keep up, each message
    finished in time lets the next waiter go: forty go on in about one idle interval, not
    one per interval (2 s), nor after in_flow_delay."""
    monkeypatch.setattr(inflow, "IDLE_RELEASE", 0.05)

    async def go() -> float:
        flow = late_with_eight_under_way(tmp_path)
        loop = asyncio.get_running_loop()
        started = loop.time()
        done = asyncio.Event()
        finished = 0

        def go_on(waited: float) -> None:
            flow.began()
            loop.call_later(0.001, finish)

        def finish() -> None:
            nonlocal finished
            flow.ended()
            flow.store_settled(0.0)
            finished += 1
            if finished == 40:
                done.set()

        for _ in range(40):
            assert not flow.admit(go_on)
        await asyncio.wait_for(done.wait(), 4.0)
        return loop.time() - started

    assert asyncio.run(go()) < 1.0


def test_waiters_let_go_that_never_begin_a_message_stop_holding_room(tmp_path: Path) -> None:
    """A waiter let go counts as under way until it begins a message. One whose client left
    (or whose transaction ended without data) would otherwise hold that room for good: a
    client that connects, sends MAIL FROM and leaves while waiting, over and over, would
    shrink the receiver's room to nothing. After PENDING_TTL it no longer counts."""
    async def go() -> tuple[int, int]:
        flow = late_with_eight_under_way(tmp_path)  # limit at the floor, 4
        w = Waiters(flow)
        w.add(6)
        for _ in range(6):  # 8 -> 2 under way: room for two, both let go (never begin)
            flow.ended()
            flow.store_settled(0.05)
        let_go = len(w.gone)
        await asyncio.sleep(inflow.PENDING_TTL * 1.5)
        flow.store_settled(0.05)  # room again: 4 - 2 under way
        return let_go, len(w.gone)

    assert asyncio.run(go()) == (2, 4)


def test_the_receivers_sweep_makes_the_count_under_way_true_again(tmp_path: Path) -> None:
    """Every second the receiver's sweep counts the connections with a message under way and
    sets the in-flow's count to it: a path that ended a message without telling the in-flow
    (a leak) holds its room for a second at most, not for good."""
    from types import SimpleNamespace

    from empath.smtp.receiver import Receiver

    flow = make(tmp_path)
    under_way(flow, 9)  # six of them leaked: no connection has them any more
    far = 1e18
    conns = [SimpleNamespace(deadline=far, end_of_life=far, under_way=i < 3) for i in range(5)]
    fake = SimpleNamespace(connections=conns, inflow=flow, stopping=True,
                           table=SimpleNamespace(refresh=lambda: None))
    Receiver.sweep(fake)  # type: ignore[arg-type]
    assert flow.under_way == 3
