"""Delivery hooks, custom delivery strategies, embedding, and the examples/ run end to end.

Every test runs the real daemon (or, for embedding, the example application that starts one);
mail goes in with smtplib and out to loopback SMTP sinks, an SQLite file, Maildirs, or the
example webhook receiver; the spool's envelopes show what the hooks kept.
"""

from __future__ import annotations

import contextlib
import email
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from empath.spool import Spool, read_queue_file
from tests.support.daemon import EmpathDaemon, empath_command, wait_for
from tests.support.fixtures import DaemonFactory
from tests.support.sink import SinkServer, start_sinks

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
FAST = {"retry_base_delay": "1s", "retry_max_delay": "1s", "retry_jitter_factor": 0,
        "queue_scan_interval": "0.2s"}
ENV = {"PYTHONPATH": f"{EXAMPLES}{os.pathsep}{REPO}"}
WAIT = 30.0


@pytest.fixture
def sinks() -> Iterator[list[SinkServer]]:
    started = start_sinks(["127.0.0.2", "127.0.0.3"])
    try:
        yield started
    finally:
        for sink in started:
            sink.stop()


def message(tenant: str | None, subject: str = "hello") -> bytes:
    head = f"From: app@localhost\r\nTo: user@example.test\r\nSubject: {subject}\r\n"
    if tenant is not None:
        head += f"X-Tenant: {tenant}\r\n"
    return (head + "\r\nbody\r\n").encode()


def envelopes(d: EmpathDaemon, state: str) -> list[dict[str, Any]]:
    spool = Spool(str(d.spool_path))
    out = []
    for mid in spool.list_ids(state):
        with contextlib.suppress(FileNotFoundError):
            out.append(read_queue_file(spool.path(state, mid))[0])
    return out


def router_daemon(factory: DaemonFactory, sinks: list[SinkServer], **options: Any
                  ) -> EmpathDaemon:
    default, _ = sinks
    opts = {"header": "X-Tenant", **options}
    d: EmpathDaemon = factory({
        "smtp": {"modules": [{"name": "header_router", "options": opts}]},
        "delivery": {**FAST, "domains": {"example.test": {
            "mx_override": f"{default.host}:{default.port}", "tls": "disabled"}}},
    }, start=False)
    return d.start(env=ENV)


def test_a_hook_routes_tags_and_adds_a_header(daemon_factory: DaemonFactory,
                                              sinks: list[SinkServer]) -> None:
    default, tenant_relay = sinks
    d = router_daemon(daemon_factory, sinks,
                      routes={"acme": f"{tenant_relay.host}:{tenant_relay.port}"})
    with d.smtp() as s:
        s.sendmail("app@localhost", ["user@example.test"], message("ACME"))
        s.sendmail("app@localhost", ["user@example.test"], message(None, "untagged"))
    [routed] = tenant_relay.wait_for_messages(1, WAIT)
    [plain] = default.wait_for_messages(1, WAIT)
    parsed = email.message_from_bytes(routed.data)
    assert parsed["X-Empath-Tenant"] == "acme" and parsed["Subject"] == "hello"
    # The header is on top of the message as sent, above Empath's own Received:.
    assert routed.data.startswith(b"X-Empath-Tenant: acme\r\n")
    assert b"X-Empath-Tenant" not in plain.data
    assert "routed to 127.0.0.3" in d.log_text()


def test_hook_metadata_from_receipt_reaches_delivery_and_survives_retries_and_a_restart(
        daemon_factory: DaemonFactory, sinks: list[SinkServer]) -> None:
    d = router_daemon(daemon_factory, sinks, hold=["paused"])
    with d.smtp() as s:
        s.sendmail("app@localhost", ["user@example.test"], message("paused"))

    def held_twice() -> dict[str, Any] | None:
        for env in envelopes(d, "deferred"):
            meta = env.get("metadata", {}).get("header_router", {})
            if meta.get("outcomes", {}).get("deferred", 0) >= 2:
                return env
        return None

    env = d.wait_for(held_twice, WAIT, message="two deferred attempts recorded by the hook")
    meta = env["metadata"]["header_router"]
    assert isinstance(meta["accepted_at"], int)  # set by on_data at receipt
    assert meta["tenant"] == "paused"
    [rcpt] = env["recipients"]
    assert rcpt["last"]["code"] == 451 and "tenant paused is paused" in rcpt["last"]["text"]
    assert not sinks[0].messages and not sinks[1].messages
    # A restart keeps what the hook saved, and its count goes on from there.
    before = meta["outcomes"]["deferred"]
    d.stop()
    d.proc = None
    d.start(env=ENV)
    d.wait_for(lambda: any(e.get("metadata", {}).get("header_router", {})
                           .get("outcomes", {}).get("deferred", 0) > before
                           for e in envelopes(d, "deferred")), WAIT,
               message="another attempt after the restart")


