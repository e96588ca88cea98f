"""Fleet mode: several Empath nodes share their delivery limits, breakers and dedup via Redis.

With ``cluster.url`` set, each receiver and delivery worker process opens one connection to the
Redis server (``fleet.py``, the ``redis`` package's asyncio client) and plugs it into the
backend hooks of ``delivery/limits.py`` (connection leases, GCRA rate limits),
``delivery/breaker.py`` (shared breaker state) and ``spool/dedup.py`` (the duplicate window).
Without it nothing here imports ``redis``: ``start`` returns None and the hooks stay empty, so a
single node runs exactly as before.

``view.py`` is the blocking side for operators: ``empathctl cluster status`` and the admin
process's ``/health/detailed`` check. docs/ARCHITECTURE.md ("Fleet mode") describes the keys
and the behaviour when Redis is down.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from empath.config.typed import Config
from empath.master.child import ChildContext

if TYPE_CHECKING:
    from empath.cluster.fleet import Fleet

_current: Fleet | None = None


def enabled(cfg: Config) -> bool:
    """Whether ``cfg`` configures fleet mode."""
    cluster = getattr(cfg, "cluster", None)
    return cluster is not None and cluster.url is not None


def node_name(cfg: Config) -> str:
    """This node's name in the fleet: ``cluster.node_name``, else the host name."""
    return str(cfg.cluster.node_name or socket.gethostname())


def current() -> Fleet | None:
    """The running process's fleet connection (None on a single node)."""
    return _current


async def start(ctx: ChildContext) -> Fleet | None:
    """Join the fleet from a child process (a receiver or delivery worker): connect, install
    the backends, start the background loop. None (and nothing imported) without a cluster."""
    global _current
    if not enabled(ctx.config):
        return None
    from empath.cluster.fleet import Fleet

    fleet = Fleet(ctx.config, kind=ctx.kind, index=ctx.index, count=ctx.count)
    await fleet.start()
    _current = fleet
    return fleet


async def stop() -> None:
    """Leave the fleet: release every lease, stop the loop, close the connection."""
    global _current
    fleet, _current = _current, None
    if fleet is not None:
        await fleet.close()
