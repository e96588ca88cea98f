"""Regression tests of faults found by reviewing the integrated daemon: each one drives the
running daemon (real processes, real sockets) into the condition that used to fail."""

from __future__ import annotations

import email
import os
import signal
import smtplib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography import x509

from empath.master.arbiter import MAX_RECEIVERS
from empath.smtp.capacity import MAX_ROWS
from tests.integration.test_cluster import (  # noqa: F401 (dns, redis_server: fixtures)
    WAIT,
    dns,
    fleet,
    node_config,
    redis_server,
    spooled,
    subjects,
    thaw,
)
from tests.integration.test_cli import empath
from tests.integration.test_extensibility import FAST
from tests.integration.test_faults import Mounts, mounts, remount  # noqa: F401 (mounts: a fixture)
from tests.integration.test_limits_e2e import ids_per_worker, spool_messages
from tests.support.certs import make_self_signed
from tests.support.daemon import EmpathDaemon, wait_for
from tests.support.dnsserver import DNSServer
from tests.support.redisserver import RedisServer
from tests.support.sink import Behaviour, SinkServer

# A module whose only effect is to block the receiver's event loop for a second on SIGUSR2,
# so a test can order "stop requested" before "connection accepted" inside one receiver.
STALL_MODULE = '''
import asyncio, signal, time


class Stall:
    def __init__(self, options):
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, time.sleep, 1.0)


def setup(options):
    return Stall(options)
'''


def test_connection_accepted_as_a_receiver_stops_is_answered(daemon_factory: Any,
                                                            tmp_path: Path) -> None:
    """A receiver told to stop used to tear down (connection table released, process exit)
    without letting the connections accepted in its last loop turn run connection_made: the
    client saw the connection closed with no greeting (b'') during reloads under load."""
    (tmp_path / "stall_mod.py").write_text(STALL_MODULE)
    d: EmpathDaemon = daemon_factory({"processes": {"receivers": 1},
                                      "smtp": {"modules": [{"name": "stall_mod"}]}},
                                     start=False)
    d.start(env={"PYTHONPATH": str(tmp_path)})
    [pid] = d.child_pids("receiver")
    # Both signals are handled in one loop turn, SIGINT (stop) first; the stall that follows
    # lets the connections below arrive before the stopping task runs.
    os.kill(pid, signal.SIGSTOP)
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGUSR2)
    os.kill(pid, signal.SIGCONT)
    time.sleep(0.3)
    conns = [socket.create_connection(d.address, timeout=10) for _ in range(5)]
    try:
        lines = [c.recv(512) for c in conns]
    finally:
        for c in conns:
            c.close()
    assert all(line[:4] in (b"220 ", b"421 ") and line.endswith(b"\r\n") for line in lines), \
        lines
    d.wait_for(lambda: pid not in d.child_pids() and d.settled(), 10, "a new receiver")
    assert "Exception in callback" not in d.log_text()


def test_a_lease_is_held_until_a_slow_quit_is_over(daemon_factory: Any, dns: DNSServer,
                                                   redis_server: RedisServer) -> None:
    """Fleet leases without connection reuse were released half a second after the delivery
    (a timer), whether or not the connection's QUIT was over: a server slow to answer QUIT
    (or a loaded host) saw more connections than ``max_connections``."""
    with SinkServer(Behaviour(delay=0.05, quit_delay=1.2), host="127.0.0.2") as sink:
        nodes = fleet(daemon_factory, 2, lambda name: node_config(
            name, redis_server, dns, sink.port, workers=1,
            domains={"example.test": {"max_connections": 2}}))
        for node in nodes:
            spool_messages(node, ids_per_worker(1, 6), "example.test")
        thaw(nodes)
        for node in nodes:
            node.wait_for(lambda n=node: spooled(n) == 0, WAIT, "every message delivered")
    assert sink.max_concurrent_sessions <= 2
    assert sorted(subjects(sink)) == sorted(f"message {i}" for i in range(6) for _ in range(2))


