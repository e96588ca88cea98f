"""Delivery-side module hooks (docs/MODULES.md, "Delivery hooks").

The modules of ``smtp.modules`` are loaded by every delivery worker too; the same object that
``setup(options)`` returns may define, besides the receiving hooks:

    before_delivery(ctx)            before an attempt: may defer or fail recipients, route a
                                    domain to another host for this attempt, add headers
    after_delivery(ctx, outcomes)   after it: one outcome per recipient tried
    on_notice(ctx, notice)          a bounce, delay or success notice was spooled

``ctx.metadata`` is the module's own dict as the receiving hooks left it in the envelope
(``metadata[<module name>]``); what a delivery hook adds is saved with the envelope after the
attempt, so it survives retries and restarts. Hooks are plain functions or coroutines, bounded
by ``delivery.timeouts.hooks``. A hook that raises or does not answer defers every open
recipient of the message for this attempt (its ``before_delivery``), or is logged (the others):
a hook can delay a message, never lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import email.parser
import email.policy
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from empath import modules as hooks
from empath.config.typed import Config
from empath.config.types import parse_address
from empath.delivery.errors import LocalSystemError
from empath.delivery.state import DEFERRED, FAILED, RecipientOutcome
from empath.spool import MessageSource
from empath.spool.records import Envelope, Recipient, recipient_domain

log = logging.getLogger("empath.delivery")

DELIVERY_HOOKS = ("before_delivery", "after_delivery", "on_notice")
MAX_HEADER_LINE = 998  # octets of a header line without its CRLF (RFC 5322 §2.1.1)
MAX_ADDED_HEADERS = 65536  # octets one hook may add to a message in one attempt
_HEADER_NAME = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                         b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass
class DeliveryContext:
    """What a delivery hook sees of one message, and the decisions ``before_delivery`` takes."""

    queue_id: str
    sender: str
    recipients: list[str]  # the open recipients of this attempt
    attempt: int
    metadata: dict[str, Any]  # this module's own (free-form JSON), saved with the envelope
    source: MessageSource | None = None  # the message as queued (message_headers())
    decided: dict[str, RecipientOutcome] = field(default_factory=dict)
    next_hops: dict[str, str] = field(default_factory=dict)
    added_headers: list[tuple[str, str]] = field(default_factory=list)

    async def message_headers(self) -> email.message.Message:
        """The message's header fields (the email package's parser; at most 64 KiB read)."""
        if self.source is None:
            return email.message.Message()
        head = await asyncio.to_thread(_head, self.source)
        return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)

    def defer(self, address: str, text: str = "deferred by local policy") -> None:
        """Do not try ``address`` in this attempt; it is retried on the normal schedule."""
        self._decide(address, RecipientOutcome(DEFERRED, 451, "4.7.1", _one_line(text)))

    def fail(self, address: str, text: str = "refused by local policy", code: int = 550,
             enhanced: str = "5.7.1") -> None:
        """Fail ``address`` now (it is bounced to the sender)."""
        if not 500 <= code <= 599:
            raise ValueError(f"a failure needs a 5xx code, not {code}")
        self._decide(address, RecipientOutcome(FAILED, code, enhanced, _one_line(text)))

    def route(self, domain: str, next_hop: str) -> None:
        """Send ``domain``'s recipients to ``host:port`` over SMTP in this attempt."""
        parse_address(next_hop, 25)  # ValueError names what is wrong
        self.next_hops[domain.lower()] = next_hop

    def add_header(self, name: str, value: str) -> None:
        """Prepend ``name: value`` to the message sent in this attempt."""
        raw = name.encode("ascii", "strict")
        if not raw or not set(raw) <= _HEADER_NAME:
            raise ValueError(f"{name!r} is not a header field name")
        if any(c in value for c in "\r\n\0"):
            raise ValueError("a header value is one line: no CR, LF or NUL")
        size = len(raw) + 2 + len(value.encode())
        if size > MAX_HEADER_LINE:
            raise ValueError(f"a header line is at most {MAX_HEADER_LINE} octets "
                             f"(RFC 5322 2.1.1); {name} would be {size}")
        added = sum(len(n) + len(v.encode()) + 4 for n, v in self.added_headers)
        if added + size + 2 > MAX_ADDED_HEADERS:
            raise ValueError(f"a hook adds at most {MAX_ADDED_HEADERS} octets of headers "
                             "to a message")
        self.added_headers.append((name, value))

    def _decide(self, address: str, outcome: RecipientOutcome) -> None:
        if address not in self.recipients:
            raise ValueError(f"<{address}> is not an open recipient of {self.queue_id}")
        self.decided[address] = outcome


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500] or "local policy"


@dataclass
class Plan:
    """What ``before_delivery`` left for the attempt."""

    recipients: list[Recipient]  # still to be handed to the strategies
    decided: dict[str, RecipientOutcome]
    next_hops: dict[str, str]
    source: MessageSource
    extra_file: str | None = None  # a copy with added headers, removed after the attempt

    def cleanup(self) -> None:
        if self.extra_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.extra_file)
            self.extra_file = None


