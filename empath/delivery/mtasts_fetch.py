"""Fetching MTA-STS policy files over HTTPS (RFC 8461 §3.3), with aiohttp's client.

Owns the one HTTP request MTA-STS needs: ``GET https://mta-sts.<domain>/.well-known/
mta-sts.txt`` (on ``delivery.mta_sts.port``, 443 but for tests), with

- the policy host's certificate verified against the Web PKI for ``mta-sts.<domain>``
  (``mta_sts.ca_file``, else ``tls.ca_file``, else the system store);
- no redirects followed (§3.3), only a 200 with media type ``text/plain`` accepted (§3.3: a
  host that lets users upload other content cannot be made to serve a policy), at most
  ``MAX_POLICY_SIZE`` bytes read, and the whole request within ``mta_sts.timeout``;
- host names resolved by the delivery worker's own resolver (``dns.py``: the configured
  ``delivery.dns.resolver`` and its cache), like every other name delivery looks up; no
  proxy from the environment.

Every failure is an OSError whose text says why (the caller logs it and goes on without a
policy). One aiohttp session per worker, opened on first use, closed with the transport.
Never touches the spool.
"""

from __future__ import annotations

import socket
import ssl

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from empath.config.typed import DeliveryMtaStsConfig
from empath.delivery.dns import MXResolver
from empath.delivery.errors import DeliveryError

MAX_POLICY_SIZE = 64 * 1024  # §3.3 suggests a limit; 64 KiB is generous for a few lines
WELL_KNOWN = "/.well-known/mta-sts.txt"


class FetchError(OSError):
    """The policy could not be fetched; the text says why."""


class _DeliveryResolver(AbstractResolver):
    """aiohttp's host lookups through the worker's MXResolver (its server and its cache)."""

    def __init__(self, resolver: MXResolver) -> None:
        self.resolver = resolver

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        try:
            answer = await self.resolver.lookup_addresses(host)
        except DeliveryError as err:
            raise OSError(f"cannot resolve {host}: {err.text}") from None
        out: list[ResolveResult] = []
        for ip in answer.addresses:
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            if family in (socket.AF_UNSPEC, fam):
                out.append({"hostname": host, "host": ip, "port": port, "family": fam,
                            "proto": 0, "flags": socket.AI_NUMERICHOST})
        if not out:
            raise OSError(f"no address for {host}")
        return out

    async def close(self) -> None:
        pass


class PolicyFetcher:
    """Fetches policy files for one delivery worker."""

    def __init__(self, mta_sts_cfg: DeliveryMtaStsConfig, tls_ca_file: str | None,
                 resolver: MXResolver) -> None:
        self.port = int(mta_sts_cfg.port)
        self.timeout = float(mta_sts_cfg.timeout)
        self.ca_file = mta_sts_cfg.ca_file or tls_ca_file
        self.resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    def url(self, domain: str) -> str:
        port = "" if self.port == 443 else f":{self.port}"
        return f"https://mta-sts.{domain}{port}{WELL_KNOWN}"

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            connector = aiohttp.TCPConnector(resolver=_DeliveryResolver(self.resolver),
                                             ssl=context, use_dns_cache=False, limit=20)
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": "Empath (MTA-STS)"})
        return self._session

    async def fetch(self, domain: str) -> str:
        """The text of ``domain``'s policy file; FetchError when it cannot be had."""
        url = self.url(domain)
        try:
            async with self._open().get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise FetchError(f"{url}: HTTP status {response.status}")
                if response.content_type != "text/plain":
                    raise FetchError(f"{url}: media type {response.content_type}, not "
                                     "text/plain")
                body = bytearray()
                async for chunk in response.content.iter_chunked(16384):
                    body += chunk
                    if len(body) > MAX_POLICY_SIZE:
                        raise FetchError(f"{url}: larger than {MAX_POLICY_SIZE} bytes")
        except FetchError:
            raise
        except TimeoutError:
            raise FetchError(f"{url}: timed out after {self.timeout:g}s") from None
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            raise FetchError(f"{url}: {exc or type(exc).__name__}") from None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise FetchError(f"{url}: not UTF-8 text") from None

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
