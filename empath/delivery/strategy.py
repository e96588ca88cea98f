"""Delivery strategies: what delivers one domain's recipients of one message.

A strategy is given a ``DeliveryRequest`` (the domain, the envelope, that domain's open
recipients, where the message's bytes are, the attempt number and the route overrides of
delivery-side hooks) and returns a ``DeliveryResult``: one ``RecipientOutcome`` per recipient
(``delivered``, ``deferred`` or ``failed``) and a route record for the attempt history.

- A temporary failure is a ``deferred`` outcome (retried on the normal schedule), a permanent
  one a ``failed`` outcome (bounced). ``DeliveryStrategy.delivered/deferred/failed`` build them.
- A recipient the result leaves out, an exception out of ``deliver`` and a strategy that does
  not answer within the domain's ``strategy_timeout`` all defer: a strategy can delay a
  message, never lose it (the dispatcher, ``dispatch.py``, enforces this for every strategy).

Built in: ``smtp`` (``remote.py``: MX hosts, TLS, DANE, MTA-STS, limits), ``webhook``
(``webhook.py``), and for local domains ``maildir`` (``local.py``) or ``lmtp`` (``lmtp.py``).
A domain's ``strategy:`` may instead name a class by import path (``package.module:Class``),
a subclass of ``DeliveryStrategy`` constructed once per delivery worker with the
configuration and the domain's ``strategy_options`` (docs/MODULES.md, "Delivery strategies").
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from empath.config.typed import Config
from empath.delivery.state import DEFERRED, DELIVERED, FAILED, RecipientOutcome
from empath.spool import MessageSource
from empath.spool.records import Envelope, Recipient, Route

BUILTIN = ("smtp", "webhook")
# A delivery hook's next hop for this attempt ("host:port"), read by remote.py's routing: set
# around one SMTP delivery, in that delivery's own task.
NEXT_HOP: contextvars.ContextVar[str | None] = contextvars.ContextVar("next_hop", default=None)
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class DeliveryRequest:
    """One domain's share of one delivery attempt."""

    domain: str
    envelope: Envelope
    recipients: list[Recipient]
    source: MessageSource
    attempt: int = 1
    # host:port to use instead of the domain's MX hosts for this attempt (delivery hooks).
    next_hop: str | None = None

    @property
    def queue_id(self) -> str:
        return str(self.envelope.get("id", ""))

    @property
    def sender(self) -> str:
        return str(self.envelope.get("sender", ""))

    @property
    def addresses(self) -> list[str]:
        return [r["address"] for r in self.recipients]


@dataclass
class DeliveryResult:
    outcomes: dict[str, RecipientOutcome]
    route: Route = field(default_factory=lambda: Route())


class DeliveryStrategy(ABC):
    """Base class of delivery strategies (built-in and custom)."""

    #: Name in logs and route records (``transport``).
    name = "custom"

    def __init__(self, cfg: Config, options: Mapping[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.options = dict(options or {})

    @abstractmethod
    async def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        """Deliver ``request.source`` to ``request.recipients``: one outcome each."""

    async def close(self) -> None:  # noqa: B027 (optional: most strategies hold nothing)
        """Release connections and files when the worker stops."""

    # -- outcomes ---------------------------------------------------------------------------
    @staticmethod
    def delivered(text: str = "delivered", server: str | None = None,
                  code: int = 250, enhanced: str = "2.0.0") -> RecipientOutcome:
        return RecipientOutcome(DELIVERED, code, enhanced, text, server)

    @staticmethod
    def deferred(text: str, server: str | None = None, code: int = 451,
                 enhanced: str = "4.0.0") -> RecipientOutcome:
        if not 400 <= code <= 499:
            raise ValueError(f"a temporary failure needs a 4xx code, not {code}")
        return RecipientOutcome(DEFERRED, code, enhanced, text, server)

    @staticmethod
    def failed(text: str, server: str | None = None, code: int = 550,
               enhanced: str = "5.0.0") -> RecipientOutcome:
        if not 500 <= code <= 599:
            raise ValueError(f"a permanent failure needs a 5xx code, not {code}")
        return RecipientOutcome(FAILED, code, enhanced, text, server)

    # -- the message ------------------------------------------------------------------------
    @staticmethod
    async def read_message(source: MessageSource) -> bytes:
        """The whole message (headers and body, CRLF lines), read in a thread."""
        return await asyncio.to_thread(_read, source)


def _read(source: MessageSource) -> bytes:
    with open(source.path, "rb") as fh:
        fh.seek(source.offset)
        return fh.read(source.length)


class StrategyError(Exception):
    """A strategy named in the configuration cannot be loaded."""


def is_import_path(name: str) -> bool:
    return bool(IMPORT_PATH.match(name))


def load_class(path: str) -> type[DeliveryStrategy]:
    """The class ``package.module:Class`` names; StrategyError says what is wrong."""
    if not is_import_path(path):
        raise StrategyError(f"{path!r} is not smtp, webhook or package.module:Class")
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module raising at import
        raise StrategyError(f"cannot import module {module_name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, DeliveryStrategy):
        raise StrategyError(f"{path} is not a subclass of "
                            "empath.delivery.strategy.DeliveryStrategy")
    if getattr(cls, "__abstractmethods__", None):
        raise StrategyError(f"{path} does not implement deliver()")
    return cls