def test_a_hook_fails_a_recipient_and_the_sender_gets_a_bounce(
        daemon_factory: DaemonFactory, sinks: list[SinkServer]) -> None:
    d = router_daemon(daemon_factory, sinks, refuse=["closed"])
    with d.smtp() as s:
        s.sendmail("sender@localhost", ["user@example.test"], message("closed"))
    bounces = d.dir / "mail" / "sender" / "new"
    [notice] = d.wait_for(lambda: sorted(bounces.glob("*")) if bounces.is_dir() else [],
                          WAIT, message="the bounce")
    text = notice.read_text(errors="replace")
    assert "tenant closed is closed" in text and "Action: failed" in text
    assert not sinks[0].messages and not sinks[1].messages


HOOK_MODULE = '''
import asyncio


class Hooks:
    def __init__(self, options):
        self.mode = options["mode"]

    async def before_delivery(self, ctx):
        if self.mode == "raise":
            raise RuntimeError("policy service exploded")
        if self.mode == "hang":
            await asyncio.sleep(3600)


def setup(options):
    return Hooks(options)
'''


@pytest.mark.parametrize("mode,logged", [("raise", "before_delivery raised RuntimeError"),
                                         ("hang", "before_delivery did not answer in time")])
def test_a_hook_that_raises_or_hangs_defers_never_loses(
        daemon_factory: DaemonFactory, sinks: list[SinkServer], tmp_path: Path,
        mode: str, logged: str) -> None:
    (tmp_path / "bad_hooks.py").write_text(HOOK_MODULE)
    default, _ = sinks
    d: EmpathDaemon = daemon_factory({
        "smtp": {"modules": [{"name": "bad_hooks", "options": {"mode": mode}}]},
        "delivery": {**FAST, "timeouts": {"hooks": "0.5s"}, "domains": {"example.test": {
            "mx_override": f"{default.host}:{default.port}", "tls": "disabled"}}},
    }, start=False)
    d.start(env={"PYTHONPATH": str(tmp_path)})
    with d.smtp() as s:
        s.sendmail("app@localhost", ["user@example.test"], message(None))
    [env] = d.wait_for(lambda: [e for e in envelopes(d, "deferred")
                                if (e.get("attempt_count") or 0) >= 1], WAIT,
                       message="a deferred attempt")
    assert env["recipients"][0]["status"] == "deferred"
    assert logged in d.log_text()
    assert not default.messages


def sqlite_daemon(factory: DaemonFactory, db: Path) -> EmpathDaemon:
    d: EmpathDaemon = factory({
        "relay_domains": ["archive.example"],
        "delivery": {**FAST, "domains": {"archive.example": {
            "strategy": "sqlite_strategy:SQLiteStore",
            "strategy_options": {"path": str(db), "refuse": ["nobody"]}}}},
    }, start=False)
    return d.start(env=ENV)


