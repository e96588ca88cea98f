"""The delivery worker process: claim, deliver, record, then remove, defer or finish.

Each worker owns ``active/<pid>/``. It claims work by renaming a file there from ``incoming/``
(woken by the receivers) or from ``deferred/`` (when the file's mtime, its due time, has
passed). Work is sharded by a hash of the queue id, so two workers rarely race for one file; a
file of another shard is taken too once it has waited a while, so a busy or dead worker delays
nothing for long. A lost race is an ENOENT and is normal.

All state lives in the queue file: after an attempt the envelope is rewritten (tmp, fsync,
rename over itself) and the file renamed on to ``deferred/`` while recipients are still open,
unlinked once every recipient is closed, or, when some failed and the sender is the null
sender (a double bounce: nobody to tell), dropped with an audit record after
``delivery.failed_retention`` (kept in ``failed/`` until then). Delivery status
notifications (``bounce.py``) are spooled as new messages before the envelope that records
them is written or the message removed. A file that cannot be read, or whose envelope cannot
be delivered, goes to ``corrupt/`` (log line and audit record). This module never builds a
spool path itself.

While other destinations of a message still run, each destination's delivered recipients are
recorded at once in the queue file's done marks (one byte each, written in place: no new
space), so a stop, reload or crash resends only to destinations that had not finished. When
even that cannot be written (a read-only or failing spool) the outcome stays in memory, the
message is held in this worker (never retried from an envelope that does not know what was
delivered), claiming stops, and both resume once the spool takes writes again.

A message whose running destination deliveries all wait for a destination's connection slot
or rate token holds no delivery slot (``limits.Ticket``): up to ``WAITING_PER_SLOT`` such
messages per slot are kept besides ``max_parallel_deliveries`` delivering ones.

Due times of ``deferred/`` are kept in a compact schedule (``schedule.py``, ~34 bytes a
message), rebuilt from a listing every ``queue_scan_interval``. The listing is read in slices
of ``SCAN_SLICE`` files between other work, so a worker started on a deferred queue of a
million messages claims and delivers new mail from ``incoming/`` while it is still reading
``deferred/``; the entries read so far are claimed as they come due meanwhile. Like the
listing of ``incoming/``, it takes no more than ``LISTING_SHARE`` of the worker's time.

Timers run on the monotonic clock. Due times in ``deferred/`` are wall-clock mtimes: when the
wall clock jumps back (against the monotonic clock) by more than ``CLOCK_JUMP``, the worker
moves the due times of its shard's deferred files back by the jump, so the jump does not
stall them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import random
import time
import zlib
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from empath import cluster
from empath.delivery import bounce, limits, state
from empath.delivery.dispatch import Dispatcher, OnGroupDone
from empath.delivery.hooks import DeliveryHooks
from empath.delivery.notices import Notices
from empath.delivery.schedule import DueSchedule
from empath.master.child import ChildContext
from empath.observe import audit, deliveries, metrics, tracing
from empath.spool import CorruptFile, Spool, WakeListener, read_queue_file
from empath.spool.layout import is_disk_full

log = logging.getLogger("empath.delivery")

FOREIGN_GRACE = 2.0  # seconds a file of another shard waits before this worker takes it
# Listing incoming/ costs time in proportion to its size: a worker works through its last
# listing and lists again only when that is used up or has aged, and never spends more than
# this share of its time listing (a backlog of 800,000 files takes about a second to list).
LISTING_SHARE = 0.1
REMOVE_RETRIES = 5
# Messages that only wait for destination limits, per delivery slot, kept claimed besides
# the delivering ones (Postfix keeps up to qmgr_message_active_limit in its active queue).
WAITING_PER_SLOT = 10
FAULT_PROBE_INTERVAL = 1.0  # seconds between probes of a spool that refused a write
FAILED_SWEEP_MAX = 60.0  # seconds between two sweeps of failed/ at most
CLOCK_JUMP = 5.0  # a wall-clock step (against the monotonic clock) beyond this is a jump
SCAN_SLICE = 2000  # files of deferred/ read between two turns of the event loop
Work = Callable[[], Coroutine[Any, Any, None]]


class DeliveryWorker:
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
        self.wake = asyncio.Event()
        self.rng = random.Random()
        self._foreign_seen: dict[str, float] = {}
        # incoming/ as last listed (in delivery order) and how far this worker has got in it.
        self._listing: list[str] = []
        self._listing_pos = 0
        self._relist_at = 0.0  # monotonic time before which incoming/ is not listed again
        self._due = DueSchedule()  # deferred/ as last listed (entries not yet claimed)
        # The listing of deferred/ being read (slice by slice), and the time it has cost.
        self._scan: Iterator[os.DirEntry[str]] | None = None
        self._scan_cost = 0.0
        self._scan_read = 0
        # Claims whose state update failed (a rename or unlink the file system refused):
        # id -> (monotonic retry time, the work that retries it). See _strand.
        self._stranded: dict[str, tuple[float, Work]] = {}
        # Why the spool refused a write (claiming stops until a probe succeeds), or None.
        self._fault: str | None = None
        self._probe_at = 0.0
        self._clock_offset = time.time() - time.monotonic()
        self._strays_seen: set[str] = set()
        self._held: set[str] = set()  # stranded ids whose outcome is held in memory
        self._next_failed_sweep = 0.0
        d = self.cfg.delivery
        # No due time this worker sets lies further ahead than this (state.decide caps the
        # delay at retry_max_delay, jitter included); one that does was set by a clock that
        # has since moved back, and counts as due now.
        self.horizon: float = d.retry_max_delay * (1 + d.retry_jitter_factor) + 1.0
        self._next_deferred_scan = 0.0  # monotonic
        # Per-destination limits are divided among the workers (limits.py): pass our share.
        self.dispatcher = Dispatcher(self.cfg, share=(ctx.index, ctx.count))
        self.hooks = DeliveryHooks.load(self.cfg)
        self._active_lock: int | None = None  # flock on active/<pid>/ (Spool.lock_active)
        self.metrics = metrics.current()  # no-ops unless serve() enabled them
        self.audit = audit.current()
        self.notices = Notices(self.cfg, self.spool, self.metrics, self.audit, self.hooks)

    def _own(self, message_id: str) -> bool:
        return zlib.crc32(message_id.encode()) % self.shards == self.shard

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        listener: WakeListener | None = None
        interval = self.cfg.delivery.queue_scan_interval
        try:
            while not self.ctx.stopping.is_set():
                self.wake.clear()
                if listener is None and self._spool_writable():
                    listener = self._listen()
                self._check_clock()
                scanning = False
                if self._active_lock is not None and not self.spool.is_frozen():
                    scanning = self._advance_scan()
                    self._fill()
                if scanning:
                    await asyncio.sleep(0)  # the rest of deferred/ after other work
                    continue
                timeout = interval
                now_mono = time.monotonic()
                nexts = [due for due, _ in self._stranded.values()]
                if self._free() > 0 and self._relist_at > now_mono:
                    nexts.append(self._relist_at)
                if self._fault is not None:
                    nexts.append(self._probe_at)
                next_due = self._due.next_due()
                if next_due is not None:
                    nexts.append(now_mono + next_due - time.time())
                if nexts:
                    timeout = max(0.05, min(interval, min(nexts) - now_mono))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_or_stop(), timeout)
        finally:
            self._stop_scan()
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
            return WakeListener(self.spool, self.wake.set, on_rescan=self._rescan_deferred)
        except OSError as exc:
            self._spool_fault(f"cannot set up this worker in the spool: {exc}")
            return None

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
            self.spool.recover_active(self.slot)
        except OSError as exc:
            log.error("cannot requeue the claims of this worker: %s; they are requeued "
                      "when the daemon next starts", exc)

    def _free(self) -> int:
        """Delivery slots free: messages that only wait for destination limits hold none,
        but no more than WAITING_PER_SLOT per slot of them are kept."""
        busy = len(self.inflight) - self._blocked
        kept = self.capacity * (1 + WAITING_PER_SLOT) - len(self.inflight)
        return min(self.capacity - busy, kept)

    # -- spool faults and clock jumps ---------------------------------------------------------
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

    def _check_clock(self) -> None:
        """Detect a wall-clock jump against the monotonic clock; after a backward one, move
        this shard's future due times back by the jump (they were set by the old clock)."""
        offset = time.time() - time.monotonic()
        jump = offset - self._clock_offset
        if abs(jump) <= CLOCK_JUMP:
            return
        self._clock_offset = offset
        log.warning("the wall clock jumped by %+.0fs; re-reading deferred due times", jump)
        self._next_deferred_scan = 0.0
        if jump < 0:
            try:
                moved = self.spool.shift_due_times(jump, time.time(), self._own)
            except OSError as exc:
                log.error("cannot move due times back: %s", exc)
                return
            if moved:
                log.warning("moved the due times of %d deferred message(s) back by %.0fs",
                            moved, -jump)

    def _fill(self) -> None:
        if not self._spool_writable():
            return  # held work is retried once a probe write succeeds
        if self._free() <= 0:
            self._fill_stranded()
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
            message_id = self._due.pop_due(now)
            if message_id is None:
                break
            self._claim(message_id, "deferred")

    def _advance_scan(self) -> bool:
        """Start a listing of deferred/ when one is due (a new one replaces one being read),
        then read one slice of it; True while the listing is unfinished."""
        if time.monotonic() >= self._next_deferred_scan:
            self._start_scan()
        if self._scan is None:
            return False
        return not self._scan_slice(time.time(), SCAN_SLICE)

    def _start_scan(self) -> None:
        """Begin a new listing of deferred/: the schedule is rebuilt from it as it is read."""
        self._stop_scan()
        self._due.clear()
        self._scan_cost = 0.0
        self._scan_read = 0
        self._next_deferred_scan = math.inf  # until this listing ends (or a rescan is asked)
        try:
            self._scan = os.scandir(self.spool.state_dir("deferred"))
        except FileNotFoundError:
            self._end_scan()

    def _stop_scan(self) -> None:
        if self._scan is not None:
            close = getattr(self._scan, "close", None)
            if close is not None:
                close()
            self._scan = None

    def _end_scan(self) -> None:
        self._stop_scan()
        # Listing a huge deferred/ costs seconds: never more than LISTING_SHARE of the time.
        wait = max(self.cfg.delivery.queue_scan_interval, self._scan_cost / LISTING_SHARE)
        self._next_deferred_scan = time.monotonic() + wait
        log.log(logging.INFO if self._scan_read > SCAN_SLICE else logging.DEBUG,
                "deferred/ listed: %d message(s) in %.2fs of work; next listing in %.0fs",
                self._scan_read, self._scan_cost, wait)

    def _scan_slice(self, now: float, count: int) -> bool:
        """Read up to ``count`` more files of the listing into the schedule (due time =
        mtime); True when the listing is finished."""
        started = time.monotonic()
        entries = self._scan
        assert entries is not None
        batch: list[tuple[float, str]] = []
        finished = True
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
            batch.append((mtime, entry.name))
            if len(batch) >= count:
                finished = False
                break
        self._due.add(batch)
        self._scan_read += len(batch)
        self._scan_cost += time.monotonic() - started
        if finished:
            self._end_scan()
        return finished

    def _scan_deferred(self, now: float) -> None:
        """Rebuild the schedule from deferred/ at once (mtime = next attempt)."""
        self._start_scan()
        while self._scan is not None and not self._scan_slice(now, SCAN_SLICE):
            pass

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

    def _drop_double_bounce(self, message_id: str, path: str,
                            envelope: dict[str, Any] | None) -> None:
        try:
            if envelope is None:
                envelope, _ = read_queue_file(path)
            self.spool.remove(path)
        except FileNotFoundError:
            return
        except (OSError, CorruptFile) as exc:
            log.error("%s: cannot drop the undeliverable notice: %s", message_id, exc)
            with contextlib.suppress(OSError):
                self.spool.move(path, "failed", message_id)
            return
        failed = [r.get("address") for r in envelope.get("recipients", [])
                  if isinstance(r, dict) and r.get("status") != state.DELIVERED]
        log.warning("%s: undeliverable message from the null sender (a double bounce) "
                    "dropped", message_id)
        self.audit.write("dropped", message_id, sender="", recipients=failed,
                         reason="double bounce", notice_of=envelope.get("notice_of"))

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

    # -- claims whose state update failed ---------------------------------------------------
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
            os.utime(path, (due, due))
            self.spool.move(path, "deferred", message_id)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s: still cannot move to deferred/: %s", message_id, exc)
            self._strand(message_id, lambda: self._resume(message_id, path))
            return
        log.info("%s: deferred until %s", message_id,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(due)))

    def _finished(self, message_id: str) -> None:
        self.inflight.pop(message_id, None)
        self._tickets.pop(message_id, None)
        self.wake.set()

    # -- one message ----------------------------------------------------------------------
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
        problem = state.envelope_problem(envelope, source.length)
        if problem is None and envelope.get("id") != message_id:
            problem = f"envelope id {envelope.get('id')!r} does not match the file name"
        if problem is not None:
            self._corrupt(path, message_id, problem)
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
            os.utime(path, (due, due))
            self.spool.move(path, "deferred", message_id)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s: cannot set the message aside (%s); tried again in %gs",
                      message_id, exc, self.cfg.delivery.retry_base_delay)
            if not is_disk_full(exc) and exc.errno != errno.EXDEV:
                self._spool_fault(f"{message_id}: cannot move to deferred/: {exc}")
            self._strand(message_id, lambda: self._resume(message_id, path))

    async def _mark_delivered(self, message_id: str, path: str, envelope: dict[str, Any],
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
    async def _attempt(self, message_id: str, path: str, envelope: dict[str, Any],
                       source: Any) -> None:
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
        routes: list[dict[str, Any]] = []
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
                                 _info: dict[str, Any], others_running: bool) -> None:
                done = sorted(delivered(result))
                # The last group needs no mark: the attempt is recorded right after it.
                if done and others_running and await self._mark_delivered(
                        message_id, path, envelope, done):
                    marked.update(done)

            outcomes, routes = await self._deliver(message_id, envelope, recipients, source,
                                                   group_done)
            unmarked = delivered(outcomes) - marked
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

    def _hold(self, message_id: str, path: str, envelope: dict[str, Any], source: Any,
              decision: state.Decision, now: float, exc: BaseException) -> None:
        """Keep an attempt's outcome in memory until the spool can record it."""
        log.error("%s: cannot record the attempt (%s); its outcome is kept in memory and "
                  "recorded when the spool takes writes again (never retried meanwhile)",
                  message_id, exc)
        self._held.add(message_id)
        self._strand(message_id,
                     lambda: self._record(message_id, path, envelope, source, decision, now))

    async def _record(self, message_id: str, path: str, envelope: dict[str, Any],
                      source: Any, decision: state.Decision, now: float) -> None:
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

    async def _conclude(self, message_id: str, path: str, envelope: dict[str, Any],
                        source: Any, decision: state.Decision, now: float) -> None:
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

    async def _deliver(self, message_id: str, envelope: dict[str, Any],
                       recipients: list[dict[str, Any]], source: Any,
                       on_done: OnGroupDone | None = None
                       ) -> tuple[dict[str, state.RecipientOutcome], list[dict[str, Any]]]:
        """The delivery hooks' before_delivery, the strategies, then after_delivery."""
        if not self.hooks:
            return await self.dispatcher.deliver(envelope, recipients, source, on_done=on_done)
        plan = await self.hooks.before(envelope, recipients, source,
                                       self.spool.tmp_path(f"hook-{message_id}"))
        outcomes = dict(plan.decided)
        routes: list[dict[str, Any]] = []
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

    async def _remove(self, message_id: str, path: str, envelope: dict[str, Any] | None,
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


async def serve(ctx: ChildContext) -> None:
    """Run one delivery worker until ctx.stopping is set."""
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
