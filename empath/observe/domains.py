"""Bounded per-domain delivery series: the busiest ``metrics.top_domains`` destination domains
get a label of their own, everything else is summed as ``domain="other"``.

The delivery workers label at most ``10 x top_domains`` distinct domains each (beyond that,
"other" at once: metrics.py); the admin process folds those counts at scrape time (``fold``)
into at most ``top_domains`` named domains plus "other", busiest first. The set changes as
traffic does, and no exposed series ever goes backwards:

- "other" is the total minus what the named series show, so it only grows;
- a domain that joins the set starts its series from what "other" had not already shown
  (``offset``: its count at the previous scrape, which "other" included), so "other" does
  not drop when a domain leaves it;
- a domain that leaves the set (displaced by one at least ``DISPLACE`` times busier) hands
  its count back to "other", which grows by it; its own series ends (Prometheus sees it
  go stale, and a later return as a reset).

The state (named domains with their offsets, the previous counts) lives in a small JSON file
in the metrics directory, locked while it is read and rewritten, so a respawned admin process
(or two during a reload) continue from it. Pure apart from ``load``/``save``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson

from empath.observe.metrics import OTHER, RESULTS

DISPLACE = 1.5  # a newcomer must be this many times busier than the least busy named domain

Counts = dict[tuple[str, str], float]  # (domain, result) -> attempts


@dataclass
class FoldState:
    named: dict[str, dict[str, float]] = field(default_factory=dict)  # domain -> offsets
    previous: Counts = field(default_factory=dict)


def fold(counts: Counts, state: FoldState, top: int) -> tuple[Counts, FoldState]:
    """The series to expose for ``counts`` (summed over processes) and the next state."""
    totals: dict[str, float] = defaultdict(float)
    for (domain, _), value in counts.items():
        if domain != OTHER:
            totals[domain] += value
    named = {d: dict(offsets) for d, offsets in state.named.items()}
    ranked = sorted(totals, key=lambda d: (-totals[d], d))[:top]
    for domain in ranked:
        if domain in named:
            continue
        if len(named) >= top:
            weakest = min(named, key=lambda d: (totals.get(d, 0.0), d))
            if totals[domain] <= DISPLACE * totals.get(weakest, 0.0):
                break  # ranked busiest first: no later candidate displaces anyone either
            del named[weakest]
        # What "other" has shown of this domain so far stays in "other".
        named[domain] = {r: state.previous.get((domain, r), 0.0) for r in RESULTS}
    out: Counts = {}
    other: dict[str, float] = dict.fromkeys(RESULTS, 0.0)
    for (_, result), value in counts.items():
        other[result] = other.get(result, 0.0) + value
    for domain, offsets in named.items():
        for result in RESULTS:
            shown = max(0.0, counts.get((domain, result), 0.0) - offsets.get(result, 0.0))
            out[(domain, result)] = shown
            other[result] = other.get(result, 0.0) - shown
    for result, value in other.items():
        out[(OTHER, result)] = max(0.0, value)
    return out, FoldState(named, dict(counts))


def follow(counts: dict[tuple[str, str], float], names: set[str] | list[str],
           state: FoldState) -> tuple[dict[tuple[str, str], float], FoldState]:
    """Fold another per-domain family (``counts`` keyed by (domain, any sample key): the
    buckets, count and sum of a histogram) to the domains ``names`` that ``fold`` chose,
    by the same rules: a domain that joins starts from what "other" had not shown yet, one
    that leaves hands its count back to "other", which never goes backwards."""
    named: dict[str, dict[str, float]] = {}
    for domain in names:
        if domain == OTHER:
            continue
        offsets = state.named.get(domain)
        if offsets is None:  # joins now: what "other" has shown of it stays there
            offsets = {k: v for (d, k), v in state.previous.items() if d == domain}
        named[domain] = offsets
    out: dict[tuple[str, str], float] = {}
    other: dict[str, float] = defaultdict(float)
    for (_, key), value in counts.items():
        other[key] += value
    for (domain, key), value in counts.items():
        offsets = named.get(domain)
        if offsets is None:
            continue
        shown = max(0.0, value - offsets.get(key, 0.0))
        out[(domain, key)] = shown
        other[key] -= shown
    for key, value in other.items():
        out[(OTHER, key)] = max(0.0, value)
    return out, FoldState(named, dict(counts))


@contextlib.contextmanager
def locked_state(path: str) -> Iterator[list[FoldState]]:
    """Read the state under an exclusive lock; the caller puts the new state in the yielded
    one-item list, which is written back (atomically) before the lock is released."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        box = [load(path)]
        yield box
        save(path, box[0])
    finally:
        os.close(fd)


def load(path: str) -> FoldState:
    try:
        with open(path, "rb") as fh:
            doc = orjson.loads(fh.read())
        named = {str(d): {str(r): float(v) for r, v in offs.items()}
                 for d, offs in doc["named"].items()}
        previous = {(str(d), str(r)): float(v) for d, r, v in doc["previous"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return FoldState()
    return FoldState(named, previous)


def save(path: str, state: FoldState) -> None:
    doc = {"named": state.named,
           "previous": [[d, r, v] for (d, r), v in state.previous.items()]}
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(OSError):
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps(doc))
        os.replace(tmp, path)
