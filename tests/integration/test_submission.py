"""Submission (RFC 6409) with SMTP AUTH (RFC 4954) over STARTTLS and implicit TLS (RFC 8314),
against argon2 password files, through the real daemon."""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest

from empath.passwords import set_password
from empath.spool import Spool, read_data, read_queue_file
from tests.support.certs import make_ca, make_server_cert
from tests.support.daemon import EmpathDaemon

MESSAGE = b"Subject: submitted\r\n\r\nbody\r\n"


def submission_daemon(daemon_factory: Any, tmp_path: Path, mode: str = "submission",
                      extra: dict[str, Any] | None = None,
                      **auth: Any) -> tuple[EmpathDaemon, ssl.SSLContext]:
    ca = make_ca(tmp_path / "pki")
    server = make_server_cert(tmp_path / "pki", ca, "mx.test.empath", ips=["127.0.0.1"])
    pwfile = tmp_path / "passwd"
    set_password(str(pwfile), "alice@example.org", "correct horse")
    set_password(str(pwfile), "bob", "battery staple")
    d: EmpathDaemon = daemon_factory({
        "listeners": [{"address": "127.0.0.1:0", "mode": mode,
                       "tls": {"cert": server.cert_path, "key": server.key_path}}],
        "mynetworks": [],  # only authentication allows relaying
        "smtp": {"auth": {"password_file": str(pwfile), **auth}},
        **(extra or {}),
    }, start=False)
    Spool(str(d.spool_path)).create_tree()
    Spool(str(d.spool_path)).set_frozen(True)
    d.start()
    client = ssl.create_default_context(cafile=ca.cert_path)
    client.check_hostname = False
    return d, client


def stored(d: EmpathDaemon) -> list[tuple[dict[str, Any], bytes]]:
    spool = Spool(str(d.spool_path))
    out = []
    for mid in spool.list_ids("incoming"):
        env, src = read_queue_file(spool.path("incoming", mid))
        out.append((env, read_data(src)))
    return out


def test_auth_over_starttls_allows_relay(daemon_factory: Any, tmp_path: Path) -> None:
    d, client = submission_daemon(daemon_factory, tmp_path)
    with d.smtp() as s:
        s.ehlo("c")
        assert "auth" not in s.esmtp_features, "AUTH must not be offered before TLS"
        code, _ = s.mail("alice@example.org")
        assert code == 530
        s.rset()
        s.starttls(context=client)
        s.ehlo("c")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        s.login("alice@example.org", "correct horse")
        s.sendmail("alice@example.org", ["someone@far-away.example"], MESSAGE)
    [(env, data)] = stored(d)
    assert env["client"]["auth"] == "alice@example.org"
    assert b"with ESMTPSA id" in data and b"(authenticated as alice@example.org)" in data
    assert env["recipients"][0]["address"] == "someone@far-away.example"


def test_login_mechanism_and_bare_user(daemon_factory: Any, tmp_path: Path) -> None:
    d, client = submission_daemon(daemon_factory, tmp_path)
    with d.smtp() as s:
        s.starttls(context=client)
        s.ehlo("c")
        s.user, s.password = "bob", "battery staple"
        code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        assert code == 235
        s.sendmail("bob@localhost", ["x@far-away.example"], MESSAGE)
    assert stored(d)[0][0]["client"]["auth"] == "bob"


def test_wrong_password_then_throttled(daemon_factory: Any, tmp_path: Path) -> None:
    d, client = submission_daemon(daemon_factory, tmp_path, max_failures=3)
    codes = []
    for _ in range(4):
        with d.smtp() as s:
            s.starttls(context=client)
            s.ehlo("c")
            s.user, s.password = "alice@example.org", "wrong"
            try:
                # One PLAIN attempt per connection (login() would also try LOGIN).
                codes.append(s.auth("PLAIN", s.auth_plain)[0])
            except smtplib.SMTPAuthenticationError as exc:
                codes.append(exc.smtp_code)
            except smtplib.SMTPServerDisconnected:
                codes.append(421)
    # Two plain failures, the third reaches max_failures: 421 and the connection is dropped;
    # then even the right password is refused for the window.
    assert codes[:2] == [535, 535] and codes[2] == 421 and codes[3] == 421
    with d.smtp() as s:
        s.starttls(context=client)
        s.ehlo("c")
        with pytest.raises((smtplib.SMTPAuthenticationError, smtplib.SMTPServerDisconnected)):
            s.login("alice@example.org", "correct horse")
    assert "AUTH failed for user 'alice@example.org'" in d.log_text()


