"""Example: an application that embeds Empath and hands it mail from code.

Starts a complete Empath (master, receivers, delivery workers) in ``DIRECTORY`` from a dict,
submits a message through the spool (durable before ``submit`` returns), waits until the
delivery worker has put it into the local Maildir, and stops Empath.

    python examples/embed_app.py DIRECTORY
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from empath.embed import Empath

CONFIG = {
    "hostname": "app.example",
    "listeners": [{"address": "127.0.0.1:0"}],   # any free port
    "local_domains": ["app.example"],
    "processes": {"receivers": 1, "delivery": 1},
    "spool": {"min_free_space": 0},
    "shutdown_timeout": "5s",
}


def main(directory: str) -> int:
    with Empath(CONFIG, directory) as mta:
        print(f"Empath is listening on {mta.address[0]}:{mta.address[1]}")
        queue_id = mta.submit("reports@app.example", ["ops@app.example"],
                              b"Subject: nightly report\r\n\r\nall systems nominal\r\n")
        print(f"queued as {queue_id}")
        inbox = Path(directory) / "mail" / "ops" / "new"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            delivered = sorted(inbox.glob("*")) if inbox.is_dir() else []
            if delivered:
                print(f"delivered to {delivered[0]}")
                return 0
            time.sleep(0.1)
    print("not delivered within 30 s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "empath-embedded"))
