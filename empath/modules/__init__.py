"""The module hook API (docs/MODULES.md).

A module is a Python module named in ``smtp.modules`` that defines ``setup(options) -> object``.
The returned object may define any of these hooks, plain functions or coroutines:

    on_connect(ctx)                    before the greeting
    on_helo(ctx, name)                 HELO/EHLO
    on_mail_from(ctx, sender, params)  MAIL FROM (params: the ESMTP parameters)
    on_rcpt_to(ctx, recipient)         RCPT TO (recipient: {"address", "orcpt", "notify"})
    on_data(ctx, envelope)             the message is complete, before it is stored

A hook returns None to let the message through, or ``Reject(code, text, enhanced)`` to answer
with that reply instead. ``ctx.metadata`` is a dict private to the module; whatever it holds
when the message is stored is saved in the envelope (``metadata[<module name>]``) and handed
back to the module's delivery-side hooks. A hook that raises gets the client a 451 for that
command and an error line in the log; it never takes the receiver down.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from empath.config.typed import ModuleConfig

log = logging.getLogger("empath.modules")

HOOKS = ("on_connect", "on_helo", "on_mail_from", "on_rcpt_to", "on_data")
# Session stage of each hook that the SMTP session pauses for.
STAGES = {"on_helo": "helo", "on_mail_from": "mail_from", "on_rcpt_to": "rcpt_to"}


@dataclass(frozen=True)
class Reject:
    """A hook's answer that replaces Empath's own reply."""

    code: int
    text: str
    enhanced: str = ""

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code {self.code} is not an SMTP reply code")


@dataclass
class HookContext:
    """What a hook sees of the connection; ``metadata`` is persisted with the message."""

    client_ip: str
    client_port: int
    listener: str
    helo: str | None = None
    tls: dict[str, str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    priority: int | None = None  # set by on_data to place the message in the delivery order


class ModuleError(Exception):
    """A module hook raised; carries the module's name."""


@dataclass
class LoadedModule:
    name: str
    instance: Any
    hooks: dict[str, Callable[..., Any]]


def load_modules(entries: Iterable[ModuleConfig]) -> list[LoadedModule]:
    """Import and set up every module of ``smtp.modules``; errors name the module."""
    loaded = []
    for entry in entries:
        mod = importlib.import_module(entry.name)
        setup = getattr(mod, "setup", None)
        if setup is None:
            raise ModuleError(f"module {entry.name} has no setup(options) function")
        instance = setup(dict(entry.options))
        hooks = {h: getattr(instance, h) for h in HOOKS if callable(getattr(instance, h, None))}
        loaded.append(LoadedModule(entry.name, instance, hooks))
    return loaded


def stages(modules: list[LoadedModule]) -> frozenset[str]:
    """Session stages some module wants to be asked about."""
    return frozenset(STAGES[h] for m in modules for h in m.hooks if h in STAGES)


async def run_hook(modules: list[LoadedModule], hook: str, ctx: HookContext,
                   *args: Any) -> Reject | None:
    """Call ``hook`` on every module in order; the first Reject wins.

    Each module sees its own ``metadata`` dict (ctx.metadata[module name]).
    """
    shared = ctx.metadata
    for module in modules:
        fn = module.hooks.get(hook)
        if fn is None:
            continue
        mine = shared.setdefault(module.name, {})
        view = HookContext(ctx.client_ip, ctx.client_port, ctx.listener, ctx.helo, ctx.tls, mine,
                           ctx.priority)
        try:
            result = fn(view, *args)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            log.exception("module %s: %s failed", module.name, hook)
            raise ModuleError(module.name) from exc
        if not mine:
            shared.pop(module.name, None)
        ctx.priority = view.priority
        if result is not None:
            if not isinstance(result, Reject):
                log.error("module %s: %s returned %r, not None or Reject", module.name, hook,
                          result)
                raise ModuleError(module.name)
            return result
    return None
