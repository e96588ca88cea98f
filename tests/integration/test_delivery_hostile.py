"""Hostile and broken destination servers, through the real daemon (issues 16 and 23).

Each test starts ``empath run`` delivering to the scripted SMTP sinks and loopback DNS of
``test_delivery_e2e.World`` and checks where the mail lands: a server answering out of turn
never gets a message counted as delivered; remote reply text reaches bounces and the log
only made printable; stored bare line ends leave as CRLF; an MX that is this host fails with
a loop verdict in one pass; a self-signed certificate keeps the message encrypted.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from empath.spool import new_message_id
from empath.spool.submit import store_message
from tests.integration.test_delivery_e2e import (
    SENDER,
    WAIT,
    Report,
    World,
    message,
    send,
    spool,
    wait_log,
    wait_mailbox,
    wait_spool_empty,
    world,
)
from tests.support.certs import make_self_signed
from tests.support.sink import Behaviour

__all__ = ["world"]  # the fixture, shared with test_delivery_e2e

EMPATHCTL = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "empathctl")
FAST_RETRY = {"retry_base_delay": "1s", "retry_max_delay": "1s"}


def behave(w: World, host: str = "127.0.0.2", **changes: Any) -> Any:
    sink = w.sink(host)
    sink.behaviour = dataclasses.replace(Behaviour(), **changes)
    return sink


def received_passes(log: str) -> int:
    """Messages the daemon's receivers accepted, from its log."""
    return sum(1 for line in log.splitlines() if " from=<" in line and " nrcpt=" in line)


# -- A: delivered only on the reply after the final dot ----------------------------------
def test_250_to_data_defers_until_a_real_transfer(world: World) -> None:
    sink = behave(world, data_reply=(250, "2.0.0 ok"))
    d = world.daemon(FAST_RETRY)
    send(d, ["u@example.test"], message("data answered 250"))
    wait_log(d, r"to DATA")
    assert sink.messages == []
    sink.behaviour = Behaviour()
    [msg] = sink.wait_for_messages(1, WAIT)
    wait_spool_empty(d)
    assert msg.rcpts[0][0] == "u@example.test" and b"data answered 250" in msg.data
    time.sleep(0.5)  # a second copy would have come by now: the retry delay is 1 s
    assert len(sink.messages) == 1


def test_a_stray_reply_after_the_dot_does_not_shift_the_next_message(world: World) -> None:
    sink = behave(world, after_final=b"250 2.1.5 ok\r\n")
    d = world.daemon({**FAST_RETRY, "connection_reuse": {"max_idle": "30s"}})
    for n in range(3):
        send(d, ["u@example.test"], message(f"stray {n}"))
        sink.wait_for_messages(n + 1, WAIT)
    wait_spool_empty(d)
    subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages)
    assert subjects == [b"stray 0", b"stray 1", b"stray 2"]  # each arrived, exactly once
    # a connection that saw a stray reply is never used for another transaction
    assert all(s.verbs().count("MAIL") <= 1 for s in sink.sessions)


# -- C: remote text made safe before bounces and logs ------------------------------------
def test_hostile_reply_text_reaches_the_bounce_and_log_made_printable(world: World) -> None:
    hostile = "5.1.1 no\x00such\x1b[2J\x1b]0;owned\x07user \u202eevil " + "A" * 58000
    behave(world, rcpt_default=(550, hostile))
    d = world.daemon(FAST_RETRY)
    send(d, ["u@example.test"], message("hostile reply"))
    [raw] = wait_mailbox(d, "sender")
    report = Report(raw)
    notice = raw.split(b"Received: ")[0]  # the notice's own parts, before the original
    for bad in (b"\x00", b"\x1b", b"\x07", "\u202e".encode()):
        assert bad not in notice
        assert bad.decode() not in d.log_text()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    diagnostic = str(report.recipients["u@example.test"]["Diagnostic-Code"])
    assert diagnostic.startswith("smtp;550 5.1.1 no?such?[2J?]0;owned?user ?evil AAAA")
    assert diagnostic.replace(" ", "").count("A") < 2100  # cut at the line limit


def test_hostile_deferral_text_reaches_empathctl_made_printable(world: World) -> None:
    behave(world, rcpt_default=(451, "4.2.0 wait\x1b[2J\x1b]0;owned\x07 \u202eevil\x00"))
    d = world.daemon(FAST_RETRY)
    qid = send(d, ["u@example.test"], message("hostile deferral"))
    wait_log(d, r"u@example.test.*status=deferred")
    view = subprocess.run([EMPATHCTL, "queue", "view", qid, "-c", str(d.config_path)],
                          capture_output=True, text=True, timeout=60)
    assert view.returncode == 0, view.stderr
    assert "wait?[2J?]0;owned? ?evil?" in view.stdout
    for bad in ("\x00", "\x1b", "\x07", "\u202e"):
        assert bad not in view.stdout and bad not in d.log_text()


