"""Per-destination limits and the circuit breaker through the real daemon: max_connections and
rate_limit hold for two delivery workers together, measured at the sink; a destination that
accepts connections and closes them at once trips the breaker, which then lets one probe out
per cool-down and closes when the destination comes back.

Messages are put into the spool directly (``store_message``) while delivery is frozen, with
ids chosen so that each worker owns a known number of them (``crc32(id) % workers``), then
delivery is thawed: every message is due at the same moment.
"""

from __future__ import annotations

import socket
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from empath.spool import CorruptFile, Spool, new_message_id, read_envelope
from empath.spool.submit import store_message
from tests.integration.test_observability import ctl, scrape_when
from tests.support.daemon import EmpathDaemon
from tests.support.dnsserver import DNSServer
from tests.support.fixtures import DaemonFactory
from tests.support.sink import Behaviour, ReceivedMessage, SessionRecord, SinkServer, start_sinks

ZONE: dict[str, dict[str, Any]] = {
    "example.test": {"MX": [(10, "mx1.example.test")]},
    "dead.test": {"MX": [(10, "mxdead.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mxdead.example.test": {"A": ["127.0.0.6"]},
}
TIMEOUTS = {"connect": "3s", "banner": "10s", "ehlo": "10s", "starttls": "10s", "mail": "10s",
            "rcpt": "10s", "data_init": "10s", "data_block": "20s",
            "data_termination": "20s", "quit": "2s"}
WAIT = 60.0


class TimedSink(SinkServer):
    """A sink that notes when each message arrived (time.monotonic)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: list[float] = []

    def store(self, message: ReceivedMessage, record: SessionRecord) -> int:
        self.arrivals.append(time.monotonic())
        return super().store(message, record)


class AcceptAndClose:
    """A listening socket that accepts each connection and closes it at once, counting them:
    a destination that reaches no SMTP server (the client sees the connection lost at the
    greeting)."""

    def __init__(self, host: str, port: int) -> None:
        self.accepted = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as server:
        yield server


def overrides(dns: DNSServer, port: int, workers: int, **delivery: Any) -> dict[str, Any]:
    return {"processes": {"receivers": 1, "delivery": workers},
            "delivery": {"port": port, "timeouts": TIMEOUTS, "queue_scan_interval": "0.2s",
                         "dns": {"resolver": f"127.0.0.1:{dns.port}", "timeout": "2s"},
                         "retry_base_delay": "1s", "retry_max_delay": "2s",
                         "retry_jitter_factor": 0, **delivery}}


def ids_per_worker(workers: int, each: int) -> list[str]:
    """``each`` fresh queue ids owned by every one of ``workers`` workers (as worker.py
    shards them), interleaved."""
    owned: list[list[str]] = [[] for _ in range(workers)]
    for _ in range(1000 * workers * each):
        qid = new_message_id()
        shard = owned[zlib.crc32(qid.encode()) % workers]
        if len(shard) < each:
            shard.append(qid)
        if all(len(s) == each for s in owned):
            break
    return [qid for group in zip(*owned, strict=True) for qid in group]


def spool_messages(daemon: EmpathDaemon, ids: list[str], domain: str) -> None:
    spool = Spool(str(daemon.spool_path))
    for n, qid in enumerate(ids):
        data = f"Subject: message {n}\r\n\r\nHello.\r\n".encode()
        store_message(spool, data, {
            "id": qid, "sender": "sender@localhost",
            "recipients": [{"address": f"u{n}@{domain}", "orcpt": None, "notify": None}],
            "params": {"body": "7BIT", "smtputf8": False, "size": len(data), "ret": None,
                       "envid": None},
            "client": {"ip": "127.0.0.1", "port": 1, "helo": "client.test", "esmtp": True,
                       "tls": None, "listener": "test", "auth": None},
            "received_at": time.time(), "metadata": {}}, wake=False)


def frozen(daemon: EmpathDaemon, value: bool) -> None:
    Spool(str(daemon.spool_path)).set_frozen(value)


def require_worker_shares(daemon: EmpathDaemon) -> None:
    """Each delivery worker gets its share of the limits (RemoteTransport logs it once it
    delivers remote mail)."""
    daemon.wait_for(lambda: "delivery worker 1 of 2" in daemon.log_text(), 30,
                    message="the workers' shares of the limits in the log")


def test_max_connections_holds_across_two_workers(daemon_factory: DaemonFactory,
                                                  dns: DNSServer) -> None:
    with SinkServer(Behaviour(delay=0.05), host="127.0.0.2") as sink:
        daemon = daemon_factory(overrides(dns, sink.port, 2, domains={
            "example.test": {"max_connections": 3}}))
        frozen(daemon, True)
        spool_messages(daemon, ids_per_worker(2, 12), "example.test")
        frozen(daemon, False)
        daemon.wait_for(lambda: len(sink.messages) == 24, WAIT, "24 messages at the sink")
        require_worker_shares(daemon)
        # Both workers delivered at once (shares 2 and 1), and never more than 3 together.
        assert sink.max_concurrent_sessions == 3
        assert sink.max_concurrent_transactions <= 3


def test_rate_limit_holds_across_two_workers(daemon_factory: DaemonFactory,
                                             dns: DNSServer) -> None:
    # 120 a minute over two workers: each a bucket of 60 refilled at one a second. 65 messages
    # each: 120 go at once, the last 10 take about 5 s (one worker alone, or each worker
    # applying the whole limit, would send all 130 at once).
    with TimedSink(host="127.0.0.2") as sink:
        daemon = daemon_factory(overrides(dns, sink.port, 2, domains={
            "example.test": {"rate_limit": 120}}))
        frozen(daemon, True)
        spool_messages(daemon, ids_per_worker(2, 65), "example.test")
        started = time.monotonic()
        frozen(daemon, False)
        daemon.wait_for(lambda: len(sink.messages) == 130, WAIT, "130 messages at the sink")
        require_worker_shares(daemon)
    arrivals = sorted(sink.arrivals)
    assert 3.5 <= arrivals[-1] - started <= 12.0
    # The token bucket's promise: in any stretch of t seconds at most 120 + 2 t messages (plus
    # one or two for the time between a token and the message's arrival).
    for i in range(len(arrivals)):
        for j in range(i, len(arrivals)):
            assert j - i + 1 <= 120 + 2 * (arrivals[j] - arrivals[i]) + 2


def last_text(daemon: EmpathDaemon, qid: str) -> str | None:
    spool = Spool(str(daemon.spool_path))
    try:
        env = read_envelope(spool.path("deferred", qid))
    except (FileNotFoundError, CorruptFile):
        return None
    return str((env["recipients"][0].get("last") or {}).get("text") or "")


def test_circuit_breaker_stops_trying_a_dead_destination(daemon_factory: DaemonFactory,
                                                         dns: DNSServer) -> None:
    [placeholder, sink_port_keeper] = start_sinks(["127.0.0.6", "127.0.0.2"])
    port = placeholder.port
    placeholder.stop()  # the port is now free on 127.0.0.6: the dead destination takes it
    dead = AcceptAndClose("127.0.0.6", port)
    revived: SinkServer | None = None
    try:
        daemon = daemon_factory({**overrides(dns, port, 1, circuit_breaker={
            "failures": 2, "cooldown": "3s"}), "metrics": {"listen_addr": "127.0.0.1:0"}})
        first = ids_per_worker(1, 1)
        spool_messages(daemon, first, "dead.test")
        daemon.wait_for(lambda: dead.accepted >= 2, WAIT, "two failed attempts")
        daemon.wait_for(lambda: "circuit breaker for dead.test open" in daemon.log_text(),
                        WAIT, "the breaker to open")
        assert dead.accepted == 2
        scrape_when(daemon, "the breaker gauge", empath_circuit_breakers_open=1,
                    empath_circuit_breaker_openings_total=1)
        later = ids_per_worker(1, 3)
        spool_messages(daemon, later, "dead.test")
        for qid in later:  # deferred at once, without a connection attempt
            daemon.wait_for(lambda q=qid: "(circuit breaker)" in (last_text(daemon, q) or ""),
                            WAIT, f"{qid} deferred by the breaker")
        assert dead.accepted == 2
        # After the cool-down exactly one probe goes out (it fails: another cool-down).
        daemon.wait_for(lambda: dead.accepted >= 3, WAIT, "the probe")
        time.sleep(1.0)
        assert dead.accepted == 3
        # The destination comes back: the next probe reaches it and everything goes out.
        dead.stop()
        revived = SinkServer(host="127.0.0.6", port=port).start()
        daemon.wait_for(lambda: revived is not None and len(revived.messages) == 4, WAIT,
                        "all four messages delivered")
        assert "circuit breaker for dead.test closed" in daemon.log_text()
        # Closed again; it opened once (the failed probe kept it open, no new opening).
        scrape_when(daemon, "the breaker gauge back to 0", empath_circuit_breakers_open=0,
                    empath_circuit_breaker_openings_total=1)
        assert len(revived.sessions) >= 1
    finally:
        dead.stop()
        sink_port_keeper.stop()
        if revived is not None:
            revived.stop()


def test_a_reload_hands_waiting_claims_to_the_next_generation_at_once(
        daemon_factory: DaemonFactory, dns: DNSServer) -> None:
    """On a reload the old worker stops: the messages it holds waiting for a destination's
    connection go back to incoming/, and it wakes the next generation's workers for them,
    which would otherwise list incoming/ again only at their scan (queue_scan_interval)."""
    with SinkServer(Behaviour(delay=0.1), host="127.0.0.2") as sink:
        daemon = daemon_factory(overrides(dns, sink.port, 1, queue_scan_interval="10s",
                                          domains={"example.test": {"max_connections": 1}}))
        spool = Spool(str(daemon.spool_path))
        frozen(daemon, True)
        spool_messages(daemon, ids_per_worker(1, 4), "example.test")
        [worker] = daemon.child_pids("delivery")
        assert ctl(daemon, "queue", "unfreeze").returncode == 0  # wakes the worker
        # One message on the destination's only connection, three claimed and waiting for it.
        daemon.wait_for(lambda: len(spool.list_ids("incoming")) == 0, 10, "all four claimed")
        assert len(sink.messages) < 3
        reloaded = time.monotonic()
        daemon.reload(wait=False)
        daemon.wait_for(lambda: len(sink.messages) == 4, 30, "four messages at the sink")
        assert time.monotonic() - reloaded < 9.0  # the next scan: 10 s after the new start
        assert worker not in daemon.child_pids("delivery")
        assert sorted(subject for m in sink.messages for subject in
                      [m.data.split(b"\r\n", 1)[0]]) == [
            b"Subject: message %d" % n for n in range(4)]
