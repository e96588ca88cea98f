"""Message-acceptance policy: what a receiver decides about one message between the client's
final dot and its reply.

In order: free space on the spool, the modules' ``on_data`` hooks, duplicate suppression
(``dedup``), the message's priority, its DKIM signature, its envelope record
(``empath.spool.records``), then the durable commit; afterwards the counters and the audit
record of a stored, suppressed or refused message. ``Acceptance.store`` returns None once
the message is stored, else the reply that refuses it.

This module holds no socket and no timer: ``server.py`` owns the transport and calls it
with the connection's facts (``Arrival``); the sans-IO session (``session.py``) owns the
grammar.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from empath import modules as hooks
from empath.observe import audit, metrics
from empath.smtp import params
from empath.smtp import replies as R
from empath.smtp.events import Envelope
from empath.smtp.receiver import Receiver, message_id, message_priority
from empath.spool import SpoolError, records
from empath.spool.layout import is_disk_full

log = logging.getLogger("empath.smtp")


@dataclass(frozen=True, slots=True)
class Arrival:
    """What the policy knows of the connection a message came on."""

    queue_id: str
    ip: str
    port: int
    listener: str  # the listener's configured address
    tls: dict[str, str] | None
    helo: str | None
    esmtp: bool
    auth_user: str | None
    trusted: bool  # mynetworks: may relay, gets DKIM-signed
    local_domains: frozenset[str]


def module_reply(rej: hooks.Reject | None) -> R.Reply | None:
    """A module's refusal as an SMTP reply (None: accepted)."""
    return None if rej is None else R.Reply(rej.code, rej.enhanced, rej.text)


