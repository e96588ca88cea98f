"""The envelope, recipient and route records (empath/spool/records.py): their keys are the
ones docs/SPOOL.md documents, every writer's constructor produces them, they survive the
queue file's encoding, and the recipient rules are answered once."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from empath.ctl import submission
from empath.delivery import state
from empath.spool import fileformat, records
from empath.spool.submit import store_message

SPOOL_MD = (Path(__file__).resolve().parents[2] / "docs" / "SPOOL.md").read_text()


def keys_of(record: type) -> set[str]:
    return set(typing.get_type_hints(record))


def documented(section: str, stop: str) -> list[str]:
    """The first-column keys of the tables between two headings of docs/SPOOL.md (a row may
    name several: "| `ip`, `port` |")."""
    text = SPOOL_MD[SPOOL_MD.index(section):]
    text = text[:text.index(stop)]
    cells = re.findall(r"^\| (`[^|]+`) \|", text, re.M)
    return [key for cell in cells for key in re.findall(r"`([a-z_\[\]\.]+)`", cell)]


def test_envelope_keys_are_the_documented_ones() -> None:
    keys = documented("### Envelope", "### Done marks")
    top = {k for k in keys if "." not in k and "[" not in k}
    per_recipient = {k.split(".", 1)[1] for k in keys if k.startswith("recipients[].")}
    # Notices carry two keys the prose names (docs/SPOOL.md: "A notice ... plus").
    assert "`notice_of`" in SPOOL_MD and "`notice_kind`" in SPOOL_MD
    assert keys_of(records.Envelope) == top | {"notice_of", "notice_kind"}
    # marked_done is added by the reader of done marks, not written (SPOOL.md "Read").
    assert keys_of(records.Recipient) == per_recipient | {"address", "orcpt", "notify",
                                                          "marked_done"}


def _row(key: str) -> str:
    """The meaning cell of the docs/SPOOL.md table row of ``key``."""
    [line] = [ln for ln in SPOOL_MD.splitlines() if ln.startswith(f"| `{key}` |")]
    return line.split("|")[2]


def _keys(text: str) -> set[str]:
    """The keys in backquotes, leaving out what is in parentheses (transport names...)."""
    return set(re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", text)))


def test_attempt_and_last_result_keys_are_the_documented_ones() -> None:
    assert keys_of(records.LastResult) == _keys(_row("recipients[].last"))
    assert keys_of(records.Attempt) == _keys(_row("attempts"))
    per_recipient = re.search(r"\(per recipient: ([^)]*)\)", _row("attempts"))
    assert per_recipient is not None
    assert keys_of(records.Result) == set(re.findall(r"`([a-z_]+)`", per_recipient[1]))
    assert keys_of(records.AttemptInfo) <= keys_of(records.Attempt)


def test_record_attempt_writes_the_typed_records() -> None:
    env = records.parse_envelope(
        {"id": "X", "sender": "s", "recipients": [records.new_recipient("a@y.test")]})
    route = records.new_route("y.test", "smtp", 0.5, server="mx.y.test", dsn=True)
    state.record_attempt(env, {"a@y.test": state.RecipientOutcome(
        "delivered", 250, "2.0.0", "ok", "mx.y.test")}, {"duration": 0.5, "routes": [route]},
        7.0)
    [attempt] = env["attempts"]
    assert set(attempt) == keys_of(records.Attempt)
    assert set(attempt["results"]["a@y.test"]) == keys_of(records.Result)
    assert set(env["recipients"][0]["last"]) == keys_of(records.LastResult)
    assert env["recipients"][0]["last"]["next_hop_dsn"] is True


def test_route_keys_are_the_documented_ones() -> None:
    assert keys_of(records.Route) == set(documented("#### Route records", "\n## "))


def test_constructors_build_the_receivers_record() -> None:
    env = records.new_envelope(
        message_id="01ABC", sender="a@x.test",
        recipients=[records.new_recipient("b@y.test", orcpt="rfc822;b@y.test",
                                          notify=["FAILURE"])],
        params=records.new_params(body="8BITMIME", smtputf8=False, size=10),
        client=records.new_client(listener="127.0.0.1:25", ip="127.0.0.9", port=4000,
                                  helo="h", esmtp=True),
        received_at=5.0, metadata={"m": 1}, priority=2, trace={"traceparent": "00-x"})
    # Key order as the receiver always wrote it: readers see the same JSON as before.
    assert list(env) == ["id", "sender", "recipients", "params", "client", "received_at",
                         "metadata", "priority", "traceparent"]
    assert list(env["client"]) == ["ip", "port", "helo", "esmtp", "tls", "listener", "auth"]
    assert env["recipients"] == [{"address": "b@y.test", "orcpt": "rfc822;b@y.test",
                                  "notify": ["FAILURE"]}]
    assert records.parse_envelope(dict(env)) == env


def test_optional_keys_are_left_out_unless_given() -> None:
    env = records.new_envelope(
        message_id="01ABC", sender="", recipients=[records.new_recipient("b@y.test")],
        params=records.new_params(body="7BIT", smtputf8=False),
        client=records.new_client(listener="notice"), received_at=1.0, trace={})
    assert not {"priority", "traceparent", "notice_of", "notice_kind"} & set(env)
    assert env["metadata"] == {} and "uid" not in env["client"]


def test_submission_envelope_is_the_receivers_format() -> None:
    env = submission.envelope(message_id="01ABC", sender="u@h", recipients=["a@x", "b@y"],
                              data=b"Subject: \xc3\xa9\r\n\r\n", notify=["NEVER"], ret="HDRS",
                              envid="e1", uid=1000, user="u", now=7.0, listener="embed")
    assert set(env) <= keys_of(records.Envelope)
    assert env["client"]["listener"] == "embed" and env["client"]["uid"] == 1000
    assert env["params"] == {"body": "8BITMIME", "smtputf8": False, "size": None,
                             "ret": "HDRS", "envid": "e1"}
    assert [r["notify"] for r in env["recipients"]] == [["NEVER"], ["NEVER"]]


def test_a_stored_envelope_reads_back_equal(tmp_path: Path) -> None:
    from empath.spool import Spool, read_queue_file

    spool = Spool(str(tmp_path / "spool"))
    spool.create_tree()
    env = submission.envelope(message_id="01JABCDEFGHJKMNPQRSTVWXYZ0", sender="u@h",
                              recipients=["a@x"], data=b"x\r\n", notify=None, ret=None,
                              envid=None, uid=1, user="u", now=3.0)
    mid = store_message(spool, b"x\r\n", env, wake=False)
    back, _ = read_queue_file(spool.path("incoming", mid))
    assert back == {**env, "data_size": 3}


def test_new_route_puts_duration_last_and_refuses_unknown_keys() -> None:
    route = records.new_route("", "maildir", 0.5)
    assert route == {"domain": "(local)", "transport": "maildir", "duration": 0.5}
    smtp = records.new_route("x.test", "smtp", server=None, ip=None)
    assert list(smtp) == ["domain", "transport", "server", "ip", "duration"]
    with pytest.raises(TypeError, match="not a route record key: servr"):
        records.new_route("x.test", "smtp", servr="mx")


def test_open_recipients_and_domains_one_rule_for_all_readers() -> None:
    env = {"recipients": [{"address": "a@X.test"}, {"address": "b@y", "status": "deferred"},
                          {"address": "c@z", "status": "delivered"},
                          {"address": "d@z", "status": "expired"}]}
    assert [r["address"] for r in records.open_recipients(env)] == ["a@X.test", "b@y"]
    assert records.open_recipients(None) == [] and records.open_recipients({}) == []
    # The delivery state module and the operator's queue view use the same functions.
    from empath.spool import queue
    assert state.open_recipients is records.open_recipients
    assert queue.open_recipients is records.open_recipients
    assert state.recipient_domain is records.recipient_domain
    assert records.recipient_domain("a@X.Test") == "x.test"
    assert records.recipient_domain("postmaster") == ""


def test_done_marks_close_a_recipient_for_every_reader() -> None:
    env = {"id": "X", "recipients": [{"address": "a@x"}, {"address": "b@x"}]}
    encoded = fileformat.encode_envelope(env).replace(b'"done":"--"', b'"done":"D-"')
    import orjson
    back = orjson.loads(encoded)
    fileformat.apply_done_marks(back)
    assert [r["address"] for r in records.open_recipients(back)] == ["b@x"]


# -- reading: one check of the envelope's shape, naming the key ------------------------------
def _env(**over: object) -> dict[str, object]:
    env: dict[str, object] = {"id": "01ABC", "sender": "s@x.test",
                              "recipients": [{"address": "a@y.test", "orcpt": None,
                                              "notify": None}],
                              "params": {}, "client": {}, "received_at": 1.0, "metadata": {}}
    env.update(over)
    return {k: v for k, v in env.items() if v is not ...}


@pytest.mark.parametrize("over,named", [
    ({"sender": ...}, "no sender (sender)"),
    ({"sender": 5}, "no sender (sender)"),
    ({"recipients": ...}, "no recipients (recipients: missing)"),
    ({"recipients": []}, "no recipients (recipients: empty)"),
    ({"recipients": "a@y.test"}, "no recipients (recipients: a str, not a list)"),
    ({"recipients": {"address": "a@y.test"}}, "(recipients: a dict, not a list)"),
    ({"recipients": [{"address": "a@y.test"}, {"orcpt": None}]},
     "recipient without an address (recipients[1].address)"),
    ({"recipients": ["a@y.test"]}, "recipient without an address (recipients[0].address)"),
    ({"recipients": [{"address": 7}]}, "(recipients[0].address)"),
    ({"recipients": [{"address": "a@y.test", "status": "sent"}]},
     "unknown status 'sent' (recipients[0].status)"),
    ({"recipients": [{"address": "a@y.test", "notify": "NEVER"}]},
     "malformed NOTIFY (recipients[0].notify)"),
    ({"recipients": [{"address": "a@y.test", "attempts": "2"}]},
     "malformed attempt count (recipients[0].attempts)"),
    ({"recipients": [{"address": "a@y.test", "attempts": True}]}, "(recipients[0].attempts)"),
    ({"recipients": [{"address": "a@y.test", "last": "451 later"}]},
     "malformed last result (recipients[0].last)"),
    ({"id": 12}, "not an object with an id (id)"),
    ({"received_at": "yesterday"}, "malformed received_at"),
    ({"attempt_count": None}, "malformed attempt_count"),
    ({"next_retry_at": "soon"}, "malformed next_retry_at"),
    ({"data_size": -1}, "malformed data_size -1"),
    ({"data_size": "many"}, "malformed data_size 'many'"),
    ({"params": []}, "malformed params"),
    ({"client": "127.0.0.1"}, "malformed client"),
    ({"metadata": None}, "malformed metadata"),
    ({"attempts": {}}, "malformed attempt history (attempts)"),
])
def test_a_malformed_envelope_is_refused_naming_the_key(over: dict[str, object],
                                                        named: str) -> None:
    with pytest.raises(records.EnvelopeError) as refused:
        records.parse_envelope(_env(**over))
    assert named in str(refused.value)


def test_a_well_formed_envelope_is_returned_as_it_is() -> None:
    env = _env(recipients=[{"address": "a@y.test", "status": "deferred", "attempts": 2,
                            "last": {"at": 5.0, "code": 451}},
                           {"address": "b@y.test", "status": "delivered"}],
               attempt_count=2, next_retry_at=None, data_size=10, attempts=[])
    assert records.parse_envelope(env, data_length=10) is env
    # Writers' minimum: the keys delivery needs; the rest are read with .get.
    minimal = {"id": "X", "sender": "", "recipients": [{"address": "a"}]}
    assert records.parse_envelope(minimal) is minimal
    with pytest.raises(records.EnvelopeError, match=r"not an object with an id"):
        records.parse_envelope(["not", "an", "object"])
    with pytest.raises(records.EnvelopeError, match="data_size 10 differs from the file's "
                                                    "data length 11"):
        records.parse_envelope(env, data_length=11)


def test_a_null_last_result_reads_as_none_yet() -> None:
    env = records.parse_envelope(_env(recipients=[{"address": "a@y.test", "last": None}]))
    assert "last" not in env["recipients"][0]


def test_read_queue_file_refuses_a_malformed_envelope_naming_the_key(tmp_path: Path) -> None:
    from empath.spool import CorruptFile, Spool, read_queue_file

    spool = Spool(str(tmp_path / "spool"))
    spool.create_tree()
    mid = store_message(spool, b"x\r\n", _env(id="01JABCDEFGHJKMNPQRSTVWXYZ0",
                                                recipients=[{"address": "a@y.test",
                                                             "status": "gone"}]),
                        wake=False)
    path = spool.path("incoming", mid)
    with pytest.raises(CorruptFile, match=r"unknown status 'gone' \(recipients\[0\]\.status\)"):
        read_queue_file(path)
    # The spool's own upkeep still reads it (a rewrite, slot recovery) and leaves the
    # verdict to the delivery worker, which sets it aside.
    raw, source = fileformat.read_unchecked(path)
    assert raw["recipients"][0]["status"] == "gone" and source.length == 3
