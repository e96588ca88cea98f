"""A daemon started on a large deferred queue: new mail is claimed and delivered while the
delivery worker is still listing deferred/, and ``empathctl queue stats`` counts a large queue
from its listings (no read of each file) while the daemon runs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from empath.spool import Spool, new_message_id
from empath.spool.submit import store_message
from tests.integration.test_empathctl import EMPATHCTL
from tests.integration.test_faults import overrides, send
from tests.support.daemon import wait_for
from tests.support.fixtures import DaemonFactory
from tests.support.seed import seed_deferred
from tests.support.sink import SinkServer

DEFERRED = 50_000


def _line_index(lines: list[str], *parts: str) -> int:
    for n, line in enumerate(lines):
        if all(p in line for p in parts):
            return n
    raise AssertionError(f"no log line with {parts}")


def test_new_mail_is_delivered_while_a_large_deferred_queue_is_still_listed(
        daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    with SinkServer() as sink:
        daemon = daemon_factory(dict(overrides(sink, retry_max_delay="2d"), log={"level": "info"}), start=False)
        spool = Spool(str(daemon.spool_path))
        seed_deferred(spool, DEFERRED, due=time.time() + 86400)
        # Accepted before the start (as a restart finds it): waiting in incoming/.
        early = new_message_id()
        store_message(spool, b"Subject: early\r\n\r\nHello.\r\n", {
            "id": early, "sender": "sender@client.test", "received_at": time.time(),
            "recipients": [{"address": "early@remote.test", "orcpt": None, "notify": None}],
            "params": {}}, wake=False)
        daemon.start()
        late = send(daemon, "late", ("late@remote.test",))
        sink.wait_for_messages(2, timeout=30)
        listed = f"deferred/ listed: {DEFERRED} message(s)"
        wait_for(lambda: listed in daemon.log_text(), timeout=60)
        lines = daemon.log_text().splitlines()
        # Order of events in the worker's own log: the message waiting in incoming/ was
        # delivered before the listing of deferred/ was finished.
        assert (_line_index(lines, early, "to=<early@remote.test>", "status=delivered")
                < _line_index(lines, listed))
        _line_index(lines, late, "to=<late@remote.test>", "status=delivered")
        assert sorted(m.recipients[0] for m in sink.messages) == [
            "early@remote.test", "late@remote.test"]  # nothing of the seeded queue was due

        # While the daemon runs: counted by name, bytes and destinations left out.
        r = subprocess.run([EMPATHCTL, "queue", "stats", "--json", "--spool", str(spool.root)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["detail"] == "counts"
        assert doc["states"]["deferred"] == {"messages": DEFERRED, "bytes": None}
        assert doc["total"] == {"messages": DEFERRED, "bytes": None}
        assert doc["domains"] is None
        assert doc["oldest"]["id"] == min(spool.list_ids("deferred"))
        assert doc["oldest"]["status"] == "deferred"
        text = subprocess.run([EMPATHCTL, "queue", "stats", "--spool", str(spool.root)],
                              capture_output=True, text=True, timeout=60)
        assert text.returncode == 0
        assert text.stdout.startswith(f"queue: {DEFERRED} message(s), bytes not counted")
        assert "--full reads every queue file" in text.stdout
