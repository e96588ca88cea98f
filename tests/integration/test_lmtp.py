"""Local delivery through the real daemon: LMTP (to the test server, and to Dovecot's LMTP when
it is installed) and Maildir.

Mail goes in with smtplib; what the LMTP server receives, the spool's deferred/ entries and
the mailboxes on disk are what the tests check.
"""

from __future__ import annotations

import contextlib
import getpass
import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml

from empath.config import load_config
from empath.delivery.lmtp import LMTPTransport
from empath.delivery.state import DEFERRED, DELIVERED, FAILED
from empath.spool import MessageSource, Spool, read_queue_file
from tests.support.daemon import EmpathDaemon, wait_for
from tests.support.fixtures import DaemonFactory
from tests.support.lmtpserver import LMTPServer

MESSAGE = "Subject: local test\r\n\r\nHello.\r\n.a line with a dot\r\n"
FAST_RETRY = {"retry_base_delay": "1s", "retry_jitter_factor": 0,
              "queue_scan_interval": "0.2s"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def send(d: EmpathDaemon, sender: str, recipients: list[str], message: str = MESSAGE) -> None:
    with d.smtp() as client:
        client.sendmail(sender, recipients, message)


def deferred_envelopes(d: EmpathDaemon) -> list[dict[str, Any]]:
    spool = Spool(str(d.spool_path))
    out = []
    for message_id in spool.list_ids("deferred"):
        with contextlib.suppress(FileNotFoundError):  # claimed for a retry meanwhile
            out.append(read_queue_file(spool.path("deferred", message_id))[0])
    return out


def spool_is_empty(d: EmpathDaemon) -> bool:
    spool = Spool(str(d.spool_path))
    return not any(spool.list_ids(state) for state in ("incoming", "deferred", "failed")) \
        and not spool.list_active()


def statuses(envelope: dict[str, Any]) -> dict[str, str]:
    return {r["address"]: r["status"] for r in envelope["recipients"]}


@pytest.fixture
def lmtp() -> Iterator[LMTPServer]:
    with LMTPServer() as server:
        yield server


def lmtp_daemon(factory: DaemonFactory, address: str) -> EmpathDaemon:
    return factory({"local_delivery": {"lmtp": address}, "delivery": FAST_RETRY})


def test_one_delivered_one_deferred_then_retried(daemon_factory: DaemonFactory,
                                                 lmtp: LMTPServer) -> None:
    lmtp.verdicts["later@localhost"] = (452, "4.2.2 mailbox full")
    d = lmtp_daemon(daemon_factory, lmtp.address)
    send(d, "sender@client.test", ["ok@localhost", "later@localhost"])
    [first] = lmtp.wait_for_messages(1)
    assert first.recipients == ["ok@localhost", "later@localhost"]
    assert first.data.endswith(MESSAGE.encode())
    [envelope] = d.wait_for(lambda: deferred_envelopes(d), message="a deferred message")
    assert statuses(envelope) == {"ok@localhost": DELIVERED, "later@localhost": DEFERRED}
    later = next(r for r in envelope["recipients"] if r["address"] == "later@localhost")
    assert (later["last"]["code"], later["last"]["enhanced"]) == (452, "4.2.2")
    assert [route["transport"] for route in envelope["attempts"][0]["routes"]] == ["lmtp"]

    del lmtp.verdicts["later@localhost"]
    messages = lmtp.wait_for_messages(2, timeout=15)
    assert messages[1].recipients == ["later@localhost"]  # ok@ is not delivered twice
    assert lmtp.delivered_to("later@localhost") == [first.data]
    d.wait_for(lambda: spool_is_empty(d), message="the message to be removed")


def test_permanent_failure_bounces_to_the_sender(daemon_factory: DaemonFactory,
                                                 lmtp: LMTPServer) -> None:
    lmtp.verdicts["gone@localhost"] = (550, "5.1.1 no such mailbox")
    d = lmtp_daemon(daemon_factory, lmtp.address)
    send(d, "sender@localhost", ["ok@localhost", "gone@localhost"])
    messages = lmtp.wait_for_messages(2, timeout=15)
    original, bounce = messages
    assert original.results["ok@localhost"][0] == 250
    assert original.results["gone@localhost"][0] == 550
    assert (bounce.mail_from, bounce.recipients) == ("", ["sender@localhost"])
    report = bounce.data.decode()
    assert "Final-Recipient: rfc822;gone@localhost" in report
    assert "5.1.1" in report and "ok@localhost" not in report.split("\r\n\r\n", 1)[0]
    d.wait_for(lambda: spool_is_empty(d), message="both messages to be delivered")


def test_unreachable_lmtp_server_defers_then_delivers(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = lmtp_daemon(daemon_factory, f"127.0.0.1:{port}")
    send(d, "sender@client.test", ["a@localhost", "b@localhost"])
    [envelope] = d.wait_for(lambda: deferred_envelopes(d), message="a deferred message")
    assert statuses(envelope) == {"a@localhost": DEFERRED, "b@localhost": DEFERRED}
    assert {(r["last"]["code"], r["last"]["enhanced"]) for r in envelope["recipients"]} == {
        (451, "4.4.1")}
    with LMTPServer(port=port) as server:
        [msg] = server.wait_for_messages(1, timeout=15)
        assert msg.recipients == ["a@localhost", "b@localhost"]
        d.wait_for(lambda: spool_is_empty(d), message="the message to be removed")


def maildir_files(d: EmpathDaemon, user: str) -> list[Path]:
    new = Path(d.config["local_delivery"]["maildir_root"]) / user / "new"
    return sorted(new.iterdir()) if new.exists() else []


def test_maildir_without_lmtp(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory({"delivery": FAST_RETRY})
    with d.smtp() as client:  # a name Maildir cannot use is refused at RCPT (no backscatter)
        refused = client.sendmail("sender@localhost", ["alice@localhost", "Bad/Name@localhost"],
                                  MESSAGE)
    assert list(refused) == ["Bad/Name@localhost"] and refused["Bad/Name@localhost"][0] == 550
    # A local submission reaches delivery, which refuses the name and bounces.
    from tests.support.daemon import REPO

    r = subprocess.run([str(REPO / ".venv" / "bin" / "empath"), "sendmail", "-C",
                        str(d.config_path), "-f", "sender@localhost", "Bad/Name@localhost"],
                       input=MESSAGE.encode(), capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    [msg] = d.wait_for(lambda: maildir_files(d, "alice"), message="alice's message")
    data = msg.read_bytes()
    assert data.startswith(b"Return-Path: <sender@localhost>\r\nDelivered-To: alice@localhost")
    assert data.endswith(MESSAGE.encode())
    [bounce] = d.wait_for(lambda: maildir_files(d, "sender"), message="the bounce")
    assert b"Bad/Name@localhost" in bounce.read_bytes()
    d.wait_for(lambda: spool_is_empty(d), message="both messages to be delivered")


# -- interoperability with Dovecot's LMTP server --------------------------------------------
DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVECOT_CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
protocols = lmtp
listen = 127.0.0.1
ssl = no
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
auth_username_format = %Ln
mail_location = maildir:~/Maildir
mail_plugins = quota
lmtp_rcpt_check_quota = no
quota_full_tempfail = yes
plugin {{
  quota = count:User quota
  quota_vsizes = yes
}}
userdb {{
  driver = passwd-file
  args = {dir}/users
  default_fields = uid={uid} gid={gid}
}}
passdb {{
  driver = static
  args = nopassword=y
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


@pytest.fixture
def dovecot() -> Iterator[tuple[Path, int]]:
    """Dovecot's LMTP server on a loopback port with a throw-away configuration.

    Users alice and bob (bob's quota is a few bytes: Dovecot answers 452 after the data);
    anyone else is unknown (550 at RCPT). Mail is stored as a user that is not root: Dovecot
    refuses to deliver as uid 0, so under root the mailboxes belong to nobody."""
    if not (os.access(DOVECOT, os.X_OK) and os.path.exists("/usr/lib/dovecot/lmtp")):
        pytest.skip("Dovecot's LMTP server is not installed (Debian: dovecot-lmtpd)")
    base = Path(tempfile.mkdtemp(prefix="empath-dovecot-"))
    os.chmod(base, 0o755)  # the mail user must reach its home below
    if os.getuid() == 0:
        mail_user = pwd.getpwnam("nobody")
        user, group = "root", "root"
    else:
        mail_user = pwd.getpwuid(os.getuid())
        user, group = getpass.getuser(), grp.getgrgid(os.getgid()).gr_name
    uid, gid = mail_user.pw_uid, mail_user.pw_gid
    mail = base / "mail"
    mail.mkdir()
    os.chown(mail, uid, gid)
    (base / "users").write_text(f"alice:::::{mail}/alice::\n"
                                f"bob:::::{mail}/bob::userdb_quota_rule=*:storage=10B\n")
    port = free_port()
    (base / "dovecot.conf").write_text(DOVECOT_CONF.format(
        dir=base, user=user, group=group, uid=uid, gid=gid, port=port))
    proc = subprocess.Popen([DOVECOT, "-F", "-c", str(base / "dovecot.conf")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        try:
            wait_for(listening, 10, message="Dovecot to listen")
        except TimeoutError:
            log = base / "dovecot.log"
            raise AssertionError(log.read_text() if log.exists() else "no log") from None
        yield mail, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(5)
        shutil.rmtree(base, ignore_errors=True)


def lmtp_config(tmp_path: Path, port: int) -> Any:
    path = tmp_path / "empath.yaml"
    path.write_text(yaml.safe_dump({
        "base_dir": str(tmp_path), "hostname": "mx.empath.test",
        "local_delivery": {"lmtp": f"127.0.0.1:{port}"},
        "delivery": {"timeouts": {"connect": "3s", "banner": "5s", "data_termination": "10s"}},
    }))
    return load_config(str(path))


def test_dovecot_lmtp_gives_each_recipient_its_verdict(tmp_path: Path,
                                                        dovecot: tuple[Path, int]) -> None:
    mail, port = dovecot
    body = b"".join(b".%04d a line that starts with a dot\r\n" % i for i in range(3000))
    data = b"Subject: interop\r\n\r\n" + body
    queued = tmp_path / "queued"
    queued.write_bytes(data)
    envelope = {"id": "01DOVECOT", "sender": "sender@client.test",
                "params": {"body": "8BITMIME", "smtputf8": False, "size": len(data),
                           "ret": None, "envid": None}}
    rcpts = [{"address": a, "orcpt": None, "notify": None}
             for a in ("alice@localhost", "bob@localhost", "carol@localhost")]

    async def go() -> Any:
        return await LMTPTransport(lmtp_config(tmp_path, port)).deliver(
            "localhost", envelope, rcpts, MessageSource(str(queued), 0, len(data)))

    out, info = uvloop.run(go())
    assert {a: (o.status, o.code, o.enhanced) for a, o in out.items()} == {
        "alice@localhost": (DELIVERED, 250, "2.0.0"),
        "bob@localhost": (DEFERRED, 452, "4.2.2"),
        "carol@localhost": (FAILED, 550, "5.1.1")}
    assert info["transport"] == "lmtp" and info["server"] == f"127.0.0.1:{port}"
    [stored] = wait_for(lambda: list((mail / "alice" / "Maildir" / "new").glob("*")), 5,
                        message="alice's message")
    content = stored.read_bytes().replace(b"\r\n", b"\n")
    assert content.startswith(b"Return-Path: <sender@client.test>\n")
    assert content.endswith(data.replace(b"\r\n", b"\n"))
    assert not list((mail / "bob").glob("Maildir/new/*"))


def test_daemon_delivers_through_dovecot(daemon_factory: DaemonFactory,
                                         dovecot: tuple[Path, int]) -> None:
    mail, port = dovecot
    d = lmtp_daemon(daemon_factory, f"127.0.0.1:{port}")
    send(d, "sender@client.test", ["alice@localhost"])
    [stored] = d.wait_for(lambda: list((mail / "alice" / "Maildir" / "new").glob("*")),
                          message="alice's message in Dovecot's Maildir")
    content = stored.read_bytes().replace(b"\r\n", b"\n")
    assert b"Delivered-To: alice@localhost\n" in content
    assert content.endswith(MESSAGE.replace("\r\n", "\n").encode())
    d.wait_for(lambda: spool_is_empty(d), message="the message to be removed")
