"""A small mail world on loopback for remote-delivery tests: DNS, MX sinks, configuration.

``MailWorld`` starts the test DNS server (tests/support/dnsserver.py) with a zone, and one SMTP
sink (tests/support/sink.py) per loopback address, all on one shared port, so MX hosts that
resolve to 127.0.0.2, 127.0.0.3, ... are reached with ``delivery.port`` set to that port::

    with MailWorld(tmp_path, zone, hosts=["127.0.0.2", "127.0.0.3"]) as world:
        cfg = world.config(tls={"default_policy": "required"})   # real empath.config loader
        source = world.source(b"Subject: x\\r\\n\\r\\nbody\\r\\n")   # a MessageSource on disk
        world.sinks["127.0.0.2"].behaviour = PRESETS["greet-421"]
        world.dns.count("example.test", "MX")

``config(**delivery)`` writes a YAML file in the test's directory (base_dir, hostname
``client.test``, the DNS server as resolver, short timeouts) with ``delivery`` keys merged in,
and loads it with ``empath.config.load_config``, so tests exercise the real loader.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import uvloop
import yaml

from empath.config import load_config
from empath.delivery.remote import RemoteTransport
from empath.spool import MessageSource
from tests.support.dnsserver import DNSServer
from tests.support.sink import Behaviour, SinkServer, start_sinks

MESSAGE = b"Received: from a by b\r\nSubject: test\r\n\r\nHello.\r\n.dot\r\n"
TEST_TIMEOUTS = {"connect": "3s", "banner": "5s", "ehlo": "5s", "starttls": "5s", "mail": "5s",
                 "rcpt": "5s", "data_init": "5s", "data_block": "10s",
                 "data_termination": "10s", "quit": "2s"}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class MailWorld:
    def __init__(self, directory: str | Path, zone: dict[str, dict[str, Any]], *,
                 hosts: list[str] | None = None,
                 behaviours: list[Behaviour] | None = None) -> None:
        self.directory = Path(directory)
        self.zone = zone
        self.hosts = hosts or ["127.0.0.2", "127.0.0.3"]
        self.behaviours = behaviours
        self.dns = DNSServer(zone)
        self.sinks: dict[str, SinkServer] = {}
        self.port = 0
        self._files = itertools.count(1)

    def start(self) -> MailWorld:
        self.dns.start()
        sinks = start_sinks(self.hosts, self.behaviours)
        self.sinks = {s.host: s for s in sinks}
        self.port = sinks[0].port
        return self

    def stop(self) -> None:
        for sink in self.sinks.values():
            sink.stop()
        self.dns.stop()

    def __enter__(self) -> MailWorld:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sink(self, host: str) -> SinkServer:
        return self.sinks[host]

    def sessions(self) -> int:
        return sum(len(s.sessions) for s in self.sinks.values())

    def config(self, **delivery: Any) -> Any:
        """A validated configuration pointing delivery at this world."""
        n = next(self._files)
        base = {"port": self.port, "timeouts": TEST_TIMEOUTS,
                "dns": {"resolver": f"127.0.0.1:{self.dns.port}", "timeout": "2s"}}
        document = {"base_dir": str(self.directory), "hostname": "client.test",
                    "delivery": merge(base, delivery)}
        path = self.directory / f"empath-{n}.yaml"
        path.write_text(yaml.safe_dump(document))
        return load_config(str(path))

    def source(self, data: bytes) -> MessageSource:
        """``data`` in a file between other bytes, as in a queue file."""
        n = next(self._files)
        path = self.directory / f"message-{n}"
        head, tail = b"HEAD" * 3, b"\n{\"envelope\": true}\n"
        path.write_bytes(head + data + tail)
        return MessageSource(str(path), len(head), len(data))


# -- delivering in tests ------------------------------------------------------------------
def envelope(sender: str = "s@client.test", **params: Any) -> dict[str, Any]:
    base = {"body": "7BIT", "smtputf8": False, "size": 0, "ret": None, "envid": None}
    return {"id": "01TESTMESSAGE", "sender": sender, "params": {**base, **params}}


def rcpt(address: str, orcpt: str | None = None,
         notify: list[str] | None = None) -> dict[str, Any]:
    return {"address": address, "orcpt": orcpt, "notify": notify}


def deliver(cfg: Any, domain: str, rcpts: list[dict[str, Any]], source: Any,
            env: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        transport = RemoteTransport(cfg)
        try:
            return await transport.deliver(domain, env or envelope(), rcpts, source)
        finally:
            await transport.close()

    outcomes, info = uvloop.run(go())
    json.dumps(info)  # goes into the attempt history as is
    return outcomes, info


def statuses(outcomes: dict[str, Any]) -> dict[str, str]:
    return {addr: o.status for addr, o in outcomes.items()}
