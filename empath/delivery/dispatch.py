"""Route one message's open recipients to their transports and collect the outcomes.

Recipients are grouped by domain: local domains go to Maildir (in a thread: it fsyncs), every
other domain to the SMTP transport, all groups concurrently. The result is one
RecipientOutcome per recipient plus one route record per group for the attempt history.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from empath.delivery import local
from empath.delivery.state import DELIVERED, DEFERRED, FAILED, RecipientOutcome
from empath.spool import MessageSource

log = logging.getLogger("empath.delivery")


def recipient_domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


class Dispatcher:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.local_domains = {d.lower() for d in cfg.local_domains}
        self._remote: Any = None

    def _remote_transport(self) -> Any:
        if self._remote is None:
            from empath.delivery.remote import RemoteTransport

            self._remote = RemoteTransport(self.cfg)
        return self._remote

    async def close(self) -> None:
        if self._remote is not None:
            await self._remote.close()

    async def deliver(self, envelope: dict[str, Any], recipients: list[dict[str, Any]],
                      source: MessageSource
                      ) -> tuple[dict[str, RecipientOutcome], list[dict[str, Any]]]:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for rcpt in recipients:
            groups[recipient_domain(rcpt["address"])].append(rcpt)
        jobs = []
        for domain, rcpts in groups.items():
            if domain in self.local_domains or domain == "":
                jobs.append(self._deliver_local(domain, envelope, rcpts, source))
            else:
                jobs.append(self._remote_transport().deliver(domain, envelope, rcpts, source))
        outcomes: dict[str, RecipientOutcome] = {}
        infos: list[dict[str, Any]] = []
        for result, info in await asyncio.gather(*jobs):
            outcomes.update(result)
            infos.append(info)
        return outcomes, infos

    async def _deliver_local(self, domain: str, envelope: dict[str, Any],
                             rcpts: list[dict[str, Any]], source: MessageSource
                             ) -> tuple[dict[str, RecipientOutcome], dict[str, Any]]:
        started = time.monotonic()
        root = self.cfg.local_delivery.maildir_root
        hostname = self.cfg.hostname
        out: dict[str, RecipientOutcome] = {}
        for rcpt in rcpts:
            addr = rcpt["address"]
            try:
                res = await asyncio.to_thread(
                    local.deliver_maildir, root, addr, envelope.get("sender", ""), source,
                    hostname)
            except OSError as exc:
                log.error("%s: maildir delivery to <%s> failed: %s", envelope["id"], addr, exc)
                out[addr] = RecipientOutcome(DEFERRED, 451, "4.2.0", f"maildir: {exc}", "maildir")
                continue
            if res.ok:
                out[addr] = RecipientOutcome(DELIVERED, 250, "2.0.0", res.text, "maildir")
            elif res.permanent:
                out[addr] = RecipientOutcome(FAILED, 550, "5.1.1", res.text, "maildir")
            else:
                out[addr] = RecipientOutcome(DEFERRED, 451, "4.2.0", res.text, "maildir")
        info = {"domain": domain or "(local)", "transport": "maildir",
                "duration": round(time.monotonic() - started, 6)}
        return out, info
