"""Wake-up sockets under a spool whose path is too long for a Unix socket address."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from empath.spool import Spool
from empath.spool.wake import SUN_PATH_MAX, Waker, WakeListener


def test_a_deep_spool_still_wakes_its_workers(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "spool"
    spool = Spool(str(deep))
    spool.create_tree()
    assert len(os.fsencode(spool.wake_socket_path(os.getpid()))) > SUN_PATH_MAX

    async def scenario() -> list[str]:
        woken: list[str] = []
        got = asyncio.Event()

        def callback() -> None:
            woken.append("wake")
            got.set()

        listener = WakeListener(spool, callback)
        waker = Waker(spool)
        try:
            assert list(spool.wake_socket_paths()) == [spool.wake_socket_path(os.getpid())]
            waker.wake()
            await asyncio.wait_for(got.wait(), 5)
        finally:
            waker.close()
            listener.close()
        return woken

    assert asyncio.run(scenario()) == ["wake"]
    # The socket was bound at its real place, and is gone after close.
    assert list(spool.wake_socket_paths()) == []
