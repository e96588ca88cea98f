"""MX and address resolution (empath/delivery/dns.py) against the loopback DNS server.

Cache expiry is driven by a fake clock handed to the resolver, so TTL tests take no time; the
query counters of tests/support/dnsserver.py show what reached the wire.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml

from empath.config import load_config
from empath.delivery.dns import NEGATIVE_TTL_CAP, MXResolver
from empath.delivery.errors import PermanentError, TemporaryError
from tests.support.dnsserver import DNSServer

ZONE: dict[str, dict[str, Any]] = {
    "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")], "ttl": 60},
    "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::2"]},
    "mx2.example.test": {"A": ["127.0.0.3"]},
    "equal.test": {"MX": [(5, "a.equal.test"), (5, "b.equal.test"), (5, "c.equal.test"),
                          (1, "first.equal.test")]},
    "implicit.test": {"A": ["127.0.0.4"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "mixed.test": {"MX": [(0, "."), (10, "mx1.example.test")]},
    "alias.test": {"CNAME": ["mx2.example.test"]},
    "v6only.test": {"AAAA": ["::5"], "A": []},
    "long.test": {"MX": [(10, "mx1.example.test")], "ttl": 3600},
    "_25._tcp.mx1.example.test": {"TLSA": ["3 1 1 " + "ab" * 32, "2 0 1 " + "cd" * 32]},
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer(ZONE, negative_ttl=30) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_counts(dns_server: DNSServer) -> None:
    dns_server.reset_counts()
    dns_server.servfail.clear()
    dns_server.silent.clear()


def dns_config(tmp_path: Path, port: int, **dns: Any) -> Any:
    settings = {"resolver": f"127.0.0.1:{port}", "timeout": "1s", "cache_ttl": "5m",
                "cache_size": 1000, **dns}
    path = tmp_path / "empath.yaml"
    path.write_text(yaml.safe_dump({"base_dir": str(tmp_path), "hostname": "client.test",
                                    "delivery": {"dns": settings}}))
    return load_config(str(path)).delivery.dns


@pytest.fixture
def make(tmp_path: Path, dns_server: DNSServer) -> Any:
    def build(clock: Clock | None = None, **dns: Any) -> MXResolver:
        cfg = dns_config(tmp_path, dns_server.port, **dns)
        return MXResolver(cfg, clock=clock or time.monotonic)
    return build


def run(coro: Any) -> Any:
    return uvloop.run(coro)


def test_mx_hosts_in_preference_order(make: Any) -> None:
    answer = run(make().lookup_mx("example.test"))
    assert answer.hosts == [(10, "mx1.example.test"), (20, "mx2.example.test")]
    assert not answer.implicit


def test_equal_preferences_are_shuffled_on_every_call(make: Any, dns_server: DNSServer) -> None:
    resolver = make()

    async def many() -> list[list[tuple[int, str]]]:
        return [await resolver.resolve_mx("equal.test") for _ in range(300)]

    results = run(many())
    assert all(r[0] == (1, "first.equal.test") for r in results)
    firsts = Counter(r[1][1] for r in results)
    # Three hosts of preference 5, each first about 100 times in 300; 50 is far in the tail.
    assert set(firsts) == {"a.equal.test", "b.equal.test", "c.equal.test"}
    assert min(firsts.values()) > 50
    assert dns_server.count("equal.test", "MX") == 1  # shuffled from the cache


def test_implicit_mx(make: Any) -> None:
    answer = run(make().lookup_mx("implicit.test"))
    assert answer.hosts == [(0, "implicit.test")] and answer.implicit


def test_null_mx_is_permanent(make: Any, dns_server: DNSServer) -> None:
    with pytest.raises(PermanentError) as info:
        run(make().resolve_mx("nullmx.test"))
    assert (info.value.code, info.value.enhanced) == (556, "5.1.10")
    assert dns_server.count("nullmx.test", "A") == 0  # nothing looked up for a connection


def test_null_mx_among_real_ones_is_ignored(make: Any) -> None:
    assert run(make().resolve_mx("mixed.test")) == [(10, "mx1.example.test")]


def test_nxdomain_is_permanent(make: Any) -> None:
    with pytest.raises(PermanentError) as info:
        run(make().resolve_mx("missing.test"))
    assert info.value.enhanced == "5.1.2"


def test_servfail_is_temporary_and_not_cached(make: Any, dns_server: DNSServer) -> None:
    dns_server.servfail.add("example.test")
    resolver = make()
    for _ in range(2):
        with pytest.raises(TemporaryError) as info:
            run(resolver.resolve_mx("example.test"))
        assert info.value.enhanced == "4.4.3"
    assert dns_server.count("example.test", "MX") == 2
    dns_server.servfail.clear()
    assert run(resolver.resolve_mx("example.test"))[0] == (10, "mx1.example.test")


def test_silent_server_times_out_temporarily(make: Any, dns_server: DNSServer) -> None:
    dns_server.silent.add("example.test")
    started = time.monotonic()
    with pytest.raises(TemporaryError) as info:
        run(make(timeout="0.5s").resolve_mx("example.test"))
    assert info.value.enhanced == "4.4.3" and "timed out" in info.value.text
    assert time.monotonic() - started < 3


def test_answers_cached_for_the_record_ttl(make: Any, dns_server: DNSServer) -> None:
    clock = Clock()
    resolver = make(clock)
    run(resolver.resolve_mx("example.test"))  # TTL 60
    clock.now += 59
    run(resolver.resolve_mx("example.test"))
    assert dns_server.count("example.test", "MX") == 1
    clock.now += 2
    run(resolver.resolve_mx("example.test"))
    assert dns_server.count("example.test", "MX") == 2


def test_cache_ttl_caps_a_long_record_ttl(make: Any, dns_server: DNSServer) -> None:
    clock = Clock()
    resolver = make(clock, cache_ttl="10s")
    run(resolver.resolve_mx("long.test"))  # TTL 3600
    clock.now += 9
    run(resolver.resolve_mx("long.test"))
    clock.now += 2
    run(resolver.resolve_mx("long.test"))
    assert dns_server.count("long.test", "MX") == 2


def test_negative_answers_are_cached_briefly(make: Any, dns_server: DNSServer) -> None:
    clock = Clock()
    resolver = make(clock)
    for _ in range(3):
        with pytest.raises(PermanentError):
            run(resolver.resolve_mx("missing.test"))
    assert dns_server.count("missing.test", "MX") == 1
    clock.now += 31  # the zone's SOA minimum (negative_ttl) is 30
    with pytest.raises(PermanentError):
        run(resolver.resolve_mx("missing.test"))
    assert dns_server.count("missing.test", "MX") == 2
    assert NEGATIVE_TTL_CAP <= 60


def test_cache_is_bounded_least_recently_used_first(make: Any, dns_server: DNSServer) -> None:
    resolver = make(cache_size=2)

    async def go() -> None:
        await resolver.resolve_mx("example.test")
        await resolver.resolve_mx("equal.test")
        await resolver.resolve_mx("example.test")  # example.test is now the most recent
        await resolver.resolve_mx("long.test")  # evicts equal.test
        await resolver.resolve_mx("example.test")
        await resolver.resolve_mx("equal.test")

    run(go())
    assert resolver.cached_entries() == 2
    assert dns_server.count("example.test", "MX") == 1
    assert dns_server.count("equal.test", "MX") == 2


def test_cache_size_zero_caches_nothing(make: Any, dns_server: DNSServer) -> None:
    resolver = make(cache_size=0)

    async def go() -> None:
        for _ in range(3):
            await resolver.resolve_mx("example.test")

    run(go())
    assert dns_server.count("example.test", "MX") == 3


def test_concurrent_lookups_share_one_query(make: Any, dns_server: DNSServer) -> None:
    resolver = make()

    async def go() -> list[list[tuple[int, str]]]:
        return await asyncio.gather(*(resolver.resolve_mx("example.test") for _ in range(20)))

    results = run(go())
    assert len(results) == 20 and all(r[0][1] == "mx1.example.test" for r in results)
    assert dns_server.count("example.test", "MX") == 1


def test_addresses_ipv4_then_ipv6(make: Any) -> None:
    resolver = make()
    assert run(resolver.resolve_addresses("mx1.example.test")) == ["127.0.0.2", "::2"]
    assert run(resolver.resolve_addresses("alias.test")) == ["127.0.0.3"]
    assert run(resolver.resolve_addresses("v6only.test")) == ["::5"]
    assert run(resolver.resolve_addresses("127.0.0.9")) == ["127.0.0.9"]


def test_address_of_a_missing_host_is_permanent(make: Any) -> None:
    with pytest.raises(PermanentError):
        run(make().resolve_addresses("nohost.example.test"))
    with pytest.raises(PermanentError):  # the name exists but has no address
        run(make().resolve_addresses("example.test"))


def test_one_failed_address_family_does_not_hide_the_other(make: Any,
                                                           dns_server: DNSServer) -> None:
    dns_server.servfail.add("mx1.example.test/AAAA")
    assert run(make().resolve_addresses("mx1.example.test")) == ["127.0.0.2"]
    dns_server.servfail.add("mx2.example.test")
    with pytest.raises(TemporaryError):
        run(make().resolve_addresses("mx2.example.test"))


def test_trailing_dot_and_case_share_the_cache(make: Any, dns_server: DNSServer) -> None:
    resolver = make()

    async def go() -> None:
        await resolver.resolve_mx("Example.TEST.")
        await resolver.resolve_mx("example.test")

    run(go())
    assert dns_server.count("example.test", "MX") == 1


# -- DNSSEC: this server never validates (AD=0); tests/integration/test_remote_dane.py has the
# validating resolver.
def test_answers_from_a_non_validating_server_are_not_secure(make: Any) -> None:
    resolver = make(dnssec="log")

    async def go() -> tuple[Any, Any, Any]:
        return (await resolver.lookup_mx("example.test"),
                await resolver.lookup_addresses("mx1.example.test"),
                await resolver.lookup_addresses("127.0.0.7"))

    mx, addresses, literal = run(go())
    assert not mx.secure and not addresses.secure and not addresses.literal
    assert literal.literal and literal.addresses == ["127.0.0.7"]


def test_tlsa_records_and_their_absence(make: Any) -> None:
    resolver = make(dnssec="log")
    found = run(resolver.lookup_tlsa("_25._tcp.mx1.example.test"))
    assert sorted((r.usage, r.selector, r.mtype, r.data) for r in found.records) == [
        (2, 0, 1, b"\xcd" * 32), (3, 1, 1, b"\xab" * 32)]
    assert not found.secure
    assert run(resolver.lookup_tlsa("_25._tcp.mx2.example.test")).records == ()


def test_nothing_is_proven_insecure_without_a_validated_answer(make: Any,
                                                               dns_server: DNSServer) -> None:
    assert run(make(dnssec="log").proven_insecure("mx1.example.test")) is None
    # DS asked from the name up, not past the top label.
    assert [dns_server.count(n, "DS") for n in ("mx1.example.test", "example.test",
                                                "test")] == [1, 1, 1]


@pytest.mark.parametrize(("mode", "queries"), [("off", 1), ("log", 2)])
def test_servfail_asked_again_with_checking_disabled_only_with_dnssec(
        make: Any, dns_server: DNSServer, mode: str, queries: int) -> None:
    # Answered SERVFAIL with CD too: a server failure, not a bogus answer.
    dns_server.servfail.add("example.test")
    with pytest.raises(TemporaryError) as info:
        run(make(dnssec=mode).resolve_mx("example.test"))
    assert info.value.text == "DNS lookup of example.test/MX failed: server failure"
    assert dns_server.count("example.test", "MX") == queries
