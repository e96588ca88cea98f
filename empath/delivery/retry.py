"""The retry schedule: a pure function of the attempt number (no clock, no files).

``delay(n) = min(base * 2^(n-1), maximum) * (1 ± jitter)``: the n-th retry waits twice as
long as the one before, up to ``maximum``, spread by a random factor so that a burst of
messages deferred together does not come back together (a thundering herd at the destination).
"""

from __future__ import annotations

import random


def retry_delay(attempt: int, base: float, maximum: float, jitter: float,
                rng: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    exponent = min(max(attempt, 1) - 1, 64)  # 2**64 * base overflows nothing, caps anyway
    delay = min(base * (2.0 ** exponent), maximum)
    if jitter:
        delay *= 1.0 + rng.uniform(-jitter, jitter)
    return max(delay, 0.0)
