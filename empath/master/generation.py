"""A generation: one configuration and what the master runs for it, as one frozen value.

The arbiter holds the running generation (``Arbiter.current``) and never changes it in part:
start-up binds its sockets (``bound``), a reload makes its ``successor``, a rollback brings
the previous one back (``revived``), SIGTTIN/SIGTTOU change its receiver count
(``with_receivers``) and a stop drops its sockets (``stopped``); each returns a new value.
Its configuration, sockets, child counts and number therefore never disagree. Nothing here
opens, closes or signals anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from empath import observe
from empath.config.typed import Config
from empath.config.types import Address
from empath.master.listeners import Listener


@dataclass(frozen=True)
class Generation:
    """One configuration and what the master runs for it: the children's number, the
    configuration, the listening sockets (SMTP and admin) and how many children of each kind.

    A reload keeps the one it replaced until the new one runs: if that cannot even start, the
    master goes back to it instead of halting (``master/reload.py``)."""

    number: int
    cfg: Config
    listeners: tuple[Listener, ...] = ()
    admin_listeners: tuple[Listener, ...] = ()
    wanted: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def first(cls, cfg: Config) -> Generation:
        """Generation 1 of a starting master, before its sockets are bound."""
        return cls(1, cfg, wanted=wanted_children(cfg))

    def bound(self, listeners: list[Listener], admin_listeners: list[Listener]) -> Generation:
        """The same generation with its sockets (bound at start-up)."""
        return replace(self, listeners=tuple(listeners), admin_listeners=tuple(admin_listeners))

    def successor(self, cfg: Config, listeners: list[Listener],
                  admin_listeners: list[Listener]) -> Generation:
        """The next generation, for a reloaded configuration and its sockets."""
        return Generation(self.number + 1, cfg, tuple(listeners), tuple(admin_listeners),
                          wanted_children(cfg))

    def revived(self, number: int) -> Generation:
        """This (previous) generation brought back by a rollback under a fresh ``number``,
        so that the children of the failed one no longer count as current."""
        return replace(self, number=number)

    def with_receivers(self, count: int) -> Generation:
        """The same generation with ``count`` receivers (SIGTTIN/SIGTTOU)."""
        return replace(self, wanted={**self.wanted, "receiver": count})

    def stopped(self) -> Generation:
        """The same generation once the master closed its sockets to stop."""
        return replace(self, listeners=(), admin_listeners=())

    def sockets(self) -> list[Listener]:
        return [*self.listeners, *self.admin_listeners]

    def left_behind(self, new: Generation) -> list[Listener]:
        """This generation's sockets that ``new`` does not use (closed once no child of an
        older generation runs)."""
        keep = new.sockets()
        return [lst for lst in self.sockets() if lst not in keep]


def wanted_children(cfg: Config) -> dict[str, int]:
    """How many children of each kind the configuration asks for (one admin process when
    metrics or health checks are configured)."""
    return {"receiver": cfg.processes.receivers, "delivery": cfg.processes.delivery,
            "admin": 1 if observe.admin_enabled(cfg) else 0}


def admin_addresses(cfg: Config) -> list[Address]:
    """The addresses of the admin process's sockets, in the order it reads them back."""
    return [address for address, _ in observe.admin_endpoints(cfg)]
