"""Delivery to Postfix's own SMTP sink (``smtp-sink``, C, from Debian's postfix package) through
the real daemon: a second, independent server implementation on the other end of Empath's
SMTP client. Each transaction smtp-sink dumps to a file (``-d``) must hold the envelope Empath
sent and the message exactly as submitted (dot-stuffing undone, 8-bit data intact)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from empath.spool import Spool
from tests.support.daemon import EmpathDaemon, wait_for

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def dumps(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.iterdir())]


def test_messages_reach_postfix_smtp_sink_intact(daemon_factory: Any, tmp_path: Path) -> None:
    assert os.access(SMTP_SINK, os.X_OK), "smtp-sink missing: tools/install-test-deps installs it"
    # smtp-sink drops to nobody before it writes, and pytest's directories are private.
    out = Path(tempfile.mkdtemp(prefix="empath-smtp-sink-"))
    os.chmod(out, 0o777)
    port = free_port()
    sink = subprocess.Popen([SMTP_SINK, "-u", "nobody", "-d", f"{out}/%H%M%S.",
                             f"127.0.0.1:{port}", "20"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: listening(port), 10, message="smtp-sink listening")
        d: EmpathDaemon = daemon_factory({
            "relay_domains": ["example.net"],
            "delivery": {"smarthost": f"127.0.0.1:{port}",
                         "tls": {"default_policy": "disabled"}}})
        bodies = [
            b"Subject: one\r\n\r\nplain text\r\n",
            b"Subject: two\r\n\r\n.a line starting with a dot\r\n..two dots\r\n.\r\nx\r\n",
            "Subject: three\r\n\r\nCaf\u00e9 \u2014 8-bit body\r\n".encode(),
        ]
        for i, body in enumerate(bodies):
            with d.smtp() as s:
                assert s.sendmail(f"sender{i}@example.org", [f"rcpt{i}@example.net"], body,
                                  mail_options=["BODY=8BITMIME"]) == {}
        wait_for(lambda: len(dumps(out)) == 3, 30, message="three transactions at smtp-sink")
        spool = Spool(str(d.spool_path))
        d.wait_for(lambda: spool.list_ids("incoming") == [] and not spool.list_active()
                   and spool.list_ids("deferred") == [], 20, "an empty queue")
        got = dumps(out)
        for i, body in enumerate(bodies):
            [dump] = [g for g in got if f"<sender{i}@example.org>".encode() in g]
            assert f"X-Rcpt-Args: <rcpt{i}@example.net>".encode() in dump
            assert b"X-Client-Proto: ESMTP" in dump
            # smtp-sink's dump: its own headers, its Received: line, then the data as sent.
            assert dump.replace(b"\r\n", b"\n").rstrip(b"\n").endswith(
                body.replace(b"\r\n", b"\n").rstrip(b"\n")), dump
            assert b"Received: from " in dump and b"by test.empath" in dump
    finally:
        sink.send_signal(signal.SIGTERM)
        try:
            sink.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sink.kill()
            sink.wait()
        shutil.rmtree(out, ignore_errors=True)
