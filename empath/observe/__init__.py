"""Observability: Prometheus metrics, health checks, the audit log.

- ``metrics.py``: the instruments the receivers and delivery workers update (no-op objects when
  ``metrics.listen_addr`` is null);
- ``multiproc.py``: the master's side of prometheus_client's multiprocess mode (the directory of
  per-process value files, dead processes marked);
- ``admin.py``: the admin process (a child kind of its own) serving ``/metrics`` and
  ``/health/*`` over aiohttp; ``collect.py`` what a scrape reads, ``domains.py`` the bounded
  per-domain labels, ``health.py`` the checks;
- ``audit.py``: the JSON Lines audit log.

This package's ``__init__`` holds only what the master needs to decide whether, and where, an
admin process runs; it imports neither aiohttp nor prometheus_client.
"""

from __future__ import annotations

from empath.config.typed import Config
from empath.config.types import Address

METRICS, HEALTH = "metrics", "health"


def admin_endpoints(cfg: Config) -> list[tuple[Address, frozenset[str]]]:
    """The addresses the admin process listens on, each with what it serves (``metrics``,
    ``health`` or both when both are configured on one address), in a fixed order: the master
    binds them in this order and the admin process reads them back the same way."""
    out: list[tuple[Address, frozenset[str]]] = []
    for role, address in ((METRICS, cfg.metrics.listen_addr), (HEALTH, cfg.health.listen_addr)):
        if address is None:
            continue
        for i, (addr, roles) in enumerate(out):
            if addr == address:
                out[i] = (addr, roles | {role})
                break
        else:
            out.append((address, frozenset({role})))
    return out


def admin_enabled(cfg: Config) -> bool:
    """Whether the master runs an admin process (metrics or health checks configured)."""
    return bool(admin_endpoints(cfg))


def metrics_enabled(cfg: Config) -> bool:
    """Whether the children keep metric values: for /metrics, and for the health checks,
    whose delivery success rate reads the delivery counters."""
    return cfg.metrics.listen_addr is not None or cfg.health.listen_addr is not None
