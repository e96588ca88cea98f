"""Delivery status notices (RFC 3461/3464) a delivery attempt makes due, spooled as messages.

``bounce.py`` decides which notices are owed and builds their bytes; this module stores each
one durably as a new message from the null sender (``spool/submit.py``) before the original's
envelope records it, so a crash in between repeats a notice, never loses one; then tells the
delivery hooks, the metrics and the audit log. It never delivers anything itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from empath.config.typed import Config
from empath.delivery import bounce, state
from empath.delivery.hooks import DeliveryHooks
from empath.observe import deliveries
from empath.spool import MessageSource, Spool, new_message_id, records
from empath.spool.submit import store_message

log = logging.getLogger("empath.delivery")


class Notices:
    """The notices of one delivery worker."""

    def __init__(self, cfg: Config, queue: Spool, metrics: Any, audit: Any,
                 hooks: DeliveryHooks) -> None:
        self.cfg = cfg
        self.queue = queue
        self.metrics = metrics
        self.audit = audit
        self.hooks = hooks

    async def send_due(self, envelope: records.Envelope, source: MessageSource) -> bool:
        """Spool the failure and success notices this attempt made due; False if one failed.

        One notice of each kind per attempt, covering every recipient it concerns (so a
        message whose recipients all fail at once gets one bounce listing them all).
        """
        ok = True
        for kind, recipients in bounce.due_notices(envelope).items():
            try:
                notice_id = await asyncio.to_thread(self.spool, envelope, recipients,
                                                    kind, source)
            except OSError as exc:
                log.error("%s: cannot spool the %s notice: %s", envelope["id"], kind, exc)
                ok = False
                continue
            bounce.mark_notified(recipients, kind)
            if self.hooks:
                await self.hooks.notice(envelope, kind, notice_id,
                                        [r["address"] for r in recipients])
            deliveries.notice_spooled(self.metrics, self.audit, envelope, kind, notice_id,
                                      recipients)
            label = "non-delivery" if kind == bounce.FAILURE_NOTICE else "delivery"
            log.info("%s: sender %s notification: %s", envelope["id"], label, notice_id)
        return ok

    async def maybe_warn_delay(self, envelope: records.Envelope, source: MessageSource,
                               now: float) -> None:
        """Send one delay notice once a message has waited delay_warning (RFC 3461 DELAY).

        The notice is spooled before the envelope that records it is rewritten: a crash in
        between can repeat a warning, never lose a message.
        """
        after = self.cfg.delivery.delay_warning
        received = float(envelope.get("received_at", now))
        if (not after or envelope.get("delay_notified") or not bounce.should_report(envelope)
                or now - received < after):
            return
        expires = received + self.cfg.delivery.message_expiration
        waiting = [r for r in state.open_recipients(envelope) if bounce.wants(r, "DELAY")]
        if waiting:
            try:
                notice_id = await asyncio.to_thread(self.spool, envelope, waiting,
                                                    "delayed", source, expires)
            except OSError as exc:
                log.error("%s: cannot spool the delay notice: %s", envelope["id"], exc)
                return
            deliveries.notice_spooled(self.metrics, self.audit, envelope, "delayed", notice_id,
                                      waiting)
            log.info("%s: sender delay notification: %s", envelope["id"], notice_id)
        envelope["delay_notified"] = True

    def spool(self, envelope: records.Envelope, recipients: list[records.Recipient],
              kind: str, source: MessageSource, retry_until: float | None = None) -> str:
        """Build a DSN about ``recipients`` and store it durably as a new message from the
        null sender (RFC 3461 §6.2: notices are sent with MAIL FROM:<>). ``retry_until``:
        when a delayed message expires."""
        hostname = self.cfg.hostname
        data = bounce.build_report(envelope, recipients, kind, source, hostname=hostname,
                                   size_limit=self.cfg.delivery.bounce_size_limit,
                                   retry_until=retry_until)
        notice_id = new_message_id()
        to = envelope["sender"]
        notice = records.new_envelope(
            message_id=notice_id, sender="", recipients=[records.new_recipient(to)],
            params=records.new_params(body="8BITMIME", smtputf8=not to.isascii(),
                                      size=len(data)),
            client=records.new_client(listener="notice", helo=hostname),
            received_at=time.time(), notice_of=envelope["id"], notice_kind=kind)
        store_message(self.queue, data, notice)
        return notice_id

