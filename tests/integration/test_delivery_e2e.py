"""Delivery through the real daemon: receiver → spool → delivery worker → DNS → SMTP sink.

Every test starts ``empath run`` (tests/support/daemon.py) whose delivery workers resolve MX
hosts at the loopback DNS server (tests/support/dnsserver.py) and deliver to SMTP sinks
(tests/support/sink.py) on 127.0.0.2-5, all on one port (``delivery.port``). Mail is submitted
with smtplib to the daemon's receiver; outcomes are read where they land: the sinks, the
Maildirs under the test directory, the spool and the log.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from empath.spool import CorruptFile, Spool, new_message_id, read_envelope
from empath.spool.submit import store_message
from tests.support.daemon import EmpathDaemon, deep_merge
from tests.support.dnsserver import DNSServer
from tests.support.fixtures import DaemonFactory
from tests.support.sink import Behaviour, SinkServer, start_sinks

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
ZONE: dict[str, dict[str, Any]] = {
    "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"]},
    "mx3.example.test": {"A": ["127.0.0.4"]},
    "mx4.example.test": {"A": ["127.0.0.5"]},
    "mxdead.example.test": {"A": ["127.0.0.9"]},  # nothing listens there: refused
    "fallback.test": {"MX": [(10, "mxdead.example.test"), (20, "mx2.example.test")]},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": {"MX": [(10, "mx1.example.test")]},  # answered SERVFAIL by the tests
    "retry.test": {"MX": [(10, "mx3.example.test")]},
    "slow.test": {"MX": [(10, "mx4.example.test")]},
    "nodsn.test": {"MX": [(10, "mx4.example.test")]},
}
TIMEOUTS = {"connect": "3s", "banner": "10s", "ehlo": "10s", "starttls": "10s", "mail": "10s",
            "rcpt": "10s", "data_init": "10s", "data_block": "20s",
            "data_termination": "20s", "quit": "2s"}
WAIT = 30.0  # generous bound for anything that should take a second or two on an idle box
SENDER = "sender@localhost"  # a local Maildir user: notices to the sender land in mail/sender


class World:
    """The loopback DNS server and the SMTP sinks one daemon delivers to."""

    def __init__(self, factory: DaemonFactory) -> None:
        self.factory = factory
        self.dns = DNSServer(ZONE).start()
        self.sink_list = start_sinks(HOSTS)
        self.sinks = {s.host: s for s in self.sink_list}
        self.port = self.sink_list[0].port

    def stop(self) -> None:
        for sink in self.sink_list:
            sink.stop()
        self.dns.stop()

    def overrides(self, delivery: dict[str, Any] | None = None,
                  **top: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "processes": {"receivers": 1, "delivery": 1},
            "delivery": {
                "port": self.port,
                "dns": {"resolver": f"127.0.0.1:{self.dns.port}", "timeout": "2s"},
                "timeouts": TIMEOUTS,
                "queue_scan_interval": "0.2s",
                "retry_base_delay": "1s",
                "retry_max_delay": "2s",
                "retry_jitter_factor": 0,
            },
        }
        return deep_merge(base, {"delivery": delivery or {}, **top})

    def daemon(self, delivery: dict[str, Any] | None = None, start: bool = True,
               **top: Any) -> EmpathDaemon:
        return self.factory(self.overrides(delivery, **top), start=start)

    def sink(self, host: str) -> SinkServer:
        return self.sinks[host]


@pytest.fixture
def world(daemon_factory: DaemonFactory) -> Iterator[World]:
    w = World(daemon_factory)
    try:
        yield w
    finally:
        w.stop()


# -- helpers ------------------------------------------------------------------------------
def message(subject: str, sender: str = SENDER, extra: bytes = b"") -> bytes:
    """A small RFC 5322 message (CRLF), with a dot-leading line to exercise transparency."""
    return (f"From: <{sender}>\r\nTo: <rcpt@example.test>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@client.test>\r\n\r\n").encode() + (
        b"Hello.\r\n.a line starting with a dot\r\n" + extra)


def send(daemon: EmpathDaemon, rcpts: list[str], data: bytes, sender: str = SENDER,
         mail_options: list[str] | None = None,
         rcpt_options: dict[str, list[str]] | None = None) -> str:
    """Submit one message over SMTP; returns its queue id (from the 250 reply)."""
    with daemon.smtp() as client:
        client.ehlo("client.test")
        code, reply = client.mail(sender, mail_options or [])
        assert code == 250, reply
        for rcpt in rcpts:
            code, reply = client.rcpt(rcpt, (rcpt_options or {}).get(rcpt, []))
            assert code == 250, reply
        code, reply = client.data(data)
        assert code == 250, reply
    match = re.search(rb"queued as ([0-9A-Z]{26})", reply)
    assert match, reply
    return match.group(1).decode()


def spool(daemon: EmpathDaemon) -> Spool:
    return Spool(str(daemon.spool_path))


def queued(daemon: EmpathDaemon) -> dict[str, list[str]]:
    """Ids per state, claimed ones under "active"; empty states left out."""
    sp = spool(daemon)
    out = {state: sp.list_ids(state) for state in ("incoming", "deferred", "failed", "hold",
                                                   "corrupt")}
    out["active"] = [mid for _, mid in sp.list_active()]
    return {k: v for k, v in out.items() if v}


def wait_spool_empty(daemon: EmpathDaemon, timeout: float = WAIT) -> None:
    daemon.wait_for(lambda: not queued(daemon), timeout, message="an empty spool")


def deferred_envelope(daemon: EmpathDaemon, queue_id: str,
                      min_attempts: int = 1) -> tuple[dict[str, Any], float]:
    """The envelope and mtime of a message once it sits in deferred/ after enough attempts."""
    path = spool(daemon).path("deferred", queue_id)

    def read() -> tuple[dict[str, Any], float] | None:
        try:
            mtime = os.stat(path).st_mtime
            env = read_envelope(path)
        except (FileNotFoundError, CorruptFile):
            return None
        return (env, mtime) if env.get("attempt_count", 0) >= min_attempts else None

    return daemon.wait_for(read, WAIT, message=f"{queue_id} in deferred/")


def mailbox(daemon: EmpathDaemon, user: str) -> list[bytes]:
    """Messages delivered to a local Maildir user, oldest first."""
    new = daemon.dir / "mail" / user / "new"
    try:
        names = sorted(os.listdir(new))
    except FileNotFoundError:
        return []
    return [(new / name).read_bytes() for name in names]


def wait_mailbox(daemon: EmpathDaemon, user: str, count: int = 1,
                 timeout: float = WAIT) -> list[bytes]:
    return daemon.wait_for(lambda: (m := mailbox(daemon, user)) and len(m) >= count and m,
                           timeout, message=f"{count} message(s) for {user}")


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


class Report:
    """A delivery status notification read back from a Maildir with the email package."""

    def __init__(self, data: bytes) -> None:
        self.raw = data
        self.msg = parse(data)
        assert self.msg.get_content_type() == "multipart/report"
        assert self.msg.get_param("report-type") == "delivery-status"
        self.human, status, self.original = self.msg.get_payload()
        assert self.human.get_content_type() == "text/plain"
        assert status.get_content_type() == "message/delivery-status"
        self.per_message, *blocks = status.get_payload()
        self.recipients = {str(b["Final-Recipient"]).partition(";")[2]: b for b in blocks}

    @property
    def text(self) -> str:
        return str(self.human.get_content())


def reports(daemon: EmpathDaemon, user: str = "sender") -> list[Report]:
    return [Report(m) for m in mailbox(daemon, user)]


def wait_log(daemon: EmpathDaemon, pattern: str, timeout: float = WAIT) -> re.Match[str]:
    rx = re.compile(pattern)
    return daemon.wait_for(lambda: rx.search(daemon.log_text()), timeout,
                           message=f"log line {pattern!r}")


def delivered_copy(data: bytes, sent: bytes) -> None:
    """``data`` is ``sent`` with exactly our one Received header in front."""
    assert data.endswith(sent)
    head = data[: len(data) - len(sent)]
    assert head.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby test.empath ")
    assert head.count(b"Received:") == 1 and head.endswith(b"\r\n")
    assert all(line.startswith(b"\t") for line in head.split(b"\r\n")[1:-1])


# -- routing ------------------------------------------------------------------------------
def test_message_reaches_the_first_mx_intact(world: World) -> None:
    daemon = world.daemon()
    sent = message("intact", extra=b"..two dots\r\n" + b"x" * 998 + b"\r\n")
    qid = send(daemon, ["alice@example.test"], sent)
    [got] = world.sink("127.0.0.2").wait_for_messages(1, WAIT)
    assert got.recipients == ["alice@example.test"] and got.mail_from == SENDER
    delivered_copy(got.data, sent)
    assert f"id {qid}".encode() in got.data
    assert world.sink("127.0.0.3").sessions == []
    wait_spool_empty(daemon)
    wait_log(daemon, rf"{qid}: to=<alice@example\.test>, attempt=1, server=mx1\.example\.test, "
                     r"status=delivered \(250 2\.0\.0 queued as 1\)")
    wait_log(daemon, rf"{qid}: removed \(all recipients delivered\)")


def test_first_mx_refusing_connections_falls_back_to_the_second(world: World) -> None:
    daemon = world.daemon()
    sent = message("fallback")
    qid = send(daemon, ["bob@fallback.test"], sent)
    [got] = world.sink("127.0.0.3").wait_for_messages(1, WAIT)
    delivered_copy(got.data, sent)
    wait_spool_empty(daemon)
    wait_log(daemon, rf"{qid}: to=<bob@fallback\.test>, attempt=1, server=mx2\.example\.test, "
                     r"status=delivered")
    assert world.sink("127.0.0.2").sessions == []


def test_null_mx_bounces_without_any_connection(world: World) -> None:
    daemon = world.daemon()
    qid = send(daemon, ["u@nullmx.test"], message("null mx"))
    [bounce] = [Report(m) for m in wait_mailbox(daemon, "sender")]
    block = bounce.recipients["u@nullmx.test"]
    assert (block["Action"], block["Status"]) == ("failed", "5.1.10")
    assert "null MX" in str(block["Diagnostic-Code"]) and block["Remote-MTA"] is None
    assert str(bounce.per_message["X-Empath-Queue-ID"]) == qid
    wait_spool_empty(daemon)
    assert world.dns.count("nullmx.test", "MX") >= 1
    assert all(not sink.sessions for sink in world.sink_list)


def test_nxdomain_bounces(world: World) -> None:
    daemon = world.daemon()
    send(daemon, ["u@nowhere.test"], message("nxdomain"))
    [bounce] = [Report(m) for m in wait_mailbox(daemon, "sender")]
    block = bounce.recipients["u@nowhere.test"]
    assert (block["Action"], block["Status"]) == ("failed", "5.1.2")
    assert "does not exist" in str(block["Diagnostic-Code"])
    wait_spool_empty(daemon)
    assert all(not sink.sessions for sink in world.sink_list)


def test_servfail_defers_with_the_reason_then_delivers(world: World) -> None:
    world.dns.servfail.add("broken.test")
    daemon = world.daemon({"retry_base_delay": "2s", "retry_max_delay": "2s"})
    qid = send(daemon, ["carol@broken.test"], message("servfail"))
    env, mtime = deferred_envelope(daemon, qid)
    [rcpt] = env["recipients"]
    assert rcpt["status"] == "deferred" and rcpt["attempts"] == env["attempt_count"]
    assert (rcpt["last"]["code"], rcpt["last"]["enhanced"]) == (451, "4.4.3")
    assert "broken.test/MX" in rcpt["last"]["text"] and "server failure" in rcpt["last"]["text"]
    assert rcpt["last"]["server"] is None
    assert env["next_retry_at"] == pytest.approx(mtime, abs=0.01)
    assert env["attempts"][0]["routes"][0]["domain"] == "broken.test"
    assert not world.sink("127.0.0.2").sessions
    world.dns.servfail.discard("broken.test")  # the DNS recovers: the retry delivers
    world.sink("127.0.0.2").wait_for_messages(1, WAIT)
    wait_spool_empty(daemon)
    assert mailbox(daemon, "sender") == []


# -- per-recipient outcomes ---------------------------------------------------------------
def test_partial_failure_delivers_defers_and_bounces_each_recipient(world: World) -> None:
    world.sink("127.0.0.2").behaviour = Behaviour(rcpt_replies={
        "temp@example.test": (451, "4.2.1 mailbox busy"),
        "gone@example.test": (550, "5.1.1 no such user"),
    })
    daemon = world.daemon({"retry_base_delay": "2s", "retry_max_delay": "2s"})
    sent = message("partial")
    qid = send(daemon, ["ok@example.test", "temp@example.test", "gone@example.test"], sent)
    env, mtime = deferred_envelope(daemon, qid)
    assert env["attempt_count"] == 1 and env["next_retry_at"] == pytest.approx(mtime, abs=0.01)
    by_addr = {r["address"]: r for r in env["recipients"]}
    assert by_addr["ok@example.test"]["status"] == "delivered"
    temp = by_addr["temp@example.test"]
    assert temp["status"] == "deferred" and temp["attempts"] == 1
    assert (temp["last"]["code"], temp["last"]["enhanced"], temp["last"]["text"],
            temp["last"]["server"]) == (451, "4.2.1", "mailbox busy", "mx1.example.test")
    gone = by_addr["gone@example.test"]
    assert (gone["status"], gone["last"]["code"], gone["dsn"]) == ("failed", 550, "failed")
    [attempt] = env["attempts"]
    assert attempt["number"] == 1 and attempt["routes"][0]["server"] == "mx1.example.test"
    assert {a: r["status"] for a, r in attempt["results"].items()} == {
        "ok@example.test": "delivered", "temp@example.test": "deferred",
        "gone@example.test": "failed"}
    [first] = world.sink("127.0.0.2").wait_for_messages(1, WAIT)
    assert first.recipients == ["ok@example.test"]
    delivered_copy(first.data, sent)
    # The permanent failure is bounced at once, while the 4xx recipient waits.
    [bounce] = [Report(m) for m in wait_mailbox(daemon, "sender")]
    assert list(bounce.recipients) == ["gone@example.test"]
    assert bounce.recipients["gone@example.test"]["Status"] == "5.1.1"
    world.sink("127.0.0.2").behaviour = Behaviour()
    wait_spool_empty(daemon)
    second = world.sink("127.0.0.2").messages[1]
    assert second.recipients == ["temp@example.test"]
    delivered_copy(second.data, sent)
    wait_log(daemon, rf"{qid}: to=<temp@example\.test>, attempt=2, .*status=delivered")
    assert len(world.sink("127.0.0.2").messages) == 2 and len(mailbox(daemon, "sender")) == 1


# -- retries ------------------------------------------------------------------------------
TEMPFAIL = Behaviour(rcpt_default=(451, "4.3.0 try later"))


def rcpt_count(sink: SinkServer) -> int:
    return sum(line.upper().startswith("RCPT") for line in sink.commands())


def test_tempfail_twice_then_delivered_on_the_third_attempt(world: World) -> None:
    sink = world.sink("127.0.0.4")
    sink.behaviour = TEMPFAIL
    daemon = world.daemon()
    sent = message("retry")
    qid = send(daemon, ["dave@retry.test"], sent)
    env, _ = deferred_envelope(daemon, qid, min_attempts=2)
    sink.behaviour = Behaviour()  # the next attempt is at least retry_max_delay away
    assert env["attempt_count"] == 2 and env["recipients"][0]["attempts"] == 2
    assert [a["number"] for a in env["attempts"]] == [1, 2]
    assert all(a["results"]["dave@retry.test"]["code"] == 451 for a in env["attempts"])
    assert env["attempts"][1]["at"] - env["attempts"][0]["at"] >= 0.9  # retry_base_delay 1s
    [got] = sink.wait_for_messages(1, WAIT)
    delivered_copy(got.data, sent)
    wait_spool_empty(daemon)
    wait_log(daemon, rf"{qid}: to=<dave@retry\.test>, attempt=3, server=mx3\.example\.test, "
                     r"status=delivered")
    assert rcpt_count(sink) == 3 and len(sink.messages) == 1


def test_max_attempts_expires_the_recipient_and_bounces(world: World) -> None:
    sink = world.sink("127.0.0.4")
    sink.behaviour = TEMPFAIL
    daemon = world.daemon({"max_attempts": 2})
    qid = send(daemon, ["erin@retry.test"], message("max attempts"))
    [bounce] = [Report(m) for m in wait_mailbox(daemon, "sender")]
    block = bounce.recipients["erin@retry.test"]
    assert (block["Action"], block["Status"]) == ("failed", "4.3.0")
    assert str(block["Diagnostic-Code"]) == "smtp;451 4.3.0 try later"
    assert "gave up after 2 attempts" in bounce.text
    wait_spool_empty(daemon)
    wait_log(daemon, rf"{qid}: to=<erin@retry\.test>, attempt=2, .*status=expired "
                     r"\(max_attempts\)")
    assert rcpt_count(sink) == 2


def test_message_expiration_bounces_with_4_4_7(world: World) -> None:
    # message_expiration cannot be set below 60 s, so the message is made old instead: it is
    # spooled the way notices and local submissions are, received two minutes ago.
    world.sink("127.0.0.4").behaviour = TEMPFAIL
    daemon = world.daemon({"message_expiration": "60s"})
    qid = new_message_id()
    received = time.time() - 120
    data = b"Received: by test\r\n" + message("expired")
    store_message(spool(daemon), data, {
        "id": qid, "sender": SENDER,
        "recipients": [{"address": "frank@retry.test", "orcpt": None, "notify": None}],
        "params": {"body": "7BIT", "smtputf8": False, "size": len(data), "ret": None,
                   "envid": None},
        "client": {"ip": "127.0.0.1", "port": 1, "helo": "client.test", "esmtp": True,
                   "tls": None, "listener": "test", "auth": None},
        "received_at": received, "metadata": {}})
    [bounce] = [Report(m) for m in wait_mailbox(daemon, "sender")]
    block = bounce.recipients["frank@retry.test"]
    assert (block["Action"], block["Status"]) == ("failed", "4.4.7")
    assert str(block["Diagnostic-Code"]) == "smtp;451 4.3.0 try later"
    assert email.utils.parsedate_to_datetime(str(bounce.per_message["Arrival-Date"])
                                             ).timestamp() == pytest.approx(received, abs=1)
    wait_spool_empty(daemon)
    wait_log(daemon, rf"{qid}: to=<frank@retry\.test>, attempt=1, .*status=expired "
                     r"\(message_expiration\)")


# -- crashes and restarts -----------------------------------------------------------------
class HoldWhen(Behaviour):
    """A sink behaviour that replies at once, except while ``when()`` is true: then each reply
    waits ``hold`` seconds, a window in which a test kills or stops the delivery worker."""

    def __init__(self, when: Callable[[], bool], hold: float = 5.0) -> None:
        super().__init__()
        self._when, self._hold = when, hold

    @property  # type: ignore[override]
    def delay(self) -> float:
        return self._hold if self._when() else 0.0

    @delay.setter
    def delay(self, value: float) -> None:
        pass  # set by Behaviour.__init__; the property decides


def kill_worker_when(daemon: EmpathDaemon, ready: Any, message_text: str) -> int:
    """SIGKILL the delivery worker as soon as ``ready()``; returns its pid."""
    [pid] = daemon.child_pids("delivery")
    daemon.wait_for(ready, WAIT, message=message_text)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_worker_killed_before_the_data_is_sent_redelivers_once(world: World) -> None:
    sink = world.sink("127.0.0.5")
    # The 354 waits while the test kills the worker: the data never leaves.
    sink.behaviour = HoldWhen(lambda: "DATA" in sink.commands() and not sink.messages)
    daemon = world.daemon()
    sent = message("killed mid transaction")
    qid = send(daemon, ["gina@slow.test"], sent)
    pid = kill_worker_when(daemon, lambda: "DATA" in sink.commands(), "DATA at the sink")
    sink.behaviour = Behaviour()
    wait_log(daemon, rf"requeued 1 message\(s\) claimed by delivery worker {pid}")
    daemon.wait_for(lambda: daemon.child_pids("delivery") not in ([], [pid]), WAIT,
                    message="a new delivery worker")
    wait_spool_empty(daemon)
    copies = sink.wait_for_messages(1, WAIT)
    # The kill came before the data left: the only copy is the redelivered one.
    assert len(copies) == 1, f"{len(copies)} copies"
    delivered_copy(copies[0].data, sent)
    assert f"id {qid}".encode() in copies[0].data


def test_worker_killed_after_the_sink_took_the_data_may_duplicate(world: World) -> None:
    sink = world.sink("127.0.0.5")
    # The final 250 waits while the test kills the worker: the sink has the message, the
    # worker never hears that it does.
    sink.behaviour = HoldWhen(lambda: bool(sink.messages))
    daemon = world.daemon()
    sent = message("killed before the 250")
    send(daemon, ["hank@slow.test"], sent)
    pid = kill_worker_when(daemon, lambda: sink.messages, "the data at the sink")
    sink.behaviour = Behaviour()
    wait_log(daemon, rf"requeued 1 message\(s\) claimed by delivery worker {pid}")
    wait_spool_empty(daemon)
    copies = sink.wait_for_messages(2, 5)
    # Stored by the sink, but the worker died before its 250: the message was never taken
    # off the spool, so it is delivered again (RFC 1047's duplicate, never a loss).
    assert len(copies) == 2, f"{len(copies)} copies"
    for copy in copies:
        delivered_copy(copy.data, sent)


def test_restart_resumes_deferred_messages_with_their_history(world: World) -> None:
    sink = world.sink("127.0.0.4")
    sink.behaviour = TEMPFAIL
    daemon = world.daemon()
    sent = message("restart")
    qid = send(daemon, ["ivan@retry.test"], sent)
    deferred_envelope(daemon, qid)
    assert daemon.stop() == 0
    assert queued(daemon) == {"deferred": [qid]}
    path = spool(daemon).path("deferred", qid)
    before = read_envelope(path)
    count = before["attempt_count"]
    assert before["next_retry_at"] == pytest.approx(os.stat(path).st_mtime, abs=0.01)
    daemon.proc = None
    daemon.start()
    env, _ = deferred_envelope(daemon, qid, min_attempts=count + 1)
    assert env["attempts"][:count] == before["attempts"]
    assert env["attempts"][count]["at"] >= before["next_retry_at"] - 0.01  # not before it was due
    assert env["recipients"][0]["attempts"] == count + 1
    sink.behaviour = Behaviour()
    [got] = sink.wait_for_messages(1, WAIT)
    delivered_copy(got.data, sent)
    wait_spool_empty(daemon)
    wait_log(daemon, rf"{qid}: to=<ivan@retry\.test>, attempt={count + 2}, .*status=delivered")


def test_stop_during_a_slow_delivery_keeps_the_message_for_the_next_start(world: World) -> None:
    sink = world.sink("127.0.0.5")
    # Once MAIL is in, every reply takes longer than shutdown_timeout allows.
    sink.behaviour = HoldWhen(lambda: any(c.startswith("MAIL") for c in sink.commands()))
    daemon = world.daemon(shutdown_timeout="1s")
    sent = message("stopped mid transaction")
    qid = send(daemon, ["lena@slow.test"], sent)
    daemon.wait_for(lambda: any(c.startswith("MAIL") for c in sink.commands()), WAIT,
                    message="MAIL at the sink")
    [pid] = daemon.child_pids("delivery")
    assert daemon.stop() == 0
    wait_log(daemon, rf"delivery 1/1 \(pid {pid}\), generation 1, exited with status 4")
    wait_log(daemon, rf"requeued 1 message\(s\) claimed by delivery worker {pid}")
    assert queued(daemon) == {"incoming": [qid]}  # unfinished work stays in the spool
    assert not sink.messages
    sink.behaviour = Behaviour()
    daemon.proc = None
    daemon.start()
    [got] = sink.wait_for_messages(1, WAIT)
    delivered_copy(got.data, sent)
    wait_spool_empty(daemon)
    assert len(sink.messages) == 1


def test_two_workers_share_the_queue_without_duplicates(world: World) -> None:
    daemon = world.daemon(processes={"receivers": 1, "delivery": 2})
    count = 12
    with daemon.smtp() as client:
        for n in range(count):
            client.sendmail(SENDER, [f"user{n}@example.test"], message(f"shared {n}"))
    messages = world.sink("127.0.0.2").wait_for_messages(count, WAIT)
    wait_spool_empty(daemon)
    assert sorted(m.recipients[0] for m in messages) == sorted(
        f"user{n}@example.test" for n in range(count))
    assert len(world.sink("127.0.0.2").messages) == count
    workers = set(re.findall(r"empath\.delivery\[(\d+)\]: \w+: to=", daemon.log_text()))
    assert workers == {str(pid) for pid in daemon.child_pids("delivery")}


# -- the spool ----------------------------------------------------------------------------
def test_freeze_stops_claims_and_unfreeze_resumes(world: World) -> None:
    daemon = world.daemon()
    spool(daemon).set_frozen(True)
    qid = send(daemon, ["judy@example.test"], message("frozen"))
    time.sleep(1.5)  # several scans and a wake-up: nothing may be claimed
    assert queued(daemon) == {"incoming": [qid]}
    assert not world.sink("127.0.0.2").sessions
    spool(daemon).set_frozen(False)
    world.sink("127.0.0.2").wait_for_messages(1, WAIT)
    wait_spool_empty(daemon)


def test_corrupt_files_go_to_corrupt_and_block_nothing(world: World) -> None:
    daemon = world.daemon()
    sp = spool(daemon)
    garbage = new_message_id()
    tmp = Path(sp.tmp_path(garbage, pid=1))
    tmp.write_bytes(b"this is not a queue file\n" * 10)
    os.rename(tmp, sp.path("incoming", garbage))
    no_rcpts = new_message_id()
    store_message(sp, b"Subject: x\r\n\r\nx\r\n", {"id": no_rcpts, "sender": SENDER})
    qid = send(daemon, ["kim@example.test"], message("after corrupt"))
    world.sink("127.0.0.2").wait_for_messages(1, WAIT)
    daemon.wait_for(lambda: sorted(sp.list_ids("corrupt")) == sorted([garbage, no_rcpts]),
                    WAIT, message="both files in corrupt/")
    wait_log(daemon, rf"{garbage}: moved to corrupt/: missing end-of-file trailer")
    wait_log(daemon, rf"{no_rcpts}: moved to corrupt/: envelope has no recipients")
    daemon.wait_for(lambda: queued(daemon) == {"corrupt": sorted([garbage, no_rcpts])}, WAIT,
                    message="only the corrupt files left")
    assert qid not in sp.list_ids("corrupt")


def test_local_domain_lands_in_maildir(world: World) -> None:
    daemon = world.daemon()
    sent = message("local")
    qid = send(daemon, ["Bob@localhost"], sent)
    [got] = wait_mailbox(daemon, "bob")
    assert got.startswith(b"Return-Path: <sender@localhost>\r\nDelivered-To: Bob@localhost\r\n")
    delivered_copy(got.split(b"\r\n", 2)[2], sent)
    wait_spool_empty(daemon)
    wait_log(daemon, rf"{qid}: to=<Bob@localhost>, attempt=1, server=maildir, "
                     r"status=delivered")
    assert all(not sink.sessions for sink in world.sink_list)
