"""``empath sendmail`` (and ``tools/sendmail``, ``sendmail -bp``) with a running daemon: local
submission straight into the spool, delivered to Maildir by the real delivery worker, or queued
for a remote domain whose sink tempfails; sendmail's exit statuses; a message submitted while
the daemon is stopped is delivered once it starts."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from empath.spool import read_queue_file
from tests.support.daemon import REPO, EmpathDaemon
from tests.support.fixtures import DaemonFactory
from tests.support.sink import PRESETS, SinkServer

EMPATH = str(REPO / ".venv" / "bin" / "empath")
EMPATHCTL = str(REPO / ".venv" / "bin" / "empathctl")


@pytest.fixture
def tempfail_sink() -> Iterator[SinkServer]:
    sink = SinkServer(PRESETS["tempfail"]).start()
    yield sink
    sink.stop()


def overrides(sink_port: int) -> dict[str, object]:
    return {"processes": {"receivers": 1, "delivery": 1},
            "local_domains": ["localhost", "test.empath"],
            "delivery": {"retry_base_delay": "1h", "queue_scan_interval": "0.3s",
                         "delay_warning": 0,
                         "domains": {"example.net": {"mx_override": f"127.0.0.1:{sink_port}"}}}}


@pytest.fixture
def daemon(daemon_factory: DaemonFactory, tempfail_sink: SinkServer) -> EmpathDaemon:
    return daemon_factory(overrides(tempfail_sink.port))


def sendmail(daemon: EmpathDaemon, *args: str, message: bytes,
             command: list[str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*(command or [EMPATH, "sendmail"]), "-C", str(daemon.config_path),
                           *args], input=message, capture_output=True, timeout=30)


def mailbox(daemon: EmpathDaemon, user: str, count: int = 1) -> list[bytes]:
    """The ``count`` messages delivered to ``user``'s Maildir (waits for them)."""
    new = Path(daemon.config["local_delivery"]["maildir_root"]) / user / "new"

    def ready() -> list[Path]:
        files = sorted(new.glob("*")) if new.is_dir() else []
        return files if len(files) >= count else []

    return [p.read_bytes() for p in daemon.wait_for(ready, 10, f"mail for {user}")]


def headers(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0]


def test_local_submission_is_delivered_to_maildir(daemon: EmpathDaemon) -> None:
    r = sendmail(daemon, "carol", message=b"Subject: cron output\n\nline 1\nline 2\n")
    assert r.returncode == 0 and r.stdout == b"" and r.stderr == b""
    [msg] = mailbox(daemon, "carol")
    assert msg.startswith(b"Return-Path: <root@test.empath>\r\nDelivered-To: carol@test.empath\r\n"
                          b"Received: by test.empath (Empath, from userid 0)\r\n\twith local id ")
    head = headers(msg)
    assert b"\r\nSubject: cron output\r\n" in head and b"\r\nFrom: root@test.empath\r\n" in head
    assert b"\r\nDate: " in head and b"\r\nMessage-ID: <" in head
    assert msg.endswith(b"\r\n\r\nline 1\r\nline 2\r\n")  # LF became CRLF
    assert b"\n" not in msg.replace(b"\r\n", b"")


def test_t_and_f_take_recipients_from_headers_and_set_the_sender(daemon: EmpathDaemon) -> None:
    message = (b"From: Boss <boss@test.empath>\nTo: dave@test.empath\nCc: erin\n"
               b"Bcc: frank@test.empath\nSubject: -t\n\nhello\n")
    r = sendmail(daemon, "-t", "-f", "boss@test.empath", "-i", message=message)
    assert r.returncode == 0, r.stderr
    for user in ("dave", "erin", "frank"):
        [msg] = mailbox(daemon, user)
        assert msg.startswith(b"Return-Path: <boss@test.empath>\r\n")
        assert b"Bcc" not in msg and b"frank" not in msg.split(b"Received:", 1)[1]
        assert b"\r\nFrom: Boss <boss@test.empath>\r\n" in msg
        assert b"\r\n\twith local id " in msg and b"\tfor <" not in msg  # three recipients


def test_remote_recipient_is_queued_with_the_sendmail_envelope(daemon: EmpathDaemon) -> None:
    r = sendmail(daemon, "-v", "-F", "Cron Daemon", "-N", "failure", "bob@example.net",
                 message=b"Subject: to the queue\n\nx\n")
    assert r.returncode == 0
    assert r.stderr.startswith(b"sendmail: queued as ") and b"bob@example.net" in r.stderr
    mid = r.stderr.split()[3].decode()

    def deferred() -> bool:
        return (daemon.spool_path / "deferred" / mid).exists()

    daemon.wait_for(deferred, 10, "the message to be deferred")
    env = read_queue_file(str(daemon.spool_path / "deferred" / mid))[0]
    assert env["client"]["listener"] == "sendmail" and env["client"]["ip"] is None
    assert env["sender"] == "root@test.empath"
    assert env["recipients"][0]["address"] == "bob@example.net"
    assert env["recipients"][0]["notify"] == ["FAILURE"] and env["attempt_count"] == 1
    view = subprocess.run([EMPATHCTL, "queue", "view", mid, "--json", "-c",
                           str(daemon.config_path)], capture_output=True, timeout=30)
    doc = json.loads(view.stdout)
    assert ["From", "Cron Daemon <root@test.empath>"] in doc["headers"]
    assert doc["headers"][0][0] == "Received" and "with local id" in doc["headers"][0][1]
    # sendmail -bp lists it like mailq
    bp = subprocess.run([EMPATH, "sendmail", "-bp", "-C", str(daemon.config_path)],
                        capture_output=True, text=True, timeout=30)
    assert bp.returncode == 0 and mid in bp.stdout and "-- 1 Kbytes in 1 Request." in bp.stdout