class DeliveryHooks:
    """The delivery hooks of one worker's modules."""

    def __init__(self, modules: list[hooks.LoadedModule], timeout: float) -> None:
        self.modules = [m for m in modules
                        if any(callable(getattr(m.instance, h, None)) for h in DELIVERY_HOOKS)]
        self.timeout = timeout

    @classmethod
    def load(cls, cfg: Config) -> DeliveryHooks:
        return cls(hooks.load_modules(cfg.smtp.modules), cfg.delivery.timeouts.hooks)

    def __bool__(self) -> bool:
        return bool(self.modules)

    def _context(self, module: hooks.LoadedModule, envelope: Envelope,
                 recipients: list[str], source: MessageSource | None = None
                 ) -> DeliveryContext:
        saved = envelope.setdefault("metadata", {})
        mine = saved.get(module.name)
        if not isinstance(mine, dict):
            mine = {}
        return DeliveryContext(str(envelope.get("id", "")), str(envelope.get("sender", "")),
                               list(recipients), int(envelope.get("attempt_count") or 0) + 1,
                               mine, source)

    @staticmethod
    def _keep(module: hooks.LoadedModule, envelope: Envelope,
              ctx: DeliveryContext) -> None:
        saved = envelope.setdefault("metadata", {})
        if ctx.metadata:
            saved[module.name] = ctx.metadata
        else:
            saved.pop(module.name, None)
        if not saved:
            envelope.pop("metadata", None)

    async def _call(self, module: hooks.LoadedModule, hook: str, *args: Any) -> None:
        fn = getattr(module.instance, hook, None)
        if not callable(fn):
            return
        result = fn(*args)
        if inspect.isawaitable(result):
            await asyncio.wait_for(result, self.timeout)

    async def before(self, envelope: Envelope, recipients: list[Recipient],
                     source: MessageSource, tmp_path: str) -> Plan:
        """Run every ``before_delivery``; a hook that fails defers the whole attempt."""
        addresses = [r["address"] for r in recipients]
        decided: dict[str, RecipientOutcome] = {}
        next_hops: dict[str, str] = {}
        headers: list[tuple[str, str]] = []
        for module in self.modules:
            ctx = self._context(module, envelope, addresses, source)
            try:
                await self._call(module, "before_delivery", ctx)
            except Exception as exc:
                why = "did not answer in time" if isinstance(exc, TimeoutError) else \
                    f"raised {type(exc).__name__}"
                log.error("%s: module %s: before_delivery %s; the attempt is deferred",
                          ctx.queue_id, module.name, why, exc_info=not isinstance(
                              exc, TimeoutError))
                local = LocalSystemError.make("local", reason=f"module {module.name}: "
                                              f"before_delivery {why}").outcome()
                return Plan([], dict.fromkeys(addresses, local), {}, source)
            self._keep(module, envelope, ctx)
            for address, outcome in ctx.decided.items():
                decided.setdefault(address, outcome)
            for domain, hop in ctx.next_hops.items():
                next_hops.setdefault(domain, hop)
            headers.extend(ctx.added_headers)
        left = [r for r in recipients if r["address"] not in decided]
        plan = Plan(left, decided, next_hops, source)
        if headers and left:
            plan.source = await asyncio.to_thread(_with_headers, source, headers, tmp_path)
            plan.extra_file = tmp_path
        for domain, hop in next_hops.items():
            if any(recipient_domain(r["address"]) == domain for r in left):
                log.info("%s: %s routed to %s by a delivery hook", envelope.get("id"), domain,
                         hop)
        return plan

    async def after(self, envelope: Envelope,
                    outcomes: dict[str, RecipientOutcome]) -> None:
        view = {a: {"status": o.status, "code": o.code, "enhanced": o.enhanced,
                    "text": o.text, "server": o.server} for a, o in outcomes.items()}
        await self._each(envelope, "after_delivery", list(outcomes), view)

    async def notice(self, envelope: Envelope, kind: str, notice_id: str,
                     recipients: list[str]) -> None:
        await self._each(envelope, "on_notice", recipients,
                         {"kind": kind, "id": notice_id, "recipients": list(recipients)})

    async def _each(self, envelope: Envelope, hook: str, recipients: list[str],
                    arg: Any) -> None:
        for module in self.modules:
            ctx = self._context(module, envelope, recipients)
            try:
                await self._call(module, hook, ctx, arg)
            except Exception as exc:
                log.error("%s: module %s: %s failed: %s", ctx.queue_id, module.name, hook,
                          "no answer in time" if isinstance(exc, TimeoutError) else repr(exc))
                continue
            self._keep(module, envelope, ctx)


def _head(source: MessageSource, limit: int = 65536) -> bytes:
    with open(source.path, "rb") as fh:
        fh.seek(source.offset)
        data = fh.read(min(limit, source.length))
    end = data.find(b"\r\n\r\n")
    return data[:end + 2] if end >= 0 else data


def _with_headers(source: MessageSource, headers: list[tuple[str, str]],
                  path: str) -> MessageSource:
    """A copy of the message with ``headers`` on top, in ``path`` (a tmp/ name)."""
    top = b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with open(source.path, "rb") as src, os.fdopen(fd, "wb", closefd=False) as out:
            out.write(top)
            src.seek(source.offset)
            left = source.length
            while left > 0:
                block = src.read(min(left, 1 << 20))
                if not block:
                    raise OSError(f"{source.path}: the message ends early")
                out.write(block)
                left -= len(block)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return MessageSource(path, 0, len(top) + source.length)
