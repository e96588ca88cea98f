"""TLS on by default (config/tlsfiles.py) through the running daemon: a listener without a
certificate offers STARTTLS with a self-signed one generated on first start (kept across
restarts); ``tls: off`` turns it off; a certificate that breaks after start-up costs a
respawned receiver its STARTTLS (an smtps listener its handshakes), not its life; a reload
with a broken certificate is refused."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from tests.support.certs import make_self_signed
from tests.support.fixtures import DaemonFactory

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def trusting(cert_path: Path | str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert_path))
    ctx.check_hostname = False  # connecting to 127.0.0.1; the name is checked separately
    return ctx


def test_starttls_is_on_by_default_with_a_generated_certificate(
        daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    cert_path = d.dir / "var" / "tls" / "selfsigned.crt"
    key_path = d.dir / "var" / "tls" / "selfsigned.key"
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert (d.dir / "var" / "tls").stat().st_mode & 0o777 == 0o700
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)  # fast to make
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["test.empath"]
    log = d.log_text()
    assert log.count("a self-signed certificate for test.empath was generated") == 1
    assert f"{cert_path} (key {key_path}, mode 0600)" in log
    with d.smtp() as s:
        s.ehlo("c")
        assert s.has_extn("starttls")
        assert s.starttls(context=trusting(cert_path))[0] == 220
        assert s.sock.getpeercert(binary_form=True) == cert.public_bytes(Encoding.DER)
        s.ehlo("c")
        assert s.sendmail("a@example.org", ["b@localhost"], MESSAGE) == {}
    # A restart keeps the certificate (clients that pinned it still find it).
    before = cert_path.read_bytes()
    assert d.stop() == 0
    d.proc = None
    d.start()
    assert cert_path.read_bytes() == before
    assert d.log_text().count("a self-signed certificate for test.empath was generated") == 1


def test_tls_off_on_a_listener(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory({"listeners": [{"address": "127.0.0.1:0", "tls": "off"}]})
    with d.smtp() as s:
        s.ehlo("c")
        assert not s.has_extn("starttls")
        assert s.sendmail("a@example.org", ["b@localhost"], MESSAGE) == {}
    assert not (d.dir / "var" / "tls").exists()
    assert "self-signed" not in d.log_text()


def test_a_certificate_broken_after_start_disables_tls_not_the_receiver(
        daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    pair = make_self_signed(tmp_path / "pki", "mx.test.empath")
    passwords = tmp_path / "passwd"
    passwords.write_text("")
    tls = {"cert": pair.cert_path, "key": pair.key_path}
    d = daemon_factory({"processes": {"receivers": 1},
                        "smtp": {"auth": {"password_file": str(passwords)}},
                        "listeners": [{"address": "127.0.0.1:0", "tls": tls},
                                      {"address": "127.0.0.2:0", "mode": "smtps",
                                       "tls": tls}]})
    plain, smtps = d.addresses()
    with d.smtp() as s:
        s.ehlo("c")
        assert s.has_extn("starttls")
    good = Path(pair.cert_path).read_bytes()
    Path(pair.cert_path).write_text("-----BEGIN CERTIFICATE-----\ngarbage\n"
                                    "-----END CERTIFICATE-----\n")
    [receiver] = d.child_pids("receiver")
    os.kill(receiver, signal.SIGKILL)
    d.wait_for(lambda: d.child_pids("receiver") not in ([], [receiver]), 20,
               "a new receiver")
    d.wait_for(lambda: "disabling TLS support" in d.log_text(), 10, "the TLS error")
    log = d.log_text()
    [line] = [x for x in log.splitlines() if "listener 127.0.0.1:0: cannot load" in x]
    assert " ERROR empath.smtp[" in line
    assert (f"listener 127.0.0.1:0: cannot load the certificate {pair.cert_path} with the key "
            f"{pair.key_path}") in line and "disabling TLS support (no STARTTLS)" in line
    assert "listener 127.0.0.2:0: cannot load the certificate" in log
    assert "its TLS handshakes fail until it is fixed" in log
    # The receiver serves: no STARTTLS, mail still accepted.
    with smtplib.SMTP(*plain, timeout=10) as s:
        s.ehlo("c")
        assert not s.has_extn("starttls")
        assert s.sendmail("a@example.org", ["b@localhost"], MESSAGE) == {}
    # The smtps listener speaks no plain text: its handshakes fail.
    with socket.create_connection(smtps, timeout=10) as raw:
        try:
            with trusting(pair.cert_path).wrap_socket(raw) as tls_sock:
                tls_sock.recv(100)
            raise AssertionError("the smtps handshake succeeded without a certificate")
        except (ssl.SSLError, ConnectionResetError):
            pass
    # A reload with the broken certificate is refused; the running configuration stays.
    generation = (d.status() or {})["generation"]
    d.signal(signal.SIGHUP)
    d.wait_for(lambda: "reload failed, keeping the running configuration" in d.log_text(),
               10, "the refused reload")
    assert "listeners[0].tls.cert: cannot load the certificate" in d.log_text()
    assert (d.status() or {})["generation"] == generation
    # Fixed and reloaded: STARTTLS is back.
    Path(pair.cert_path).write_bytes(good)
    d.reload()
    with d.smtp() as s:
        s.ehlo("c")
        assert s.has_extn("starttls")