def test_a_lone_dot_ends_the_message_unless_i(daemon: EmpathDaemon) -> None:
    message = b"Subject: dots\n\nbefore\n.\nafter\n"
    assert sendmail(daemon, "gina", message=message).returncode == 0
    [first] = mailbox(daemon, "gina")
    assert first.endswith(b"before\r\n")
    assert sendmail(daemon, "-oi", "gina", message=message).returncode == 0
    both = mailbox(daemon, "gina", 2)
    assert any(m.endswith(b"before\r\n.\r\nafter\r\n") for m in both)


def test_tools_sendmail_wrapper(daemon: EmpathDaemon) -> None:
    r = sendmail(daemon, "-i", "henry", message=b"Subject: wrapper\n\nx\n",
                 command=[str(REPO / "tools" / "sendmail")])
    assert r.returncode == 0, r.stderr
    assert b"Subject: wrapper" in mailbox(daemon, "henry")[0]


def test_empath_sendmail_console_script(daemon: EmpathDaemon) -> None:
    r = sendmail(daemon, "-i", "iris", message=b"Subject: script\n\nx\n",
                 command=[str(REPO / ".venv" / "bin" / "empath-sendmail")])
    assert r.returncode == 0, r.stderr
    assert b"Subject: script" in mailbox(daemon, "iris")[0]
    q = subprocess.run([str(REPO / ".venv" / "bin" / "empath-mailq"), "-c",
                        str(daemon.config_path)], capture_output=True, timeout=30)
    assert q.returncode == 0 and b"Mail queue is empty" in q.stdout, q.stdout + q.stderr


def test_exit_statuses(daemon: EmpathDaemon, tmp_path: Path) -> None:
    r = sendmail(daemon, "-t", message=b"Subject: nobody\n\nx\n")
    assert r.returncode == 64 and b"no recipients" in r.stderr
    assert sendmail(daemon, "-bs", message=b"").returncode == 64
    assert sendmail(daemon, "-q", message=b"").returncode == 64
    r = sendmail(daemon, "bad address@x", message=b"x\n")
    assert r.returncode == 65 and b"invalid address" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("smtp: {max_recipients: many}\n")
    r = subprocess.run([EMPATH, "sendmail", "-C", str(bad), "x@y"], input=b"x\n",
                       capture_output=True, timeout=30)
    assert r.returncode == 78 and b"bad.yaml" in r.stderr
    nospool = tmp_path / "nospool.yaml"
    nospool.write_text(f"spool: {{path: {tmp_path / 'missing'}}}\n")
    r = subprocess.run([EMPATH, "sendmail", "-C", str(nospool), "x@y"], input=b"x\n",
                       capture_output=True, timeout=30)
    assert r.returncode == 75 and b"no spool at" in r.stderr
    assert list(daemon.spool_path.joinpath("incoming").iterdir()) == []


def test_submitted_while_stopped_then_delivered_at_start(daemon_factory: DaemonFactory,
                                                         tempfail_sink: SinkServer) -> None:
    first = daemon_factory(overrides(tempfail_sink.port))
    assert first.stop() == 0
    r = sendmail(first, "ivan", message=b"Subject: while stopped\n\nx\n")
    assert r.returncode == 0
    [mid] = [p.name for p in (first.spool_path / "incoming").iterdir()]
    # The same files, a new master: the message waiting in incoming/ is delivered.
    second = EmpathDaemon(first.dir, first.overrides)
    try:
        second.start()
        [msg] = mailbox(second, "ivan")
        assert f"with local id {mid}".encode() in msg
    finally:
        second.kill()


@pytest.mark.parametrize("option", ["--help", "-?"])
def test_help_prints_the_usage(option: str) -> None:
    for command in ([EMPATH, "sendmail"], [str(REPO / ".venv" / "bin" / "empath-sendmail")]):
        r = subprocess.run([*command, option], capture_output=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(b"usage: sendmail [-t] [-i|-oi]"), r.stdout
        assert b"-bp" in r.stdout and r.stderr == b""


def test_an_unknown_long_option_is_named() -> None:
    r = subprocess.run([EMPATH, "sendmail", "--frobnicate", "x@y"], capture_output=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 64
    assert b"unknown option --frobnicate (sendmail --help lists the options)" in r.stderr


def test_empath_sendmail_linked_as_mailq_prints_the_queue(daemon: EmpathDaemon,
                                                          tmp_path: Path) -> None:
    link = tmp_path / "mailq"
    link.symlink_to(REPO / ".venv" / "bin" / "empath-sendmail")
    r = sendmail(daemon, "-i", "nobody@example.net", message=b"Subject: queued\n\nx\n")
    assert r.returncode == 0, r.stderr
    q = subprocess.run([str(link), "-c", str(daemon.config_path)], capture_output=True,
                       timeout=30)
    assert q.returncode == 0, q.stderr
    assert b"nobody@example.net" in q.stdout, q.stdout
