"""The delivery worker process: the loop that claims messages and hands each to an attempt.

Each worker owns ``active/<pid>/``. It claims work by renaming a file there from ``incoming/``
(woken by the receivers) or from ``deferred/`` (when the file's mtime, its due time, has
passed: ``deferred.py`` keeps those due times). Work is sharded by a hash of the queue id, so
two workers rarely race for one file; a file of another shard is taken too once it has waited
a while, so a busy or dead worker delays nothing for long. A lost race is an ENOENT and is
normal. What happens to one claimed message (read, attempt, record, then deferred/, removed
or failed/) is ``attempt.py``'s; this module owns the loop, the claims, the sweep of
``failed/``, the spool-fault mode and the retry of state updates that failed. It never builds
a spool path itself.

Listing ``incoming/`` costs time in proportion to its size: the worker works through its
last listing and lists again only when that is used up or has aged, and never spends more
than ``LISTING_SHARE`` of its time listing.

A message whose running destination deliveries all wait for a destination's connection slot
or rate token holds no delivery slot (``limits.Ticket``): up to ``WAITING_PER_SLOT`` such
messages per slot are kept besides ``max_parallel_deliveries`` delivering ones.

When the spool refuses a write (a read-only or failing file system), claiming stops until a
probe write succeeds (every ``FAULT_PROBE_INTERVAL``); a claimed message whose state update
failed is kept in this worker and its update retried (``_strand``), never left in
``active/<pid>/`` until the worker exits. Timers run on the monotonic clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time

from empath import cluster
from empath.delivery import limits
from empath.delivery.attempt import MessageAttempts, Work
from empath.delivery.deferred import LISTING_SHARE, DeferredQueue
from empath.delivery.dispatch import Dispatcher
from empath.delivery.hooks import DeliveryHooks
from empath.delivery.notices import Notices
from empath.master.child import ChildContext
from empath.observe import audit, metrics, tracing
from empath.spool import Spool, WakeListener
from empath.spool.ids import shard_of
from empath.spool.wake import wake_workers

log = logging.getLogger("empath.delivery")

FOREIGN_GRACE = 2.0  # seconds a file of another shard waits before this worker takes it
# Messages that only wait for destination limits, per delivery slot, kept claimed besides
# the delivering ones (Postfix keeps up to qmgr_message_active_limit in its active queue).
WAITING_PER_SLOT = 10
FAULT_PROBE_INTERVAL = 1.0  # seconds between probes of a spool that refused a write
FAILED_SWEEP_MAX = 60.0  # seconds between two sweeps of failed/ at most


class Wake:
    """What the worker loop sleeps on between rounds: set by a receiver's wake-up, a free
    delivery slot or a stop. A sleep costs one future and one timer (an event awaited
    together with the stop event cost two tasks per round, at every message received)."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def sleep(self, timeout: float) -> None:
        """Until set (at once if it is) or ``timeout`` seconds have passed."""
        if self._set:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _wake_up, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _wake_up(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class DeliveryWorker(MessageAttempts):
    def __init__(self, ctx: ChildContext) -> None:
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
        self._blocked = 0  # inflight messages whose deliveries all wait for destinations
        self._tickets: dict[str, limits.Ticket] = {}
        self.wake = Wake()
        self.rng = random.Random()
        self._foreign_seen: dict[str, float] = {}
        # incoming/ as last listed (in delivery order) and how far this worker has got in it.
        self._listing: list[str] = []
        self._listing_pos = 0
        self._relist_at = 0.0  # monotonic time before which incoming/ is not listed again
        self._listed_at = 0.0  # monotonic time of the last listing of incoming/
        self._mail_pending = True  # woken for new mail since the last listing (or started)
        self._foreign_due = math.inf  # when a file of another share seen last has waited
        # Claims whose state update failed (a rename or unlink the file system refused):
        # id -> (monotonic retry time, the work that retries it). See _strand.
        self._stranded: dict[str, tuple[float, Work]] = {}
        # Why the spool refused a write (claiming stops until a probe succeeds), or None.
        self._fault: str | None = None
        self._probe_at = 0.0
        self._strays_seen: set[str] = set()
        self._held: set[str] = set()  # stranded ids whose outcome is held in memory
        self._next_failed_sweep = 0.0
        d = self.cfg.delivery
        # No due time this worker sets lies further ahead than this horizon (state.decide
        # caps the delay at retry_max_delay, jitter included).
        self.deferred = DeferredQueue(
            self.spool, scan_interval=d.queue_scan_interval,
            horizon=d.retry_max_delay * (1 + d.retry_jitter_factor) + 1.0, own=self._own,
            foreign_delay=FOREIGN_GRACE * 5)
        # Per-destination limits are divided among the workers (limits.py): pass our share.
        self.dispatcher = Dispatcher(self.cfg, share=(ctx.index, ctx.count))
        self.hooks = DeliveryHooks.load(self.cfg)
        self._active_lock: int | None = None  # flock on active/<pid>/ (Spool.lock_active)
        self.metrics = metrics.current()  # no-ops unless serve() enabled them
        self.audit = audit.current()
        self.notices = Notices(self.cfg, self.spool, self.metrics, self.audit, self.hooks)

    def _own(self, message_id: str) -> bool:
        return shard_of(message_id, self.shards) == self.shard

    async def run(self) -> None:
        listener: WakeListener | None = None
        interval = self.cfg.delivery.queue_scan_interval
        stop_watch = asyncio.ensure_future(self._wake_on_stop())
        try:
            while not self.ctx.stopping.is_set():
                self.wake.clear()
                if listener is None and self._spool_writable():
                    listener = self._listen()
                self.deferred.check_clock()
                scanning = False
                if self._active_lock is not None and not self.spool.is_frozen():
                    scanning = self.deferred.advance()
                    self._fill()
                if scanning:
                    await asyncio.sleep(0)  # the rest of deferred/ after other work
                    continue
                timeout = interval
                now_mono = time.monotonic()
                nexts = [due for due, _ in self._stranded.values()]
                if self._free() > 0:
                    nexts.append(self._relist_due())
                if self._fault is not None:
                    nexts.append(self._probe_at)
                next_due = self.deferred.schedule.next_due()
                if next_due is not None:
                    nexts.append(now_mono + next_due - time.time())
                if nexts:
                    timeout = max(0.05, min(interval, min(nexts) - now_mono))
                await self.wake.sleep(timeout)
        finally:
            stop_watch.cancel()
            self.deferred.stop()
            if listener is not None:
                listener.close()
            await self._drain()
            await self.dispatcher.close()

    def _listen(self) -> WakeListener | None:
        """This worker's claim directory and wake socket; None (and the spool fault mode,
        which retries this) when the spool refuses them: a worker started on a read-only
        spool waits for it instead of exiting and being restarted in a loop."""
        try:
            if self._active_lock is None:
                # Held (never read) until the process ends: the claims in active/<pid>/ are
                # ours, and no recovery moves them while this lock is held.
                self._active_lock = self.spool.lock_active(self.slot)
            return WakeListener(self.spool, self._woken, on_rescan=self._rescan_deferred,
                                share=(self.shard, self.shards))
        except OSError as exc:
            self._spool_fault(f"cannot set up this worker in the spool: {exc}")
            return None

    def _woken(self) -> None:
        """A receiver (or empathctl) put mail of this worker's share in incoming/."""
        self._mail_pending = True
        self.wake.set()

    def _rescan_deferred(self) -> None:
        """An operator made deferred messages due (empathctl queue retry/flush)."""
        self.deferred.rescan()

    async def _wake_on_stop(self) -> None:
        await self.ctx.stopping.wait()
        self.wake.set()

    async def _drain(self) -> None:
        """Let in-flight deliveries finish (the child enforces shutdown_timeout), try held
        state updates once more, then requeue."""
        for message_id, ticket in list(self._tickets.items()):
            if ticket.blocked:
                self._cancel(message_id)
        if self.inflight:
            await asyncio.wait(list(self.inflight.values()))
        for message_id in [k for k in self._stranded if k in self._held]:
            _, work = self._stranded.pop(message_id)
            await work()  # only held outcomes: nothing is delivered again while stopping
        for message_id in self._held:
            log.critical("%s: stopping with its delivery outcome still unrecorded (the spool "
                         "refuses writes); recipients it reached may get it again", message_id)
        try:
            requeued = self.spool.recover_active(self.slot)
        except OSError as exc:
            log.error("cannot requeue the claims of this worker: %s; they are requeued "
                      "when the daemon next starts", exc)
            return
        if requeued:  # for the workers of the next generation (a reload)
            wake_workers(self.spool)

    def _free(self) -> int:
        """Delivery slots free: messages that only wait for destination limits hold none,
        but no more than WAITING_PER_SLOT per slot of them are kept."""
        busy = len(self.inflight) - self._blocked
        kept = self.capacity * (1 + WAITING_PER_SLOT) - len(self.inflight)
        return min(self.capacity - busy, kept)

    def _spool_fault(self, why: str) -> None:
        """The spool refused a write: stop claiming until a probe write succeeds."""
        if self._fault is None:
            log.error("%s; claiming stops until the spool takes writes again", why)
        self._fault = why
        self._probe_at = time.monotonic() + FAULT_PROBE_INTERVAL

    def _spool_writable(self) -> bool:
        """False while the spool refuses writes (probed every FAULT_PROBE_INTERVAL)."""
        if self._fault is None:
            return True
        now = time.monotonic()
        if now < self._probe_at:
            return False
        self._probe_at = now + FAULT_PROBE_INTERVAL
        try:
            self.spool.probe_writable()
        except OSError:
            return False
        log.warning("the spool takes writes again (it had refused: %s); claiming resumes",
                    self._fault)
        self._fault = None
        self._stranded = {k: (now, work) for k, (_, work) in self._stranded.items()}
        return True

    def _fill(self) -> None:
        if not self._spool_writable():
            return  # held work is retried once a probe write succeeds
        if self._free() <= 0:
            self._fill_stranded()
            return
        now_mono = time.monotonic()
        if now_mono >= self._relist_due():
            self._list_incoming(now_mono)
        listing = self._listing
        while self._listing_pos < len(listing) and self._free() > 0:
            message_id = listing[self._listing_pos]
            self._listing_pos += 1
            if not self._own(message_id):
                first = self._foreign_seen.setdefault(message_id, now_mono)
                if now_mono - first < FOREIGN_GRACE:
                    self._foreign_due = min(self._foreign_due, first + FOREIGN_GRACE)
                    continue
            self._claim(message_id, "incoming")
        self._fill_deferred()
        self._fill_stranded()

    def _relist_due(self) -> float:
        """When incoming/ is to be listed again (monotonic time): for new mail, as soon as
        LISTING_SHARE allows; when a file of another worker's share seen in the last listing
        has waited FOREIGN_GRACE; otherwise after ``queue_scan_interval`` (for a file put
        there without a wake-up). An idle worker lists nothing in between: it sleeps."""
        if self._mail_pending:
            return self._relist_at
        due = min(self._listed_at + self.cfg.delivery.queue_scan_interval, self._foreign_due)
        return max(due, self._relist_at)

    def _list_incoming(self, now_mono: float) -> None:
        """List incoming/ again; the next listing waits for a reason (``_relist_due``) and at
        least until LISTING_SHARE allows."""
        self._mail_pending = False
        self._listed_at = now_mono
        ordered = self.spool.list_ids_by_mtime if self.prioritized else self.spool.list_ids
        strays: list[str] = []
        listing = ordered("incoming", strays=strays)
        if strays and self.shard == 0:
            self._set_aside_strays(strays)
        took = time.monotonic() - now_mono
        self._listing, self._listing_pos = listing, 0
        self._relist_at = now_mono + took / LISTING_SHARE
        # Forget first sightings of files of other shards that are gone from incoming/.
        if self._foreign_seen:
            present = set(listing)
            self._foreign_seen = {k: v for k, v in self._foreign_seen.items() if k in present}
        # The next file of another share to have waited its grace (those past it are
        # claimed now, or at the next listing if they cannot be).
        self._foreign_due = min((first + FOREIGN_GRACE for first in self._foreign_seen.values()
                                 if first + FOREIGN_GRACE > now_mono), default=math.inf)

    def _set_aside_strays(self, names: list[str]) -> None:
        """Files in incoming/ that are not queue ids: reported once, moved to corrupt/."""
        for name in names:
            if name in self._strays_seen:
                continue
            self._strays_seen.add(name)
            try:
                dest = self.spool.set_aside_stray("incoming", name)
            except OSError as exc:
                log.error("incoming/%s is not a queue file and cannot be moved aside: %s",
                          name, exc)
                continue
            if dest is not None:
                self._strays_seen.discard(name)  # gone: a new file of that name is new
                log.error("incoming/%s is not a queue file (its name is no queue id); moved "
                          "to %s", name, dest)
                self.audit.write("corrupt", name, reason="name is no queue id", path=dest)
        if len(self._strays_seen) > 10000:
            self._strays_seen.clear()

    def _fill_deferred(self) -> None:
        now = time.time()
        if time.monotonic() >= self._next_failed_sweep:
            self._sweep_failed(now)
        while self._free() > 0:
            message_id = self.deferred.schedule.pop_due(now)
            if message_id is None:
                break
            self._claim(message_id, "deferred")

    def _sweep_failed(self, now: float) -> None:
        """Drop double bounces (failed/, null sender) of this shard older than
        delivery.failed_retention (a file's mtime there is when it failed)."""
        retention = self.cfg.delivery.failed_retention
        # Listing failed/ costs a stat per file: at most every tenth of the retention (and
        # every scan interval, at most a minute apart).
        every = min(FAILED_SWEEP_MAX, max(self.cfg.delivery.queue_scan_interval, retention / 10))
        self._next_failed_sweep = time.monotonic() + every
        for message_id, mtime in self.spool.list_with_mtimes("failed"):
            if not self._own(message_id) or mtime + retention > now:
                continue
            try:
                path = self.spool.claim(message_id, "failed", self.slot)
            except OSError as exc:
                self._spool_fault(f"cannot claim {message_id} from failed/: {exc}")
                return
            if path is not None:
                self._drop_double_bounce(message_id, path, None)

    def _claim(self, message_id: str, from_state: str) -> None:
        if message_id in self.inflight:
            return
        try:
            path = self.spool.claim(message_id, from_state, self.slot)
        except ValueError:
            return  # not a queue id: never touched
        except OSError as exc:
            self._spool_fault(f"cannot claim {message_id} from {from_state}/: {exc}")
            return
        if path is None:
            return
        ticket = limits.Ticket()
        self._start(message_id, lambda: self._process(message_id, path, ticket), ticket)

    def _start(self, message_id: str, work: Work, ticket: limits.Ticket | None = None) -> None:
        if ticket is not None:
            self._watch(message_id, ticket)
        task = asyncio.ensure_future(work())
        self.inflight[message_id] = task
        task.add_done_callback(lambda _t: self._finished(message_id))

    def _watch(self, message_id: str, ticket: limits.Ticket) -> None:
        """Keep ``_blocked`` right as the ticket's message starts and stops waiting. While
        stopping, a message that only waits is cancelled: it starts no new delivery, its
        finished destinations are marked done, and the file is requeued."""
        was = [False]

        def changed() -> None:
            now = ticket.blocked
            if now != was[0]:
                was[0] = now
                self._blocked += 1 if now else -1
                if now:
                    self.wake.set()  # a delivery slot came free
                    if self.ctx.stopping.is_set():
                        self._cancel(message_id)

        ticket.on_change = changed
        self._tickets[message_id] = ticket

    def _cancel(self, message_id: str) -> None:
        task = self.inflight.get(message_id)
        if task is not None and not task.done():
            log.info("%s: stopping while it waits for a destination; requeued", message_id)
            task.cancel()

    def _strand(self, message_id: str, work: Work) -> None:
        """Retry a failed state update of a claimed message later, in this worker.

        ``work`` finishes what failed: ``_resume`` (the message could not be moved on: finish
        its move to deferred/ if it is not due yet, else process it again), ``_remove`` (only
        the unlink of a finished message: never a delivery again) or ``_record`` (an
        attempt's outcome held in memory). Without this the file would sit in active/<pid>/
        until the worker exits.
        """
        retry_at = time.monotonic() + self.cfg.delivery.retry_base_delay
        self._stranded[message_id] = (retry_at, work)

    def _fill_stranded(self) -> None:
        now = time.monotonic()
        for message_id, (retry_at, work) in list(self._stranded.items()):
            if retry_at > now or message_id in self.inflight:
                continue
            if len(self.inflight) >= self.capacity:
                return
            del self._stranded[message_id]
            self._start(message_id, work)

    def _finished(self, message_id: str) -> None:
        self.inflight.pop(message_id, None)
        self._tickets.pop(message_id, None)
        self.wake.set()


def batch_policy() -> None:
    """Run this process's threads (and those it starts later, which inherit it) as
    SCHED_BATCH: the same CPU share, but a worker woken by a remote server's reply no
    longer preempts a receiver's event loop on its CPU. Delivery is throughput work; the
    time from a client's final dot to its 250 is what waits for a preempted loop."""
    if not hasattr(os, "SCHED_BATCH"):
        return
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        with contextlib.suppress(OSError, ValueError):
            # Only from the ordinary policy: one an administrator chose (systemd's
            # CPUSchedulingPolicy=, chrt) is theirs.
            if os.sched_getscheduler(int(tid)) == os.SCHED_OTHER:
                os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))


async def serve(ctx: ChildContext) -> None:
    """Run one delivery worker until ctx.stopping is set."""
    batch_policy()
    instruments = metrics.init(ctx.config)
    audit.init(ctx.config)
    tracing.init(ctx.config)
    await cluster.start(ctx)  # fleet mode only: limits and breakers shared through Redis
    try:
        await DeliveryWorker(ctx).run()
    finally:
        await cluster.stop()
        instruments.stop_flushing()
        tracing.shutdown()
