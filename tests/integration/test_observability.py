"""Metrics, health checks, the audit log and operational logs, through the real daemon.

The daemon serves /metrics and /health/* from its admin process on 127.0.0.1 (port 0, read
back from the status file), writes the audit log under its directory and delivers to an SMTP
sink (``delivery.smarthost``) or to Maildir. Scrapes are parsed with prometheus_client's own
parser; the numbers are checked against what the test sent and what the sink received.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from empath.observe.multiproc import default_dir
from empath.passwords import set_password
from empath.spool import Spool
from tests.support.certs import make_ca, make_server_cert
from tests.support.daemon import REPO, EmpathDaemon
from tests.support.dnsserver import DNSServer
from tests.support.fixtures import DaemonFactory
from tests.support.sink import Behaviour, SinkServer

ID_RE = re.compile(r"queued as ([0-9A-Z]{26})")
WAIT = 20.0  # generous: a slow, shared machine
EMPATHCTL = [str(REPO / ".venv" / "bin" / "empathctl")]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def observed(factory: DaemonFactory, **overrides: Any) -> EmpathDaemon:
    base: dict[str, Any] = {"metrics": {"listen_addr": "127.0.0.1:0"},
                            "health": {"listen_addr": "127.0.0.1:0"},
                            "audit": {"log_path": "log/audit.jsonl"}}
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    daemon = factory(base, start=False)
    daemon.start()
    return daemon


@pytest.fixture(autouse=True)
def _forget_metrics_dirs(tmp_path: Path) -> Any:
    """Killed daemons cannot remove their tmpfs metrics directory: do it for them."""
    yield
    for sub in tmp_path.glob("empath*/spool"):
        path = default_dir(str(sub), str(sub / "control"))
        for name in (os.listdir(path) if os.path.isdir(path) else []):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, name))
        with contextlib.suppress(OSError):
            os.rmdir(path)


# -- helpers ---------------------------------------------------------------------------------
def admin_url(d: EmpathDaemon, role: str, path: str) -> str:
    status = d.status() or {}
    return f"http://{status['admin_listeners'][role]}{path}"


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(d: EmpathDaemon) -> Samples:
    code, body = http_get(admin_url(d, "metrics", "/metrics"))
    assert code == 200
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_when(d: EmpathDaemon, what: str, **want: float) -> Samples:
    """The first scrape in which every ``name=value`` of ``want`` holds (children hand their
    counts over every quarter of a second). ``name__label_is_value`` (one or more) stands for
    the sample with those labels."""
    def check() -> Samples | None:
        m = scrape(d)
        return m if all(got(m, key) == v for key, v in want.items()) else None

    return d.wait_for(check, WAIT, what)


def got(m: Samples, key: str) -> float:
    name, *labels = key.split("__")
    return value(m, name, **dict(label.split("_is_", 1) for label in labels))


def send(d: EmpathDaemon, sender: str, rcpts: list[str], body: bytes) -> str:
    """One message on its own connection; its queue id from the 250 reply."""
    with d.smtp() as client:
        client.ehlo("client.test")
        client.mail(sender)
        for r in rcpts:
            client.rcpt(r)
        code, reply = client.data(body)
        assert code == 250, reply
    match = ID_RE.search(reply.decode())
    assert match, reply
    return match.group(1)


def message(n: int, size: int) -> bytes:
    line = b"x" * 70 + b"\r\n"
    return (b"Subject: test %d\r\n\r\n" % n) + line * max(1, size // len(line))


def audit_records(d: EmpathDaemon, name: str = "audit.jsonl") -> list[dict[str, Any]]:
    path = d.dir / "log" / name
    if not path.exists():
        return []
    # Every line must be one complete JSON object.
    return [json.loads(line) for line in path.read_text().splitlines()]


def ctl(d: EmpathDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EMPATHCTL, *args[:2], "-c", str(d.config_path), *args[2:]],
                          capture_output=True, text=True, timeout=60)


def monotonic_counters(before: Samples, after: Samples) -> list[str]:
    """Counter-like samples (totals, histogram buckets, counts, sums) that went backwards.
    ``process_*`` series are left out: they are each one process's own, and a respawned
    process starts them again from zero (a counter reset, as Prometheus expects)."""
    worse = []
    for key, old in before.items():
        name = key[0]
        if name.startswith("process_"):
            continue
        if name.endswith(("_total", "_bucket", "_count", "_sum")) and after.get(key, 0) < old:
            worse.append(f"{name}{dict(key[1])}: {old} -> {after.get(key)}")
    return worse


# -- tests -----------------------------------------------------------------------------------
def test_metrics_audit_and_logs_tell_what_was_sent(daemon_factory: DaemonFactory) -> None:
    sink = SinkServer(Behaviour()).start()
    try:
        d = observed(daemon_factory, delivery={"smarthost": f"127.0.0.1:{sink.port}"},
                     relay_domains=["example.net"])
        sizes = [100, 1000, 5000, 20000, 70000]
        rcpts = ["ann@example.net", "bob@example.net"]
        ids = [send(d, "alice@example.org", rcpts, message(i, size))
               for i, size in enumerate(sizes)]
        sink.wait_for_messages(len(sizes), timeout=WAIT)
        m = scrape_when(d, "the metrics of 5 messages", empath_messages_received_total=5,
                        empath_smtp_connections_accepted_total=5,
                        empath_delivery_attempts_total__result_is_delivered=10,
                        empath_smtp_replies_total__class_is_2xx=35,
                        empath_smtp_connections_active=0,
                        # A child hands its counters over one family at a time: a scrape
                        # between two of them sees the first already counted.
                        **{"empath_delivery_domain_attempts_total__domain_is_example.net"
                           "__result_is_delivered": 10,
                           "empath_delivery_duration_seconds_count__transport_is_smtp"
                           "__domain_is_example.net": 5})
        stored = sum(len(msg.data) for msg in sink.messages)
        assert value(m, "empath_messages_received_total") == 5
        assert value(m, "empath_messages_received_bytes_total") == stored
        assert value(m, "empath_message_size_bytes_count") == 5
        assert value(m, "empath_message_size_bytes_sum") == stored
        assert value(m, "empath_message_size_bytes_bucket", le="4096.0") == 2
        # Per connection: 220, EHLO, MAIL, 2 x RCPT, final 250, QUIT 221; and one 354.
        assert value(m, "empath_smtp_replies_total", **{"class": "2xx"}) == 5 * 7
        assert value(m, "empath_smtp_replies_total", **{"class": "3xx"}) == 5
        assert value(m, "empath_smtp_replies_total", **{"class": "4xx"}) == 0
        assert value(m, "empath_smtp_replies_total", **{"class": "5xx"}) == 0
        assert value(m, "empath_smtp_connections_accepted_total") == 5
        assert value(m, "empath_smtp_connections_active") == 0
        assert value(m, "empath_smtp_connections_rejected_total",
                     reason="too_many_connections") == 0
        assert value(m, "empath_spool_commit_seconds_count") == 5
        assert value(m, "empath_spool_write_seconds_count") == 5
        assert value(m, "empath_delivery_attempts_total", result="deferred") == 0
        assert value(m, "empath_delivery_domain_attempts_total", domain="example.net",
                     result="delivered") == 10
        assert value(m, "empath_delivery_domain_attempts_total", domain="other",
                     result="delivered") == 0
        assert value(m, "empath_delivery_duration_seconds_count", transport="smtp",
                     domain="example.net") == 5
        assert value(m, "empath_processes", kind="receiver") == 2
        assert value(m, "empath_processes", kind="delivery") == 1
        assert value(m, "empath_queue_messages", state="pending") == 0

        # Queue gauges come from the spool: frozen, three messages wait; one is held.
        assert ctl(d, "queue", "freeze").returncode == 0
        waiting = [send(d, "alice@example.org", ["cid@example.net"], message(9, 200))
                   for _ in range(3)]
        held = ctl(d, "queue", "hold", waiting[0])
        assert held.returncode == 0, held.stderr
        m = scrape_when(d, "8 messages received", empath_messages_received_total=8)
        assert value(m, "empath_delivery_frozen") == 1
        assert value(m, "empath_queue_messages", state="pending") == 2
        assert value(m, "empath_queue_messages", state="held") == 1
        assert value(m, "empath_queue_messages", state="deferred") == 0
        assert value(m, "empath_messages_received_total") == 8
        assert value(m, "empath_queue_oldest_age_seconds") >= 0

        # The audit log: every line parses; every message sent has its records.
        records = audit_records(d)
        received = {r["id"]: r for r in records if r["event"] == "received"}
        assert set(received) == set(ids + waiting)
        for msg_id, size in zip(ids, sizes, strict=True):
            rec = received[msg_id]
            assert rec["sender"] == "alice@example.org" and rec["recipients"] == rcpts
            assert rec["client_ip"] == "127.0.0.1" and rec["size"] >= size
            delivered = [r for r in records if r["event"] == "delivered" and r["id"] == msg_id]
            assert sorted(r["recipient"] for r in delivered) == rcpts
            for r in delivered:
                assert (r["mx"], r["ip"], r["code"], r["attempt"]) == ("127.0.0.1",
                                                                      "127.0.0.1", 250, 1)
                assert r["destination"] == "example.net" and r["duration"] >= 0
        assert sum(r["size"] for r in received.values() if r["id"] in ids) == stored
        holds = [r for r in records if r["event"] == "held"]
        assert [h["id"] for h in holds] == [waiting[0]] and holds[0]["operator"]

        # empathctl queue view shows the audit records, also of a message already delivered.
        view = ctl(d, "queue", "view", waiting[0])
        assert view.returncode == 0 and "received" in view.stdout and "held" in view.stdout
        gone = ctl(d, "queue", "view", ids[0], "--json")
        assert gone.returncode == 0, gone.stderr
        doc = json.loads(gone.stdout)
        assert doc["status"] is None
        assert [r["event"] for r in doc["audit"]] == ["received", "delivered", "delivered"]

        # Operational log: grep ID tells the message's story.
        story = [line for line in d.log_path.read_text().splitlines() if ids[0] in line]
        assert any("from=<alice@example.org>" in line for line in story)
        assert sum("status=delivered" in line for line in story) == 2
        assert any("removed" in line for line in story)
    finally:
        sink.stop()


def test_no_counter_goes_backwards_when_a_receiver_is_killed(
        daemon_factory: DaemonFactory) -> None:
    d = observed(daemon_factory)
    for i in range(3):
        send(d, "a@example.org", ["u1@localhost"], message(i, 500))
    first = scrape_when(d, "3 messages counted", empath_messages_received_total=3,
                        empath_smtp_connections_accepted_total=3,
                        empath_delivery_attempts_total__result_is_delivered=3)
    victim = d.child_pids("receiver")[0]
    os.kill(victim, signal.SIGKILL)
    d.wait_for(lambda: d.settled() and victim not in d.child_pids(), WAIT,
               "a new receiver")
    for i in range(3):
        send(d, "a@example.org", ["u1@localhost"], message(i, 500))
    # The connections' end is handed over with the receiver's next flush, which a delivery
    # woken at once can beat: wait for it too.
    second = scrape_when(d, "6 deliveries", empath_delivery_attempts_total__result_is_delivered=6,
                         empath_messages_received_total=6, empath_smtp_connections_active=0)
    assert monotonic_counters(first, second) == []
    # Neither lost nor counted twice: the dead receiver's files stay in the sum, once.
    assert value(second, "empath_messages_received_total") == 6
    assert value(second, "empath_smtp_connections_accepted_total") == 6
    assert value(second, "empath_smtp_connections_active") == 0
    assert value(second, "empath_processes", kind="receiver") == 2
    # A reload replaces every child, the admin process too, on the same port.
    port = (d.status() or {})["admin_listeners"]["metrics"]
    d.reload()
    assert (d.status() or {})["admin_listeners"]["metrics"] == port
    send(d, "a@example.org", ["u1@localhost"], message(7, 500))
    third = scrape_when(d, "7 messages", empath_messages_received_total=7)
    assert monotonic_counters(second, third) == []


def test_ready_turns_503_with_the_reason_then_200_again(daemon_factory: DaemonFactory,
                                                        tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    slack = 512 * 1024 * 1024
    d = observed(daemon_factory, health={"min_free_space": free - slack, "max_queue": 2})

    def ready() -> tuple[int, dict[str, Any]]:
        code, body = http_get(admin_url(d, "health", "/health/ready"))
        return code, json.loads(body)

    d.wait_for(lambda: ready()[0] == 200, WAIT, "ready")
    assert http_get(admin_url(d, "health", "/health/live"))[0] == 200
    code, detailed = http_get(admin_url(d, "health", "/health/detailed"))
    doc = json.loads(detailed)
    assert code == 200 and doc["version"] and doc["speedups"] in ("cython", "python")
    assert sorted(p["kind"] for p in doc["processes"]) == ["admin", "delivery", "receiver",
                                                          "receiver"]
    assert all(p["alive"] for p in doc["processes"]) and doc["uptime"] >= 0

    # Unwritable: tmp/ is not a directory any more.
    spool = Spool(str(d.spool_path))
    os.rename(spool.tmp, spool.tmp + ".away")
    Path(spool.tmp).write_text("not a directory")
    try:
        code, body = d.wait_for(lambda: (r := ready())[0] == 503 and r, WAIT, "503")
        assert body["failed"] == ["spool"]
        assert "not writable" in body["checks"]["spool"]["detail"]
    finally:
        os.unlink(spool.tmp)
        os.rename(spool.tmp + ".away", spool.tmp)
    d.wait_for(lambda: ready()[0] == 200, WAIT, "ready again")

    # Full: free space falls under the floor while a large file takes it.
    ballast = tmp_path / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 4 * slack)
        code, body = d.wait_for(lambda: (r := ready())[0] == 503 and r, WAIT, "503 (full)")
        assert body["failed"] == ["spool"] and "free space" in body["checks"]["spool"]["detail"]
    finally:
        os.close(fd)
        ballast.unlink()
    d.wait_for(lambda: ready()[0] == 200, WAIT, "ready after the disk emptied")

    # Too many messages waiting (health.max_queue: 2).
    assert ctl(d, "queue", "freeze").returncode == 0
    for i in range(3):
        send(d, "a@example.org", ["u2@localhost"], message(i, 300))
    code, body = ready()
    assert code == 503 and body["failed"] == ["queue"]
    assert ctl(d, "queue", "unfreeze").returncode == 0
    d.wait_for(lambda: ready()[0] == 200, WAIT, "ready once the queue drained")


def test_usr1_reopens_the_audit_log(daemon_factory: DaemonFactory) -> None:
    d = observed(daemon_factory, metrics={"listen_addr": None})
    first = send(d, "a@example.org", ["u3@localhost"], message(1, 300))
    d.wait_for(lambda: any(r["event"] == "delivered" for r in audit_records(d)), WAIT,
               "first delivery recorded")
    log_dir = d.dir / "log"
    os.rename(log_dir / "audit.jsonl", log_dir / "audit.jsonl.1")
    d.signal(signal.SIGUSR1)
    d.wait_for(lambda: (log_dir / "audit.jsonl").exists(), WAIT, "a new audit log")
    time.sleep(1.0)  # every child handles its SIGUSR1 (the first one created the file)
    later = [send(d, "a@example.org", ["u3@localhost"], message(i, 300)) for i in range(4)]
    d.wait_for(lambda: sum(r["event"] == "delivered" for r in audit_records(d)) == 4, WAIT,
               "later deliveries recorded in the new file")
    new = audit_records(d)
    old = audit_records(d, "audit.jsonl.1")
    assert {r["id"] for r in new} == set(later)
    assert {r["id"] for r in old} == {first}
    # queue view reads the rotated copy too.
    view = ctl(d, "queue", "view", first, "--json")
    assert [r["event"] for r in json.loads(view.stdout)["audit"]] == ["received", "delivered"]


def test_audit_records_of_deferral_expiry_bounce_notice_and_operators(
        daemon_factory: DaemonFactory) -> None:
    sink = SinkServer(Behaviour(rcpt_replies={
        "later@example.net": (451, "4.2.1 mailbox busy"),
        "gone@example.net": (550, "5.1.1 no such user")})).start()
    try:
        d = observed(daemon_factory, relay_domains=["example.net"], delivery={
            "smarthost": f"127.0.0.1:{sink.port}", "max_attempts": 2,
            "retry_base_delay": "1s", "retry_max_delay": "1s", "retry_jitter_factor": 0,
            "queue_scan_interval": "0.2s"})
        later = send(d, "alice@localhost", ["later@example.net"], message(1, 300))
        gone = send(d, "alice@localhost", ["gone@example.net"], message(2, 300))

        def events(msg_id: str) -> list[str]:
            return [r["event"] for r in audit_records(d) if r["id"] == msg_id]

        # later: deferred on the first attempt, expired (max_attempts 2) on the second.
        d.wait_for(lambda: events(later) == ["received", "deferred", "expired", "notice"],
                   WAIT, "later@ deferred, then expired with a notice")
        d.wait_for(lambda: events(gone) == ["received", "bounced", "notice"], WAIT,
                   "gone@ bounced with a notice")
        records = audit_records(d)
        by = {(r["id"], r["event"]): r for r in records}
        deferred = by[(later, "deferred")]
        assert (deferred["recipient"], deferred["code"], deferred["enhanced"],
                deferred["attempt"]) == ("later@example.net", 451, "4.2.1", 1)
        expired = by[(later, "expired")]
        assert (expired["attempt"], expired["expired_by"]) == (2, "max_attempts")
        bounced = by[(gone, "bounced")]
        assert (bounced["recipient"], bounced["code"], bounced["text"]) == (
            "gone@example.net", 550, "no such user")
        for msg_id, rcpt in ((later, "later@example.net"), (gone, "gone@example.net")):
            notice = by[(msg_id, "notice")]
            assert notice["kind"] == "failed" and notice["recipients"] == [rcpt]
            assert notice["notice_id"] != msg_id
            # The bounce itself is a message of the queue, delivered to alice's Maildir.
            assert ("received" not in events(notice["notice_id"]))
        d.wait_for(lambda: len(list((d.dir / "mail" / "alice" / "new").glob("*"))) == 2,
                   WAIT, "both bounces in alice's mailbox")

        # Operators: hold, release, delete, each recorded with who and the states.
        assert ctl(d, "queue", "freeze").returncode == 0
        parked = send(d, "alice@localhost", ["ann@example.net"], message(3, 300))
        for command in (["hold"], ["release"], ["delete", "--yes"]):
            done = ctl(d, "queue", command[0], parked, *command[1:])
            assert done.returncode == 0, done.stderr
        ops = [r for r in audit_records(d) if r["id"] == parked and r["event"] != "received"]
        assert [(r["event"], r["previous"], r.get("status")) for r in ops] == [
            ("held", "pending", "held"), ("released", "held", "pending"),
            ("deleted", "pending", None)], ops
        assert all(r["operator"] for r in ops)
    finally:
        sink.stop()


# -- per-destination delivery metrics, the dashboard and the alerting rules ----------------
CONTRIB = REPO / "contrib"
METRIC_NAME = re.compile(r"\b((?:empath|process)_[a-z0-9_]+)\b")
ZONE = {"ok.test": {"MX": [(10, "mx.ok.test")]}, "mx.ok.test": {"A": ["127.0.0.1"]},
        "strict.test": {"MX": [(10, "mx.strict.test")]}, "mx.strict.test": {"A": ["127.0.0.1"]},
        "probe.test": {"A": ["127.0.0.1"]}}


def contrib_metric_names() -> dict[str, set[str]]:
    """Every metric name the dashboard's queries and the alerting rules use, by file."""
    dashboard = json.loads((CONTRIB / "grafana" / "empath-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((CONTRIB / "prometheus" / "empath-alerts.yml").read_text())
    alerts = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {"dashboard": {n for e in exprs for n in METRIC_NAME.findall(e)},
            "rules": {n for e in alerts for n in METRIC_NAME.findall(e)}}


def test_delivery_metrics_by_destination_reply_reason_and_tls(daemon_factory: DaemonFactory,
                                                              tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "certs")
    mx = make_server_cert(tmp_path / "certs", ca, "mx.ok.test", ips=["127.0.0.1"])
    own = make_server_cert(tmp_path / "certs", ca, "test.empath", ips=["127.0.0.1"])
    sink = SinkServer(Behaviour(tls_cert=mx.cert_path, tls_key=mx.key_path, rcpt_replies={
        "later@ok.test": (451, "4.2.1 mailbox busy"),
        "gone@ok.test": (550, "5.1.1 no such user")})).start()
    dns = DNSServer(ZONE).start()
    try:
        d = observed(daemon_factory, relay_domains=["ok.test", "strict.test"],
                     processes={"receivers": 1, "delivery": 1},
                     listeners=[{"address": "127.0.0.1:0",
                                 "tls": {"cert": own.cert_path, "key": own.key_path}}],
                     delivery={"port": sink.port, "queue_scan_interval": "0.2s",
                               "retry_base_delay": "1h", "retry_max_delay": "1h",
                               "dns": {"resolver": f"127.0.0.1:{dns.port}", "timeout": "2s"},
                               "tls": {"ca_file": ca.cert_path},
                               "connection_reuse": {"max_idle": "10s"},
                               # mx.strict.test's certificate names mx.ok.test: no TLS.
                               "domains": {"strict.test": {"tls": "required"}}})
        with d.smtp() as client:  # one inbound TLS session, for the inbound TLS series
            client.starttls(context=ssl.create_default_context(cafile=ca.cert_path))
            assert client.ehlo("client.test")[0] == 250
        send(d, "alice@localhost", ["ann@ok.test", "later@ok.test", "gone@ok.test"],
             message(1, 300))
        send(d, "alice@localhost", ["x@strict.test"], message(2, 300))
        sink.wait_for_messages(1, timeout=WAIT)
        m = scrape_when(
            d, "one delivery, two deferrals, a bounce, a TLS failure",
            empath_delivery_deferrals_total__reason_is_mailbox=1,
            empath_delivery_deferrals_total__reason_is_policy=1,
            empath_delivery_bounces_total__reason_is_address=1,
            empath_tls_failures_out_total__reason_is_certificate=1,
            **{"empath_delivery_active_connections__server_is_mx.ok.test": 1})
        # Per destination domain: one route (one delivery) each, whatever its result.
        for domain in ("ok.test", "strict.test"):
            assert value(m, "empath_delivery_duration_seconds_count", transport="smtp",
                         domain=domain) == 1, domain
            assert value(m, "empath_delivery_duration_seconds_bucket", transport="smtp",
                         domain=domain, le="+Inf") == 1
        assert value(m, "empath_delivery_domain_attempts_total", domain="ok.test",
                     result="delivered") == 1
        # Replies of the destination server, by code and enhanced code; errors by code.
        replies = {(dict(k[1])["code"], dict(k[1])["enhanced"]): v for k, v in m.items()
                   if k[0] == "empath_delivery_replies_total" and v}
        assert replies[("451", "4.2.1")] == 1 and replies[("550", "5.1.1")] == 1
        assert replies[("250", "2.1.5")] == 1  # ann's RCPT
        assert replies[("220", "")] == 2  # both greetings
        assert value(m, "empath_smtp_errors_total", code="451") == 1
        assert value(m, "empath_smtp_errors_total", code="550") == 1
        assert not any(k[0] == "empath_smtp_errors_total" and dict(k[1])["code"] < "400" and v
                       for k, v in m.items())
        # Reasons: 4.2.1 mailbox, 4.7.5 (TLS required, certificate refused) policy, 5.1.1
        # address; nothing else.
        for name, reason, want in (("deferrals", "mailbox", 1), ("deferrals", "policy", 1),
                                   ("deferrals", "network", 0), ("bounces", "address", 1),
                                   ("bounces", "expired", 0)):
            assert value(m, f"empath_delivery_{name}_total", reason=reason) == want
        assert value(m, "empath_tls_failures_out_total", reason="handshake") == 0
        assert value(m, "empath_tls_sessions_out_total", version="TLSv1.3") >= 1
        assert value(m, "empath_dns_lookup_seconds_count", type="MX") == 2
        assert value(m, "empath_dns_lookup_seconds_count", type="A") >= 2
        assert value(m, "empath_delivery_active_connections", server="mx.strict.test") == 0
        # The standard process series, for every process.
        for kind in ("master", "receiver", "delivery", "admin"):
            index = "0" if kind == "master" else "1"
            assert value(m, "process_resident_memory_bytes", kind=kind, index=index) > 0, kind
            assert value(m, "process_open_fds", kind=kind, index=index) > 0, kind
        not_after = x509.load_pem_x509_certificate(Path(own.cert_path).read_bytes())
        assert value(m, "empath_tls_certificate_expiry_seconds", listener="127.0.0.1:0",
                     path=own.cert_path) == not_after.not_valid_after_utc.timestamp()

        # Every metric the dashboard and the alerting rules name is in this live scrape.
        live = {name for name, _ in m}
        for where, names in contrib_metric_names().items():
            assert names and not names - live, (where, sorted(names - live))

        # The idle connection closes after max_idle: the gauge comes back to 0.
        scrape_when(d, "the idle connection closed",
                    **{"empath_delivery_active_connections__server_is_mx.ok.test": 0})
    finally:
        sink.stop()
        dns.stop()


def test_auth_failures_are_counted(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki")
    server = make_server_cert(tmp_path / "pki", ca, "test.empath", ips=["127.0.0.1"])
    pwfile = tmp_path / "passwd"
    set_password(str(pwfile), "alice", "correct horse")
    d = observed(daemon_factory, listeners=[{
        "address": "127.0.0.1:0", "mode": "submission",
        "tls": {"cert": server.cert_path, "key": server.key_path}}],
        smtp={"auth": {"password_file": str(pwfile)}})
    client = ssl.create_default_context(cafile=ca.cert_path)
    client.check_hostname = False
    codes = []
    for password in ("wrong", "also wrong", "correct horse"):
        with d.smtp() as s:
            s.starttls(context=client)
            s.ehlo("c")
            s.user, s.password = "alice", password
            try:
                codes.append(s.auth("PLAIN", s.auth_plain)[0])
            except smtplib.SMTPAuthenticationError as exc:
                codes.append(exc.smtp_code)
    assert codes == [535, 535, 235]
    m = scrape_when(d, "two AUTH failures", empath_smtp_auth_failures_total=2)
    assert value(m, "empath_smtp_auth_failures_total") == 2


def test_promtool_accepts_the_rules_and_their_tests() -> None:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: run tools/install-test-deps (Debian's prometheus)")
    rules = CONTRIB / "prometheus"
    checked = subprocess.run(["promtool", "check", "rules", "empath-alerts.yml"], cwd=rules,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout
    tested = subprocess.run(["promtool", "test", "rules", "empath-alerts.test.yml"],
                            cwd=rules, capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # One runbook per alert, where each rule's annotation points.
    operations = (REPO / "docs" / "OPERATIONS.md").read_text()
    doc = yaml.safe_load((rules / "empath-alerts.yml").read_text())
    for rule in doc["groups"][0]["rules"]:
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert f'<a id="{anchor}"></a>' in operations, anchor


def test_the_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads((CONTRIB / "grafana" / "empath-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] == "Empath" and "id" not in dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("messages in and out", "queue by state", "oldest", "latency percentiles",
                  "deferrals", "per destination", "circuit breakers", "tls"):
        assert topic in titles, topic
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


# -- health: the delivery success rate and the DNS probe --------------------------------------
def ready_body(d: EmpathDaemon) -> tuple[int, dict[str, Any]]:
    code, body = http_get(admin_url(d, "health", "/health/ready"))
    return code, json.loads(body)


def test_ready_turns_red_on_a_failing_success_rate_then_green(
        daemon_factory: DaemonFactory) -> None:
    sink = SinkServer(Behaviour(rcpt_default=(451, "4.3.0 try again later"))).start()
    try:
        d = observed(daemon_factory, relay_domains=["example.net"], metrics={"listen_addr": None},
                     health={"min_delivery_success_rate": 0.5, "delivery_window": "10s",
                             "min_delivery_attempts": 3},
                     delivery={"smarthost": f"127.0.0.1:{sink.port}",
                               "queue_scan_interval": "0.2s", "retry_base_delay": "1s",
                               "retry_max_delay": "1s", "retry_jitter_factor": 0})
        assert http_get(admin_url(d, "health", "/health"))[0] == 200  # the alias of live
        code, body = ready_body(d)
        assert code == 200 and "too few" in body["checks"]["delivery_rate"]["detail"]
        for i in range(3):
            send(d, "a@localhost", [f"r{i}@example.net"], message(i, 200))
        code, body = d.wait_for(lambda: (r := ready_body(d))[0] == 503 and r, WAIT,
                                "not ready: deliveries failing")
        assert body["failed"] == ["delivery_rate"], body
        assert "below 50.0%" in body["checks"]["delivery_rate"]["detail"]
        code, detailed = http_get(admin_url(d, "health", "/health/detailed"))
        figures = json.loads(detailed)["deliveries"]
        assert code == 503 and figures["success_rate"] == 0.0
        assert figures["not_delivered"] >= 3 and figures["threshold"] == 0.5

        sink.behaviour = Behaviour()  # the destination accepts again
        sink.wait_for_messages(3, timeout=WAIT)
        code, body = d.wait_for(lambda: (r := ready_body(d))[0] == 200 and r, WAIT,
                                "ready again once the failures left the window")
        assert body["checks"]["delivery_rate"]["ok"]
        figures = json.loads(http_get(admin_url(d, "health", "/health/detailed"))[1])[
            "deliveries"]
        assert figures["success_rate"] in (None, 1.0) or figures["success_rate"] >= 0.5
    finally:
        sink.stop()


def test_ready_turns_red_while_the_resolver_is_silent(daemon_factory: DaemonFactory) -> None:
    dns = DNSServer(ZONE).start()
    try:
        d = observed(daemon_factory, metrics={"listen_addr": None},
                     health={"dns_probe_name": "probe.test", "dns_probe_interval": "0.3s",
                             "dns_probe_timeout": "0.5s"},
                     delivery={"dns": {"resolver": f"127.0.0.1:{dns.port}"}})
        code, body = d.wait_for(lambda: (r := ready_body(d))[0] == 200
                                and "answered" in r[1]["checks"]["dns"]["detail"] and r,
                                WAIT, "the first probe answered")
        assert dns.count("probe.test", "A") >= 1
        dns.silent.add("probe.test")
        code, body = d.wait_for(lambda: (r := ready_body(d))[0] == 503 and r, WAIT,
                                "not ready: the resolver is silent")
        assert body["failed"] == ["dns"] and "no answer" in body["checks"]["dns"]["detail"]
        dns.silent.discard("probe.test")
        code, body = d.wait_for(lambda: (r := ready_body(d))[0] == 200 and r, WAIT,
                                "ready once the resolver answers")
        assert body["checks"]["dns"]["ok"]
    finally:
        dns.stop()
