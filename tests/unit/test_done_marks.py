"""Done marks: a queue file's per-recipient delivered marks, written in place
(``fileformat.mark_delivered``), read back as statuses, rewritten from them."""

from __future__ import annotations

import os

import orjson
import pytest

from empath.spool import Spool, fileformat, new_message_id, read_envelope
from empath.spool.submit import store_message


@pytest.fixture
def spool(tmp_path) -> Spool:
    sp = Spool(str(tmp_path / "spool"))
    sp.create_tree()
    return sp

def test_done_marks_are_written_in_place_without_growing_the_file(spool):
    qid = new_message_id()
    env = {"id": qid, "sender": "s@a", "received_at": 1.0, "params": {},
           "recipients": [{"address": "a@x"}, {"address": "b@y"}, {"address": "c@z"}]}
    store_message(spool, b"Subject: t\r\n\r\nbody\r\n", env, wake=False)
    path = spool.path("incoming", qid)
    before = os.stat(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    assert b',"done":"---"}\n' in raw
    assert spool.mark_delivered(path, 3, [0, 2]) is True
    after = os.stat(path)
    assert (after.st_size, after.st_ino) == (before.st_size, before.st_ino)
    got = read_envelope(path)
    assert [r.get("status") for r in got["recipients"]] == ["delivered", None, "delivered"]
    assert "done" not in got
    # A rewrite carries the marks as statuses, and writes fresh marks from them.
    got["recipients"][1]["status"] = "deferred"
    spool.rewrite(path, got)
    with open(path, "rb") as fh:
        assert b',"done":"D-D"}\n' in fh.read()
    # The wrong recipient count: refused, nothing written.
    assert spool.mark_delivered(path, 2, [0]) is False
    with pytest.raises(ValueError):
        spool.mark_delivered(path, 3, [3])


def test_a_file_without_done_marks_is_read_as_before_and_not_marked(spool):
    qid = new_message_id()
    env = {"id": qid, "sender": "s@a", "recipients": [{"address": "a@x"}]}
    data = b"Subject: t\r\n\r\nbody\r\n"
    body = orjson.dumps(env)
    trailer = b"\n%s %010d %016d\n" % (fileformat.MAGIC, len(body), len(data))
    path = spool.path("incoming", qid)
    with open(path, "wb") as fh:
        fh.write(data + body + trailer)
    assert read_envelope(path) == env
    assert spool.mark_delivered(path, 1, [0]) is False
    assert read_envelope(path) == env