class Acceptance:
    """The acceptance of one message (``message``: the spool writer's open message);
    ``head`` and ``digest`` are the start and hash of the client's data, kept only with
    duplicate suppression on."""

    def __init__(self, receiver: Receiver, arrival: Arrival, ctx: hooks.HookContext,
                 trace: Any, message: Any, head: bytes, digest: Any) -> None:
        self.receiver = receiver
        self.arrival = arrival
        self.ctx = ctx
        self.trace = trace
        self.message = message
        self.head = head
        self.digest = digest
        self.priority = 0

    async def store(self, envelope: Envelope) -> R.Reply | None:
        """Modules, duplicate check, priority, DKIM, then the durable commit: None once the
        message is stored, else the reply that refuses it (the message is then aborted)."""
        r, message, queue_id = self.receiver, self.message, self.arrival.queue_id
        reply = None
        try:
            if not r.space_ok():
                reply = R.NO_STORAGE
            elif r.data_hooks:
                # data_termination bounds the modules; the spool write below is never cut
                # short (a message is stored and acknowledged, or refused, never half-done).
                rej = await asyncio.wait_for(
                    hooks.run_hook(r.modules, "on_data", self.ctx, envelope),
                    r.cfg.smtp.timeouts.data_termination)
                reply = module_reply(rej)
        except hooks.ModuleError:
            reply = R.MODULE_ERROR
        except TimeoutError:
            log.error("%s: on_data module hooks did not answer within %gs", queue_id,
                      r.cfg.smtp.timeouts.data_termination)
            reply = R.MODULE_ERROR
        dedup_key = self._dedup_key(envelope) if r.dedup is not None else None
        if reply is None and dedup_key is not None:
            assert r.dedup is not None
            original = await r.dedup.claim_shared(dedup_key, queue_id)
            if original is not None:
                log.info("%s: duplicate of %s suppressed (from=<%s>)", queue_id, original,
                         envelope.sender)
                self._duplicate(envelope, original)
                reply, dedup_key = R.DUPLICATE.format(queue_id=original), None
        if reply is not None:
            message.abort()
            return reply
        try:
            self._set_priority(envelope)
            if r.signer is not None and self.arrival.trusted:
                await message.add_header(self._dkim_header)
            await message.commit(self.envelope_record(envelope))
        except SpoolError as exc:
            reply = self._spool_failure(exc)
        except BaseException:
            reply = R.SPOOL_ERROR
            raise
        finally:
            if reply is not None and dedup_key is not None and r.dedup is not None:
                r.dedup.release(dedup_key)
        return reply

    def store_soon(self, envelope: Envelope, done: Callable[[R.Reply | None], None]) -> bool:
        """store() without a coroutine, for the common message: no ``on_data`` module, no
        duplicate suppression, no DKIM signature to compute, and a slot ready for it. Then
        ``done(None)`` once it is stored, or ``done(reply)`` when it is refused, is called
        from the loop (never from inside this call), and True is returned; else False, and
        store() must be awaited."""
        r, message = self.receiver, self.message
        if r.dedup is not None or (r.signer is not None and self.arrival.trusted) \
                or r.data_hooks:
            return False
        loop = asyncio.get_running_loop()
        if not r.space_ok():
            message.abort()
            loop.call_soon(done, R.NO_STORAGE)
            return True
        self._set_priority(envelope)

        def committed(error: SpoolError | None) -> None:
            done(None if error is None else self._spool_failure(error))

        try:
            return bool(message.commit_soon(self.envelope_record(envelope), committed))
        except SpoolError as exc:
            loop.call_soon(done, self._spool_failure(exc))
            return True

    def _spool_failure(self, exc: SpoolError) -> R.Reply:
        log.error("%s: not stored: %s", self.arrival.queue_id, exc)
        return R.NO_STORAGE if is_disk_full(exc) else R.SPOOL_ERROR

    def received(self, envelope: Envelope, size: int) -> None:
        """Count a stored message, and record it in the audit log."""
        instruments, log_ = metrics.current(), audit.current()
        instruments.messages_received.inc()
        instruments.received_bytes.inc(size)
        instruments.message_size.observe(size)
        if log_.enabled:
            a = self.arrival
            log_.write("received", a.queue_id, sender=envelope.sender,
                       recipients=[r["address"] for r in envelope.recipients], size=size,
                       client_ip=a.ip, client_port=a.port, helo=a.helo, tls=a.tls,
                       listener=a.listener, auth=a.auth_user)

    def refused(self, reply: R.Reply) -> None:
        """A message not stored after its data: counted, and logged with its queue id."""
        if reply.code < 400:
            reason = "duplicate"
        elif reply is R.NO_STORAGE:
            reason = "no_storage"
        elif reply is R.SPOOL_ERROR:
            reason = "spool_error"
        else:
            reason = "module"
        metrics.current().refused[reason].inc()
        if reason != "duplicate":  # already logged, with the id of the original
            log.info("%s: refused after data: %s", self.arrival.queue_id,
                     reply.line.decode().strip())

    def envelope_record(self, env: Envelope) -> records.Envelope:
        a = self.arrival
        client = records.new_client(
            ip=a.ip, port=a.port, helo=a.helo, esmtp=a.esmtp,
            tls=dict(a.tls) if a.tls is not None else None, listener=a.listener,
            auth=a.auth_user)
        return records.new_envelope(
            message_id=a.queue_id, sender=env.sender, recipients=env.recipients,
            params=env.params(), client=client, received_at=time.time(),
            metadata=self.ctx.metadata, priority=self.priority,
            trace=self.trace.envelope_keys())

    def _duplicate(self, envelope: Envelope, original: str) -> None:
        """Record a suppressed copy in the audit log: acknowledged, not stored."""
        log_ = audit.current()
        if log_.enabled:
            a = self.arrival
            log_.write("duplicate", a.queue_id, original=original, sender=envelope.sender,
                       recipients=[r["address"] for r in envelope.recipients],
                       client_ip=a.ip, client_port=a.port)

    def _dedup_key(self, envelope: Envelope) -> str | None:
        """Message-ID + sender + recipients + data hash; None without a Message-ID."""
        mid = message_id(self.head)
        if mid is None:
            return None
        rcpts = ",".join(sorted(r["address"].lower() for r in envelope.recipients))
        material = b"\0".join([mid, envelope.sender.lower().encode(), rcpts.encode(),
                                self.digest.hexdigest().encode()])
        return hashlib.sha256(material).hexdigest()[:40]

    def _set_priority(self, envelope: Envelope) -> None:
        """The first matching ``priority.rules`` entry, or a module's ctx.priority, moves the
        message's place in incoming/ (its file's mtime) by priority x step."""
        cfg = self.receiver.cfg
        prio = self.ctx.priority
        if prio is None:
            prio = message_priority(cfg.priority.rules, envelope, self.arrival.listener,
                                    self.arrival.auth_user)
        self.priority = prio
        if prio:
            self.message.mtime = time.time() - prio * cfg.priority.step

    def _dkim_header(self, message: bytes) -> bytes | None:
        """Thread side: the DKIM-Signature for mail whose From: domain has a key and is one
        the client may sign for: an authenticated user only for the domains it may send as
        (params.domain_owned, the rule of require_sender_match); a mynetworks client for
        every domain in dkim.domains."""
        signer = self.receiver.signer
        assert signer is not None
        a = self.arrival
        user = a.auth_user
        key = signer.key_for(message)
        if key is None:
            return None
        if user is not None and not params.domain_owned(key.domain, user, a.local_domains):
            log.warning("%s: not DKIM-signed: user %s may not send as %s", a.queue_id,
                        user, key.domain)
            return None
        try:
            return signer.sign(message, key)
        except Exception as exc:  # a message dkimpy cannot parse still goes out unsigned
            log.warning("%s: not DKIM-signed: %s", a.queue_id, exc)
            return None
