"""The admin process: serves ``/metrics`` and ``/health/*`` over HTTP (aiohttp).

A child kind of its own (``empath: admin 1/1``), started by the master when
``metrics.listen_addr`` or ``health.listen_addr`` is set. The master binds the sockets before
forking (so port 80 works before privileges are dropped, and a reload that keeps an address
keeps the socket: the old and new admin processes share it while they overlap) and passes them
in ``ctx.listeners``, in ``observe.admin_endpoints`` order; each serves the routes of what it
was configured for (both when metrics and health share an address).

Routes:

- ``GET /metrics``: the Prometheus text format (``collect.py``), built in a worker thread;
- ``GET /health/live`` (and ``GET /health``, its alias): 200 while the master's loop turns,
  else 503;
- ``GET /health/ready``: 200 or 503, with ``{"status", "failed", "checks"}``;
- ``GET /health/detailed``: 200 or 503, the checks plus processes, queue, uptime, version,
  and the delivery figures (attempts and success rate in the window).

Besides the master's heartbeat, the loop samples the delivery counters for the success-rate
check (every ``DELIVERY_SAMPLE`` seconds, from the per-process metric files) and runs the DNS
probe when one is configured (``health.py``).

Why a child and not a thread of the master: the master stays free of HTTP, of scrapes that
read many files, and of threads (it forks); a crashed admin process is respawned like any
other child. /health/live still reports on the master itself, through the master's own
heartbeat. This module never changes the spool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from aiohttp import web

from empath.master.child import ChildContext
from empath.observe import HEALTH, METRICS, admin_endpoints, health
from empath.observe.multiproc import ENV
from empath.spool import Spool

log = logging.getLogger("empath.admin")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SAMPLE_INTERVAL = 0.5  # seconds between looks at the master's heartbeat
DELIVERY_SAMPLES = 30  # samples of the delivery counters per health.delivery_window


class Admin:
    def __init__(self, ctx: ChildContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.config
        self.spool = Spool(self.cfg.spool.path)
        self.status_file: str | None = ctx.status_file
        self.master = health.MasterWatch(ctx.master_heartbeat, self.cfg.health.master_timeout)
        hcfg = self.cfg.health
        self.deliveries = health.Deliveries(hcfg.delivery_window, hcfg.min_delivery_attempts,
                                            hcfg.min_delivery_success_rate)
        self.dns: health.DNSProbe | None = None
        if hcfg.dns_probe_name:
            self.dns = health.DNSProbe(self.cfg)
        self.registry: Any = None
        if self.cfg.metrics.listen_addr is not None:
            from empath.observe import collect

            self.registry = collect.build_registry(self.cfg, self.spool, self.status_file)

    def application(self, roles: frozenset[str]) -> web.Application:
        app = web.Application()
        if METRICS in roles:
            app.router.add_get("/metrics", self.metrics)
        if HEALTH in roles:
            app.router.add_get("/health", self.live)
            app.router.add_get("/health/live", self.live)
            app.router.add_get("/health/ready", self.ready)
            app.router.add_get("/health/detailed", self.detailed)
        return app

    async def metrics(self, request: web.Request) -> web.Response:
        from empath.observe import collect

        body = await asyncio.to_thread(collect.render, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def live(self, request: web.Request) -> web.Response:
        check = self.master.check()
        return web.json_response({"status": "ok" if check.ok else "fail",
                                  "checks": {check.name: check.as_json()}},
                                 status=200 if check.ok else 503)

    def extra_checks(self) -> tuple[health.Check, ...]:
        checks = [self.deliveries.check()]
        if self.dns is not None:
            checks.append(self.dns.last)
        return tuple(checks)

    async def ready(self, request: web.Request) -> web.Response:
        ok, body = await asyncio.to_thread(health.ready, self.cfg, self.spool, self.status_file,
                                           self.extra_checks())
        return web.json_response(body, status=200 if ok else 503)

    async def detailed(self, request: web.Request) -> web.Response:
        delivered, other = self.deliveries.figures()
        total = delivered + other
        figures = {"deliveries": {
            "window": self.deliveries.window, "delivered": delivered, "not_delivered": other,
            "success_rate": round(delivered / total, 4) if total else None,
            "threshold": self.deliveries.threshold,
            "min_attempts": self.deliveries.min_attempts}}
        body = await asyncio.to_thread(health.detailed, self.cfg, self.spool,
                                       self.status_file, self.master.check(),
                                       self.extra_checks(), figures)
        return web.json_response(body, status=200 if body["status"] == "ok" else 503)

    async def watch_deliveries(self) -> None:
        """Sample the delivery counters (the workers' metric files) for the success rate."""
        path = os.environ.get(ENV)
        if not path or not os.path.isdir(path):
            return
        interval = max(0.2, self.deliveries.window / DELIVERY_SAMPLES)
        while True:
            try:
                delivered, other = await asyncio.to_thread(health.attempt_counts, path)
                self.deliveries.add(time.monotonic(), delivered, other)
            except Exception:  # a file being written: the next sample will do
                log.debug("cannot sample the delivery counters", exc_info=True)
            await asyncio.sleep(interval)

    async def watch_master(self) -> None:
        while True:
            self.master.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)


async def serve(ctx: ChildContext) -> None:
    """Run the admin process until ctx.stopping is set."""
    admin = Admin(ctx)
    runners = []
    for (_, roles), sock in zip(admin_endpoints(ctx.config), ctx.listeners, strict=False):
        runner = web.AppRunner(admin.application(roles), handle_signals=False,
                               access_log=None)
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        runners.append(runner)
    loop = asyncio.get_running_loop()
    watchers = [loop.create_task(admin.watch_master()),
                loop.create_task(admin.watch_deliveries())]
    if admin.dns is not None:
        watchers.append(loop.create_task(admin.dns.run(admin.cfg.health.dns_probe_interval)))
    try:
        await ctx.stopping.wait()
    finally:
        for watcher in watchers:
            watcher.cancel()
        for runner in runners:
            await runner.cleanup()
