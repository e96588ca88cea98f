"""Whether a process exists is asked in one place (``empath.spool.layout.pid_alive``); the
master's pidfile check (``process_running``) builds on it and also tells a zombie apart."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from empath.master import daemon
from empath.spool import pid_alive

EMPATH = Path(__file__).resolve().parents[2] / "empath"


def test_live_zombie_and_reaped_processes() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    try:
        assert pid_alive(proc.pid) and daemon.process_running(proc.pid)
        assert proc.stdin is not None
        proc.stdin.close()  # the child exits; unreaped, it is a zombie
        deadline = time.monotonic() + 10
        while daemon.process_running(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not daemon.process_running(proc.pid)
        assert pid_alive(proc.pid)  # a zombie still holds its pid
    finally:
        proc.wait(timeout=10)
    assert not pid_alive(proc.pid) and not daemon.process_running(proc.pid)
    assert pid_alive(os.getpid()) and pid_alive(1)


def test_signal_zero_probes_are_written_once() -> None:
    probes = {str(p.relative_to(EMPATH)) for p in EMPATH.rglob("*.py")
              if re.search(r"os\.kill\([^)]*,\s*0\)", p.read_text())}
    assert probes == {"spool/layout.py"}
