"""In-flow control: when delivery falls behind, new transactions wait at MAIL FROM.

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

The same wait applies while this receiver's event loop is saturated: when it answers finished
spool stores more than ``smtp.in_flow_lag`` late on average (its turns are long: more
sessions than its CPU share can serve at once), a new transaction waits at MAIL FROM while
the ones under way finish. Then each store the loop settles lets one waiting MAIL FROM go on
for every two finished (fewer transactions at once, so shorter turns), and all of them once
the lateness is back under the limit; a MAIL FROM waits at most ``in_flow_delay``, and when
no store has finished for a few milliseconds the waiters go on anyway. Finishing the
messages already sent before starting new ones keeps the time from the final dot to its 250
short (RFC 1047: the window in which a lost 250 makes a duplicate); the sender's wait moves
to MAIL FROM, before any data is sent, as with Postfix's ``in_flow_delay``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

from empath._speedups import list_names

LOOK_INTERVAL = 0.1  # seconds between two looks at incoming/
LAG_WEIGHT = 0.05  # weight of each store's lateness in the running average
IDLE_RELEASE = 0.005  # seconds without a finished store after which a waiter goes on


class InFlow:
    def __init__(self, incoming: str, delay: float, backlog: int,
                 lag_limit: float = 0.0) -> None:
        self.incoming = incoming
        self.delay = delay
        self.backlog = backlog
        self.lag_limit = lag_limit if delay > 0 else 0.0  # 0: the loop's lateness is ignored
        self.backlogged = False  # incoming/ held more than ``backlog`` at the last look
        self.lag = 0.0  # running average of how late finished stores were settled (seconds)
        self._timer: asyncio.TimerHandle | None = None
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._credit = 0.0
        self._last_store = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def congested(self) -> bool:
        """Whether a MAIL FROM should wait now (it then goes through ``wait``)."""
        return self.backlogged or self.saturated

    @property
    def saturated(self) -> bool:
        return self.lag_limit > 0 and self.lag > self.lag_limit

    def store_settled(self, late: float) -> None:
        """A spool store finished and its callback ran ``late`` seconds after the store
        itself ended (the spool writer calls this). Lets waiting transactions go on."""
        self.lag += LAG_WEIGHT * (late - self.lag)
        if not self._waiters:
            return
        self._last_store = asyncio.get_running_loop().time()
        if not self.saturated:
            self._release(len(self._waiters))
            return
        self._credit += 0.5
        if self._credit >= 1.0:
            self._credit -= 1.0
            self._release(1)

    def _release(self, count: int) -> None:
        while count > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                count -= 1

    def _idle(self) -> None:
        """While transactions wait: with no store finished for IDLE_RELEASE seconds (nothing
        under way to finish), the average decays and one waiter goes on."""
        self._idle_timer = None
        if not self._waiters:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_store >= IDLE_RELEASE:
            self.lag /= 2
            self._release(len(self._waiters) if not self.saturated else 1)
        if self._waiters:
            self._idle_timer = loop.call_later(IDLE_RELEASE, self._idle)

    def start(self) -> None:
        if self.delay > 0:
            self._look()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._release(len(self._waiters))

    def _look(self) -> None:
        self.backlogged = more_than(self.incoming, self.backlog)
        self._timer = asyncio.get_running_loop().call_later(LOOK_INTERVAL, self._look)

    async def wait(self) -> float:
        """Until the backlog is under the limit and the loop is not saturated, at most
        ``delay`` seconds in all; how long."""
        if not self.congested:
            return 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.delay
        if self.saturated:
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            if self._idle_timer is None:
                self._last_store = started
                self._idle_timer = loop.call_later(IDLE_RELEASE, self._idle)
            try:
                await asyncio.wait_for(fut, self.delay)
            except TimeoutError:
                pass
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
        while self.backlogged and loop.time() < deadline:
            await asyncio.sleep(min(LOOK_INTERVAL / 2, deadline - loop.time()))
        return loop.time() - started


def more_than(directory: str, limit: int) -> bool:
    """Whether ``directory`` has more than ``limit`` entries (reads at most limit + 1)."""
    try:
        return len(list_names(directory, limit + 1)) > limit
    except OSError:
        return False
