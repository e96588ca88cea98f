"""MTA-STS (RFC 8461) as pure functions: the TXT record, the policy file, MX matching, the
policy cache with fake DNS and fetches, and what a policy demands of one delivery."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from empath.delivery.errors import TemporaryError
from empath.delivery.mtasts import (
    MAX_AGE_LIMIT,
    Policy,
    PolicyCache,
    PolicyError,
    StsCheck,
    mx_matches,
    parse_policy,
    parse_txt,
)
from empath.delivery.tls import MTA_STS_ENFORCE, TLSPolicy

GOOD = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n" \
       "max_age: 604800\r\n"


# -- TXT record -----------------------------------------------------------------------------
@pytest.mark.parametrize(("records", "expected"), [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1; id=abc; ext=1"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=abc;"], "abc"),  # other TXT records are ignored
    (["v=STSv1; id=a;", "v=STSv1; id=b;"], None),  # two: no MTA-STS
    (["v=STSv1; id=;"], None),
    (["v=STSv1; id=not-alnum;"], None),
    (["v=STSv1; id=" + "a" * 33], None),
    (["v=STSv1"], None),  # no ";", no id
    (["v=STSv2; id=abc;"], None),
    ([], None),
])
def test_txt_record(records: list[str], expected: str | None) -> None:
    assert parse_txt(records) == expected


# -- policy file ----------------------------------------------------------------------------
def test_policy_parses() -> None:
    p = parse_policy(GOOD, "id1")
    assert p == Policy("enforce", ("mail.example.com", "*.example.net"), 604800, "id1")


def test_policy_accepts_lf_blank_lines_unknown_fields_and_keeps_the_first_duplicate() -> None:
    text = ("version: STSv1\nmode: testing\n\nfuture_field: whatever\nmode: enforce\n"
            "mx:MAIL.Example.COM.\nmax_age:99999999999\n")
    with pytest.raises(PolicyError):  # 11 digits: not a max_age
        parse_policy(text)
    p = parse_policy(text.replace("99999999999", "9999999999"))
    assert p.mode == "testing" and p.mx == ("mail.example.com",)
    assert p.max_age == MAX_AGE_LIMIT  # capped at about a year


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n").mx == ()


@pytest.mark.parametrize(("text", "why"), [
    (GOOD.replace("STSv1", "STSv2"), "version"),
    (GOOD.replace("version: STSv1\r\n", ""), "version"),
    (GOOD.replace("enforce", "enforcing"), "mode"),
    (GOOD.replace("max_age: 604800\r\n", ""), "max_age"),
    (GOOD.replace("604800", "-1"), "max_age"),
    ("version: STSv1\nmode: enforce\nmax_age: 5\n", "mx"),
    (GOOD + "this is not a field\n", "key: value"),
    (GOOD.replace("*.example.net", "*.*.example.net"), "MX pattern"),
    (GOOD.replace("mail.example.com", "localhost"), "MX pattern"),
])
def test_invalid_policies(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        parse_policy(text)


@pytest.mark.parametrize(("pattern", "host", "expected"), [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.example.com.", True),
    ("mail.example.com", "mail2.example.com", False),
    ("*.example.com", "mx1.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", ".example.com", False),
])
def test_mx_matching(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


# -- the cache --------------------------------------------------------------------------------
class FakeWorld:
    def __init__(self) -> None:
        self.txt: dict[str, list[str]] = {"_mta-sts.example.com": ["v=STSv1; id=1;"]}
        self.policies: dict[str, str] = {"example.com": GOOD}
        self.txt_fails = False
        self.fetch_fails = False
        self.fetched: list[str] = []
        self.now = 0.0
        self.gate: asyncio.Event | None = None

    async def lookup_txt(self, name: str) -> list[str]:
        if self.txt_fails:
            raise TemporaryError.make("dns_temp", name=name, reason="timed out")
        return self.txt.get(name, [])

    async def fetch(self, domain: str) -> str:
        self.fetched.append(domain)
        if self.gate is not None:
            await self.gate.wait()
        if self.fetch_fails:
            raise OSError("connection refused")
        return self.policies[domain]

    def cache(self, size: int = 100) -> PolicyCache:
        return PolicyCache(self.lookup_txt, self.fetch, size, clock=lambda: self.now)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_cache_fetches_once_and_again_when_the_id_changes() -> None:
    w = FakeWorld()
    cache = w.cache()

    async def go() -> None:
        assert (await cache.policy("example.com")).mode == "enforce"  # type: ignore[union-attr]
        assert (await cache.policy("Example.COM.")) is not None
        assert w.fetched == ["example.com"]
        w.txt["_mta-sts.example.com"] = ["v=STSv1; id=2;"]
        w.policies["example.com"] = GOOD.replace("enforce", "testing")
        assert (await cache.policy("example.com")).mode == "testing"  # type: ignore[union-attr]
        assert len(w.fetched) == 2 and cache.fetches == 2

    run(go())


def test_cached_policy_survives_a_missing_txt_record_or_failed_fetch_until_it_expires() -> None:
    w = FakeWorld()
    cache = w.cache()

    async def go() -> None:
        first = await cache.policy("example.com")
        assert first is not None
        w.txt.clear()
        assert await cache.policy("example.com") == first  # TXT gone: cached policy stays
        w.txt_fails = True
        assert await cache.policy("example.com") == first  # TXT lookup failed: the same
        w.txt_fails = False
        w.txt["_mta-sts.example.com"] = ["v=STSv1; id=2;"]
        w.fetch_fails = True
        assert await cache.policy("example.com") == first  # new id, fetch failed: keep
        w.now += 604800
        assert await cache.policy("example.com") is None  # expired, nothing new to be had

    run(go())


def test_failed_fetch_is_not_repeated_at_once() -> None:
    w = FakeWorld()
    w.fetch_fails = True
    cache = w.cache()

    async def go() -> None:
        assert await cache.policy("example.com") is None
        assert await cache.policy("example.com") is None
        assert len(w.fetched) == 1
        w.now += 301
        w.fetch_fails = False
        assert await cache.policy("example.com") is not None
        assert len(w.fetched) == 2

    run(go())


def test_invalid_policy_is_no_policy() -> None:
    w = FakeWorld()
    w.policies["example.com"] = "<html>hello</html>"
    assert run(w.cache().policy("example.com")) is None


def test_no_txt_record_means_no_fetch() -> None:
    w = FakeWorld()
    assert run(w.cache().policy("other.com")) is None and w.fetched == []


def test_concurrent_lookups_share_one_fetch() -> None:
    w = FakeWorld()
    cache = w.cache()

    async def go() -> list[Any]:
        w.gate = asyncio.Event()
        tasks = [asyncio.ensure_future(cache.policy("example.com")) for _ in range(5)]
        await asyncio.sleep(0.01)
        w.gate.set()
        return await asyncio.gather(*tasks)

    results = run(go())
    assert len(w.fetched) == 1 and all(r is not None and r.id == "1" for r in results)


def test_cache_is_bounded() -> None:
    w = FakeWorld()
    for n in range(5):
        w.txt[f"_mta-sts.d{n}.com"] = ["v=STSv1; id=1;"]
        w.policies[f"d{n}.com"] = GOOD
    cache = w.cache(size=3)

    async def go() -> None:
        for n in range(5):
            await cache.policy(f"d{n}.com")

    run(go())
    assert [cache.cached(f"d{n}.com") is not None for n in range(5)] == [False, False] + [
        True] * 3


# -- what a policy demands of one delivery ---------------------------------------------------
OPPORTUNISTIC = TLSPolicy("opportunistic", verify=True)


def test_enforce_refuses_hosts_outside_the_policy_and_requires_verified_tls() -> None:
    check = StsCheck.of("example.com", parse_policy(GOOD), verify=False)
    assert check is not None and check.enforcing
    refusal = check.refuse_host("evil.example.org")
    assert refusal is not None and "not in its MTA-STS policy" in refusal.text
    assert check.result == "failed"
    assert check.refuse_host("mx1.example.net") is None
    assert check.tls_policy(OPPORTUNISTIC) is MTA_STS_ENFORCE
    assert MTA_STS_ENFORCE.verify and MTA_STS_ENFORCE.requires_tls
    check.connected("mx1.example.net", tls=True, tls_failure=None, dane=False)
    info: dict[str, Any] = {}
    check.fill(info)
    assert info == {"mta_sts_result": "verified"}


@pytest.mark.parametrize(("host", "tls", "verify", "failure"), [
    ("mail.example.com", True, True, None),
    ("other.example.org", True, True, "not in the policy"),
    ("mail.example.com", False, True, "no TLS with mail.example.com (STARTTLS not offered)"),
    ("mail.example.com", True, False, "not verified (accept_invalid_certs)"),
])
def test_testing_only_records(host: str, tls: bool, verify: bool, failure: str | None) -> None:
    check = StsCheck.of("example.com", parse_policy(GOOD.replace("enforce", "testing")),
                        verify=verify)
    assert check is not None and not check.enforcing
    assert check.refuse_host(host) is None
    assert check.tls_policy(OPPORTUNISTIC) is OPPORTUNISTIC
    check.connected(host, tls=tls, tls_failure=None if tls else "STARTTLS not offered",
                    dane=False)
    info: dict[str, Any] = {}
    check.fill(info)
    if failure is None:
        assert info == {"mta_sts_result": "verified"}
    else:
        assert info["mta_sts_result"] == "failed" and failure in info["mta_sts_failure"]


def test_dane_takes_precedence_and_mode_none_demands_nothing() -> None:
    check = StsCheck.of("example.com", parse_policy(GOOD), verify=True)
    assert check is not None
    check.connected("anything.example.org", tls=True, tls_failure=None, dane=True)
    assert check.result == "dane" and check.failure is None
    none = parse_policy("version: STSv1\nmode: none\nmax_age: 1\n")
    assert StsCheck.of("example.com", none, verify=True) is None
    assert StsCheck.of("example.com", None, verify=True) is None
