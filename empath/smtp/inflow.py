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
"""

from __future__ import annotations

import asyncio
import os

LOOK_INTERVAL = 0.1  # seconds between two looks at incoming/


class InFlow:
    def __init__(self, incoming: str, delay: float, backlog: int) -> None:
        self.incoming = incoming
        self.delay = delay
        self.backlog = backlog
        self.congested = False  # incoming/ held more than ``backlog`` at the last look
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.delay > 0:
            self._look()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _look(self) -> None:
        self.congested = more_than(self.incoming, self.backlog)
        self._timer = asyncio.get_running_loop().call_later(LOOK_INTERVAL, self._look)

    async def wait(self) -> float:
        """Until the backlog is under the limit, at most ``delay`` seconds; how long."""
        if not self.congested:
            return 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.delay
        while self.congested and loop.time() < deadline:
            await asyncio.sleep(min(LOOK_INTERVAL / 2, deadline - loop.time()))
        return loop.time() - started


def more_than(directory: str, limit: int) -> bool:
    """Whether ``directory`` has more than ``limit`` entries (reads at most limit + 1)."""
    try:
        with os.scandir(directory) as entries:
            for count, _ in enumerate(entries, 1):
                if count > limit:
                    return True
    except OSError:
        return False
    return False
