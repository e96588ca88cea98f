"""In-flow control: when delivery falls behind, or the receiver's loop cannot keep up, new
transactions wait at MAIL FROM.

Postfix's ``in_flow_delay``, in Empath's terms. Mail accepted faster than it is delivered only
grows ``incoming/`` while the receivers take the CPU the delivery workers need; a sender that
waits a moment at MAIL FROM loses nothing (no data has been sent yet, and the 250 for the
message itself comes as quickly as ever). So while ``incoming/`` holds more than
``smtp.in_flow_backlog`` messages (messages no delivery worker has claimed yet), each MAIL FROM
waits until it holds fewer, but at most ``smtp.in_flow_delay`` seconds: with delivery frozen
or stopped, mail is still accepted, one transaction per delay and session.

The backlog is looked at every LOOK_INTERVAL seconds from the receiver's event loop, by
counting names in ``incoming/`` up to the limit (never more than ``backlog`` + 1 entries
read). ``in_flow_delay: 0`` turns it off (nothing is looked at).

The receiver's own loop is watched too, through how late it answers finished spool stores
(the store's thread is done; its callback runs when the loop comes round to it). Late by more
than ``smtp.in_flow_lag`` on average means long turns: more messages under way than the
loop's CPU share serves promptly, so every one of them waits for all the others. The
receiver then keeps a limit on its messages under way (from DATA to their reply): each store
settled late lowers it, each settled in time raises it (by LIMIT_STEP, never under
MIN_UNDER_WAY, unbounded when the loop keeps up), and a MAIL FROM that would start one more
than the limit waits, in arrival order, until a finished message makes room. Room is given
at most RELEASE_MAX waiters per finished store, never to a crowd at once: a crowd let in
together makes the very long turn the limit is there to avoid. A waiter let go counts as under
way until it begins a message, PENDING_TTL at most (its client may leave, or its transaction
end without data: it must not hold the room for good). When no store has finished
for IDLE_RELEASE seconds (nothing under way to finish), waiters go on anyway; no MAIL FROM
waits more than ``in_flow_delay``.

Finishing the messages already sent before starting new ones keeps the time from the final
dot to its 250 short (RFC 1047: the window in which a lost 250 makes a duplicate); the
sender's wait moves to MAIL FROM, before any data is sent, as with Postfix's
``in_flow_delay``. A waiting MAIL FROM costs a callback in a queue: no task, no timer of
its own (one timer serves the whole queue).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from empath._speedups import list_names

LOOK_INTERVAL = 0.1  # seconds between two looks at incoming/
LAG_WEIGHT = 0.05  # weight of each store's lateness in the running average
IDLE_RELEASE = 0.005  # seconds without a finished store after which waiters go on
# Messages under way the limit never goes below: the loop needs a few to keep its CPU share
# and the spool's group commit busy.
MIN_UNDER_WAY = 4
LIMIT_STEP = 0.1  # how far each finished store moves the limit
LIMIT_MAX = 1_000_000.0  # the limit of a loop that keeps up: none in practice
RELEASE_MAX = 2  # waiters let go per finished store, at most
# A waiter let go counts as under way until it begins a message, or for this long at most:
# one whose client left, or whose transaction ended without data, must not hold room forever.
PENDING_TTL = 0.1

Admitted = Callable[[float], None]  # called with the seconds a MAIL FROM waited


class InFlow:
    def __init__(self, incoming: str, delay: float, backlog: int,
                 lag_limit: float = 0.0) -> None:
        self.incoming = incoming
        self.delay = delay
        self.backlog = backlog
        self.lag_limit = lag_limit if delay > 0 else 0.0  # 0: the loop's lateness is ignored
        self.backlogged = False  # incoming/ held more than ``backlog`` at the last look
        self.lag = 0.0  # running average of how late finished stores were settled (seconds)
        self.under_way = 0  # messages between DATA and their reply (or abort)
        self.limit = LIMIT_MAX  # messages under way from which new transactions wait
        # When each waiter let go was (loop time), while it has not begun a message yet.
        self._let_go: collections.deque[float] = collections.deque()
        self._waiters: collections.deque[tuple[float, Admitted]] = collections.deque()
        self._last_store = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._tick_timer: asyncio.TimerHandle | None = None

    def congested(self) -> bool:
        """Whether a MAIL FROM should wait now (it then goes through ``admit``); asked by
        the session at each MAIL FROM, not per read."""
        return self.backlogged or self.saturated

    @property
    def saturated(self) -> bool:
        """As many messages under way as the loop's limit, or others already waiting."""
        return self.lag_limit > 0 and (
            bool(self._waiters) or self.under_way + self._pending() >= self.limit)

    def _pending(self) -> int:
        """Waiters let go that may still begin a message (see PENDING_TTL)."""
        let_go = self._let_go
        if let_go:
            oldest = asyncio.get_running_loop().time() - PENDING_TTL
            while let_go and let_go[0] < oldest:
                let_go.popleft()
        return len(let_go)

    def _room(self) -> int:
        """Waiters to let go now: the room under the limit, at most RELEASE_MAX."""
        return min(RELEASE_MAX, int(self.limit) - self.under_way - self._pending())

    # -- what the receiver reports -----------------------------------------------------------
    def began(self) -> None:
        """A message began: DATA or a first BDAT was accepted."""
        self.under_way += 1
        if self._let_go:
            self._let_go.popleft()

    def ended(self) -> None:
        """A message under way ended: answered, aborted, or its connection gone."""
        self.under_way = max(0, self.under_way - 1)

    def store_settled(self, late: float) -> None:
        """A spool store finished and its callback ran ``late`` seconds after the store
        itself ended (the spool writer calls this). Moves the limit; lets waiters go on."""
        self.lag += LAG_WEIGHT * (late - self.lag)
        if self.lag_limit <= 0:
            return
        if self.lag > self.lag_limit:
            # From the messages actually under way: a limit far above them (left from a
            # quiet spell) would otherwise take thousands of stores to come down.
            self.limit = max(MIN_UNDER_WAY, min(self.limit, self.under_way) - LIMIT_STEP)
        elif self.limit < LIMIT_MAX:
            # In time: room for one more than are under way at least, so messages that
            # stall (a slow client in DATA) cannot keep the limit shut on the others.
            self.limit = min(LIMIT_MAX, max(self.limit + LIMIT_STEP, self.under_way + 1.0))
        if not self._waiters:
            return
        self._last_store = asyncio.get_running_loop().time()
        if not self.backlogged:
            self._release(self._room())

    # -- waiting ---------------------------------------------------------------------------
    def admit(self, go_on: Admitted) -> bool:
        """Whether a MAIL FROM may go on now; if not, ``go_on(seconds waited)`` is called
        when it may (from the loop, later)."""
        if not self.congested():
            return True
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._waiters:
            self._last_store = now
        self._waiters.append((now, go_on))
        if self._tick_timer is None:
            self._tick_timer = loop.call_later(IDLE_RELEASE, self._tick)
        return False

    async def wait(self) -> float:
        """``admit`` for a coroutine: the seconds it waited (0.0 when it need not)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[float] = loop.create_future()

        def go_on(waited: float) -> None:
            if not fut.done():
                fut.set_result(waited)

        if self.admit(go_on):
            return 0.0
        return await fut

    def _release(self, count: int) -> None:
        if count <= 0 or not self._waiters:
            return
        now = asyncio.get_running_loop().time()
        while count > 0 and self._waiters:
            since, go_on = self._waiters.popleft()
            self._let_go.append(now)
            count -= 1
            go_on(now - since)

    def _tick(self) -> None:
        """Every IDLE_RELEASE while MAIL FROMs wait: those that waited ``delay`` go on; with
        no store finished since the last tick (nothing under way to finish) and no backlog,
        the average decays and some go on."""
        self._tick_timer = None
        if not self._waiters:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._waiters and now - self._waiters[0][0] >= self.delay:
            since, go_on = self._waiters.popleft()
            go_on(now - since)
        if not self.backlogged and now - self._last_store >= IDLE_RELEASE:
            self.lag /= 2
            self._let_go.clear()
            self._last_store = now
            self._release(max(1, self._room()))
        if self._waiters:
            self._tick_timer = loop.call_later(IDLE_RELEASE, self._tick)

    # -- life ------------------------------------------------------------------------------
    def start(self) -> None:
        if self.delay > 0:
            self._look()

    def stop(self) -> None:
        """Every waiter goes on (the receiver is stopping)."""
        for handle in (self._timer, self._tick_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._tick_timer = None
        self._release(len(self._waiters))
        self._let_go.clear()

    def _look(self) -> None:
        was = self.backlogged
        self.backlogged = more_than(self.incoming, self.backlog)
        if was and not self.backlogged and self._waiters:
            if self.lag_limit <= 0:
                self._release(len(self._waiters))
            else:  # as a finished store would, one at least
                self._release(max(1, self._room()))
        self._timer = asyncio.get_running_loop().call_later(LOOK_INTERVAL, self._look)


def more_than(directory: str, limit: int) -> bool:
    """Whether ``directory`` has more than ``limit`` entries (reads at most limit + 1)."""
    try:
        return len(list_names(directory, limit + 1)) > limit
    except OSError:
        return False
