"""A DNSSEC mail world on loopback for DANE tests: a signed zone, a validating resolver, and
SMTP sinks whose STARTTLS certificates do or do not match their TLSA records.

``DaneWorld(directory).start()`` starts, in this order (the TLSA owner names carry the port):

- one SMTP sink per host of ``SINKS`` on 127.0.0.2-8, all on one port (``world.port``);
- the certificates of ``tests/support/certs.py``: a CA, and per sink the certificate below;
- the zone ``dane.test``, signed (tests/support/signedzone.py), with an unsigned delegated child
  ``plain.dane.test``, served by ``world.auth`` (an authoritative server, not validating);
- Debian's unbound (tests/support/unbound.py) with ``dane.test``'s DS as its only trust
  anchor: ``world.unbound``, the validating resolver.

Destination domains (``<name>.dane.test`` unless said otherwise) and what they exercise:

| domain | MX host (sink) | certificate sent | TLSA at ``_<port>._tcp.<MX>`` |
|---|---|---|---|
| ee | mx-ee (.2) | self-signed | ``3 1 1`` of its key (and an unrelated ``3 0 1``) |
| ta | mx-ta (.3) | CA-signed leaf + CA | ``2 0 1`` of the CA certificate |
| taleaf | mx-taleaf (.8) | CA-signed leaf alone | ``2 0 0``: the whole CA certificate |
| taname | mx-taname (.7) | CA-signed, for another name, + CA | ``2 1 1`` of the CA key |
| bad | mx-bad (.4) | self-signed | ``3 1 1`` of mx-ee's key: mismatch |
| fallback | mx-bad, then mx-ee | | |
| notls | mx-notls (.5) | none (no STARTTLS) | ``3 1 1`` of mx-ee's key |
| notlsa | mx-notlsa (.6) | self-signed | none (proven absent) |
| unusable | mx-unusable (.2) | self-signed | ``1 1 1`` only (PKIX-EE: unusable for SMTP) |
| bogus | mx-ee | | its MX RRSIG is corrupted: bogus |
| boguship | mx-bogus (.2) | | the RRSIG of mx-bogus's A record is corrupted |
| bogusfallback | mx-bogus, then mx-ee | | |
| plain.dane.test | mx.plain.dane.test (.6) | self-signed | ``3 1 1`` of nothing, unsigned zone |

``config(resolver="unbound"|"auth", **delivery)`` loads a configuration (the real loader) that
delivers to this world through the validating resolver or, to play a resolver that does not
validate, straight to the authoritative server.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

import yaml

from empath.config import load_config
from empath.spool import MessageSource
from tests.support.certs import (
    CertPair,
    der,
    make_ca,
    make_self_signed,
    make_server_cert,
    spki,
    write_chain,
)
from tests.support.mailworld import TEST_TIMEOUTS, merge
from tests.support.signedzone import SignedDNSServer, TestZone, break_signature, make_zone
from tests.support.sink import Behaviour, SinkServer, start_sinks
from tests.support.unbound import Unbound

SINKS = {"mx-ee": "127.0.0.2", "mx-ta": "127.0.0.3", "mx-bad": "127.0.0.4",
         "mx-notls": "127.0.0.5", "mx-notlsa": "127.0.0.6", "mx-taname": "127.0.0.7",
         "mx-taleaf": "127.0.0.8"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class DaneWorld:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.sinks: dict[str, SinkServer] = {}
        self.port = 0
        self.certs: dict[str, CertPair] = {}
        self.zones: list[TestZone] = []
        self.auth: SignedDNSServer | None = None
        self.unbound: Unbound | None = None
        self._files = itertools.count(1)

    # -- set-up ---------------------------------------------------------------------------
    def _make_certs(self) -> None:
        d = self.directory / "certs"
        ca = make_ca(d)
        self.certs = {
            "ca": ca,
            "mx-ee": make_self_signed(d, "mx-ee.dane.test"),
            "mx-ta": write_chain(d, make_server_cert(d, ca, "mx-ta.dane.test"), ca),
            "mx-taleaf": make_server_cert(d, ca, "mx-taleaf.dane.test"),
            "mx-taname": write_chain(d, make_server_cert(d, ca, "elsewhere.test"), ca),
            "mx-bad": make_self_signed(d, "mx-bad.dane.test"),
            "mx-notlsa": make_self_signed(d, "mx-notlsa.dane.test"),
        }

    def _behaviour(self, host: str) -> Behaviour:
        cert = self.certs.get(host)
        return Behaviour(tls_cert=cert.cert_path if cert else None,
                         tls_key=cert.key_path if cert else None)

    def _make_zones(self) -> None:
        c, tcp = self.certs, "._tcp."
        p = f"_{self.port}"
        ee_key = f"3 1 1 {sha256(spki(c['mx-ee']))}"
        records: dict[str, dict[str, list[str]]] = {
            "ee": {"MX": ["10 mx-ee.dane.test."]},
            "ta": {"MX": ["10 mx-ta.dane.test."]},
            "taleaf": {"MX": ["10 mx-taleaf.dane.test."]},
            "taname": {"MX": ["10 mx-taname.dane.test."]},
            "bad": {"MX": ["10 mx-bad.dane.test."]},
            "fallback": {"MX": ["10 mx-bad.dane.test.", "20 mx-ee.dane.test."]},
            "notls": {"MX": ["10 mx-notls.dane.test."]},
            "notlsa": {"MX": ["10 mx-notlsa.dane.test."]},
            "unusable": {"MX": ["10 mx-unusable.dane.test."]},
            "bogus": {"MX": ["10 mx-ee.dane.test."]},
            "boguship": {"MX": ["10 mx-bogus.dane.test."]},
            "bogusfallback": {"MX": ["10 mx-bogus.dane.test.", "20 mx-ee.dane.test."]},
            "mx-bogus": {"A": [SINKS["mx-ee"]]},
            "mx-unusable": {"A": [SINKS["mx-ee"]]},
            f"{p}{tcp}mx-ee": {"TLSA": [ee_key, f"3 0 1 {sha256(b'unrelated')}"]},
            f"{p}{tcp}mx-ta": {"TLSA": [f"2 0 1 {sha256(der(c['ca']))}"]},
            f"{p}{tcp}mx-taleaf": {"TLSA": [f"2 0 0 {der(c['ca']).hex()}"]},
            f"{p}{tcp}mx-taname": {"TLSA": [f"2 1 1 {sha256(spki(c['ca']))}"]},
            f"{p}{tcp}mx-bad": {"TLSA": [ee_key]},
            f"{p}{tcp}mx-notls": {"TLSA": [ee_key]},
            f"{p}{tcp}mx-unusable": {"TLSA": [f"1 1 1 {sha256(spki(c['mx-ee']))}"]},
        }
        for host, address in SINKS.items():
            records.setdefault(host, {})["A"] = [address]
        top = make_zone("dane.test", records, delegate={"plain.dane.test": "127.0.0.1"})
        break_signature(top, "bogus.dane.test", "MX")
        break_signature(top, "mx-bogus.dane.test", "A")
        child = make_zone("plain.dane.test", {
            "@": {"MX": ["10 mx.plain.dane.test."]},
            "mx": {"A": [SINKS["mx-notlsa"]]},
            f"{p}{tcp}mx": {"TLSA": [f"3 1 1 {sha256(b'nothing')}"]},
        }, signed=False)
        self.zones = [top, child]

    def start(self) -> DaneWorld:
        hosts = list(SINKS)
        sinks = start_sinks([SINKS[h] for h in hosts])
        self.sinks = dict(zip(hosts, sinks, strict=True))
        self.port = sinks[0].port
        self._make_certs()
        for host, sink in self.sinks.items():
            sink.behaviour = self._behaviour(host)
        self._make_zones()
        self.auth = SignedDNSServer(self.zones).start()
        stubs = {"dane.test": self.auth.port, "plain.dane.test": self.auth.port,
                 ".": self.auth.port}
        self.unbound = Unbound(self.directory / "unbound", stubs=stubs,
                               trust_anchors=[self.zones[0].trust_anchor()],
                               probe="dane.test").start()
        return self

    def stop(self) -> None:
        if self.unbound is not None:
            self.unbound.stop()
        if self.auth is not None:
            self.auth.stop()
        for sink in self.sinks.values():
            sink.stop()

    def __enter__(self) -> DaneWorld:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- for tests ------------------------------------------------------------------------
    def reset_sinks(self) -> None:
        """Forget every session and message, and restore each sink's certificate."""
        for host, sink in self.sinks.items():
            sink.sessions.clear()
            sink.messages.clear()
            sink.behaviour = self._behaviour(host)

    def resolver_address(self, resolver: str = "unbound") -> str:
        server = self.unbound if resolver == "unbound" else self.auth
        assert server is not None
        return f"127.0.0.1:{server.port}"

    def delivery_settings(self, resolver: str = "unbound", **delivery: Any) -> dict[str, Any]:
        base = {"port": self.port, "timeouts": TEST_TIMEOUTS,
                "dns": {"resolver": self.resolver_address(resolver), "timeout": "3s"}}
        return merge(base, delivery)

    def config(self, resolver: str = "unbound", **delivery: Any) -> Any:
        """A validated configuration delivering to this world."""
        n = next(self._files)
        document = {"base_dir": str(self.directory), "hostname": "client.test",
                    "delivery": self.delivery_settings(resolver, **delivery)}
        path = self.directory / f"empath-{n}.yaml"
        path.write_text(yaml.safe_dump(document))
        return load_config(str(path))

    def source(self, data: bytes) -> MessageSource:
        n = next(self._files)
        path = self.directory / f"message-{n}"
        path.write_bytes(data)
        return MessageSource(str(path), 0, len(data))
