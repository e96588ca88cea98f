"""DNSSEC and DANE through the real daemon: the route's validation state and DANE verdict are
kept in the message's attempt history and shown by ``empathctl queue view``.

The daemon's delivery worker resolves through Debian's unbound, which validates the signed test
zone of tests/support/daneworld.py; one message goes to a domain whose MX matches its TLSA
records and to one whose MX does not.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from empath.spool import CorruptFile, Spool, read_envelope
from tests.support.daemon import REPO, EmpathDaemon
from tests.support.daneworld import DaneWorld
from tests.support.fixtures import DaemonFactory
from tests.support.unbound import UNBOUND

EMPATHCTL = str(REPO / ".venv" / "bin" / "empathctl")
WAIT = 30.0


@pytest.fixture(scope="module")
def dane_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaneWorld]:
    if UNBOUND is None:
        pytest.fail("unbound is not installed: tools/test installs it (tools/install-test-deps, "
                    "Debian package unbound); the DANE tests need a validating resolver")
    with DaneWorld(tmp_path_factory.mktemp("dane")) as world:
        yield world


def start_daemon(factory: DaemonFactory, world: DaneWorld) -> EmpathDaemon:
    delivery = world.delivery_settings(dns={"dnssec": "enforce"},
                                       queue_scan_interval="0.2s", retry_base_delay="1h")
    return factory({"processes": {"receivers": 1, "delivery": 1}, "delivery": delivery})


def send(daemon: EmpathDaemon, rcpts: list[str]) -> str:
    with daemon.smtp() as client:
        client.ehlo("client.test")
        client.mail("sender@localhost")
        for address in rcpts:
            code, reply = client.rcpt(address)
            assert code == 250, reply
        code, reply = client.data(b"Subject: dane\r\n\r\nHello.\r\n")
        assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def deferred_envelope(daemon: EmpathDaemon, queue_id: str) -> dict[str, Any]:
    path = Spool(str(daemon.spool_path)).path("deferred", queue_id)

    def read() -> dict[str, Any] | None:
        try:
            env = read_envelope(path)
        except (FileNotFoundError, CorruptFile):
            return None
        return env if env.get("attempt_count", 0) >= 1 else None

    return daemon.wait_for(read, WAIT, message=f"{queue_id} in deferred/")


def ctl(daemon: EmpathDaemon, *args: str) -> str:
    result = subprocess.run([EMPATHCTL, *args, "-c", str(daemon.config_path)],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_queue_view_shows_the_validation_state_and_dane_verdict_of_each_route(
        daemon_factory: DaemonFactory, dane_world: DaneWorld) -> None:
    daemon = start_daemon(daemon_factory, dane_world)
    qid = send(daemon, ["good@ee.dane.test", "bad@bad.dane.test"])
    env = deferred_envelope(daemon, qid)
    [attempt] = env["attempts"]
    routes = {r["domain"]: r for r in attempt["routes"]}
    good, bad = routes["ee.dane.test"], routes["bad.dane.test"]
    assert (good["dnssec"], good["dane"]) == ("secure", "verified")
    assert good["dane_match"].startswith("DANE-EE 3 1 1 ")
    assert (bad["dnssec"], bad["dane"]) == ("secure", "failed")
    assert bad["dnssec_lookups"]["bad.dane.test/MX"] == "secure"
    statuses = {r["address"]: r["status"] for r in env["recipients"]}
    assert statuses == {"good@ee.dane.test": "delivered", "bad@bad.dane.test": "deferred"}
    assert dane_world.sinks["mx-ee"].wait_for_messages(1)[0].tls

    text = ctl(daemon, "queue", "view", qid)
    route_lines = [line for line in text.splitlines() if line.strip().startswith("route ")]
    assert len(route_lines) == 2
    good_line = next(line for line in route_lines if "domain=ee.dane.test" in line)
    bad_line = next(line for line in route_lines if "domain=bad.dane.test" in line)
    assert "dnssec=secure" in good_line and "dane=verified" in good_line
    assert "dane_match=DANE-EE 3 1 1" in good_line
    assert "dnssec=secure" in bad_line and "dane=failed" in bad_line
    assert "DANE: certificate of mx-bad.dane.test rejected" in text
    viewed = json.loads(ctl(daemon, "queue", "view", qid, "--json"))
    assert viewed["envelope"]["attempts"][0]["routes"] == attempt["routes"]