# -- E: nothing stored leaves with a bare CR or LF ---------------------------------------
def test_stored_bare_line_ends_are_sent_as_crlf(world: World) -> None:
    sink = behave(world)
    d = world.daemon(FAST_RETRY)
    data = (b"From: <sender@localhost>\r\nSubject: smuggle\r\n\r\nhi\n.\nMAIL FROM:<x@evil>\n"
            b"lone\rcr\r\n")
    qid = new_message_id()
    store_message(spool(d), data, {
        "id": qid, "sender": SENDER,
        "recipients": [{"address": "u@example.test", "orcpt": None, "notify": None}],
        "params": {"body": "8BITMIME", "smtputf8": False, "size": len(data), "ret": None,
                   "envid": None},
        "client": {"ip": "127.0.0.1", "port": 1, "helo": "client.test", "esmtp": True,
                   "tls": None, "listener": "test", "auth": None},
        "received_at": time.time(), "metadata": {}})
    [msg] = sink.wait_for_messages(1, WAIT)
    wait_spool_empty(d)
    assert msg.data == (b"From: <sender@localhost>\r\nSubject: smuggle\r\n\r\nhi\r\n.\r\n"
                        b"MAIL FROM:<x@evil>\r\nlone\r\ncr\r\n")
    assert len(sink.messages) == 1 and sink.commands().count("MAIL FROM:<x@evil>") == 0


# -- D: a route back to this host fails at once ------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_an_mx_that_is_this_host_bounces_once_instead_of_looping(world: World) -> None:
    """The issue's loop: mail for a domain whose MX is this host, from a trusted client. It
    fails with "loops back to myself" without a connection; the bounce to the local sender
    is the only other pass (before the fix: thousands of receive-and-deliver passes)."""
    port = free_port()
    world.dns.set("loop.test", "MX", [(10, "mx.loop.test")])
    world.dns.set("mx.loop.test", "A", ["127.0.0.1"])
    world.port = port  # delivery.port: the MX is reached on the port the daemon listens on
    d = world.daemon(FAST_RETRY, listeners=[{"address": f"127.0.0.1:{port}"}])
    send(d, ["x@loop.test"], message("loop"))
    [raw] = wait_mailbox(d, "sender")
    block = Report(raw).recipients["x@loop.test"]
    assert (block["Action"], block["Status"]) == ("failed", "5.4.6")
    assert "mail for loop.test loops back to myself" in str(block["Diagnostic-Code"])
    wait_spool_empty(d)
    time.sleep(1.0)  # a loop would keep receiving: give it time to show
    assert received_passes(d.log_text()) == 1  # only the message itself came in over SMTP
    assert len(wait_mailbox(d, "sender")) == 1


def test_a_bounce_whose_mx_is_this_host_does_not_loop(world: World) -> None:
    """The sender's domain has this host as MX: its bounce (from the null sender) fails
    with the loop verdict and is dropped as a double bounce, never relayed back here."""
    port = free_port()
    world.dns.set("loop.test", "MX", [(10, "mx.loop.test")])
    world.dns.set("mx.loop.test", "A", ["127.0.0.1"])
    behave(world, rcpt_default=(550, "5.1.1 no such user"))
    d = world.daemon({**FAST_RETRY, "domains": {
        "example.test": {"mx_override": f"127.0.0.2:{world.port}"}}, "port": port},
        listeners=[{"address": f"127.0.0.1:{port}"}])
    send(d, ["u@example.test"], message("bounce loop", sender="x@loop.test"),
         sender="x@loop.test")
    wait_log(d, r"loops back to myself")
    time.sleep(2.0)  # a loop would keep receiving: give it time to show
    assert received_passes(d.log_text()) == 1
    assert d.log_text().count("loops back to myself") <= 3


def test_the_issue_loop_scenario_makes_a_bounded_number_of_passes(world: World) -> None:
    """Issue 16.1 as reported: an anonymous message to ``bad%y@localhost`` whose sender's
    domain has this host as MX. Local delivery refuses the name and bounces to the sender's
    domain, that is to us. The bounce fails with the loop verdict instead of circling (the
    report saw ~5,900 passes in 13 s). Should the receiver refuse such a name at RCPT, nothing
    is accepted and there is nothing to loop."""
    port = free_port()
    world.dns.set("loop.test", "MX", [(10, "mx.loop.test")])
    world.dns.set("mx.loop.test", "A", ["127.0.0.1"])
    d = world.daemon({**FAST_RETRY, "port": port},
                     listeners=[{"address": f"127.0.0.1:{port}"}])
    with d.smtp() as client:
        client.ehlo("client.test")
        assert client.mail("x@loop.test")[0] == 250
        code, _ = client.rcpt("bad%y@localhost")
        if code >= 500:
            return  # refused at RCPT: no message, no bounce, no loop
        assert code == 250
        assert client.data(message("loop scenario", sender="x@loop.test"))[0] == 250
    wait_log(d, r"loops back to myself")
    time.sleep(2.0)  # a loop would keep receiving: give it time to show
    assert received_passes(d.log_text()) == 1


# -- F: opportunistic TLS never downgrades for a bad certificate -------------------------
def test_self_signed_certificate_still_gets_the_message_encrypted(world: World,
                                                                  tmp_path: Any) -> None:
    cert = make_self_signed(tmp_path, "mx1.example.test")
    sink = behave(world, tls_cert=cert.cert_path, tls_key=cert.key_path)
    d = world.daemon(FAST_RETRY)
    send(d, ["u@example.test"], message("self-signed"))
    [msg] = sink.wait_for_messages(1, WAIT)
    wait_spool_empty(d)
    assert msg.tls  # arrived over TLS
    assert all(s.tls for s in sink.sessions if "MAIL" in s.verbs())
    log = d.log_text()
    assert "certificate not verified" in log and "retrying without TLS" not in log
