"""``empathctl queue stats`` on a queue counted by name (more than 10,000 messages): exact
numbers while the daemon runs and messages move between states, after it stopped, with the
counts of unchanged directories reused from control/counts (empath/spool/counts.py) and never
those of a changed one; and the command loads none of the daemon's or the crypto code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from empath.spool import Spool
from empath.spool.counts import SETTLE
from tests.integration.test_empathctl import EMPATHCTL
from tests.integration.test_faults import overrides, send
from tests.support.daemon import REPO, wait_for
from tests.support.fixtures import DaemonFactory
from tests.support.seed import seed_deferred
from tests.support.sink import PRESETS, SinkServer

SEEDED = 10_500  # above stats.FULL_LIMIT: counted from the listings


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([EMPATHCTL, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def _stats(spool: Spool) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_ctl("queue", "stats", "--json", "--spool",
                                          spool.root).stdout)
    assert doc["detail"] == "counts"
    return doc


def _counted(doc: dict[str, Any]) -> dict[str, int]:
    return {status: s["messages"] for status, s in doc["states"].items()}


def _truth(spool: Spool) -> dict[str, int]:
    """The states as listed here, independently of counts.py."""
    return {"pending": len(spool.list_ids("incoming")), "active": len(spool.list_active()),
            "deferred": len(spool.list_ids("deferred")), "held": len(spool.list_ids("hold")),
            "failed": len(spool.list_ids("failed")), "corrupt": len(spool.list_ids("corrupt"))}


def _recorded(spool: Spool, state: str) -> int | None:
    try:
        doc = json.loads(Path(spool.counts_file).read_text())
    except FileNotFoundError:
        return None
    entry = doc["states"].get(state)
    return None if entry is None else int(entry["messages"])


def _settle(spool: Spool, state: str) -> None:
    """Wait until ``state`` has been unchanged long enough for its count to be recorded."""
    path = spool.state_dir(state)
    wait_for(lambda: time.time() - os.stat(path).st_ctime > SETTLE + 0.2, timeout=30)


def _expect(spool: Spool, want: dict[str, int], oldest: tuple[str, str]) -> None:
    """stats says ``want`` and ``oldest``, and so do the listings, before and after it ran
    (the spool was still)."""
    assert _truth(spool) == want
    doc = _stats(spool)
    assert _truth(spool) == want
    assert _counted(doc) == want
    assert doc["total"] == {"messages": sum(want.values()), "bytes": None}
    assert (doc["oldest"]["id"], doc["oldest"]["status"]) == oldest


def _quiet(spool: Spool) -> bool:
    t = _truth(spool)
    return t["pending"] == 0 and t["active"] == 0


def test_stats_counts_exactly_while_messages_move_with_and_without_the_daemon(
        daemon_factory: DaemonFactory) -> None:
    with SinkServer(PRESETS["tempfail"]) as sink:
        daemon = daemon_factory(overrides(sink, retry_base_delay="1h", retry_max_delay="2d"),
                                start=False)
        spool = Spool(str(daemon.spool_path))
        seed_deferred(spool, SEEDED, due=time.time() + 86400)
        seeded = spool.list_ids("deferred")
        daemon.start()
        want = {"pending": 0, "active": 0, "deferred": SEEDED, "held": 0, "failed": 0,
                "corrupt": 0}

        # Settled: the first stats lists deferred/ and records its count; the next reuses it.
        _settle(spool, "deferred")
        assert _recorded(spool, "deferred") is None
        _expect(spool, want, (seeded[0], "deferred"))
        assert _recorded(spool, "deferred") == SEEDED
        _expect(spool, want, (seeded[0], "deferred"))

        # Messages move: two new ones deferred by the worker (the sink says 4xx), three held,
        # two deleted by the operator. The record of SEEDED is stale and must not be used.
        new = [send(daemon, f"new {n}") for n in range(2)]
        wait_for(lambda: all((spool.find(m) or ("",))[0] == "deferred" for m in new)
                 and _quiet(spool), timeout=30)
        _ctl("queue", "hold", "--spool", spool.root, *seeded[:3])
        _ctl("queue", "delete", "-y", "--spool", spool.root, *seeded[3:5])
        assert _recorded(spool, "deferred") == SEEDED
        want.update(deferred=SEEDED + 2 - 5, held=3)
        _expect(spool, want, (seeded[0], "held"))

        # A released message goes back through incoming/ and a worker, and is deferred again.
        _ctl("queue", "release", "--spool", spool.root, seeded[0])
        wait_for(lambda: (spool.find(seeded[0]) or ("",))[0] == "deferred" and _quiet(spool),
                 timeout=30)
        want.update(deferred=SEEDED + 2 - 5 + 1, held=2)
        _expect(spool, want, (seeded[0], "deferred"))
        _settle(spool, "deferred")
        _expect(spool, want, (seeded[0], "deferred"))
        assert _recorded(spool, "deferred") == want["deferred"]

        # The daemon stopped (no worker to keep anything up to date): still exact.
        daemon.stop()
        _expect(spool, want, (seeded[0], "deferred"))
        _ctl("queue", "delete", "-y", "--spool", spool.root, seeded[0], new[0])
        want.update(deferred=want["deferred"] - 2)
        _expect(spool, want, (seeded[1], "held"))
        assert sink.messages == []


def test_queue_stats_loads_none_of_the_daemon_or_crypto_code(tmp_path: Path) -> None:
    """What a stats run imports is its start-up time: argon2 alone (empath.passwords hashes a
    dummy password when loaded) took a second on a busy machine."""
    spool = Spool(str(tmp_path / "spool"))
    spool.create_tree()
    out = tmp_path / "modules.json"
    code = ("import json, sys\nfrom empath.ctl.cli import main\n"
            f"rc = main(['queue', 'stats', '--json', '--spool', {spool.root!r}])\n"
            f"open({str(out)!r}, 'w').write(json.dumps(sorted(sys.modules)))\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total"] == {"messages": 0, "bytes": 0}
    loaded = set(json.loads(out.read_text()))
    assert "empath.ctl.stats" in loaded
    heavy = {"argon2", "empath.passwords", "empath.dkim", "dkim", "dns", "nacl",
             "cryptography", "asyncio", "ssl", "yaml", "empath.spool.writer",
             "empath.spool.wake", "empath.observe.metrics"}
    assert sorted(heavy & loaded) == []
