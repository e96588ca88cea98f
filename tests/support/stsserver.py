"""A loopback HTTPS server for MTA-STS policy files (RFC 8461 §3.3), for delivery tests.

Serves ``/.well-known/mta-sts.txt`` with aiohttp, from a thread of its own, presenting a
certificate chosen by the requested server name (SNI)::

    server = PolicyServer(host="127.0.0.7").start()
    server.add("example.test", POLICY_TEXT, cert)      # cert: CertPair for mta-sts.example.test
    server.add("other.test", "...", cert2, content_type="text/html", status=200)
    ...point mta-sts.example.test at 127.0.0.7 in the test DNS zone, delivery.mta_sts.port
       at server.port...
    server.requests("example.test")                     # GETs of that domain's policy so far
    server.stop()

A request for a domain that was not added gets 404. Nothing here is fit for anything but tests.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections import Counter
from dataclasses import dataclass

from aiohttp import web

from tests.support.certs import CertPair

WELL_KNOWN = "/.well-known/mta-sts.txt"


@dataclass
class _Site:
    body: str
    cert: CertPair
    context: ssl.SSLContext
    content_type: str = "text/plain"
    status: int = 200


class PolicyServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.sites: dict[str, _Site] = {}
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def add(self, domain: str, body: str, cert: CertPair, *, content_type: str = "text/plain",
            status: int = 200) -> None:
        """Serve ``body`` as the policy of ``domain`` with ``cert`` (for mta-sts.<domain>)."""
        context = cert.server_context()
        with self._lock:
            self.sites[f"mta-sts.{domain}"] = _Site(body, cert, context, content_type, status)

    def requests(self, domain: str) -> int:
        with self._lock:
            return self.counts[f"mta-sts.{domain}"]

    # -- serving ----------------------------------------------------------------------------
    def _sni(self, sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        site = self.sites.get(name or "")
        if site is not None:
            sock.context = site.context

    async def _policy(self, request: web.Request) -> web.Response:
        name = (request.host or "").rsplit(":", 1)[0].lower()
        with self._lock:
            self.counts[name] += 1
            site = self.sites.get(name)
        if site is None:
            return web.Response(status=404, text="no policy here")
        return web.Response(status=site.status, text=site.body, content_type=site.content_type)

    def start(self) -> PolicyServer:
        assert self.sites, "add() a site first: its certificate is the default"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.sni_callback = self._sni  # type: ignore[assignment]
        # The outer context needs a certificate of its own before SNI can switch it.
        first = next(iter(self.sites.values())).cert
        context.load_cert_chain(first.cert_path, first.key_path)
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_get(WELL_KNOWN, self._policy)
            runner = web.AppRunner(app, access_log=None)
            try:
                loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, self.host, self.port, ssl_context=context)
                loop.run_until_complete(site.start())
                server = site._server  # the bound port, when 0 was asked for
                assert server is not None
                self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            self._runner = runner
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"mta-sts-{self.host}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)

