"""The delivery worker process: claim, deliver, record, then remove, defer or finish.

Each worker owns ``active/<pid>/``. It claims work by renaming a file there from ``incoming/``
(woken by the receivers) or from ``deferred/`` (when the file's mtime, its due time, has
passed). Work is sharded by a hash of the queue id, so two workers rarely race for one file; a
file of another shard is taken too once it has waited a while, so a busy or dead worker delays
nothing for long. A lost race is an ENOENT and is normal.

All state lives in the queue file: after an attempt the envelope is rewritten (tmp, fsync,
rename over itself) and the file renamed on to ``deferred/`` while recipients are still open,
unlinked once every recipient is closed, or kept in ``failed/`` when some failed and the
sender is the null sender (nobody to tell). Delivery status notifications (``bounce.py``) are
spooled as new messages before the envelope that records them is written or the message
removed. A file that cannot be read, or whose envelope cannot be delivered, goes to
``corrupt/``. This module never builds a spool path itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import random
import time
import zlib
from collections.abc import Coroutine
from typing import Any

from empath import cluster
from empath.delivery import bounce, state
from empath.delivery.dispatch import Dispatcher
from empath.observe import audit, deliveries, metrics
from empath.spool import CorruptFile, Spool, WakeListener, new_message_id, read_queue_file
from empath.spool.submit import store_message

log = logging.getLogger("empath.delivery")

FOREIGN_GRACE = 2.0  # seconds a file of another shard waits before this worker takes it
# Listing incoming/ costs time in proportion to its size: a worker works through its last
# listing and lists again only when that is used up or has aged, and never spends more than
# this share of its time listing (a backlog of 800,000 files takes about a second to list).
LISTING_SHARE = 0.1
REMOVE_RETRIES = 5


class DeliveryWorker:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.cfg = ctx.config
        self.spool = Spool(self.cfg.spool.path, self.cfg.spool.recycle_files)
        self.slot = os.getpid()
        self.shard: int = ctx.index - 1
        self.shards: int = max(ctx.count, 1)
        self.capacity: int = self.cfg.delivery.max_parallel_deliveries
        # With priorities (config rules, or modules that may set them), incoming/ is taken in
        # the order of the files' mtimes, which the receiver moved by priority x step.
        self.prioritized = bool(self.cfg.priority.rules or self.cfg.smtp.modules)
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()
        self.rng = random.Random()
        self._foreign_seen: dict[str, float] = {}
        # incoming/ as last listed (in delivery order) and how far this worker has got in it.
        self._listing: list[str] = []
        self._listing_pos = 0
        self._relist_at = 0.0  # monotonic time before which incoming/ is not listed again
        self._due: list[tuple[float, str]] = []  # heap of (due time, id) from the last scan
        # Claims whose state update failed (a rename or unlink the file system refused):
        # id -> (retry at, path in active/<pid>/, what to retry). See _strand.
        self._stranded: dict[str, tuple[float, str, str]] = {}
        d = self.cfg.delivery
        # No due time this worker sets lies further ahead than this (state.decide caps the
        # delay at retry_max_delay, jitter included); one that does was set by a clock that
        # has since moved back, and counts as due now.
        self.horizon: float = d.retry_max_delay * (1 + d.retry_jitter_factor) + 1.0
        self._next_deferred_scan = 0.0
        # Per-destination limits are divided among the workers (limits.py): pass our share.
        self.dispatcher = Dispatcher(self.cfg, share=(ctx.index, ctx.count))
        self.metrics = metrics.current()  # no-ops unless serve() enabled them
        self.audit = audit.current()

    def _own(self, message_id: str) -> bool:
        return zlib.crc32(message_id.encode()) % self.shards == self.shard

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        os.makedirs(self.spool.active_dir(self.slot), mode=0o700, exist_ok=True)
        listener = WakeListener(self.spool, self.wake.set, on_rescan=self._rescan_deferred)
        interval = self.cfg.delivery.queue_scan_interval
        try:
            while not self.ctx.stopping.is_set():
                self.wake.clear()
                if not self.spool.is_frozen():
                    self._fill()
                timeout = interval
                nexts = [due for due, _, _ in self._stranded.values()]
                if self._free() > 0 and self._relist_at > time.monotonic():
                    nexts.append(time.time() + self._relist_at - time.monotonic())
                if self._due:
                    nexts.append(self._due[0][0])
                if nexts:
                    timeout = max(0.05, min(interval, min(nexts) - time.time()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_or_stop(), timeout)
        finally:
            listener.close()
            await self._drain()
            await self.dispatcher.close()

    def _rescan_deferred(self) -> None:
        """An operator made deferred messages due (empathctl queue retry/flush)."""
        self._next_deferred_scan = 0.0

    async def _wake_or_stop(self) -> None:
        stop = asyncio.ensure_future(self.ctx.stopping.wait())
        woke = asyncio.ensure_future(self.wake.wait())
        try:
            await asyncio.wait({stop, woke}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            woke.cancel()

    async def _drain(self) -> None:
        """Let in-flight deliveries finish (the child enforces shutdown_timeout), then requeue."""
        if self.inflight:
            await asyncio.wait(list(self.inflight.values()))
        self.spool.recover_active(self.slot)

    def _free(self) -> int:
        return self.capacity - len(self.inflight)

    def _fill(self) -> None:
        if self._free() <= 0:
            return
        now_mono = time.monotonic()
        if now_mono >= self._relist_at:
            self._list_incoming(now_mono)
        listing = self._listing
        while self._listing_pos < len(listing) and self._free() > 0:
            message_id = listing[self._listing_pos]
            self._listing_pos += 1
            if not self._own(message_id):
                first = self._foreign_seen.setdefault(message_id, now_mono)
                if now_mono - first < FOREIGN_GRACE:
                    continue
            self._claim(message_id, "incoming")
        self._fill_deferred()
        self._fill_stranded()

    def _list_incoming(self, now_mono: float) -> None:
        """List incoming/ again; the next listing waits until this one is used up (or, with
        free capacity, for new mail) and at least LISTING_SHARE allows."""
        ordered = self.spool.list_ids_by_mtime if self.prioritized else self.spool.list_ids
        listing = ordered("incoming")
        took = time.monotonic() - now_mono
        self._listing, self._listing_pos = listing, 0
        self._relist_at = now_mono + took / LISTING_SHARE
        # Forget first sightings of files of other shards that are gone from incoming/.
        if self._foreign_seen:
            present = set(listing)
            self._foreign_seen = {k: v for k, v in self._foreign_seen.items() if k in present}

    def _fill_deferred(self) -> None:
        now = time.time()
        if now >= self._next_deferred_scan:
            self._scan_deferred(now)
        while self._due and self._due[0][0] <= now and self._free() > 0:
            _, message_id = heapq.heappop(self._due)
            self._claim(message_id, "deferred")

    def _scan_deferred(self, now: float) -> None:
        """Rebuild the heap of due times from deferred/ (mtime = next attempt)."""
        due: list[tuple[float, str]] = []
        try:
            entries = os.scandir(self.spool.state_dir("deferred"))
        except FileNotFoundError:
            entries = None
        if entries is not None:
            with entries:
                for entry in entries:
                    try:
                        mtime = entry.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if mtime - now > self.horizon:
                        log.warning("%s: due %s, further ahead than any retry delay (the "
                                    "clock moved back?); due now", entry.name,
                                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime)))
                        mtime = now
                    if not self._own(entry.name):
                        mtime += FOREIGN_GRACE * 5
                    due.append((mtime, entry.name))
        heapq.heapify(due)
        self._due = due
        self._next_deferred_scan = now + self.cfg.delivery.queue_scan_interval

    def _claim(self, message_id: str, from_state: str) -> None:
        if message_id in self.inflight:
            return
        try:
            path = self.spool.claim(message_id, from_state, self.slot)
        except ValueError:
            return  # not a queue id: never touched
        if path is None:
            return
        self._start(message_id, self._process(message_id, path))

    def _start(self, message_id: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self.inflight[message_id] = task
        task.add_done_callback(lambda _t: self._finished(message_id))

    # -- claims whose state update failed ---------------------------------------------------
    def _strand(self, message_id: str, path: str, what: str) -> None:
        """Retry a failed state update of a claimed message later, in this worker.

        ``what`` is "resume" (the message could not be moved on: finish its move to
        deferred/ if it is not due yet, else process it again) or "remove" (only the unlink
        of a finished message is retried: never a delivery again). Without this the file
        would sit in active/<pid>/ until the worker exits.
        """
        retry_at = time.time() + self.cfg.delivery.retry_base_delay
        self._stranded[message_id] = (retry_at, path, what)

    def _fill_stranded(self) -> None:
        now = time.time()
        for message_id, (retry_at, path, what) in list(self._stranded.items()):
            if retry_at > now or message_id in self.inflight:
                continue
            if self._free() <= 0:
                return
            del self._stranded[message_id]
            work = (self._remove(message_id, path, None, "finished earlier")
                    if what == "remove" else self._resume(message_id, path))
            self._start(message_id, work)

    async def _resume(self, message_id: str, path: str) -> None:
        try:
            envelope, _ = read_queue_file(path)
        except FileNotFoundError:
            return
        except CorruptFile as exc:
            self.spool.mark_corrupt(path, message_id, str(exc))
            return
        due = envelope.get("next_retry_at")
        if (not state.open_recipients(envelope) or not isinstance(due, (int, float))
                or due <= time.time()):
            await self._process(message_id, path)  # due (or finished): an ordinary pass
            return
        try:
            os.utime(path, (due, due))
            self.spool.move(path, "deferred", message_id)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s: still cannot move to deferred/: %s", message_id, exc)
            self._strand(message_id, path, "resume")
            return
        log.info("%s: deferred until %s", message_id,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(due)))

    def _finished(self, message_id: str) -> None:
        self.inflight.pop(message_id, None)
        self.wake.set()

    # -- one message ----------------------------------------------------------------------
    async def _process(self, message_id: str, path: str) -> None:
        try:
            envelope, source = read_queue_file(path)
        except CorruptFile as exc:
            self.spool.mark_corrupt(path, message_id, str(exc))
            return
        except FileNotFoundError:
            return
        problem = state.envelope_problem(envelope)
        if problem is None and envelope.get("id") != message_id:
            problem = f"envelope id {envelope.get('id')!r} does not match the file name"
        if problem is not None:
            self.spool.mark_corrupt(path, message_id, problem)
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
            # retry_base_delay in deferred/ (its file as it was before this attempt).
            self._set_aside(message_id, path)

    def _set_aside(self, message_id: str, path: str) -> None:
        due = time.time() + self.cfg.delivery.retry_base_delay
        log.exception("%s: delivery attempt failed unexpectedly; retried after %s", message_id,
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(due)))
        try:
            os.utime(path, (due, due))
            self.spool.move(path, "deferred", message_id)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s: cannot set the message aside (%s); tried again in %gs",
                      message_id, exc, self.cfg.delivery.retry_base_delay)
            self._strand(message_id, path, "resume")

    async def _attempt(self, message_id: str, path: str, envelope: dict[str, Any],
                       source: Any) -> None:
        """One delivery attempt for the open recipients, then notices, then the next state.

        Order matters for "nothing vanishes": notices are durable in incoming/ before the
        envelope that records them is rewritten, and before the message is removed. A crash
        in between repeats a notice, never loses one.
        """
        recipients = state.open_recipients(envelope)
        outcomes: dict[str, state.RecipientOutcome] = {}
        routes: list[dict[str, Any]] = []
        now = time.time()
        if recipients:  # none: a restart after every recipient closed (notices left to send)
            started = now
            outcomes, routes = await self.dispatcher.deliver(envelope, recipients, source)
            now = time.time()
            info = {"duration": round(now - started, 6), "routes": routes}
            state.record_attempt(envelope, outcomes, info, now)
        d = self.cfg.delivery
        decision = state.decide(
            envelope, now, max_attempts=d.max_attempts, base=d.retry_base_delay,
            maximum=d.retry_max_delay, jitter=d.retry_jitter_factor,
            expiration=d.message_expiration, rng=self.rng)
        self._log_outcomes(message_id, envelope, outcomes)
        deliveries.attempt_done(self.metrics, self.audit, envelope,
                                {r["address"] for r in recipients}, routes)
        if not await self._send_notices(envelope, source) and decision.action != "defer":
            # A notice could not be spooled (disk full?): keep the message, with its state
            # recorded, and try the notice again later instead of losing it.
            decision = state.Decision("defer", now + d.retry_base_delay)
            envelope["next_retry_at"] = decision.next_retry_at
        if decision.action == "defer":
            due = decision.next_retry_at or now
            await self._maybe_warn_delay(envelope, source, now)
            await asyncio.to_thread(self.spool.rewrite, path, envelope, due)
            self.spool.move(path, "deferred", message_id)
            log.info("%s: deferred until %s", message_id,
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(due)))
        elif decision.action == "remove":
            await self._remove(message_id, path, envelope, "all recipients delivered")
        elif not bounce.should_report(envelope):
            # From the null sender: no notice (no loops), and not silently gone either.
            await asyncio.to_thread(self.spool.rewrite, path, envelope, None)
            self.spool.move(path, "failed", message_id)
            log.warning("%s: undeliverable message from the null sender; kept in failed/",
                        message_id)
        else:
            await self._remove(message_id, path, envelope, "every recipient done")

    def _log_outcomes(self, message_id: str, envelope: dict[str, Any],
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

    async def _send_notices(self, envelope: dict[str, Any], source: Any) -> bool:
        """Spool the failure and success notices this attempt made due; False if one failed.

        One notice of each kind per attempt, covering every recipient it concerns (so a
        message whose recipients all fail at once gets one bounce listing them all).
        """
        ok = True
        for kind, recipients in bounce.due_notices(envelope).items():
            try:
                notice_id = await asyncio.to_thread(self._spool_notice, envelope, recipients,
                                                    kind, source)
            except OSError as exc:
                log.error("%s: cannot spool the %s notice: %s", envelope["id"], kind, exc)
                ok = False
                continue
            bounce.mark_notified(recipients, kind)
            deliveries.notice_spooled(self.metrics, self.audit, envelope, kind, notice_id,
                                      recipients)
            label = "non-delivery" if kind == bounce.FAILURE_NOTICE else "delivery"
            log.info("%s: sender %s notification: %s", envelope["id"], label, notice_id)
        return ok

    async def _maybe_warn_delay(self, envelope: dict[str, Any], source: Any, now: float) -> None:
        """Send one delay notice once a message has waited delay_warning (RFC 3461 DELAY).

        The notice is spooled before the envelope that records it is rewritten: a crash in
        between can repeat a warning, never lose a message.
        """
        after = self.cfg.delivery.delay_warning
        received = float(envelope.get("received_at", now))
        if (not after or envelope.get("delay_notified") or not bounce.should_report(envelope)
                or now - received < after):
            return
        expires = received + self.cfg.delivery.message_expiration
        waiting = [dict(r, will_retry_until=expires) for r in state.open_recipients(envelope)
                   if bounce.wants(r, "DELAY")]
        if waiting:
            try:
                notice_id = await asyncio.to_thread(self._spool_notice, envelope, waiting,
                                                    "delayed", source)
            except OSError as exc:
                log.error("%s: cannot spool the delay notice: %s", envelope["id"], exc)
                return
            deliveries.notice_spooled(self.metrics, self.audit, envelope, "delayed", notice_id,
                                      waiting)
            log.info("%s: sender delay notification: %s", envelope["id"], notice_id)
        envelope["delay_notified"] = True

    def _spool_notice(self, envelope: dict[str, Any], recipients: list[dict[str, Any]],
                      kind: str, source: Any) -> str:
        """Build a DSN about ``recipients`` and store it durably as a new message from the
        null sender (RFC 3461 §6.2: notices are sent with MAIL FROM:<>)."""
        hostname = self.cfg.hostname
        data = bounce.build_report(envelope, recipients, kind, source, hostname=hostname)
        notice_id = new_message_id()
        to = envelope["sender"]
        notice = {
            "id": notice_id, "sender": "",
            "recipients": [{"address": to, "orcpt": None, "notify": None}],
            "params": {"body": "8BITMIME", "smtputf8": not to.isascii(), "size": len(data),
                       "ret": None, "envid": None},
            "client": {"ip": None, "port": None, "helo": hostname, "esmtp": False, "tls": None,
                       "listener": "notice", "auth": None},
            "received_at": time.time(), "metadata": {}, "notice_of": envelope["id"],
            "notice_kind": kind,
        }
        store_message(self.spool, data, notice)
        return notice_id

    async def _remove(self, message_id: str, path: str, envelope: dict[str, Any] | None,
                      why: str) -> None:
        """Unlink a finished message, retrying; never let it be delivered twice."""
        for attempt in range(REMOVE_RETRIES):
            try:
                self.spool.retire(path, None if envelope is None
                                  else envelope.get("data_size"))
                log.info("%s: removed (%s)", message_id, why)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                log.error("%s: cannot remove finished message (try %d): %s",
                          message_id, attempt + 1, exc)
                await asyncio.sleep(0.2 * (attempt + 1))
        # Still there: record the final state so a restart finds nothing left to send, and
        # try the unlink (only the unlink) again later.
        if envelope is not None:
            try:
                await asyncio.to_thread(self.spool.rewrite, path, envelope, None)
            except OSError as exc:
                log.critical("%s: finished but neither removable nor rewritable: %s",
                             message_id, exc)
        self._strand(message_id, path, "remove")


async def serve(ctx: Any) -> None:
    """Run one delivery worker until ctx.stopping is set."""
    instruments = metrics.init(ctx.config)
    audit.init(ctx.config)
    await cluster.start(ctx)  # fleet mode only: limits and breakers shared through Redis
    try:
        await DeliveryWorker(ctx).run()
    finally:
        await cluster.stop()
        instruments.stop_flushing()
