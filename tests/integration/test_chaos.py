"""The chaos harness's short profiles: SIGKILLs under load, then message-by-message checks.

``tools/chaos_harness.py`` (docs/RELIABILITY.md) runs the real daemon relaying to a recording
sink while the benchmark load generator sends continuously, and SIGKILLs receivers, delivery
workers and the master (restarted with ``empath start``) at random instants. Each profile runs
once per module; the tests below read its JSON results. The full run (1,000 kills) is
``tools/chaos`` by hand; its latest figures are in docs/RELIABILITY.md.

- short: 30 kills over 30 s (3 of them the master) against a sink that accepts everything;
- flaky: 15 kills over 20 s against a sink that fails 20 % of transactions (451 to RCPT, 451
  after the data, or a dropped connection after 354), so every retry path runs under kills too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tools" / "chaos_harness.py"

pytestmark = pytest.mark.slow


def run_profile(tmp_path: Path, *args: str, timeout: float = 110.0) -> dict[str, Any]:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(HARNESS), "--quiet", "--json", str(out), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert out.exists(), f"the harness wrote no results (status {proc.returncode})\n" \
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results: dict[str, Any] = json.loads(out.read_text())
    results["exit_status"] = proc.returncode
    results["summary"] = proc.stdout[-4000:]
    return results


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_profile(tmp_path_factory.mktemp("chaos-short"), "--kills", "30",
                       "--duration", "30", "--seed", "20261125")


@pytest.fixture(scope="module")
def flaky(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_profile(tmp_path_factory.mktemp("chaos-flaky"), "--kills", "15",
                       "--duration", "20", "--flaky-sink", "0.2", "--seed", "7")


def describe(r: dict[str, Any]) -> str:
    return f"\n{r['summary']}"


def test_short_profile_kills_every_kind_of_process(short: dict[str, Any]) -> None:
    k = short["kills"]
    assert k["total"] == 30 and k["master"] == 3, describe(short)
    assert k["receiver"] >= 5 and k["delivery"] >= 5, describe(short)
    assert short["restarts"]["count"] == 3, describe(short)
    assert not short["unexpected_master_exits"], describe(short)
    assert short["messages"]["acknowledged"] >= 1000, describe(short)  # load really ran


def test_short_profile_loses_no_acknowledged_message(short: dict[str, Any]) -> None:
    m = short["messages"]
    assert short["drain"]["drained"], describe(short)
    assert m["lost"] == 0, f"lost: {short['lost_tokens'][:10]}" + describe(short)
    assert m["acknowledged_delivered"] == m["acknowledged"], describe(short)
    assert not short["notices"], describe(short)  # nothing bounced
    # Every 250 was seen by the harness (no load session cut short) and nothing foreign came.
    assert not [f for f in short["failures"] if "cancelled" in f or "unknown tokens" in f], \
        describe(short)


def test_short_profile_duplicates_come_only_from_kills(short: dict[str, Any]) -> None:
    d = short["duplicates"]
    bad = [x for x in d["details"] if x["problems"]]
    assert d["unexplained"] == 0, json.dumps(bad[:5], indent=1) + describe(short)


def test_short_profile_leaves_the_spool_clean(short: dict[str, Any]) -> None:
    assert short["spool_leftovers"] == {}, (
        "\n".join(short["leftover_owners"]) + describe(short))
    assert not short["leftover_processes"], describe(short)
    # The harness's own verdict agrees with the checks above.
    assert short["exit_status"] == (0 if short["verdict"] == "PASS" else 1), describe(short)


def test_flaky_sink_retries_lose_nothing(flaky: dict[str, Any]) -> None:
    m = flaky["messages"]
    faults = flaky["sink"].get("faults", {})
    assert sum(faults.values()) >= 100, describe(flaky)  # the sink really failed
    assert {"rcpt_451", "data_451", "drop_after_354"} <= set(faults), describe(flaky)
    assert flaky["kills"]["total"] == 15, describe(flaky)
    assert flaky["drain"]["drained"], describe(flaky)
    assert m["lost"] == 0, f"lost: {flaky['lost_tokens'][:10]}" + describe(flaky)
    assert flaky["duplicates"]["unexplained"] == 0, describe(flaky)
    assert not flaky["notices"], describe(flaky)


def test_flaky_sink_leaves_the_spool_clean(flaky: dict[str, Any]) -> None:
    assert flaky["spool_leftovers"] == {}, (
        "\n".join(flaky["leftover_owners"]) + describe(flaky))
    assert flaky["verdict"] == "PASS" and flaky["exit_status"] == 0, describe(flaky)
