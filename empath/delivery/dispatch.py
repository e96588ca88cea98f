"""Route one message's open recipients to their delivery strategies and collect the outcomes.

Recipients are grouped by domain; each group goes to its strategy (strategy.py): local domains
to LMTP when ``local_delivery.lmtp`` is set, else Maildir; a domain whose
``delivery.domains.<domain>.strategy`` is ``webhook`` to its URL, or a class named by import
path to that class; every other domain to SMTP; all groups concurrently. The result is one
RecipientOutcome per recipient plus one route record per group for the attempt history.
Whatever a strategy does (raises, hangs past its ``strategy_timeout``, leaves a recipient
out) defers its recipients: it never fails them and never loses them.

Each group counts as running on the task's ``limits.Ticket`` (the worker reads from it whether
the message only waits for destination limits), and ``on_done`` hears each group's outcomes as
soon as that group finishes, so the worker records them while other groups still run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

from empath.config.typed import Config, DomainPolicyConfig, DomainPolicyWebhookConfig
from empath.config.types import normalize_domain
from empath.delivery import limits
from empath.delivery.errors import LocalSystemError
from empath.delivery.state import RecipientOutcome
from empath.delivery.strategies import (
    LMTPStrategy,
    MaildirStrategy,
    SMTPStrategy,
    WebhookStrategy,
)
from empath.delivery.strategy import DeliveryRequest, DeliveryResult, DeliveryStrategy, load_class
from empath.spool import MessageSource
from empath.spool.records import Envelope, Recipient, Route, recipient_domain

log = logging.getLogger("empath.delivery")

DEFAULT_STRATEGY_TIMEOUT = 600.0  # seconds, for a domain without delivery.domains settings
# Called with one group's outcomes and route record, and whether other groups still run.
OnGroupDone = Callable[[dict[str, RecipientOutcome], Route, bool], Awaitable[None]]


class Dispatcher:
    def __init__(self, cfg: Config, share: tuple[int, int] = (1, 1)) -> None:
        self.cfg = cfg
        self.share = share  # (index, count) of this worker among the delivery workers
        self.local_domains = {d.lower() for d in cfg.local_domains}
        # Strategy instances by name ("smtp", "maildir", ... or an import path), made on
        # first use and kept for the worker's life (connections, sessions, caches).
        self.strategies: dict[str, DeliveryStrategy] = {}

    def policy(self, domain: str) -> DomainPolicyConfig | None:
        """The ``delivery.domains`` entry of a domain (by its A-label too), else None."""
        policies = self.cfg.delivery.domains or {}
        policy = policies.get(domain)
        if policy is None and domain and not domain.isascii():
            try:  # the configuration's keys are A-labels (IDNA)
                policy = policies.get(normalize_domain(domain))
            except ValueError:
                return None
        return policy

    def webhook_settings(self, domain: str) -> DomainPolicyWebhookConfig | None:
        """The ``webhook`` settings of a domain whose strategy is webhook, else None."""
        policy = self.policy(domain)
        if policy is None or policy.strategy != "webhook":
            return None
        return policy.webhook

    def strategy_name(self, domain: str) -> str:
        if domain in self.local_domains or domain == "":
            return "lmtp" if self.cfg.local_delivery.lmtp is not None else "maildir"
        policy = self.policy(domain)
        return "smtp" if policy is None else str(policy.strategy)

    def strategy(self, name: str, domain: str) -> DeliveryStrategy:
        found = self.strategies.get(name)
        if found is None:
            found = self.strategies[name] = self._make(name, domain)
        return found

    def _make(self, name: str, domain: str) -> DeliveryStrategy:
        cfg = self.cfg
        if name == "smtp":
            return SMTPStrategy(cfg, share=self.share)
        if name == "webhook":
            return WebhookStrategy(cfg)
        if name == "lmtp":
            return LMTPStrategy(cfg)
        if name == "maildir":
            return MaildirStrategy(cfg)
        policy = self.policy(domain)
        options = dict(policy.strategy_options) if policy is not None else {}
        return load_class(name)(cfg, options)

    async def close(self) -> None:
        for strategy in list(self.strategies.values()):
            try:
                await strategy.close()
            except Exception:
                log.exception("closing delivery strategy %s failed", strategy.name)

    async def deliver(self, envelope: Envelope, recipients: list[Recipient],
                      source: MessageSource, next_hops: dict[str, str] | None = None,
                      on_done: OnGroupDone | None = None
                      ) -> tuple[dict[str, RecipientOutcome], list[Route]]:
        groups: dict[str, list[Recipient]] = defaultdict(list)
        for rcpt in recipients:
            groups[recipient_domain(rcpt["address"])].append(rcpt)
        attempt = int(envelope.get("attempt_count") or 0) + 1
        ticket = limits.current_ticket()
        pending = [len(groups)]

        async def run(domain: str, request: DeliveryRequest) -> DeliveryResult:
            with ticket.run():  # running until its outcome is recorded
                result = await self._run(domain, request)
                pending[0] -= 1
                if on_done is not None:
                    await on_done(result.outcomes, result.route, pending[0] > 0)
            return result

        jobs = [run(domain, DeliveryRequest(domain, envelope, rcpts, source, attempt,
                                            (next_hops or {}).get(domain)))
                for domain, rcpts in groups.items()]
        outcomes: dict[str, RecipientOutcome] = {}
        infos: list[Route] = []
        # One domain (most messages): awaited in this task, without a task of its own.
        results = [await jobs[0]] if len(jobs) == 1 else await asyncio.gather(*jobs)
        for result in results:
            outcomes.update(result.outcomes)
            infos.append(result.route)
        return outcomes, infos

    async def _run(self, domain: str, request: DeliveryRequest) -> DeliveryResult:
        """One group through its strategy; whatever goes wrong defers, never fails."""
        name = self.strategy_name(domain)
        policy = self.policy(domain)
        timeout = policy.strategy_timeout if policy is not None else DEFAULT_STRATEGY_TIMEOUT
        started = time.monotonic()
        why = ""
        try:
            strategy = self.strategy(name, domain)
            async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for
                result = await strategy.deliver(request)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            why = f"delivery strategy {name} did not answer within {timeout:g}s"
            log.error("%s: %s (%s)", request.queue_id, why, domain)
            result = DeliveryResult({})
        except Exception as exc:  # a bug, or a custom strategy that raises
            why = f"delivery strategy {name} failed: {type(exc).__name__}"
            log.exception("%s: %s (%s)", request.queue_id, why, domain)
            result = DeliveryResult({})
        if not isinstance(result, DeliveryResult):
            log.error("%s: delivery strategy %s returned %r, not a DeliveryResult",
                      request.queue_id, name, result)
            why = f"delivery strategy {name} returned no result"
            result = DeliveryResult({})
        outcomes = {a: o for a, o in result.outcomes.items()
                    if a in request.addresses and isinstance(o, RecipientOutcome)}
        missing = [a for a in request.addresses if a not in outcomes]
        if missing:
            reason = why or f"delivery strategy {name} gave no outcome"
            if not why:
                log.error("%s: %s for %s", request.queue_id, reason, ", ".join(missing))
            local = LocalSystemError.make("local", reason=reason).outcome()
            outcomes.update(dict.fromkeys(missing, local))
        route = result.route.copy() or Route(domain=domain or "(local)", transport=name)
        route.setdefault("transport", name)
        route.setdefault("domain", domain or "(local)")
        route.setdefault("duration", round(time.monotonic() - started, 6))
        return DeliveryResult(outcomes, route)