def _served_names(d: EmpathDaemon) -> list[str]:
    """The DNS names of the certificate the daemon presents after STARTTLS."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with d.smtp() as s:
        s.ehlo("c")
        assert s.starttls(context=ctx)[0] == 220
        der = s.sock.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


def _restart(d: EmpathDaemon) -> None:
    assert d.stop() == 0
    d.proc = None
    d.start()


def test_generated_tls_pair_is_never_taken_from_another_user(daemon_factory: Any,
                                                             tmp_path: Path) -> None:
    """The generated pair was used whenever both paths existed: a link planted at the key
    path served another user's key (they could decrypt every STARTTLS session); a key made
    world-readable stayed in use; a changed hostname kept the old name's certificate."""
    d: EmpathDaemon = daemon_factory({"processes": {"receivers": 1}}, start=False)
    tls_dir = d.dir / "var" / "tls"
    tls_dir.mkdir(parents=True, mode=0o700)
    evil = make_self_signed(tmp_path / "evil", "evil.example")
    evil_key = Path(evil.key_path).read_bytes()
    (tls_dir / "selfsigned.crt").symlink_to(evil.cert_path)
    (tls_dir / "selfsigned.key").symlink_to(evil.key_path)
    d.start()
    key_path = tls_dir / "selfsigned.key"
    assert not key_path.is_symlink() and key_path.stat().st_mode & 0o777 == 0o600
    assert Path(evil.key_path).read_bytes() == evil_key  # never written through the link
    assert _served_names(d) == ["test.empath"]
    assert "are not regular files of the daemon's user: making a new pair" in d.log_text()
    # A key others may read is taken as known to them: a new pair.
    first = key_path.read_bytes()
    key_path.chmod(0o644)
    _restart(d)
    assert key_path.read_bytes() != first and key_path.stat().st_mode & 0o777 == 0o600
    assert "(mode 0644) may be read by other users: making a new pair" in d.log_text()
    # A new hostname gets a certificate of its own, at a restart and at a reload.
    d.write_config({"hostname": "mx2.test.empath"})
    _restart(d)
    assert _served_names(d) == ["mx2.test.empath"]
    d.reload({"hostname": "mx3.test.empath"})
    d.wait_for(lambda: _served_names(d) == ["mx3.test.empath"], 15, "the new certificate")
    # A directory other users may write in is not used to make a pair in.
    assert d.stop() == 0
    d.proc = None
    for name in ("selfsigned.crt", "selfsigned.key"):
        (tls_dir / name).unlink()
    tls_dir.chmod(0o777)
    d.start()
    assert "must belong to the daemon's user (or root) and be writable by it alone" \
        in d.log_text()
    assert not (tls_dir / "selfsigned.key").exists()
    with d.smtp() as s:
        s.ehlo("c")
        assert not s.has_extn("starttls")


def test_receivers_on_a_read_only_spool_answer_451_and_recover(
        daemon_factory: Any, mounts: Mounts, tmp_path: Path) -> None:
    """A spool remounted read-only under running receivers, and a receiver started on it (a
    respawn): every message gets 451 (never a crash, a 250 or a dropped connection), and
    mail is taken again once the spool is writable, without a restart."""
    fs = mounts.tmpfs(tmp_path / "spoolfs", size="16m")
    d: EmpathDaemon = daemon_factory({"processes": {"receivers": 1},
                                      "spool": {"path": str(fs / "spool")}})
    remount(fs, "ro")
    try:
        with d.smtp() as s:
            with pytest.raises(smtplib.SMTPDataError) as err:
                s.sendmail("a@example.org", ["b@localhost"], b"Subject: ro 1\r\n\r\nx\r\n")
            assert err.value.smtp_code == 451
        [pid] = d.child_pids("receiver")
        os.kill(pid, signal.SIGKILL)
        d.wait_for(lambda: pid not in d.child_pids() and d.settled(), 15, "a new receiver")
        time.sleep(1.5)  # a receiver that cannot start on the spool has exited by now
        [new] = d.child_pids("receiver")
        with d.smtp() as s:
            code, _ = s.ehlo("c")
            assert code == 250
            with pytest.raises(smtplib.SMTPDataError) as err:
                s.sendmail("a@example.org", ["b@localhost"], b"Subject: ro 2\r\n\r\nx\r\n")
            assert err.value.smtp_code == 451
        assert d.child_pids("receiver") == [new]
    finally:
        remount(fs, "rw")
    with d.smtp() as s:
        assert s.sendmail("a@example.org", ["b@localhost"], b"Subject: rw\r\n\r\nx\r\n") == {}


HEADER_MODULE = '''
class Big:
    def __init__(self, options):
        self.report = options["report"]

    def before_delivery(self, ctx):
        refused = []
        for value in ("x" * 2000, "y" * 900):
            try:
                ctx.add_header("X-Big", value)
            except ValueError as exc:
                refused.append(str(exc))
        for _ in range(200):  # 200 lines of 900 octets: past the total a hook may add
            try:
                ctx.add_header("X-Many", "z" * 900)
            except ValueError as exc:
                refused.append(str(exc))
                break
        with open(self.report, "a") as fh:
            fh.write(" | ".join(refused) + "\\n")


def setup(options):
    return Big(options)
'''


def test_a_delivery_hook_cannot_add_an_overlong_header_line(daemon_factory: Any,
                                                            tmp_path: Path) -> None:
    """``add_header`` took a value of any length: a hook could put a 2,000-octet line on the
    wire (RFC 5322 allows 998) or megabytes of headers, copied into the spool on every
    attempt."""
    (tmp_path / "big_mod.py").write_text(HEADER_MODULE)
    report = tmp_path / "refused.txt"
    with SinkServer(host="127.0.0.2") as sink:
        d: EmpathDaemon = daemon_factory({
            "smtp": {"modules": [{"name": "big_mod", "options": {"report": str(report)}}]},
            "delivery": {**FAST, "domains": {"example.test": {
                "mx_override": f"127.0.0.2:{sink.port}", "tls": "disabled"}}}}, start=False)
        d.start(env={"PYTHONPATH": str(tmp_path)})
        with d.smtp() as s:
            s.sendmail("app@localhost", ["user@example.test"], b"Subject: big\r\n\r\nbody\r\n")
        [msg] = sink.wait_for_messages(1, WAIT)
    lines = msg.data.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    assert b"X-Big: " + b"y" * 900 in lines and b"x" * 999 not in msg.data
    parsed = email.message_from_bytes(msg.data)
    [refused] = report.read_text().splitlines()
    assert "a header line is at most 998 octets (RFC 5322 2.1.1); X-Big would be 2007" \
        in refused
    assert "a hook adds at most 65536 octets of headers to a message" in refused
    assert 60 <= len(parsed.get_all("X-Many")) <= 73


