"""Example module: tag and route mail by a header.

Receiving side: ``on_data`` tags every message with the time it was accepted. Delivery side:
``before_delivery`` reads the header named by ``header`` (default ``X-Tenant``); a value listed
in ``routes`` sends the message's recipients to that tenant's own relay (``host:port``) for this
attempt, records the tenant in the message's metadata and adds an ``X-Empath-Tenant`` header; a
value listed in ``hold`` defers the message (retried later); a value listed in ``refuse`` fails
its recipients (bounced). ``after_delivery`` counts attempts per outcome in the metadata, which
is saved with the message across retries.

    smtp:
      modules:
        - name: header_router          # this file on the PYTHONPATH
          options:
            header: X-Tenant
            routes: {acme: "127.0.0.1:2600"}
            hold: [paused-tenant]
            refuse: [closed-tenant]
"""

from __future__ import annotations

import time
from typing import Any


class HeaderRouter:
    def __init__(self, options: dict[str, Any]) -> None:
        self.header = str(options.get("header", "X-Tenant"))
        self.routes = {str(k).lower(): str(v) for k, v in (options.get("routes") or {}).items()}
        self.hold = {str(v).lower() for v in options.get("hold") or []}
        self.refuse = {str(v).lower() for v in options.get("refuse") or []}

    # -- receiving side ---------------------------------------------------------------------
    def on_data(self, ctx: Any, envelope: Any) -> None:
        ctx.metadata["accepted_at"] = int(time.time())

    # -- delivery side ----------------------------------------------------------------------
    async def before_delivery(self, ctx: Any) -> None:
        tenant = ((await ctx.message_headers()).get(self.header) or "").strip().lower()
        if not tenant:
            return
        ctx.metadata["tenant"] = tenant
        if tenant in self.refuse:
            for address in ctx.recipients:
                ctx.fail(address, f"tenant {tenant} is closed")
            return
        if tenant in self.hold:
            for address in ctx.recipients:
                ctx.defer(address, f"tenant {tenant} is paused")
            return
        hop = self.routes.get(tenant)
        if hop is not None:
            for domain in {a.rpartition("@")[2].lower() for a in ctx.recipients}:
                ctx.route(domain, hop)
            ctx.add_header("X-Empath-Tenant", tenant)

    def after_delivery(self, ctx: Any, outcomes: dict[str, dict[str, Any]]) -> None:
        seen = ctx.metadata.setdefault("outcomes", {})
        for outcome in outcomes.values():
            seen[outcome["status"]] = seen.get(outcome["status"], 0) + 1


def setup(options: dict[str, Any]) -> HeaderRouter:
    return HeaderRouter(options)
