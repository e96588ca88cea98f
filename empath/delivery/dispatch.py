"""Route one message's open recipients to their transports and collect the outcomes.

Recipients are grouped by domain: local domains go to the LMTP server when
``local_delivery.lmtp`` is set (``lmtp.py``), else to Maildir (``local.py``, in a thread: it
fsyncs); a domain whose ``delivery.domains.<domain>.strategy`` is ``webhook`` goes to its URL
(``webhook.py``); every other domain goes to the SMTP transport; all groups concurrently. The
result is one RecipientOutcome per recipient plus one route record per group for the attempt
history. A transport that fails unexpectedly defers its recipients; it never fails them.

Each group counts as running on the task's ``limits.Ticket`` (the worker reads from it whether
the message only waits for destination limits), and ``on_done`` hears each group's outcomes as
soon as that group finishes, so the worker records them while other groups still run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from empath.config.types import normalize_domain
from empath.delivery import limits, local
from empath.delivery.errors import LocalSystemError
from empath.delivery.state import RecipientOutcome
from empath.spool import MessageSource

log = logging.getLogger("empath.delivery")

GroupResult = tuple[dict[str, RecipientOutcome], dict[str, Any]]
# Called with one group's outcomes and route record, and whether other groups still run.
OnGroupDone = Callable[[dict[str, RecipientOutcome], dict[str, Any], bool], Awaitable[None]]


def recipient_domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


class Dispatcher:
    def __init__(self, cfg: Any, share: tuple[int, int] = (1, 1)) -> None:
        self.cfg = cfg
        self.share = share  # (index, count) of this worker among the delivery workers
        self.local_domains = {d.lower() for d in cfg.local_domains}
        self._remote: Any = None
        self._lmtp: Any = None
        self._webhook: Any = None

    def _remote_transport(self) -> Any:
        if self._remote is None:
            from empath.delivery.remote import RemoteTransport

            self._remote = RemoteTransport(self.cfg, share=self.share)
        return self._remote

    def _lmtp_transport(self) -> Any:
        if self._lmtp is None:
            from empath.delivery.lmtp import LMTPTransport

            self._lmtp = LMTPTransport(self.cfg)
        return self._lmtp

    def _webhook_transport(self) -> Any:
        if self._webhook is None:
            from empath.delivery.webhook import WebhookTransport

            self._webhook = WebhookTransport(self.cfg)
        return self._webhook

    def webhook_settings(self, domain: str) -> Any | None:
        """The ``webhook`` settings of a domain whose strategy is webhook, else None."""
        policies = self.cfg.delivery.domains or {}
        policy = policies.get(domain)
        if policy is None and domain and not domain.isascii():
            try:  # the configuration's keys are A-labels (IDNA)
                policy = policies.get(normalize_domain(domain))
            except ValueError:
                return None
        if policy is None or policy.strategy != "webhook":
            return None
        return policy.webhook

    async def close(self) -> None:
        try:
            if self._remote is not None:
                await self._remote.close()
        finally:
            if self._webhook is not None:
                await self._webhook.close()

    async def deliver(self, envelope: dict[str, Any], recipients: list[dict[str, Any]],
                      source: MessageSource, on_done: OnGroupDone | None = None
                      ) -> tuple[dict[str, RecipientOutcome], list[dict[str, Any]]]:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for rcpt in recipients:
            groups[recipient_domain(rcpt["address"])].append(rcpt)
        jobs: list[Coroutine[Any, Any, GroupResult]] = []
        for domain, rcpts in groups.items():
            if domain in self.local_domains or domain == "":
                if self.cfg.local_delivery.lmtp is not None:
                    jobs.append(self._lmtp_transport().deliver(domain, envelope, rcpts, source))
                else:
                    jobs.append(self._deliver_maildir(domain, envelope, rcpts, source))
            elif (hook := self.webhook_settings(domain)) is not None:
                jobs.append(self._webhook_transport().deliver(domain, hook, envelope, rcpts,
                                                              source))
            else:
                jobs.append(self._remote_transport().deliver(domain, envelope, rcpts, source))
        ticket = limits.current_ticket()
        pending = [len(jobs)]

        async def run(job: Coroutine[Any, Any, GroupResult]) -> GroupResult:
            with ticket.run():  # running until its outcome is recorded
                result, info = await job
                pending[0] -= 1
                if on_done is not None:
                    await on_done(result, info, pending[0] > 0)
            return result, info

        outcomes: dict[str, RecipientOutcome] = {}
        infos: list[dict[str, Any]] = []
        for result, info in await asyncio.gather(*(run(job) for job in jobs)):
            outcomes.update(result)
            infos.append(info)
        return outcomes, infos

    async def _deliver_maildir(self, domain: str, envelope: dict[str, Any],
                               rcpts: list[dict[str, Any]], source: MessageSource
                               ) -> tuple[dict[str, RecipientOutcome], dict[str, Any]]:
        """Each recipient's copy in its own thread: the fsyncs of one message's copies
        overlap (local.py makes concurrent deliveries, even to one mailbox, safe)."""
        started = time.monotonic()
        results = await asyncio.gather(*(self._maildir_copy(envelope, rcpt["address"], source)
                                         for rcpt in rcpts))
        out = {rcpt["address"]: outcome for rcpt, outcome in zip(rcpts, results, strict=True)}
        info = {"domain": domain or "(local)", "transport": "maildir",
                "duration": round(time.monotonic() - started, 6)}
        return out, info

    async def _maildir_copy(self, envelope: dict[str, Any], addr: str,
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
