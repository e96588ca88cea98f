"""Pytest fixtures around ``EmpathDaemon``.

Import them into a test module (``from tests.support.fixtures import daemon_factory``). Every
daemon a test starts has its process group killed, by the master's pid, at teardown, whatever
the test did to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import EmpathDaemon

DaemonFactory = Callable[..., EmpathDaemon]


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    """``make(overrides=None, start=True)`` → an ``EmpathDaemon`` in its own subdirectory."""
    made: list[EmpathDaemon] = []

    def make(overrides: dict[str, Any] | None = None, start: bool = True) -> EmpathDaemon:
        daemon = EmpathDaemon(tmp_path / f"empath{len(made)}", overrides)
        made.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield make
    for daemon in made:
        daemon.kill()


@pytest.fixture
def empath_daemon(daemon_factory: DaemonFactory) -> EmpathDaemon:
    """One started daemon with the default test configuration."""
    return daemon_factory()
