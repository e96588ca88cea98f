"""One message through a delivery worker: read, attempt, record, then the next state.

``MessageAttempts`` is the part of ``DeliveryWorker`` (``worker.py``) that handles one
claimed message; the worker owns the loop, the claims, the spool-fault mode and the retry of
failed state updates (``_strand``), and calls ``_process`` for each claim.

A claimed file that cannot be read, or whose envelope delivery cannot use
(``records.parse_envelope``, through ``read_queue_file``) or whose id is not its name, goes to
``corrupt/`` with a log line and an audit record. Otherwise one attempt delivers the open
recipients (delivery hooks, then the dispatcher), the outcome is recorded in the envelope
(``state.record_attempt``), the next state decided (``state.decide``), notices spooled
(``notices.py``), and the file rewritten and moved on to ``deferred/``, unlinked once every
recipient is closed, or, when some failed and the sender is the null sender (a double bounce:
nobody to tell), dropped with an audit record after ``delivery.failed_retention`` (kept in
``failed/`` until then).

While other destinations of a message still run, each destination's delivered recipients are
recorded at once in the queue file's done marks (one byte each, written in place: no new
space), so a stop, reload or crash resends only to destinations that had not finished. When
even that cannot be written (a read-only or failing spool) the outcome stays in memory, the
message is held in the worker (never retried from an envelope that does not know what was
delivered), and recorded once the spool takes writes again. This module never builds a spool
path itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import time
from abc import abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any

from empath.config.typed import Config
from empath.delivery import bounce, limits, state
from empath.delivery.dispatch import Dispatcher, OnGroupDone
from empath.delivery.hooks import DeliveryHooks
from empath.delivery.notices import Notices
from empath.observe import audit, deliveries, metrics, tracing
from empath.spool import CorruptFile, MessageSource, Spool, read_queue_file
from empath.spool.layout import is_disk_full
from empath.spool.records import AttemptInfo, Envelope, Recipient, Route

log = logging.getLogger("empath.delivery")

REMOVE_RETRIES = 5
Work = Callable[[], Coroutine[Any, Any, None]]


class MessageAttempts:
    """Handles one claimed message at a time (many concurrently); mixed into the worker."""

    cfg: Config
    spool: Spool
    rng: random.Random
    dispatcher: Dispatcher
    hooks: DeliveryHooks
    notices: Notices
    metrics: metrics.Instruments
    audit: audit.AuditLog
    _held: set[str]  # ids whose attempt outcome is held in memory (see _hold)

    @abstractmethod
    def _spool_fault(self, why: str) -> None:
        """The spool refused a write: the worker stops claiming until it takes writes."""

    @abstractmethod
    def _strand(self, message_id: str, work: Work) -> None:
        """Retry a failed state update of a claimed message later (``work`` finishes it)."""

    async def _resume(self, message_id: str, path: str) -> None:
        try:
            envelope, _ = read_queue_file(path)
        except FileNotFoundError:
            return
        except CorruptFile as exc:
            self._corrupt(path, message_id, str(exc))
            return
        due = envelope.get("next_retry_at")
        if (not state.open_recipients(envelope) or not isinstance(due, (int, float))
                or due <= time.time()):
            await self._process(message_id, path)  # due (or finished): an ordinary pass
            return
        try:
            self.spool.defer(path, message_id, due)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s: still cannot move to deferred/: %s", message_id, exc)
            self._strand(message_id, lambda: self._resume(message_id, path))
            return
        log.info("%s: deferred until %s", message_id,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(due)))

    def _drop_double_bounce(self, message_id: str, path: str,
                            envelope: Envelope | None) -> None:
        try:
            if envelope is None:
                envelope, _ = read_queue_file(path)
            self.spool.remove(path)
        except FileNotFoundError:
            return
        except CorruptFile as exc:
            # As from any other state: set aside for an operator, not swept again and again.
            self._corrupt(path, message_id, str(exc))
            return
        except OSError as exc:
            log.error("%s: cannot drop the undeliverable notice: %s", message_id, exc)
            with contextlib.suppress(OSError):
                self.spool.move(path, "failed", message_id)
            return
        failed = [r["address"] for r in envelope["recipients"]
                  if r.get("status") != state.DELIVERED]
        log.warning("%s: undeliverable message from the null sender (a double bounce) "
                    "dropped", message_id)
        self.audit.write("dropped", message_id, sender="", recipients=failed,
                         reason="double bounce", notice_of=envelope.get("notice_of"))

    def _corrupt(self, path: str, message_id: str, reason: str) -> None:
        """Move a file that cannot be delivered as it is to corrupt/: log line, audit record."""
        self.spool.mark_corrupt(path, message_id, reason)
        self.audit.write("corrupt", message_id, reason=reason)

    async def _process(self, message_id: str, path: str,
                       ticket: limits.Ticket | None = None) -> None:
        limits.track(ticket)
        try:
            envelope, source = read_queue_file(path)
        except CorruptFile as exc:
            self._corrupt(path, message_id, str(exc))
            return
        except FileNotFoundError:
            return
        if envelope["id"] != message_id:
            self._corrupt(path, message_id,
                          f"envelope id {envelope['id']!r} does not match the file name")
            return
        try:
            await self._attempt(message_id, path, envelope, source)
        except FileNotFoundError as exc:
            if os.path.exists(path):
                self._set_aside(message_id, path)
            else:
                # An operator deleted the claimed file (empathctl queue delete --force); the
                # spool's rewrite refuses to bring it back.
                log.info("%s: removed by an operator during the attempt (%s)", message_id,
                         exc.strerror or exc)
        except Exception:
            # A bug or a system error must not lose the message, nor spin on it: it waits
            # retry_base_delay in deferred/ (its file as it was before this attempt, with
            # the done marks of what this attempt delivered: see _attempt).
            self._set_aside(message_id, path)

    def _set_aside(self, message_id: str, path: str) -> None:
        due = time.time() + self.cfg.delivery.retry_base_delay
        log.exception("%s: delivery attempt failed unexpectedly; retried after %s", message_id,
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(due)))
        try:
            self.spool.defer(path, message_id, due)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s: cannot set the message aside (%s); tried again in %gs",
                      message_id, exc, self.cfg.delivery.retry_base_delay)
            if not is_disk_full(exc) and exc.errno != errno.EXDEV:
                self._spool_fault(f"{message_id}: cannot move to deferred/: {exc}")
            self._strand(message_id, lambda: self._resume(message_id, path))

    async def _mark_delivered(self, message_id: str, path: str, envelope: Envelope,
                              indexes: list[int]) -> bool:
        """Record recipients ``indexes`` delivered in the queue file's done marks, in place
        (no new space needed); False when that failed or the file has no marks."""
        try:
            done = await asyncio.to_thread(self.spool.mark_delivered, path,
                                           len(envelope["recipients"]), indexes)
        except FileNotFoundError:
            return False
        except (OSError, CorruptFile, ValueError) as exc:
            log.error("%s: cannot record %d delivered recipient(s) in place: %s", message_id,
                      len(indexes), exc)
            if isinstance(exc, OSError) and not is_disk_full(exc):
                self._spool_fault(f"{message_id}: cannot write the queue file: {exc}")
            return False
        if not done:
            log.info("%s: the queue file has no done marks (written by an older version); "
                     "delivered recipients are recorded with the attempt", message_id)
        return done

    @tracing.delivery_attempt
    async def _attempt(self, message_id: str, path: str, envelope: Envelope,
                       source: MessageSource) -> None:
        """One delivery attempt for the open recipients, then notices, then the next state.

        Order matters for "nothing vanishes": notices are durable in incoming/ before the
        envelope that records them is rewritten, and before the message is removed. A crash
        in between repeats a notice, never loses one.

        Order matters for "never twice" too: a destination that finishes while others still
        run has its delivered recipients marked done in the file at once. If recording the
        attempt fails, delivered recipients not yet marked are marked then; if even that
        fails the outcome is held in memory (``_record``) instead of leaving the file to be
        retried from an envelope that does not know what was delivered.
        """
        recipients = state.open_recipients(envelope)
        outcomes: dict[str, state.RecipientOutcome] = {}
        routes: list[Route] = []
        marked: set[int] = set()  # delivered in this attempt and marked done in the file
        unmarked: set[int] = set()  # delivered in this attempt, not marked
        now = time.time()
        if recipients:  # none: a restart after every recipient closed (notices left to send)
            started = now
            opened = {id(r) for r in recipients}

            def delivered(result: dict[str, state.RecipientOutcome]) -> set[int]:
                return {i for i, r in enumerate(envelope["recipients"])
                        if id(r) in opened and (o := result.get(r["address"])) is not None
                        and o.status == state.DELIVERED}

            async def group_done(result: dict[str, state.RecipientOutcome],
                                 _info: Route, others_running: bool) -> None:
                done = sorted(delivered(result))
                # The last group needs no mark: the attempt is recorded right after it.
                if done and others_running and await self._mark_delivered(
                        message_id, path, envelope, done):
                    marked.update(done)

            outcomes, routes = await self._deliver(message_id, envelope, recipients, source,
                                                   group_done)
            unmarked = delivered(outcomes) - marked
            now = time.time()
            info: AttemptInfo = {"duration": round(now - started, 6), "routes": routes}
            state.record_attempt(envelope, outcomes, info, now)
        d = self.cfg.delivery
        decision = state.decide(
            envelope, now, max_attempts=d.max_attempts, base=d.retry_base_delay,
            maximum=d.retry_max_delay, jitter=d.retry_jitter_factor,
            expiration=d.message_expiration, rng=self.rng)
        self._log_outcomes(message_id, envelope, outcomes)
        deliveries.attempt_done(self.metrics, self.audit, envelope,
                                {r["address"] for r in recipients}, routes)
        try:
            await self._conclude(message_id, path, envelope, source, decision, now)
        except Exception as exc:
            if isinstance(exc, FileNotFoundError) and not os.path.exists(path):
                raise  # removed by an operator: _process says so
            if unmarked and not await self._mark_delivered(message_id, path, envelope,
                                                           sorted(unmarked)):
                self._hold(message_id, path, envelope, source, decision, now, exc)
                return
            raise  # the file knows what was delivered: _process sets it aside

    def _hold(self, message_id: str, path: str, envelope: Envelope, source: MessageSource,
              decision: state.Decision, now: float, exc: BaseException) -> None:
        """Keep an attempt's outcome in memory until the spool can record it."""
        log.error("%s: cannot record the attempt (%s); its outcome is kept in memory and "
                  "recorded when the spool takes writes again (never retried meanwhile)",
                  message_id, exc)
        self._held.add(message_id)
        self._strand(message_id,
                     lambda: self._record(message_id, path, envelope, source, decision, now))

    async def _record(self, message_id: str, path: str, envelope: Envelope,
                      source: MessageSource, decision: state.Decision, now: float) -> None:
        """Record an attempt held in memory (see _hold)."""
        self._held.discard(message_id)
        try:
            await self._conclude(message_id, path, envelope, source, decision, now)
        except FileNotFoundError:
            log.info("%s: removed by an operator while its outcome was held", message_id)
        except Exception as exc:
            if isinstance(exc, OSError) and not is_disk_full(exc):
                self._spool_fault(f"{message_id}: cannot record the attempt: {exc}")
            self._hold(message_id, path, envelope, source, decision, now, exc)
        else:
            log.info("%s: the attempt held in memory is recorded", message_id)

    async def _conclude(self, message_id: str, path: str, envelope: Envelope,
                        source: MessageSource, decision: state.Decision, now: float) -> None:
        """Notices, then the next state of a message whose attempt is recorded in
        ``envelope``: deferred/, removed, or (a double bounce) dropped or kept in failed/."""
        d = self.cfg.delivery
        if not await self.notices.send_due(envelope, source) and decision.action != "defer":
            # A notice could not be spooled (disk full?): keep the message, with its state
            # recorded, and try the notice again later instead of losing it.
            decision = state.Decision("defer", now + d.retry_base_delay)
            envelope["next_retry_at"] = decision.next_retry_at
        if decision.action == "defer":
            due = decision.next_retry_at or now
            await self.notices.maybe_warn_delay(envelope, source, now)
            await asyncio.to_thread(self.spool.rewrite, path, envelope, due)
            self.spool.move(path, "deferred", message_id)
            log.info("%s: deferred until %s", message_id,
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(due)))
        elif decision.action == "remove":
            await self._remove(message_id, path, envelope, "all recipients delivered")
        elif not bounce.should_report(envelope):
            # From the null sender: no notice (no loops), and not silently gone either.
            if d.failed_retention <= 0:
                self._drop_double_bounce(message_id, path, envelope)
                return
            await asyncio.to_thread(self.spool.rewrite, path, envelope, time.time())
            self.spool.move(path, "failed", message_id)
            log.warning("%s: undeliverable message from the null sender; kept in failed/ "
                        "for %gs", message_id, d.failed_retention)
        else:
            await self._remove(message_id, path, envelope, "every recipient done")

    async def _deliver(self, message_id: str, envelope: Envelope,
                       recipients: list[Recipient], source: MessageSource,
                       on_done: OnGroupDone | None = None
                       ) -> tuple[dict[str, state.RecipientOutcome], list[Route]]:
        """The delivery hooks' before_delivery, the strategies, then after_delivery."""
        if not self.hooks:
            return await self.dispatcher.deliver(envelope, recipients, source, on_done=on_done)
        plan = await self.hooks.before(envelope, recipients, source,
                                       self.spool.tmp_path(f"hook-{message_id}"))
        outcomes = dict(plan.decided)
        routes: list[Route] = []
        try:
            if plan.recipients:
                done, routes = await self.dispatcher.deliver(envelope, plan.recipients,
                                                             plan.source, plan.next_hops,
                                                             on_done)
                outcomes.update(done)
        finally:
            plan.cleanup()
        await self.hooks.after(envelope, outcomes)
        return outcomes, routes

    def _log_outcomes(self, message_id: str, envelope: Envelope,
                      outcomes: dict[str, state.RecipientOutcome]) -> None:
        attempt = envelope.get("attempt_count", 0)
        for rcpt in envelope["recipients"]:
            outcome = outcomes.get(rcpt["address"])
            if outcome is None and rcpt.get("status") != state.EXPIRED:
                continue
            last = rcpt.get("last") or {}
            reply = " ".join(str(part) for part in (last.get("code"), last.get("enhanced"),
                                                     last.get("text")) if part)
            extra = f" ({rcpt['expired_by']})" if rcpt.get("expired_by") else ""
            log.info("%s: to=<%s>, attempt=%d, server=%s, status=%s%s (%s)", message_id,
                     rcpt["address"], attempt, last.get("server") or "none",
                     rcpt.get("status"), extra, reply)

    async def _remove(self, message_id: str, path: str, envelope: Envelope | None,
                      why: str) -> None:
        """Unlink a finished message, retrying; never let it be delivered twice.

        When it stays, its final state is recorded (rewrite, else done marks in place) and
        only the unlink is retried later; when even that fails the state is held in memory
        (``envelope`` travels with the retry, and a stop tries it once more)."""
        for attempt in range(REMOVE_RETRIES):
            try:
                self.spool.retire(path, None if envelope is None
                                  else envelope.get("data_size"))
                log.info("%s: removed (%s)", message_id, why)
                self._held.discard(message_id)
                return
            except FileNotFoundError:
                self._held.discard(message_id)
                return
            except OSError as exc:
                self.metrics.spool_delete_failures.inc()
                log.error("%s: cannot remove finished message (try %d): %s",
                          message_id, attempt + 1, exc)
                if not is_disk_full(exc):
                    self._spool_fault(f"{message_id}: cannot remove: {exc}")
                await asyncio.sleep(0.2 * (attempt + 1))
        # Still there: record the final state so a restart finds nothing left to send, and
        # try the unlink (only the unlink) again later.
        held = None
        if envelope is not None:
            try:
                await asyncio.to_thread(self.spool.rewrite, path, envelope, None)
            except OSError as exc:
                done = [i for i, r in enumerate(envelope["recipients"])
                        if r.get("status") == state.DELIVERED]
                if not done or not await self._mark_delivered(message_id, path, envelope,
                                                              done):
                    log.critical("%s: finished but neither removable nor recordable (%s); "
                                 "its state is held in memory", message_id, exc)
                    held = envelope
        if held is not None:
            self._held.add(message_id)
        else:
            self._held.discard(message_id)
        self._strand(message_id, lambda: self._remove(message_id, path, held,
                                                      "finished earlier"))
