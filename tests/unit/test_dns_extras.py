"""dns.py beyond MX and addresses: TXT lookups (for MTA-STS) and the DNS metrics (lookup time,
cache hits), against the loopback DNS server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop
import yaml

from empath.config import load_config
from empath.delivery.dns import MXResolver
from empath.observe import metrics
from tests.support.dnsserver import DNSServer

ZONE: dict[str, dict[str, Any]] = {
    "_mta-sts.example.test": {"TXT": ["v=STSv1; id=1;", "x" * 300]},
    "example.test": {"MX": [(10, "mx1.example.test")]},
}


@pytest.fixture
def resolver(tmp_path: Path) -> Iterator[MXResolver]:
    with DNSServer(ZONE) as server:
        path = tmp_path / "empath.yaml"
        path.write_text(yaml.safe_dump({"base_dir": str(tmp_path), "hostname": "c.test",
                                        "delivery": {"dns": {
                                            "resolver": f"127.0.0.1:{server.port}",
                                            "timeout": "1s"}}}))
        yield MXResolver(load_config(str(path)).delivery.dns)


def test_txt_records_are_joined_per_record_and_absent_names_have_none(
        resolver: MXResolver) -> None:
    async def go() -> tuple[list[str], list[str], list[str]]:
        return (await resolver.lookup_txt("_mta-sts.example.test"),
                await resolver.lookup_txt("_mta-sts.missing.test"),
                await resolver.lookup_txt("example.test"))

    found, missing, nodata = uvloop.run(go())
    assert sorted(found) == sorted(["v=STSv1; id=1;", "x" * 300])  # 300: two strings joined
    assert missing == [] and nodata == []


def test_lookup_times_and_cache_hits_are_measured(resolver: MXResolver,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    observed: list[float] = []
    hits: list[float] = []
    instruments = metrics.Instruments(False)  # every other instrument a no-op
    types: list[str] = []
    instruments.dns_duration = SimpleNamespace(labels=lambda t: types.append(t) or SimpleNamespace(
        observe=observed.append))
    instruments.dns_cache_hits = SimpleNamespace(inc=lambda amount=1.0: hits.append(amount))
    monkeypatch.setattr(metrics, "_current", instruments)

    async def go() -> None:
        for _ in range(3):
            await resolver.lookup_mx("example.test")

    uvloop.run(go())
    assert len(observed) == 1 and 0 <= observed[0] < 1.0 and types == ["MX"]
    assert hits == [1.0, 1.0]