def test_the_last_receiver_accepts_past_its_share(daemon_factory: Any) -> None:
    """A receiver stops accepting at its share of smtp.max_connections so the kernel hands
    connections to the others; after SIGTTOU (or with the other receiver dead) there is no
    other, and clients waited in the accept queue with no greeting while the daemon was
    under its limit."""
    d: EmpathDaemon = daemon_factory({"processes": {"receivers": 2},
                                      "smtp": {"max_connections": 4}})
    d.signal(signal.SIGTTOU)
    d.wait_for(lambda: len(d.child_pids("receiver")) == 1, 15, "one receiver left")
    conns = []
    try:
        for _ in range(4):
            conn = socket.create_connection(d.address, timeout=5)
            conns.append(conn)
            assert conn.recv(512).startswith(b"220 ")
        conn = socket.create_connection(d.address, timeout=5)  # past the daemon's limit
        conns.append(conn)
        assert conn.recv(512).startswith(b"421 ")
    finally:
        for conn in conns:
            conn.close()


def test_a_killed_receivers_row_neither_counts_nor_holds_the_gate(daemon_factory: Any) -> None:
    """A receiver SIGKILLed (the master held back from replacing it) leaves its row in the
    shared table marked as accepting, with its connections counted: the survivor must not
    wait for it at its share, nor count the dead connections against the limit."""
    d: EmpathDaemon = daemon_factory({"processes": {"receivers": 2},
                                      "smtp": {"max_connections": 4}})
    victim, survivor = d.child_pids("receiver")
    held = [socket.create_connection(d.address, timeout=5) for _ in range(4)]
    for conn in held:
        assert conn.recv(512).startswith(b"220 ")
    os.kill(d.master_pid, signal.SIGSTOP)
    conns: list[socket.socket] = []
    try:
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status()
                 == psutil.STATUS_ZOMBIE, 10, message="the receiver killed")
        for conn in held:
            conn.close()
        time.sleep(1.5)  # the survivor's sweep (every second) has seen the free lock
        for _ in range(4):
            conn = socket.create_connection(d.address, timeout=5)
            conns.append(conn)
            assert conn.recv(512).startswith(b"220 ")
        assert psutil.Process(survivor).is_running()
    finally:
        os.kill(d.master_pid, signal.SIGCONT)
        for conn in conns:
            conn.close()


def test_more_receivers_than_the_connection_table_holds_are_refused(tmp_path: Path) -> None:
    """``processes.receivers`` took up to 256 while the shared connection table has 64 rows:
    receivers past the 64th (or past half of it during a reload, when two generations run)
    could not claim a row and exited at start, over and over, or rolled the reload back."""
    assert MAX_RECEIVERS * 2 <= MAX_ROWS
    for count, ok in ((MAX_RECEIVERS, True), (MAX_RECEIVERS + 1, False)):
        path = tmp_path / f"r{count}.yaml"
        path.write_text(f"processes:\n  receivers: {count}\n")
        result = empath("check-config", env={"EMPATH_CONFIG": str(path)})
        assert (result.returncode == 0) is ok, result.stderr
        if not ok:
            assert f"{path}:2: processes.receivers" in result.stderr


LOOP_MODULE = '''
class Loop:
    def __init__(self, options):
        self.hop = options["hop"]

    def before_delivery(self, ctx):
        ctx.route("example.test", self.hop)


def setup(options):
    return Loop(options)
'''


def test_a_hook_routing_to_our_own_listener_is_a_loop(daemon_factory: Any,
                                                      tmp_path: Path) -> None:
    """A delivery hook that sends a domain to this daemon's own listener: the route is this
    host, so the recipients fail at once ("loops back to myself") instead of the message
    going round through our own receiver."""
    (tmp_path / "loop_mod.py").write_text(LOOP_MODULE)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d: EmpathDaemon = daemon_factory({
        "listeners": [{"address": f"127.0.0.1:{port}"}],
        "smtp": {"modules": [{"name": "loop_mod", "options": {"hop": f"127.0.0.1:{port}"}}]},
        "delivery": FAST}, start=False)
    d.start(env={"PYTHONPATH": str(tmp_path)})
    with d.smtp() as s:
        s.sendmail("someone@example.org", ["user@example.test"], b"Subject: loop\r\n\r\nx\r\n")
    d.wait_for(lambda: "status=failed (554 5.4.6 mail for example.test loops back to myself)"
               in d.log_text(), WAIT, "the loop detected")
    time.sleep(1)
    assert d.log_text().count("from=<someone@example.org>") == 1  # received once, not again
