"""The built-in delivery strategies behind the ``DeliveryStrategy`` interface (strategy.py).

Each wraps one transport of this package and is made once per delivery worker, on first use:
``SMTPStrategy`` (remote.py), ``WebhookStrategy`` (webhook.py), ``MaildirStrategy``
(local.py, one thread per copy: they fsync) and ``LMTPStrategy`` (lmtp.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from empath.config.typed import Config
from empath.delivery import local
from empath.delivery.errors import LocalSystemError
from empath.delivery.state import RecipientOutcome
from empath.delivery.strategy import NEXT_HOP, DeliveryRequest, DeliveryResult, DeliveryStrategy
from empath.spool import MessageSource
from empath.spool.records import Envelope, new_route

log = logging.getLogger("empath.delivery")

class SMTPStrategy(DeliveryStrategy):
    name = "smtp"

    def __init__(self, cfg: Config, options: Mapping[str, Any] | None = None,
                 share: tuple[int, int] = (1, 1)) -> None:
        super().__init__(cfg, options)
        from empath.delivery.remote import RemoteTransport

        self.transport = RemoteTransport(cfg, share=share)

    async def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        token = NEXT_HOP.set(request.next_hop)
        try:
            outcomes, route = await self.transport.deliver(
                request.domain, request.envelope, request.recipients, request.source)
        finally:
            NEXT_HOP.reset(token)
        return DeliveryResult(outcomes, route)

    async def close(self) -> None:
        await self.transport.close()


class WebhookStrategy(DeliveryStrategy):
    name = "webhook"

    def __init__(self, cfg: Config, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(cfg, options)
        from empath.delivery.webhook import WebhookTransport

        self.transport = WebhookTransport(cfg)

    async def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        settings = self.cfg.delivery.domains[request.domain].webhook
        outcomes, route = await self.transport.deliver(
            request.domain, settings, request.envelope, request.recipients, request.source)
        return DeliveryResult(outcomes, route)

    async def close(self) -> None:
        await self.transport.close()


class LMTPStrategy(DeliveryStrategy):
    name = "lmtp"

    def __init__(self, cfg: Config, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(cfg, options)
        from empath.delivery.lmtp import LMTPTransport

        self.transport = LMTPTransport(cfg)

    async def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        outcomes, route = await self.transport.deliver(
            request.domain, request.envelope, request.recipients, request.source)
        return DeliveryResult(outcomes, route)


class MaildirStrategy(DeliveryStrategy):
    name = "maildir"

    async def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        """Each recipient's copy in its own thread: the fsyncs of one message's copies
        overlap (local.py makes concurrent deliveries, even to one mailbox, safe)."""
        started = time.monotonic()
        results = await asyncio.gather(*(self._copy(request.envelope, addr, request.source)
                                         for addr in request.addresses))
        out = dict(zip(request.addresses, results, strict=True))
        route = new_route(request.domain, "maildir", round(time.monotonic() - started, 6))
        return DeliveryResult(out, route)

    async def _copy(self, envelope: Envelope, addr: str,
                    source: MessageSource) -> RecipientOutcome:
        try:
            res = await asyncio.to_thread(
                local.deliver_maildir, self.cfg.local_delivery.maildir_root, addr,
                envelope.get("sender", ""), source, self.cfg.hostname)
        except Exception as exc:  # a bug must defer, never fail, the recipient
            log.exception("%s: maildir delivery to <%s> failed", envelope.get("id"), addr)
            return LocalSystemError.make("local", server="maildir",
                                         reason=f"maildir: {exc}").outcome()
        if not res.ok:
            log.warning("%s: maildir delivery to <%s>: %s", envelope.get("id"), addr, res.text)
        return res.outcome()
