"""Message-acceptance policy lives in smtp/acceptance.py, transport in smtp/server.py, and no
module of the policy side imports the transport (no import cycle)."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from empath.smtp import replies as R
from empath.smtp.acceptance import Acceptance, Arrival
from empath.smtp.events import Envelope
from empath.spool import records

SMTP = Path(__file__).resolve().parents[2] / "empath" / "smtp"


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_policy_and_receiver_state_never_import_the_transport() -> None:
    for name in ("acceptance.py", "receiver.py", "session.py", "events.py", "params.py"):
        assert "empath.smtp.server" not in imports(SMTP / name), name
    # The transport calls the policy; it no longer spells the policy's steps itself.
    server = (SMTP / "server.py").read_text()
    assert "empath.smtp.acceptance" in imports(SMTP / "server.py")
    for step in ("claim_shared", "message_priority", "domain_owned", "new_envelope",
                 "space_ok", '"on_data"'):
        assert step not in server, step


class _Trace:
    def envelope_keys(self) -> dict[str, str]:
        return {"traceparent": "00-abc-def-01"}


def _acceptance(**arrival: Any) -> Acceptance:
    facts = dict(queue_id="01JQUEUEID0000000000000000", ip="192.0.2.7", port=40000,
                 listener="127.0.0.1:25", tls={"version": "TLSv1.3", "cipher": "X"},
                 helo="client.test", esmtp=True, auth_user=None, trusted=False,
                 local_domains=frozenset({"local.test"}))
    facts.update(arrival)
    cfg = SimpleNamespace(priority=SimpleNamespace(rules=[], step=60.0))
    ctx = SimpleNamespace(metadata={"spam": 0}, priority=None)
    message = SimpleNamespace(mtime=None)
    return Acceptance(SimpleNamespace(cfg=cfg), Arrival(**facts),  # type: ignore[arg-type]
                      ctx, _Trace(), message, b"", None)  # type: ignore[arg-type]


def test_the_envelope_record_is_built_from_the_arrival() -> None:
    acc = _acceptance(auth_user="alice")
    env = Envelope(sender="a@b.test", recipients=[records.new_recipient("c@d.test")],
                   body="8BITMIME")
    acc.ctx.priority = 2  # a module's priority for this message
    acc._set_priority(env)
    record = acc.envelope_record(env)
    assert record["client"] == {"ip": "192.0.2.7", "port": 40000, "helo": "client.test",
                                "esmtp": True, "tls": {"version": "TLSv1.3", "cipher": "X"},
                                "listener": "127.0.0.1:25", "auth": "alice"}
    assert (record["id"], record["priority"], record["traceparent"]) == (
        "01JQUEUEID0000000000000000", 2, "00-abc-def-01")
    assert record["metadata"] == {"spam": 0} and record["params"]["body"] == "8BITMIME"
    assert acc.message.mtime is not None  # moved forward in incoming/ by 2 x step


def test_low_space_refuses_and_aborts_before_any_hook_or_commit() -> None:
    import asyncio

    acc = _acceptance()
    done: list[str] = []
    acc.receiver.space_ok = lambda: False
    acc.receiver.modules = []
    acc.receiver.dedup = None
    acc.message.abort = lambda: done.append("abort")
    acc.message.commit = lambda record: done.append("commit")
    env = Envelope(sender="a@b.test", recipients=[records.new_recipient("c@d.test")])
    assert asyncio.run(acc.store(env)) is R.NO_STORAGE
    assert done == ["abort"]
