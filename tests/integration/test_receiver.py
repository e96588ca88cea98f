"""The receiver through real sockets against the real master: smtplib, swaks and raw bytes.

Delivery is frozen (the spool's freeze flag is set before start), so every accepted message
stays in incoming/ where the test reads it back with the spool's own reader.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from empath.spool import Spool, read_data, read_queue_file
from tests.support.daemon import EmpathDaemon, wait_for

MESSAGE = b"From: a@example.org\r\nTo: b@localhost\r\nSubject: hello\r\n\r\nbody line\r\n"


def frozen_daemon(daemon_factory: Any, overrides: dict[str, Any] | None = None) -> EmpathDaemon:
    d: EmpathDaemon = daemon_factory(overrides, start=False)
    spool = Spool(str(d.spool_path))
    spool.create_tree()
    spool.set_frozen(True)
    return d.start()


def incoming(d: EmpathDaemon) -> list[tuple[dict[str, Any], bytes]]:
    spool = Spool(str(d.spool_path))
    out = []
    for mid in spool.list_ids("incoming"):
        env, src = read_queue_file(spool.path("incoming", mid))
        out.append((env, read_data(src)))
    return out


class Raw:
    """A line-oriented raw SMTP client, for what smtplib will not send."""

    def __init__(self, d: EmpathDaemon, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(d.address, timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One whole (possibly multi-line) reply."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed; got {lines!r} {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(lines)

    def replies(self, n: int) -> list[bytes]:
        return [self.reply() for _ in range(n)]

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def send_bdat(d: EmpathDaemon, *chunks: bytes) -> list[bytes]:
    """One BDAT transaction (a@example.org to b@localhost), pipelined with its EHLO; the
    replies to EHLO, MAIL, RCPT and each chunk."""
    c = Raw(d)
    c.reply()
    last = len(chunks) - 1
    c.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@localhost>\r\n" + b"".join(
        b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if i == last else b"") + chunk
        for i, chunk in enumerate(chunks)))
    try:
        return c.replies(3 + len(chunks))
    finally:
        c.close()


def test_smtplib_message_is_durable_in_incoming_with_envelope(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory)
    with d.smtp() as s:
        s.ehlo("client.example")
        assert s.has_extn("pipelining") and s.has_extn("chunking") and s.has_extn("dsn")
        code, text = s.mail("a@example.org", [f"SIZE={len(MESSAGE)}", "RET=HDRS",
                                             "ENVID=env+2B1"])
        assert code == 250
        assert s.rcpt("b@localhost", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;b@localhost"])[0] \
            == 250
        code, text = s.data(MESSAGE)
    assert code == 250
    queue_id = text.decode().rsplit(" ", 1)[1]
    [(env, data)] = incoming(d)
    assert env["id"] == queue_id
    assert env["sender"] == "a@example.org"
    assert env["recipients"] == [{"address": "b@localhost", "orcpt": "rfc822;b@localhost",
                                  "notify": ["SUCCESS", "FAILURE"]}]
    assert env["params"]["ret"] == "HDRS" and env["params"]["envid"] == "env+1"
    assert env["client"]["ip"] == "127.0.0.1" and env["client"]["helo"] == "client.example"
    assert env["client"]["esmtp"] is True and env["client"]["tls"] is None
    assert data.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby test.empath "
                           b"(Empath) with ESMTP id " + queue_id.encode())
    assert data.endswith(MESSAGE) and b"\r\n\r\n" not in data[:-len(MESSAGE)]
    assert not os.listdir(d.spool_path / "tmp")


def test_swaks_delivers_into_the_spool(daemon_factory: Any) -> None:
    swaks = shutil.which("swaks")
    assert swaks, "swaks is installed by tools/install-test-deps"
    d = frozen_daemon(daemon_factory)
    host, port = d.address
    out = subprocess.run([swaks, "--server", f"{host}:{port}", "--from", "me@example.org",
                          "--to", "alice@localhost", "--body", "swaks body", "--pipeline"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 OK queued as" in out.stdout
    [(env, data)] = incoming(d)
    assert env["recipients"][0]["address"] == "alice@localhost"
    assert b"swaks body" in data


def test_pipelined_batch_is_answered_in_order(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory, {"mynetworks": []})
    c = Raw(d)
    assert c.reply().startswith(b"220 ")
    c.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@localhost>\r\n"
           b"RCPT TO:<y@elsewhere.example>\r\nRCPT TO:<z@localhost>\r\nDATA\r\n")
    replies = c.replies(6)
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"554", b"250", b"354"]
    c.send(b"one\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<x@localhost>\r\nDATA\r\ntwo\r\n.\r\nQUIT\r\n")
    replies = c.replies(6)
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250", b"221"]
    c.close()
    envs = sorted(incoming(d), key=lambda item: item[0]["id"])
    assert [e["sender"] for e, _ in envs] == ["a@example.org", ""]
    assert [r["address"] for r in envs[0][0]["recipients"]] == ["x@localhost", "z@localhost"]


def test_8bit_and_smtputf8(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory)
    body = "Subject: grüße\r\n\r\n8-bit body €\r\n".encode()
    with d.smtp() as s:
        s.ehlo("c")
        assert s.has_extn("smtputf8") and s.has_extn("8bitmime")
        # Relayed (127.0.0.1 is trusted): Maildir delivery has no non-ASCII mailbox names, so
        # bücher@localhost is refused at RCPT (test_undeliverable_local_parts_...).
        s.sendmail("jörg@example.org", ["bücher@example.net"], body,
                   mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    [(env, data)] = incoming(d)
    assert env["sender"] == "jörg@example.org"
    assert env["recipients"][0]["address"] == "bücher@example.net"
    assert env["params"]["smtputf8"] is True and env["params"]["body"] == "8BITMIME"
    assert data.endswith(body)
    assert b"with UTF8SMTP id" in data


def test_bdat_chunks(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory)
    part1, part2 = b"Subject: chunked\r\n\r\n.not stuffed\r\n", b"last\r\n.\r\n"
    replies = send_bdat(d, part1, part2)
    assert replies[3] == b"250 2.0.0 %d octets received" % len(part1)
    assert replies[4].startswith(b"250 2.0.0 OK queued as")
    [(_, data)] = incoming(d)
    assert data.endswith(part1 + part2)


SMUGGLING = [
    b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n",
]


@pytest.mark.parametrize("terminator", SMUGGLING, ids=lambda t: t.hex())
def test_smuggled_message_is_never_accepted(daemon_factory: Any, terminator: bytes) -> None:
    d = frozen_daemon(daemon_factory)
    c = Raw(d)
    c.reply()
    c.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
    c.replies(4)
    c.send(b"Subject: real\r\n\r\nreal body" + terminator
           + b"MAIL FROM:<smuggled@example.org>\r\nRCPT TO:<victim@localhost>\r\nDATA\r\n"
           + b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n")
    reply = c.reply()
    assert reply.startswith(b"550 5.6.0"), reply
    c.send(b"QUIT\r\n")
    assert c.reply().startswith(b"221")
    c.close()
    assert incoming(d) == []


def test_open_relay_is_refused(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory, {"mynetworks": [], "relay_domains": ["partner.example"]})
    with d.smtp() as s:
        s.ehlo("c")
        s.mail("spammer@example.org")
        code, text = s.rcpt("victim@gmail.example")
        assert code == 554 and b"5.7.1" in text
        assert s.rcpt("ok@partner.example")[0] == 250
        assert s.rcpt("local@localhost")[0] == 250


def test_limits(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory, {"smtp": {"max_recipients": 3,
                                                "max_message_size": 2048}})
    with d.smtp() as s:
        s.ehlo("c")
        assert s.esmtp_features["size"] == "2048"
        code, _ = s.mail("a@example.org", ["SIZE=4096"])
        assert code == 552
        s.mail("a@example.org")
        assert [s.rcpt(f"u{i}@localhost")[0] for i in range(4)] == [250, 250, 250, 452]
        code, _ = s.data(b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n" + b"z" * 900 + b"\r\n")
        assert code == 552
        s.rset()
        code, _ = s.docmd("NOOP " + "x" * 600)
        assert code == 500
        s.mail("a@example.org")
        s.rcpt("b@localhost")
        code, text = s.data(b"a" * 1200 + b"\r\n")
        assert code == 550 and b"longer than 1000" in text
    assert incoming(d) == []


def test_command_timeout_gives_421(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory, {"smtp": {"timeouts": {"command": "1s"}}})
    c = Raw(d)
    c.reply()
    started = time.monotonic()
    reply = c.reply()
    assert reply.startswith(b"421 4.4.2")
    assert 0.9 <= time.monotonic() - started < 5
    assert c.closed()


def test_early_talker_is_rejected(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory, {"smtp": {"greeting_delay": "1s"}})
    c = Raw(d)
    c.send(b"EHLO impatient\r\n")
    assert c.reply().startswith(b"554 5.5.0")
    assert c.closed()
    polite = Raw(d)
    assert polite.reply().startswith(b"220 ")


def test_connection_limit_per_ip(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory, {"processes": {"receivers": 1},
                                       "smtp": {"max_connections_per_ip": 2}})
    first, second = Raw(d), Raw(d)
    assert first.reply().startswith(b"220") and second.reply().startswith(b"220")
    third = Raw(d)
    assert third.reply().startswith(b"421 4.7.0")
    first.close()
    wait_for(lambda: Raw(d).reply().startswith(b"220"), 5, message="a free slot")


def test_connection_limit_of_a_receiver(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory, {"processes": {"receivers": 1},
                                       "smtp": {"max_connections": 3,
                                                "max_connections_per_ip": 100}})
    held = [Raw(d) for _ in range(3)]
    assert all(c.reply().startswith(b"220") for c in held)
    extra = Raw(d)
    assert extra.reply() == b"421 4.7.0 test.empath too many connections, try again later"
    held[0].close()
    wait_for(lambda: Raw(d).reply().startswith(b"220"), 5, message="a free slot")


def test_acknowledged_message_survives_sigkill_of_its_receiver(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory, {"processes": {"receivers": 1}})
    [receiver] = d.child_pids("receiver")
    with d.smtp() as s:
        s.sendmail("a@example.org", ["b@localhost"], MESSAGE)
        os.kill(receiver, signal.SIGKILL)
    [(env, data)] = incoming(d)
    assert data.endswith(MESSAGE)
    # The master replaces the receiver, and the new one accepts mail.
    d.wait_for(lambda: d.child_pids("receiver") and d.child_pids("receiver") != [receiver],
               message="a new receiver")
    with d.smtp() as s:
        s.sendmail("a@example.org", ["b@localhost"], MESSAGE)
    assert len(incoming(d)) == 2


def test_large_message_is_streamed_with_bounded_memory(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory, {"processes": {"receivers": 1},
                                       "smtp": {"max_message_size": "300MiB"}})
    [receiver] = d.child_pids("receiver")
    proc = psutil.Process(receiver)
    line = b"x" * 998 + b"\r\n"
    size = 200 * 1024 * 1024
    peak = 0
    with d.smtp(timeout=120) as s:
        s.ehlo("c")
        s.mail("a@example.org", [f"SIZE={size}"])
        s.rcpt("b@localhost")
        code, _ = s.docmd("DATA")
        assert code == 354
        sent = 0
        block = line * 1024
        while sent < size:
            s.sock.sendall(block)
            sent += len(block)
            if sent % (16 * len(block)) == 0:
                peak = max(peak, proc.memory_info().rss)
        s.sock.sendall(b".\r\n")
        code, _ = s.getreply()
        assert code == 250
    assert peak < 120 * 1024 * 1024, f"receiver RSS peaked at {peak / 2**20:.0f} MiB"
    spool = Spool(str(d.spool_path))
    [mid] = spool.list_ids("incoming")
    _, src = read_queue_file(spool.path("incoming", mid))
    assert src.length > sent


def test_disk_full_answers_452_and_leaves_no_partial_file(daemon_factory: Any,
                                                          tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"this machine cannot mount a small tmpfs: {made.stderr!r}")
    try:
        d = daemon_factory({"spool": {"path": str(mnt / "spool")}}, start=False)
        Spool(str(mnt / "spool")).create_tree()
        Spool(str(mnt / "spool")).set_frozen(True)
        d.start()
        with d.smtp() as s:
            s.ehlo("c")
            s.mail("a@example.org")
            s.rcpt("b@localhost")
            code, text = s.data(b"x" * 998 + b"\r\n" * 1 + (b"y" * 998 + b"\r\n") * 3000)
            assert code == 452, text
            # The session stays usable, and a small message still fits.
            assert s.sendmail("a@example.org", ["b@localhost"], MESSAGE) == {}
        spool = Spool(str(mnt / "spool"))
        assert os.listdir(spool.tmp) == []
        assert len(spool.list_ids("incoming")) == 1
        for _, data in incoming(d):
            assert data.endswith(MESSAGE)
    finally:
        d.kill()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_module_hooks_reject_and_record_metadata(daemon_factory: Any, tmp_path: Path) -> None:
    blocked = tmp_path / "blocked.txt"
    blocked.write_text("# blocked senders\nspam@bad.example\n@worse.example\n")
    d = frozen_daemon(daemon_factory, {"smtp": {"modules": [
        {"name": "empath.modules.blocklist", "options": {"senders": str(blocked)}}]}})
    with d.smtp() as s:
        s.ehlo("c")
        assert s.mail("spam@bad.example")[0] == 550
        assert s.mail("x@worse.example")[0] == 550
        s.sendmail("ok@good.example", ["b@localhost"], MESSAGE)
    [(env, _)] = incoming(d)
    assert env["metadata"] == {"empath.modules.blocklist": {"sender_checked": True,
                                                            "recipients_checked": 1}}


def test_many_messages_on_one_connection(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory)
    with d.smtp() as s:
        for i in range(50):
            s.sendmail("a@example.org", [f"u{i}@localhost"], MESSAGE)
    assert len(incoming(d)) == 50


def test_duplicate_suppression_survives_a_restart(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory, {"smtp": {"dedup_window": "1h"},
                                       "audit": {"log_path": "log/audit.jsonl"}})
    msg = b"Message-ID: <dup-1@example.org>\r\nSubject: once\r\n\r\nbody\r\n"
    replies = []
    for _ in range(2):
        with d.smtp() as s:
            s.ehlo("c")
            s.mail("a@example.org")
            s.rcpt("b@localhost")
            replies.append(s.data(msg))
    assert [code for code, _ in replies] == [250, 250]
    first_id = replies[0][1].decode().rsplit(" ", 1)[1]
    assert replies[1][1].decode() == f"2.0.0 OK already queued as {first_id}"
    assert len(incoming(d)) == 1
    # Different recipients, data or no Message-ID: not duplicates.
    with d.smtp() as s:
        s.sendmail("a@example.org", ["c@localhost"], msg)
        s.sendmail("a@example.org", ["b@localhost"], msg.replace(b"body", b"other"))
        s.sendmail("a@example.org", ["b@localhost"], b"Subject: no id\r\n\r\nx\r\n")
        s.sendmail("a@example.org", ["b@localhost"], b"Subject: no id\r\n\r\nx\r\n")
    assert len(incoming(d)) == 5
    assert "duplicate of " + first_id + " suppressed" in d.log_text()
    audit = [json.loads(line) for line in (d.dir / "log" / "audit.jsonl").read_text().splitlines()]
    dups = [r for r in audit if r["event"] == "duplicate"]
    assert len(dups) == 1 and dups[0]["original"] == first_id and dups[0]["id"] != first_id
    assert dups[0]["recipients"] == ["b@localhost"] and dups[0]["sender"] == "a@example.org"
    assert sum(r["event"] == "received" for r in audit) == 5
    # The window is kept in the spool: after a restart the copy is still recognised.
    assert d.stop() == 0
    d.proc = None
    d.start()
    with d.smtp() as s:
        s.ehlo("c")
        s.mail("a@example.org")
        s.rcpt("b@localhost")
        code, text = s.data(msg)
    assert code == 250 and text.decode().endswith(first_id)
    assert len(incoming(d)) == 5


POLICY_MODULE = '''
import asyncio
from empath.modules import Reject


class Policy:
    def __init__(self, options):
        self.mode = options["mode"]

    async def on_data(self, ctx, envelope):
        if self.mode == "raise" and envelope.sender == "boom@example.org":
            raise RuntimeError("policy service exploded")
        if self.mode == "hang" and envelope.sender == "slow@example.org":
            await asyncio.sleep(3600)
        if self.mode == "bad_priority" and envelope.sender == "odd@example.org":
            ctx.priority = "urgent"  # not a number: the receiver cannot place the message
        return None


def setup(options):
    return Policy(options)
'''


def policy_daemon(daemon_factory: Any, tmp_path: Path, mode: str) -> EmpathDaemon:
    (tmp_path / "policy_mod.py").write_text(POLICY_MODULE)
    d: EmpathDaemon = daemon_factory({
        "smtp": {"modules": [{"name": "policy_mod", "options": {"mode": mode}}],
                 "timeouts": {"data_termination": "1s"}}}, start=False)
    spool = Spool(str(d.spool_path))
    spool.create_tree()
    spool.set_frozen(True)
    d.start(env={"PYTHONPATH": str(tmp_path)})
    return d


def test_module_that_raises_gets_451_and_the_session_goes_on(daemon_factory: Any,
                                                             tmp_path: Path) -> None:
    d = policy_daemon(daemon_factory, tmp_path, "raise")
    with d.smtp() as s:
        s.ehlo("c")
        s.mail("boom@example.org")
        s.rcpt("b@localhost")
        code, text = s.data(MESSAGE)
        assert (code, text) == (451, b"4.3.5 Local policy error, try again later")
        assert s.sendmail("fine@example.org", ["b@localhost"], MESSAGE) == {}
    [(env, _)] = incoming(d)
    assert env["sender"] == "fine@example.org"
    log = d.log_text()
    assert "module policy_mod: on_data failed" in log and "policy service exploded" in log


def test_on_data_hook_that_hangs_is_cut_by_data_termination(daemon_factory: Any,
                                                            tmp_path: Path) -> None:
    d = policy_daemon(daemon_factory, tmp_path, "hang")
    with d.smtp() as s:
        s.ehlo("c")
        s.mail("slow@example.org")
        s.rcpt("b@localhost")
        started = time.monotonic()
        code, text = s.data(MESSAGE)
        waited = time.monotonic() - started
        assert (code, text) == (451, b"4.3.5 Local policy error, try again later")
        assert 0.9 <= waited < 30, waited
        assert s.sendmail("fine@example.org", ["b@localhost"], MESSAGE) == {}
    assert [env["sender"] for env, _ in incoming(d)] == ["fine@example.org"]
    assert "on_data module hooks did not answer within 1s" in d.log_text()


def test_unexpected_error_while_accepting_gets_451_and_the_session_goes_on(
        daemon_factory: Any, tmp_path: Path) -> None:
    """A module's bad value breaks the commit outside any module handler: the message is not
    stored, the client hears 451 (not silence), the error is logged, the session goes on."""
    d = policy_daemon(daemon_factory, tmp_path, "bad_priority")
    with d.smtp(timeout=20) as s:
        s.ehlo("c")
        s.mail("odd@example.org")
        s.rcpt("b@localhost")
        code, text = s.data(MESSAGE)
        assert (code, text) == (451, b"4.3.0 Local error in processing, try again later")
        assert s.noop()[0] == 250
        assert s.sendmail("fine@example.org", ["b@localhost"], MESSAGE) == {}
    assert [env["sender"] for env, _ in incoming(d)] == ["fine@example.org"]
    log = d.log_text()
    assert "not stored: unexpected error (from=<odd@example.org>" in log, log
    assert "TypeError" in log


def test_from_with_thousands_of_nested_comments_does_not_hang_the_session(
        daemon_factory: Any, tmp_path: Path) -> None:
    """~3,000 nested "(" in From: exhaust the stack of the stdlib address parser the DKIM step
    uses; the message is answered (stored unsigned), and the session goes on."""
    from tests.integration.test_dkim import keygen

    key, _ = keygen(tmp_path, "rsa-sha256", "s1")
    d = frozen_daemon(daemon_factory, {"dkim": {"domains": {"example.org": {
        "selector": "s1", "key": key}}}})
    hostile = (b"From: " + b"\r\n ".join([b"(" * 750] * 4) + b"alice@example.org\r\n"
               b"To: b@localhost\r\nSubject: nested\r\n\r\nbody\r\n")
    with d.smtp(timeout=20) as s:  # 127.0.0.1 is in mynetworks: DKIM applies
        s.ehlo("c")
        s.mail("alice@example.org")
        s.rcpt("b@localhost")
        code, _ = s.data(hostile)
        assert code == 250
        assert s.noop()[0] == 250
        assert s.sendmail("alice@example.org", ["b@localhost"],
                          b"From: alice@example.org\r\n\r\nfine\r\n") == {}
    stored = sorted((data for _, data in incoming(d)), key=len)
    assert len(stored) == 2
    assert b"DKIM-Signature" not in stored[1] and b"(" * 750 + b"\r\n (" in stored[1]
    assert stored[0].startswith(b"DKIM-Signature: ")


def test_hop_limit_refuses_more_received_headers_than_the_limit(daemon_factory: Any) -> None:
    """smtp.hop_limit (default 50): 50 Received: fields are accepted, 51 are a mail loop (554
    5.4.6 after the data, nothing stored), through DATA and through BDAT."""
    d = frozen_daemon(daemon_factory)
    trace = b"".join(b"Received: from hop%d.example (hop%d.example [192.0.2.%d])\r\n"
                     b"\tby next.example; Sat, 5 Dec 2026 08:00:00 +0000\r\n" % (i, i, i)
                     for i in range(51))
    body = b"Subject: loop\r\n\r\nReceived: in the body does not count\r\n"
    fifty = b"Received".join(trace.split(b"Received")[:51])  # the first 50 fields
    assert fifty.count(b"Received:") == 50 and trace.count(b"Received:") == 51
    with d.smtp() as s:
        s.ehlo("c")
        s.mail("a@example.org")
        s.rcpt("b@localhost")
        code, text = s.data(trace + body)
        assert (code, text) == (554, b"5.4.6 Too many hops (51 Received: header fields): "
                                     b"mail loop")
        assert s.sendmail("a@example.org", ["b@localhost"], fifty + body) == {}
    replies = send_bdat(d, trace[:1000], trace[1000:] + body)
    assert replies[4].startswith(b"554 5.4.6 Too many hops"), replies
    [(_, data)] = incoming(d)
    assert data.count(b"Received:") == 52  # the 50, ours, and the one in the body
    assert d.log_text().count("refused after data from [127.0.0.1]: 554 5.4.6 Too many hops "
                              "(51 Received: header fields)") == 2


def test_bdat_smuggling_is_refused_like_data(daemon_factory: Any) -> None:
    """A bare LF "." bare LF inside a BDAT chunk is refused (bare_eol=reject) like in DATA,
    so it can never be relayed byte for byte to a server that would end the data there."""
    d = frozen_daemon(daemon_factory)
    content = (b"Subject: real\r\n\r\nreal body\n.\nMAIL FROM:<smuggled@example.org>\r\n"
               b"RCPT TO:<victim@localhost>\r\nDATA\r\nSubject: smuggled\r\n")
    replies = send_bdat(d, content)
    assert replies[3].startswith(b"550 5.6.0"), replies
    assert incoming(d) == []


def test_bdat_bare_line_endings_are_normalized_when_configured(daemon_factory: Any) -> None:
    d = frozen_daemon(daemon_factory, {"smtp": {"bare_eol": "normalize"}})
    replies = send_bdat(d, b"Subject: n\r\n\r\none\n.\ntwo\r", b"three\r\n")
    assert replies[4].startswith(b"250 2.0.0 OK queued as"), replies
    [(_, data)] = incoming(d)
    assert data.endswith(b"Subject: n\r\n\r\none\r\n.\r\ntwo\r\nthree\r\n")


UNDELIVERABLE = ["bad%y@localhost", "a!b@localhost", "a/b@localhost", '"kate"@localhost',
                 "a=b@localhost", "bücher@localhost", "\u212aate@localhost"]


def rcpt_codes(d: EmpathDaemon, addresses: list[str]) -> dict[str, int]:
    with d.smtp() as s:
        s.ehlo("c")
        s.mail("x@example.org", ["SMTPUTF8"])
        codes = {address: s.rcpt(address)[0] for address in addresses}
        s.rset()
    return codes


def test_undeliverable_local_parts_are_refused_at_rcpt_even_when_any_user_is_accepted(
        daemon_factory: Any) -> None:
    """The loopback default accepts any user, but not a name Maildir delivery would refuse:
    no 250 now and a bounce to a (forged) sender later."""
    d = frozen_daemon(daemon_factory)
    codes = rcpt_codes(d, [*UNDELIVERABLE, "kate@localhost", "Brand.New+tag@localhost"])
    assert codes == {**dict.fromkeys(UNDELIVERABLE, 550), "kate@localhost": 250,
                     "Brand.New+tag@localhost": 250}


def test_unknown_users_rejected_are_all_but_system_users_and_maildirs(
        daemon_factory: Any) -> None:
    """local_delivery.unknown_users: reject (the default on a non-loopback listener): system
    users, existing Maildirs and postmaster are accepted, any other name gets 550 5.1.1 at RCPT
    (nothing is stored for it, so no Maildir is ever made for it)."""
    d: EmpathDaemon = daemon_factory({"local_delivery": {"unknown_users": "reject"}},
                                     start=False)
    (d.dir / "mail" / "kate" / "new").mkdir(parents=True)
    Spool(str(d.spool_path)).create_tree()
    Spool(str(d.spool_path)).set_frozen(True)
    d.start()
    codes = rcpt_codes(d, ["root@localhost", "KATE@localhost", "postmaster@localhost",
                           "stranger@localhost", "bad%y@localhost", "\u212aate@localhost"])
    assert codes == {"root@localhost": 250, "KATE@localhost": 250, "postmaster@localhost": 250,
                     "stranger@localhost": 550, "bad%y@localhost": 550,
                     "\u212aate@localhost": 550}


def test_unknown_local_users_are_refused_at_rcpt(daemon_factory: Any, tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("# local users\nalice\nBob\n")
    d = frozen_daemon(daemon_factory, {"local_delivery": {"users": str(users)}})
    with d.smtp() as s:
        s.ehlo("c")
        s.mail("x@example.org")
        assert s.rcpt("alice@localhost")[0] == 250
        assert s.rcpt("bob@localhost")[0] == 250
        code, text = s.rcpt("carol@localhost")
        assert code == 550 and text.startswith(b"5.1.1"), text
        assert s.rcpt("someone@example.net")[0] == 250  # not a local domain: relay rules
        assert s.data(MESSAGE)[0] == 250
    [(env, _)] = incoming(d)
    assert [r["address"] for r in env["recipients"]] == [
        "alice@localhost", "bob@localhost", "someone@example.net"]


def test_failed_flush_answers_452_and_leaves_no_file(daemon_factory: Any,
                                                      tmp_path: Path) -> None:
    """The write succeeds into the page cache and only the fdatasync fails: the spool sits on
    a thin-provisioned disk (ext4 on a loop device whose sparse backing file lives on a small
    tmpfs) whose backing store is then filled, so writeback fails (ENOSPC from the block
    layer) after every write call has succeeded."""
    back, fs = tmp_path / "back", tmp_path / "fs"
    back.mkdir()
    fs.mkdir()
    run = functools.partial(subprocess.run, capture_output=True, text=True)
    loop = ""
    d: EmpathDaemon | None = None
    try:
        assert run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(back)]).returncode == 0
        image = back / "disk.img"
        with open(image, "wb") as fh:
            fh.truncate(64 * 1024 * 1024)
        made = run(["losetup", "-f", "--show", str(image)])
        assert made.returncode == 0, made.stderr
        loop = made.stdout.strip()
        assert run(["mkfs.ext4", "-q", "-O", "^has_journal", loop]).returncode == 0
        assert run(["mount", "-o", "errors=continue", loop, str(fs)]).returncode == 0
        d = daemon_factory({"spool": {"path": str(fs / "spool")}}, start=False)
        Spool(str(fs / "spool")).create_tree()
        Spool(str(fs / "spool")).set_frozen(True)
        d.start()
        with d.smtp() as s:
            assert s.sendmail("a@example.org", ["b@localhost"], MESSAGE) == {}
            ballast = back / "ballast"
            with open(ballast, "wb") as fh:
                with contextlib.suppress(OSError):
                    for _ in range(1000):  # bounded: 64 MiB, far more than the tmpfs
                        fh.write(b"\0" * 65536)
                        fh.flush()
            big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 200
            s.ehlo("c")
            s.mail("a@example.org")
            s.rcpt("b@localhost")
            code, text = s.data(big)
            assert code == 452, text
            ballast.unlink()
            assert s.sendmail("a@example.org", ["c@localhost"], MESSAGE) == {}
        spool = Spool(str(fs / "spool"))
        assert os.listdir(spool.tmp) == []
        assert sorted(env["recipients"][0]["address"] for env, _ in incoming(d)) == [
            "b@localhost", "c@localhost"]
        assert "not stored" in d.log_text()
    finally:
        if d is not None:
            d.kill()
        run(["umount", "-l", str(fs)])
        if loop:
            run(["losetup", "-d", loop])
        run(["umount", "-l", str(back)])


def test_mail_loop_through_our_own_mx_is_bounded(daemon_factory: Any) -> None:
    """The issue's loop: a domain whose MX (a loopback DNS server) is this daemon. A stranger's
    message to bad%y@localhost from such a sender is refused at RCPT (it would have bounced to
    ourselves); a trusted client's message to that domain goes round until the hop limit
    refuses it, its bounce likewise, and then the loop is over: the receipts stay few."""
    from tests.support.dnsserver import DNSServer

    with socket.socket() as probe:  # the daemon must listen where the MX points
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hop_limit = 5
    zone = {"loop.test": {"MX": [(10, "mx.loop.test")]}, "mx.loop.test": {"A": ["127.0.0.1"]}}
    with DNSServer(zone) as dns:
        d: EmpathDaemon = daemon_factory({
            "listeners": [{"address": f"127.0.0.1:{port}"}],
            "mynetworks": ["127.0.0.1/32"],
            "smtp": {"hop_limit": hop_limit},
            "processes": {"receivers": 1, "delivery": 1},
            "delivery": {"port": port, "queue_scan_interval": "0.2s",
                         "dns": {"resolver": f"127.0.0.1:{dns.port}", "timeout": "2s"}}})
        stranger = smtplib.SMTP("127.0.0.1", port, timeout=10,
                                source_address=("127.0.0.2", 0))
        with stranger as s:
            s.ehlo("stranger.example")
            s.mail("someone@loop.test")
            code, _ = s.rcpt("bad%y@localhost")
            assert code == 550
        with d.smtp() as s:
            s.sendmail("a@loop.test", ["b@loop.test"], MESSAGE)
        spool = Spool(str(d.spool_path))

        def settled() -> bool:
            return not any(spool.list_ids(state) for state in ("incoming", "deferred")) \
                and not spool.list_active()

        wait_for(settled, 60, message="the loop to end")
        receipts = d.log_text().count(": from=<")
        time.sleep(2)
        assert d.log_text().count(": from=<") == receipts, "still looping"
    # The message and its bounce each pass at most hop_limit + 1 times.
    assert 1 <= receipts <= 2 * (hop_limit + 1), receipts