def test_sender_must_match_the_user_when_configured(daemon_factory: Any,
                                                    tmp_path: Path) -> None:
    d, client = submission_daemon(daemon_factory, tmp_path, require_sender_match=True)
    with d.smtp() as s:
        s.starttls(context=client)
        s.ehlo("c")
        s.login("alice@example.org", "correct horse")
        code, text = s.mail("ceo@bank.example")
        assert code == 553 and b"not owned by user alice@example.org" in text
        assert s.mail("alice@example.org")[0] == 250


def test_implicit_tls_submission(daemon_factory: Any, tmp_path: Path) -> None:
    d, client = submission_daemon(daemon_factory, tmp_path, mode="smtps")
    host, port = d.address
    with smtplib.SMTP_SSL(host, port, context=client, timeout=10) as s:
        s.ehlo("c")
        assert "starttls" not in s.esmtp_features
        s.login("bob", "battery staple")
        s.sendmail("bob@localhost", ["y@far-away.example"], MESSAGE)
    [(env, data)] = stored(d)
    assert env["client"]["tls"] is not None and b"with ESMTPSA id" in data


def test_submission_listener_without_password_file_is_a_config_error(daemon_factory: Any) -> None:
    d: EmpathDaemon = daemon_factory({"listeners": [{"address": "127.0.0.1:0",
                                                     "mode": "submission"}]}, start=False)
    d.start(wait=False)
    assert d.wait_exit(10) != 0
    assert "listeners[0].mode: mode submission requires AUTH" in d.log_text()


def test_empathctl_passwd_adds_and_changes_users(tmp_path: Path) -> None:
    import subprocess

    from empath.passwords import read_password_file, verify
    from tests.support.daemon import REPO

    pwfile = tmp_path / "passwd"
    ctl = str(REPO / ".venv" / "bin" / "empathctl")
    for user, password in (("carol@example.org", "first"), ("dave", "x"),
                           ("carol@example.org", "second")):
        out = subprocess.run([ctl, "passwd", user, "--file", str(pwfile), "--stdin"],
                             input=password + "\n", capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
    users = read_password_file(str(pwfile))
    assert sorted(users) == ["carol@example.org", "dave"]
    assert all(h.startswith("$argon2id$") for h in users.values())
    assert verify(users, "carol@example.org", "second")
    assert not verify(users, "carol@example.org", "first")
    assert not verify(users, "nobody", "x")
    assert oct(pwfile.stat().st_mode & 0o777) == "0o600"
    bad = subprocess.run([ctl, "passwd", "bad:name", "--file", str(pwfile), "--stdin"],
                         input="pw\n", capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "invalid user name" in bad.stderr


def test_authenticated_mail_is_dkim_signed_with_the_configured_headers(
        daemon_factory: Any, tmp_path: Path) -> None:
    import dkim

    from tests.integration.test_dkim import dns_txt, keygen
    from tests.support.dnsserver import DNSServer

    key, txt = keygen(tmp_path, "rsa-sha256", "sub1")
    d, client = submission_daemon(daemon_factory, tmp_path, extra={"dkim": {
        "canonicalization": "simple/simple", "headers": ["from", "subject"],
        "domains": {"example.org": {"selector": "sub1", "key": key}}}})
    body = b"From: Alice <alice@example.org>\r\nSubject: signed\r\n\r\ncovered text\r\n"
    with d.smtp() as s:
        s.starttls(context=client)
        s.login("alice@example.org", "correct horse")
        s.sendmail("alice@example.org", ["someone@far-away.example"], body)
    [(_, data)] = stored(d)
    assert data.startswith(b"DKIM-Signature: ")
    header = data.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    sig = header.split(b"\r\n", 1)[0]
    assert b"c=simple/simple" in sig and b"d=example.org" in sig and b"s=sub1" in sig
    signed = next(t.split(b"=", 1)[1] for t in sig.replace(b" ", b"").split(b";")
                  if t.startswith(b"h="))
    assert signed.lower().split(b":") == [b"from", b"subject"]
    with DNSServer({"sub1._domainkey.example.org": {"TXT": [txt]}}) as server:
        assert dkim.verify(data, dnsfunc=dns_txt(server))
        # simple body canonicalization: even a changed space breaks it.
        assert not dkim.verify(data.replace(b"covered text", b"covered  text"),
                               dnsfunc=dns_txt(server))
