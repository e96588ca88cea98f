"""DKIM signing (RFC 6376, RFC 8463) through the real daemon, verified by dkimpy against TXT
records served by a DNS server on loopback, after relaying through a retry."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest

from empath.spool import Spool, read_data, read_queue_file
from tests.support.daemon import REPO, EmpathDaemon
from tests.support.dnsserver import DNSServer
from tests.support.sink import PRESETS, SinkServer

CTL = str(REPO / ".venv" / "bin" / "empathctl")
MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: bob@far.example\r\nSubject: signed\r\n"
           b"Date: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\n"
           b"Hello,\r\n\r\nthis body is covered by the signature.\r\n")


def keygen(tmp_path: Path, algorithm: str, selector: str,
           domain: str = "example.org") -> tuple[str, str]:
    """(key path, TXT value) from ``empathctl dkim keygen``."""
    out = subprocess.run([CTL, "dkim", "keygen", domain, selector, "--algorithm",
                          algorithm, "--dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    record = out.stdout.splitlines()[0]
    assert record.startswith(f"{selector}._domainkey.{domain}. IN TXT")
    value = "".join(re.findall(r'"([^"]*)"', record))
    return str(tmp_path / f"{domain}.{selector}.key"), value


def dns_txt(server: DNSServer) -> Any:
    """A dkimpy dnsfunc asking the loopback server (not the system resolver)."""

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        query = dns.message.make_query(name.decode().rstrip("."), dns.rdatatype.TXT)
        answer = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=timeout)
        for rrset in answer.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None

    return lookup


def stored(d: EmpathDaemon) -> bytes:
    spool = Spool(str(d.spool_path))
    [mid] = spool.list_ids("incoming")
    return read_data(read_queue_file(spool.path("incoming", mid))[1])


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_signed_at_receipt_and_verifiable(daemon_factory: Any, tmp_path: Path,
                                          algorithm: str) -> None:
    key, txt = keygen(tmp_path, algorithm, "s1")
    d: EmpathDaemon = daemon_factory({"dkim": {"domains": {"example.org": {
        "selector": "s1", "key": key, "algorithm": algorithm}}}}, start=False)
    Spool(str(d.spool_path)).create_tree()
    Spool(str(d.spool_path)).set_frozen(True)
    d.start()
    with d.smtp() as s:  # 127.0.0.1 is in mynetworks: a trusted client
        s.sendmail("alice@example.org", ["bob@far.example"], MESSAGE)
    data = stored(d)
    assert data.startswith(b"DKIM-Signature: v=1; a=" + algorithm.encode())
    with DNSServer({"s1._domainkey.example.org": {"TXT": [txt]}}) as server:
        assert dkim.verify(data, dnsfunc=dns_txt(server))
        # Tampering with the body breaks it: the check is real.
        assert not dkim.verify(data.replace(b"covered", b"kovered"), dnsfunc=dns_txt(server))


def test_untrusted_clients_and_unlisted_domains_are_not_signed(daemon_factory: Any,
                                                               tmp_path: Path) -> None:
    key, _ = keygen(tmp_path, "rsa-sha256", "s1")
    d: EmpathDaemon = daemon_factory({"mynetworks": [], "dkim": {"domains": {
        "example.org": {"selector": "s1", "key": key}}}}, start=False)
    Spool(str(d.spool_path)).create_tree()
    Spool(str(d.spool_path)).set_frozen(True)
    d.start()
    with d.smtp() as s:
        s.sendmail("alice@example.org", ["bob@localhost"], MESSAGE)
    assert b"DKIM-Signature" not in stored(d)


def test_authenticated_user_is_signed_only_for_domains_it_may_send_as(
        daemon_factory: Any, tmp_path: Path) -> None:
    """alice@example.org may send as example.org, bob (a bare name) as the local domains: a
    From: of another domain that has a key (here the CEO's) is relayed unsigned, whatever
    the envelope sender (require_sender_match is off)."""
    from tests.integration.test_submission import stored as stored_all
    from tests.integration.test_submission import submission_daemon

    org, org_txt = keygen(tmp_path, "rsa-sha256", "s1")
    corp, _ = keygen(tmp_path, "ed25519-sha256", "s1", "corp.test")
    local, _ = keygen(tmp_path, "ed25519-sha256", "s1", "localhost")
    d, client = submission_daemon(daemon_factory, tmp_path, extra={"dkim": {"domains": {
        "example.org": {"selector": "s1", "key": org},
        "corp.test": {"selector": "s1", "key": corp, "algorithm": "ed25519-sha256"},
        "localhost": {"selector": "s1", "key": local, "algorithm": "ed25519-sha256"}}}})

    def send(user: str, password: str, from_: bytes) -> None:
        with d.smtp() as s:
            s.starttls(context=client)
            s.login(user, password)
            s.sendmail("alice@example.org", ["x@far.example"],
                       b"From: " + from_ + b"\r\nSubject: " + from_ + b"\r\n\r\nbody\r\n")

    send("alice@example.org", "correct horse", b"ceo@corp.test")
    send("alice@example.org", "correct horse", b"Alice <alice@example.org>")
    send("bob", "battery staple", b"ceo@corp.test")
    send("bob", "battery staple", b"bob@localhost")
    signatures = []
    for _, data in stored_all(d):
        head = data.split(b"\r\n\r\n", 1)[0]
        subject = head.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        signed = re.search(rb"^DKIM-Signature:.*?d=([^;]+);", head, re.S)
        signatures.append((subject, signed.group(1).decode() if signed else None))
    assert sorted(signatures, key=str) == sorted([
        ("ceo@corp.test", None), ("ceo@corp.test", None),
        ("Alice <alice@example.org>", "example.org"), ("bob@localhost", "localhost")], key=str)
    log = d.log_text()
    assert "not DKIM-signed: user alice@example.org may not send as corp.test" in log
    assert "not DKIM-signed: user bob may not send as corp.test" in log
    with DNSServer({"s1._domainkey.example.org": {"TXT": [org_txt]}}) as server:
        [alice] = [data for _, data in stored_all(d) if b"d=example.org" in data]
        assert dkim.verify(alice, dnsfunc=dns_txt(server))


def test_signature_survives_retries_to_the_next_hop(daemon_factory: Any, tmp_path: Path) -> None:
    key, txt = keygen(tmp_path, "rsa-sha256", "s2")
    sink = SinkServer(PRESETS["tempfail"]).start()
    try:
        d: EmpathDaemon = daemon_factory({
            "dkim": {"domains": {"example.org": {"selector": "s2", "key": key}}},
            "delivery": {"smarthost": f"127.0.0.1:{sink.port}", "retry_base_delay": "1s",
                         "retry_max_delay": "1s", "queue_scan_interval": "0.5s"},
        })
        with d.smtp() as s:
            s.sendmail("alice@example.org", ["bob@far.example"], MESSAGE)
        d.wait_for(lambda: Spool(str(d.spool_path)).list_ids("deferred"), 30,
                   message="the first attempt to be deferred")
        sink.behaviour = PRESETS["accept"]
        sink.wait_for_messages(1, timeout=60)
        data = sink.messages[0].data
        assert data.count(b"DKIM-Signature:") == 1
        with DNSServer({"s2._domainkey.example.org": {"TXT": [txt]}}) as server:
            assert dkim.verify(data, dnsfunc=dns_txt(server))
    finally:
        sink.stop()


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    keygen(tmp_path, "rsa-sha256", "s3")
    again = subprocess.run([CTL, "dkim", "keygen", "example.org", "s3", "--dir",
                            str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "not overwriting" in again.stderr
    assert oct((tmp_path / "example.org.s3.key").stat().st_mode & 0o777) == "0o600"