def test_a_custom_strategy_from_the_configuration_delivers_defers_and_fails(
        daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    db = tmp_path / "archive" / "mail.db"  # its directory does not exist yet: deferred
    d = sqlite_daemon(daemon_factory, db)
    with d.smtp() as s:
        s.sendmail("sender@localhost", ["a@archive.example", "nobody@archive.example"],
                   message(None, "archived"))
    [env] = d.wait_for(lambda: envelopes(d, "deferred"), WAIT, message="a deferral")
    status = {r["address"]: r for r in env["recipients"]}
    assert status["a@archive.example"]["status"] == "deferred"
    assert "archive database" in status["a@archive.example"]["last"]["text"]
    assert status["nobody@archive.example"]["status"] == "failed"
    db.parent.mkdir()

    def stored() -> list[Any]:
        if not db.exists():
            return []
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
            try:
                return conn.execute("SELECT queue_id, sender, recipient, message "
                                    "FROM messages").fetchall()
            except sqlite3.OperationalError:  # the table is not made yet
                return []

    rows = d.wait_for(stored, WAIT, message="the retry stored in SQLite")
    d.wait_for(lambda: not envelopes(d, "deferred") and not Spool(str(d.spool_path))
               .list_ids("incoming"), WAIT, message="the message out of the queue")
    assert [(r[1], r[2]) for r in rows] == [("sender@localhost", "a@archive.example")]
    assert rows[0][0] == env["id"] and b"Subject: archived" in rows[0][3]
    bounce = d.dir / "mail" / "sender" / "new"
    assert d.wait_for(lambda: sorted(bounce.glob("*")) if bounce.is_dir() else [], WAIT,
                      message="the bounce for nobody@")


@pytest.mark.parametrize("strategy,why", [
    ("no_such_module_here:Thing", "cannot import module 'no_such_module_here'"),
    ("sqlite_strategy:Nothing", "is not a subclass of"),
    ("not a path", "is not smtp, webhook or package.module:Class"),
])
def test_check_config_refuses_a_bad_strategy_naming_file_line_and_key(
        tmp_path: Path, strategy: str, why: str) -> None:
    conf = tmp_path / "empath.yaml"
    conf.write_text("delivery:\n  domains:\n    archive.example:\n"
                    f"      strategy: {strategy}\n")
    res = subprocess.run([*empath_command(), "check-config", "-c", str(conf)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, **ENV})
    assert res.returncode == 1
    assert f"{conf}:4: delivery.domains.archive.example.strategy:" in res.stderr
    assert why in res.stderr


def test_example_embedding_application(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(EXAMPLES / "embed_app.py"), str(tmp_path / "e")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, **ENV})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "queued as " in res.stdout and "delivered to " in res.stdout
    [delivered] = sorted((tmp_path / "e" / "mail" / "ops" / "new").glob("*"))
    text = delivered.read_bytes()
    assert b"Subject: nightly report" in text and b"all systems nominal" in text
    # The embedded daemon is stopped: no status file, nothing listening.
    assert not (tmp_path / "e" / "run" / "empath.status.json").exists()


def test_embedding_api_refuses_a_bad_configuration_by_key(tmp_path: Path) -> None:
    from empath.config import ConfigError
    from empath.embed import Empath

    with pytest.raises(ConfigError, match=r"smtp\.max_recipients"):
        Empath({"smtp": {"max_recipients": "many"}}, tmp_path)


@pytest.mark.parametrize("fmt", ["json", "multipart"])
def test_example_webhook_receiver_stores_signed_requests_only(
        daemon_factory: DaemonFactory, tmp_path: Path, fmt: str) -> None:
    secret = tmp_path / "webhook.secret"
    secret.write_text("example-secret\n")
    out = tmp_path / "received"
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "webhook_receiver.py"),
                             "--port", "0", "--secret-file", str(secret), "--out", str(out)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        url = f"http://{line.split()[-1]}/incoming-mail"
        d: EmpathDaemon = daemon_factory({"relay_domains": ["hook.example"], "delivery": {
            **FAST, "domains": {"hook.example": {"strategy": "webhook", "webhook": {
                "url": url, "secret_file": str(secret), "format": fmt}}}}})
        with d.smtp() as s:
            s.sendmail("app@localhost", ["user@hook.example"], message(None, "via webhook"))
        [stored] = d.wait_for(lambda: sorted(out.glob("*.eml")), WAIT,
                              message="the message stored by the receiver")
        assert b"Subject: via webhook" in stored.read_bytes()
        # A request without a valid signature is refused and stores nothing.
        forged = urllib.request.Request(url, data=b'{"id": "FORGED", "message": ""}',
                                        headers={"Content-Type": "application/json",
                                                 "X-Empath-Timestamp": str(int(time.time())),
                                                 "X-Empath-Signature": "sha256=" + "0" * 64})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(forged, timeout=10)
        assert refused.value.code == 401
        assert not (out / "FORGED.eml").exists()
    finally:
        proc.terminate()
        proc.wait(10)


def test_example_prometheus_configuration_scrapes_a_live_daemon(
        daemon_factory: DaemonFactory) -> None:
    scrape = yaml.safe_load((EXAMPLES / "prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    [target] = job["static_configs"][0]["targets"]
    host, _, port = target.rpartition(":")
    # The example's address is what the comment tells the operator to configure; the test
    # serves metrics on a free port and scrapes it with the example's path.
    d: EmpathDaemon = daemon_factory({"metrics": {"listen_addr": f"{host}:0"}})
    status = d.status() or {}
    bound = status["admin_listeners"]["metrics"]
    with d.smtp() as s:
        s.sendmail("app@localhost", ["b@localhost"], message(None))
    url = f"http://{bound}{job['metrics_path']}"

    def scraped() -> str | None:
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        return body if "empath_messages_received_total" in body else None

    body = wait_for(scraped, WAIT, message="a scrape with the received counter")
    assert int(port) > 0 and job["job_name"] == "empath"
    assert "empath_messages_received_total" in body
