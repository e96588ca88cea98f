"""Every writer of the running daemon stores the records of empath/spool/records.py.

Three messages end in failed/ (each from the null sender, whose failure is kept and not
bounced): one received over SMTP, one submitted with ``empath sendmail``, and the bounce the
daemon wrote about a third. Their envelopes, recipients, clients, params and the route records
of their attempts must use only the keys the typed records (and docs/SPOOL.md) define, and
carry every key the record requires.
"""

from __future__ import annotations

import subprocess
import typing
from typing import Any

from empath.spool import read_envelope, records
from tests.integration.test_delivery_e2e import (  # noqa: F401  (world: the fixture)
    WAIT,
    World,
    message,
    queued,
    send,
    spool,
    world,
)
from tests.integration.test_sendmail import EMPATH
from tests.support.sink import Behaviour


def check(value: dict[str, Any], record: Any, what: str) -> None:
    hints = typing.get_type_hints(record, include_extras=True)
    keys = set(hints)
    assert set(value) <= keys, f"{what}: keys outside {record.__name__}: {set(value) - keys}"
    required = {k for k, t in hints.items()
                if record.__total__ and typing.get_origin(t) is not typing.NotRequired}
    missing = required - set(value)
    assert not missing, f"{what}: {record.__name__} keys missing: {missing}"


def test_receiver_submission_and_notice_write_the_typed_records(world: World) -> None:
    world.sink("127.0.0.2").behaviour = Behaviour(rcpt_default=(550, "5.1.1 no such user"))
    daemon = world.daemon()
    received = send(daemon, ["a@example.test"], message("from null", sender=""), sender="")
    original = send(daemon, ["b@example.test"], message("to nowhere", sender="bob@nullmx.test"),
                    sender="bob@nullmx.test")
    r = subprocess.run([EMPATH, "sendmail", "-C", str(daemon.config_path), "-f", "<>",
                        "c@example.test"], input=b"Subject: submitted\n\nbody\n",
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr

    def settled() -> bool:
        q = queued(daemon)
        return set(q) == {"failed"} and len(q["failed"]) == 3

    daemon.wait_for(settled, WAIT, message="three messages in failed/ and nothing else")
    envelopes = {mid: read_envelope(spool(daemon).path("failed", mid))
                 for mid in queued(daemon)["failed"]}
    assert received in envelopes and original not in envelopes
    listeners = {env["client"]["listener"]: env for env in envelopes.values()}
    assert set(listeners) == {"notice", "sendmail", envelopes[received]["client"]["listener"]}
    assert listeners["notice"]["notice_of"] == original
    assert listeners["notice"]["notice_kind"] == "failed"
    assert envelopes[received]["priority"] == 0  # written by the receiver only
    for mid, env in envelopes.items():
        kind = env["client"]["listener"]
        check(env, records.Envelope, kind)
        check(env["client"], records.Client, f"{kind} client")
        check(env["params"], records.Params, f"{kind} params")
        [rcpt] = env["recipients"]
        check(rcpt, records.Recipient, f"{kind} recipient")
        assert rcpt["status"] == "failed" and env["data_size"] > 0, mid
        [attempt] = env["attempts"]
        for route in attempt["routes"]:
            check(route, records.Route, f"{kind} route")
            assert {"domain", "transport", "duration"} <= set(route)
