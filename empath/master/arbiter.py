"""The master: binds the listeners, pre-forks the children, keeps them running, obeys signals.

One loop does everything. Signal handlers only put the signal number on a queue (and Python's
wake-up fd interrupts the loop's sleep); reaping, logging, respawning and reloading all happen
in the loop, never inside a handler (gunicorn once reaped and logged in its SIGCHLD handler,
which could deadlock on the logging lock).

Each pass of the loop: handle queued signals, reap exited children, kill silent or overdue
ones, retire the previous generation once the new one runs, start what is missing (with
backoff), write the status file if anything changed.

The master does no mail work and never imports the children's roles: a child imports its
``serve`` after the fork, so a broken role fails in the child (exit status 3) and the master
halts instead of respawning it forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import select
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from empath import logsetup, observe
from empath.config import ConfigError, load_config, tlsfiles
from empath.config.typed import Config, LogConfig
from empath.config.types import Address
from empath.master import child as child_mod
from empath.master import preflight, privileges
from empath.master.child import ChildContext, Heartbeat, run_child
from empath.master.daemon import Pidfile, StatusFile, report, sd_notify, status_path
from empath.master.listeners import Listener, ListenError, bind_all
from empath.master.respawn import KINDS, Child, RespawnPolicy
from empath.observe import multiproc
from empath.smtp import capacity
from empath.spool import Spool, pid_alive

log = logging.getLogger("empath.master")

ROLES = {"receiver": "empath.smtp.server:serve", "delivery": "empath.delivery.worker:serve",
         "admin": "empath.observe.admin:serve"}
HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                   signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
MAX_RECEIVERS = 32  # processes.receivers' maximum: two generations fill smtp/capacity.py's table
KILL_GRACE = 1.0  # past shutdown_timeout before SIGKILL: children enforce it themselves first
FAST_STOP_WAIT = 2.0  # after SIGQUIT, before SIGKILL
# Most a new generation may take to boot before the reload is rolled back (the old one keeps
# serving until then): generous, as children boot in well under a second on an idle host.
NEW_GENERATION_WAIT = 30.0
READY_WAIT = 10.0  # most start-up waits for the first children to boot before reporting ready
ORPHAN_SWEEP_INTERVAL = 10.0
FAULT_RETRY = 2.0  # after a spool operation failed (EROFS, ENOSPC, EIO...), try again this soon
FAULT_LOG_INTERVAL = 60.0  # most one log line a minute per kind of failing operation


class LogThrottle:
    """At most one log line per ``interval`` for each kind of recurring failure; the next
    line says how many were held back. A full or read-only disk must not flood the log."""

    def __init__(self, interval: float = FAULT_LOG_INTERVAL) -> None:
        self.interval = interval
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def error(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -self.interval) < self.interval:
            self.held[kind] = self.held.get(kind, 0) + 1
            return
        held = self.held.pop(kind, 0)
        self.last[kind] = now
        log.error(message + (f" ({held} more like it not logged)" if held else ""), *args)


class HaltError(Exception):
    """Respawning cannot help (children fail to boot); the master stops."""


class SetupError(Exception):
    """The master cannot start (a listener cannot be bound, the spool is unusable...)."""


@dataclass(frozen=True)
class Generation:
    """One configuration and what the master runs for it: the children's number, the
    configuration, the listening sockets (SMTP and admin) and how many children of each kind.

    The arbiter never changes one of these in place; reload, rollback, a change of the
    receiver count and stop each replace it whole (``successor``, ``revived``,
    ``with_receivers``, ``stopped``), so the four can never disagree. A reload keeps the one
    it replaced until the new one runs: if that cannot even start, the master goes back to
    it instead of halting."""

    number: int
    cfg: Config
    listeners: tuple[Listener, ...] = ()
    admin_listeners: tuple[Listener, ...] = ()
    wanted: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def first(cls, cfg: Config) -> Generation:
        """Generation 1 of a starting master, before its sockets are bound."""
        return cls(1, cfg, wanted=_wanted(cfg))

    def bound(self, listeners: list[Listener], admin_listeners: list[Listener]) -> Generation:
        """The same generation with its sockets (bound at start-up)."""
        return replace(self, listeners=tuple(listeners), admin_listeners=tuple(admin_listeners))

    def successor(self, cfg: Config, listeners: list[Listener],
                  admin_listeners: list[Listener]) -> Generation:
        """The next generation, for a reloaded configuration and its sockets."""
        return Generation(self.number + 1, cfg, tuple(listeners), tuple(admin_listeners),
                          _wanted(cfg))

    def revived(self, number: int) -> Generation:
        """This (previous) generation brought back by a rollback under a fresh ``number``,
        so that the children of the failed one no longer count as current."""
        return replace(self, number=number)

    def with_receivers(self, count: int) -> Generation:
        """The same generation with ``count`` receivers (SIGTTIN/SIGTTOU)."""
        return replace(self, wanted={**self.wanted, "receiver": count})

    def stopped(self) -> Generation:
        """The same generation once the master closed its sockets to stop."""
        return replace(self, listeners=(), admin_listeners=())

    def sockets(self) -> list[Listener]:
        return [*self.listeners, *self.admin_listeners]

    def left_behind(self, new: Generation) -> list[Listener]:
        """This generation's sockets that ``new`` does not use (closed once no child of an
        older generation runs)."""
        keep = new.sockets()
        return [lst for lst in self.sockets() if lst not in keep]


class Arbiter:
    """The master process of one empath instance."""

    def __init__(self, cfg: Config, *, pidfile: Pidfile | None = None,
                 report_fd: int | None = None) -> None:
        # The running generation, swapped whole (see Generation); ``cfg``, ``listeners``,
        # ``admin_listeners``, ``wanted`` and ``generation`` read it.
        self.current = Generation.first(cfg)
        self.pidfile = pidfile
        self.report_fd = report_fd  # where ``empath start`` waits for "ready" or "error ..."
        self.pid = os.getpid()
        self.children: dict[int, Child] = {}
        self.removed_listeners: list[Listener] = []
        self.respawn = RespawnPolicy()
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.wakeup: tuple[int, int] | None = None
        self.stopping: str | None = None  # None, "graceful" or "fast"
        self.stop_deadline = 0.0
        self.stop_killed = False
        self.exit_code = 0
        self.error: str | None = None  # why the master failed or halted, for the CLI
        self.reloaded_at = 0.0
        self.previous: Generation | None = None
        self.started = time.monotonic()
        self.ready_reported = False
        self.next_orphan_sweep = 0.0
        self.spool = Spool(cfg.spool.path, cfg.spool.recycle_files)
        self.status = StatusFile(status_path(cfg.pidfile))
        self.status_changed = True
        self.started_at = time.time()
        self.heartbeat_dir: str | None = None
        # The master's own heartbeat, bumped on every pass of the loop: the admin process
        # answers /health/live from it ("the master's loop turns").
        self.beacon: Heartbeat | None = None
        self.metrics_dir: str | None = None
        self.faults = LogThrottle()
        # The outcome of the last reload: time, generation, ok (None while the new generation
        # boots) and the reason it failed; in the status file (empath status, /health).
        self.last_reload: dict[str, Any] | None = None

    @property
    def cfg(self) -> Config:
        return self.current.cfg

    @property
    def generation(self) -> int:
        return self.current.number

    @property
    def listeners(self) -> list[Listener]:
        return list(self.current.listeners)

    @property
    def admin_listeners(self) -> list[Listener]:
        """The admin process's /metrics and /health sockets (observe.admin_endpoints order)."""
        return list(self.current.admin_listeners)

    @property
    def wanted(self) -> Mapping[str, int]:
        return self.current.wanted

    # -- start-up ----------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; the process exit status."""
        try:
            self.setup()
        except (SetupError, privileges.PrivilegeError) as exc:
            self.error = f"cannot start: {exc}"
            log.error("%s", self.error)
            self._report(f"error {exc}")
            self._cleanup()
            return 1
        try:
            return self.main_loop()
        except Exception:
            # A bug in the master: the children drain on SIGTERM (and would notice the
            # master's death anyway); the pidfile goes with the master.
            log.exception("master failed; stopping the children")
            self._signal_all(signal.SIGTERM)
            self.error = "master failed (see the log)"
            return 1
        finally:
            self._cleanup()

    def setup(self) -> None:
        child_mod.set_title("empath: master")
        ident = privileges.lookup(self.cfg.user, self.cfg.group)
        privileges.check_can_switch(ident)
        for warning in preflight.security_warnings(self.cfg):
            log.warning("SECURITY WARNING: %s", warning)
        self._install_signals()
        try:
            listeners = bind_all([lc.address for lc in self.cfg.listeners], [])
            try:
                admin_listeners = bind_all(_admin_addresses(self.cfg), [])
            except ListenError:
                for lst in listeners:
                    lst.close()
                raise
            self.current = self.current.bound(listeners, admin_listeners)
        except ListenError as exc:
            raise SetupError(str(exc)) from None
        for lst in self.listeners:
            log.info("listening on %s", lst.bound)
        self._log_admin_listeners([])
        _warn_loose_keys(self.cfg)
        try:
            self.spool.create_tree()
        except OSError as exc:
            raise SetupError(f"spool {self.spool.root}: {exc.strerror or exc}") from None
        try:
            moved = self.spool.recover_all(pid_alive)
        except OSError as exc:  # the periodic sweep tries again
            log.error("start-up recovery failed: %s; retrying in the background",
                      exc.strerror or exc)
            moved = 0
        if moved:
            log.info("start-up recovery requeued %d message(s)", moved)
        self._prepare_metrics_dir()
        audit_log = self._prepare_audit_log()
        if ident is not None and privileges.needs_switch(ident):
            files = [p for p in (logsetup.current_log_file(),
                                 self.pidfile.path if self.pidfile else None,
                                 self.status.path, audit_log) if p]
            privileges.hand_over(ident, self.spool.root, files,
                                 dirs=[self.metrics_dir] if self.metrics_dir else [])
            _preload_roles()
            privileges.drop(ident)
        # The receivers' shared connection counts (smtp/capacity.py): made once, kept across
        # reloads, so every generation's receivers count together.
        capacity.create_shared_table()
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            self.heartbeat_dir = "/dev/shm"  # tmpfs: a heartbeat never touches a disk
        self.beacon = Heartbeat(self.heartbeat_dir)
        log.info("master %d started (config %s)", self.pid, self.cfg.config_file)

    def _prepare_metrics_dir(self) -> None:
        """With metrics on: the multiprocess directory, emptied and exported before any fork
        (observe/multiproc.py). A failure leaves metrics off rather than the master down."""
        if self.metrics_dir is not None or not observe.metrics_enabled(self.cfg):
            return
        try:
            self.metrics_dir = multiproc.prepare(self.cfg, self.spool.root, self.spool.control)
        except OSError as exc:
            log.error("metrics: cannot prepare the multiprocess directory: %s; metrics are "
                      "off", exc.strerror or exc)
            return
        log.info("metrics: per-process files in %s", self.metrics_dir)

    def _prepare_audit_log(self) -> str | None:
        """Create the audit log (so it can be handed over to ``user``); its path or None."""
        path: str | None = self.cfg.audit.log_path
        if path is None:
            return None
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                             0o640))
        except OSError as exc:
            raise SetupError(f"audit log {path}: {exc.strerror or exc}") from None
        return path

    def _log_admin_listeners(self, known: list[Listener]) -> None:
        """Log where /metrics and /health are served (those not in ``known`` only)."""
        for (_, roles), lst in zip(observe.admin_endpoints(self.cfg), self.admin_listeners,
                                   strict=False):
            if lst not in known:
                log.info("%s on http://%s/", " and ".join(sorted(roles)), lst.bound)

    def _install_signals(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup = (read_fd, write_fd)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._enqueue)

    def _enqueue(self, signum: int, frame: Any) -> None:
        # Only this: everything else happens in the loop.
        self.signals.put_nowait(signum)

    # -- the loop ------------------------------------------------------------------------------
    def main_loop(self) -> int:
        while True:
            try:
                if self.beacon is not None:
                    with contextlib.suppress(OSError):
                        self.beacon.beat()
                while not self.signals.empty():
                    self._dispatch(self.signals.get_nowait())
                self._reap()
                if self.stopping is None:
                    self._check_heartbeats()
                    self._retire_old_generation()
                    self._close_removed_listeners()
                    self._sweep_orphan_claims()
                    self._spawn_missing()
                    self._report_ready()
                elif self._stop_progress():
                    log.info("master %d exiting (status %d)", self.pid, self.exit_code)
                    return self.exit_code
            except HaltError as exc:
                self.error = f"{exc}; halting"
                log.critical("%s", self.error)
                self._report(f"error {exc}")
                self.exit_code = child_mod.EXIT_BOOT_FAILURE
                self.begin_stop(graceful=True)
            except OSError as exc:
                # A file system or logging error the steps above did not expect: the master
                # keeps serving (its children carry the mail) and tries again next pass.
                self.faults.error("loop", "master: %s; carrying on", exc)
            self._write_status()
            self._sleep()

    def _sleep(self) -> None:
        timeout = 1.0
        now = time.monotonic()
        next_start = self.respawn.next_start()
        if next_start is not None:
            timeout = min(timeout, next_start - now)
        if self.stopping:
            timeout = min(timeout, self.stop_deadline - now)
        elif any(not c.booted for c in self.children.values()):
            timeout = min(timeout, 0.05)  # notice boots soon: readiness, reload hand-over
        if not self.signals.empty():
            timeout = 0
        assert self.wakeup is not None
        ready, _, _ = select.select([self.wakeup[0]], [], [], max(timeout, 0.01))
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.wakeup[0], 512):
                    pass

    def _dispatch(self, sig: int) -> None:
        if sig == signal.SIGCHLD:
            return  # reaping happens on every pass
        log.info("received %s", signal.Signals(sig).name)
        if self.stopping and sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            log.info("stopping: %s ignored", signal.Signals(sig).name)
        elif sig == signal.SIGHUP:
            self.reload()
        elif sig in (signal.SIGTERM, signal.SIGINT):
            self.begin_stop(graceful=True)
        elif sig == signal.SIGQUIT:
            self.begin_stop(graceful=False)
        elif sig == signal.SIGUSR1:
            logsetup.reopen_logs()
            self._signal_all(signal.SIGUSR1)
            log.info("reopened log files")
        elif sig in (signal.SIGTTIN, signal.SIGTTOU):
            step = 1 if sig == signal.SIGTTIN else -1
            self.current = self.current.with_receivers(
                max(1, min(MAX_RECEIVERS, self.wanted["receiver"] + step)))
            log.info("receivers: %d", self.wanted["receiver"])
            self.status_changed = True

    # -- children ------------------------------------------------------------------------------
    def _spawn_missing(self) -> None:
        """Start every missing child of the current generation whose backoff has passed, and
        retire those beyond the wanted count (SIGTTOU)."""
        now = time.monotonic()
        for kind in KINDS:
            want = self.wanted[kind]
            current = [c for c in self.children.values()
                       if c.kind == kind and c.generation == self.generation and not c.retiring]
            have = {c.index for c in current}
            for index in range(1, want + 1):
                if index not in have and self.respawn.may_start((kind, index), now):
                    self._spawn(kind, index, want)
            for c in current:
                if c.index > want:
                    self._retire(c)

    def _spawn(self, kind: str, index: int, count: int) -> None:
        socks = {"receiver": self.listeners, "admin": self.admin_listeners}.get(kind, [])
        ctx = ChildContext(
            config=self.cfg, kind=kind, index=index, count=count,
            listeners=[lst.sock for lst in socks],
            stopping=asyncio.Event(), shutdown_timeout=self.cfg.shutdown_timeout,
            master_heartbeat=self.beacon if kind == "admin" else None,
            status_file=self.status.path)
        try:
            heartbeat = Heartbeat(self.heartbeat_dir)
        except OSError as exc:
            self.faults.error("heartbeat", "cannot create a heartbeat file for a %s: %s",
                              kind, exc.strerror or exc)
            self.respawn.delay((kind, index), FAULT_RETRY)
            return
        mask = child_mod.block_signals()
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            heartbeat.close()
            log.error("cannot fork a %s: %s", kind, exc.strerror)
            self.respawn.delay((kind, index), 1.0)
            return
        if pid == 0:  # the child: never return into the master's loop
            try:
                self._forget_master_state(keep=ctx.listeners)
                run_child(ctx, ROLES[kind], heartbeat=heartbeat, master_pid=self.pid)
            finally:
                os._exit(child_mod.EXIT_ERROR)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        rec = Child(pid, kind, index, count, self.generation, heartbeat)
        rec.last_change_ns = heartbeat.change_ns()
        self.children[pid] = rec
        log.info("started %s, generation %d", rec.name, self.generation)
        self.status_changed = True

    def _forget_master_state(self, keep: list[socket.socket]) -> None:
        """In a new child: close what belongs to the master or to other children."""
        child_mod.reset_signals()
        if self.pidfile is not None:
            self.pidfile.forget_in_child()
        if self.wakeup is not None:
            for fd in self.wakeup:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for other in self.children.values():
            other.heartbeat.close()
        for lst in self.current.sockets() + self.removed_listeners:
            if lst.sock not in keep:
                lst.close()
        if self.report_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.report_fd)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            rec = self.children.pop(pid, None)
            if rec is not None:
                self._child_exited(rec, status)

    def _child_exited(self, rec: Child, status: int) -> None:
        rec.heartbeat.close()
        self.status_changed = True
        expected = rec.retiring or self.stopping is not None
        code = os.waitstatus_to_exitcode(status)
        clean = code == 0 or (expected and code in (-signal.SIGTERM, -signal.SIGQUIT))
        level = logging.INFO if expected and clean else logging.WARNING
        log.log(level, "%s, generation %d, %s", rec.name, rec.generation,
                child_mod.describe_exit(code))
        if rec.kind == "delivery":
            # Its claims in active/<pid>/ go back to incoming/ (a clean exit leaves none).
            self._requeue_claims(rec.pid)
        # Its half-written tmp/ files: the pid is reaped, so nothing can rename them now.
        self._sweep_tmp(lambda pid: pid == rec.pid)
        if self.metrics_dir is not None:
            # Its live gauges go; its counters stay in the sum (they never go backwards).
            try:
                multiproc.mark_dead(rec.pid, self.metrics_dir)
            except OSError as exc:
                self.faults.error("metrics", "metrics: cannot mark %s dead: %s", rec.name,
                                  exc.strerror or exc)
        if expected or rec.generation != self.generation:
            return
        if not rec.booted and self.previous is not None and rec.kind != "admin":
            # A reload's new child died before it was ready: the old generation still serves;
            # go back to it rather than retire it for children that cannot run.
            if self._roll_back(f"{rec.kind} {rec.index} of generation {rec.generation} "
                               f"{child_mod.describe_exit(code)} before it was ready"):
                return
        # An admin process that cannot start costs metrics and health checks, not mail: it
        # is retried with backoff, never a reason to halt.
        if code == child_mod.EXIT_BOOT_FAILURE and not rec.booted and rec.kind != "admin":
            if self.respawn.boot_failed(rec.kind):
                raise HaltError(f"{rec.kind} processes fail to start (exit status 3, "
                                f"{self.respawn.boot_failures[rec.kind]} times in a row; "
                                "see above)")
        delay, failures = self.respawn.died(rec, time.monotonic())
        if delay:
            log.warning("restarting %s %d in %.2fs (%d quick failures)", rec.kind, rec.index,
                        delay, failures)

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        timeout = self.cfg.processes.heartbeat_timeout
        for rec in list(self.children.values()):
            with contextlib.suppress(OSError):
                change = rec.heartbeat.change_ns()
                if change != rec.last_change_ns:
                    rec.last_change_ns, rec.last_change = change, now
                    if not rec.booted:
                        rec.booted = True
                        self.respawn.booted(rec.kind)
                        self.status_changed = True
            if rec.killed:
                continue
            if now - rec.last_change > timeout:
                log.error("%s silent for %.0fs; killing it", rec.name, now - rec.last_change)
                self._kill(rec)
            elif rec.kill_at is not None and now >= rec.kill_at:
                log.warning("%s still running %gs after SIGTERM; killing it", rec.name,
                            self.cfg.shutdown_timeout + KILL_GRACE)
                self._kill(rec)

    def _kill(self, rec: Child) -> None:
        rec.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGKILL)

    def _retire(self, rec: Child) -> None:
        """Ask a child to finish its work and exit; SIGKILL it if it takes too long."""
        rec.retiring = True
        rec.kill_at = time.monotonic() + self.cfg.shutdown_timeout + KILL_GRACE
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGTERM)
        log.info("stopping %s, generation %d", rec.name, rec.generation)
        self.status_changed = True

    def _signal_all(self, sig: int) -> None:
        for rec in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, sig)

    def _sweep_orphan_claims(self) -> None:
        """Requeue claims of delivery workers that died outside our watch (children of a
        previous master that were still draining when this one started)."""
        now = time.monotonic()
        if now < self.next_orphan_sweep:
            return
        self.next_orphan_sweep = now + ORPHAN_SWEEP_INTERVAL
        try:
            slots = self.spool.active_slots()
        except OSError as exc:
            slots = []
            self._spool_fault("list active/", exc)
        for slot in slots:
            if slot not in self.children:  # claims whose owner's lock is free
                self._requeue_claims(slot)
        # tmp/ files of writers that died outside our watch (a previous master's children,
        # a killed empath-sendmail).
        self._sweep_tmp(lambda pid: pid not in self.children and not pid_alive(pid))

    def _requeue_claims(self, slot: int) -> None:
        """Requeue a gone worker's claims; on a file system error, log (rate-limited) and
        let the sweep try again soon: the claims stay where they are meanwhile."""
        try:
            self.spool.recover_unowned(slot)
        except OSError as exc:
            self._spool_fault(f"requeue the claims of delivery worker {slot}", exc)

    def _sweep_tmp(self, dead: Any) -> None:
        try:
            self.spool.sweep_tmp(dead)
        except OSError as exc:
            self._spool_fault("sweep tmp/", exc)

    def _spool_fault(self, what: str, exc: OSError) -> None:
        self.faults.error(what, "cannot %s: %s; retrying every %gs", what,
                          exc.strerror or exc, FAULT_RETRY)
        self.next_orphan_sweep = min(self.next_orphan_sweep, time.monotonic() + FAULT_RETRY)

    def _report_ready(self) -> None:
        if self.ready_reported:
            return
        current = [c for c in self.children.values() if c.generation == self.generation]
        all_booted = current and all(c.booted for c in current)
        if all_booted or time.monotonic() - self.started > READY_WAIT:
            self.ready_reported = True
            listening = " ".join(str(lst.bound) for lst in self.listeners)
            self._report(f"ready {self.pid} {listening}")
            sd_notify(f"READY=1\nMAINPID={self.pid}\nSTATUS=listening on {listening}")

    def _report(self, message: str) -> None:
        if self.report_fd is not None:
            report(self.report_fd, message)
            with contextlib.suppress(OSError):
                os.close(self.report_fd)
            self.report_fd = None

    def _write_status(self) -> None:
        if not self.status_changed:
            return
        self.status_changed = False
        self.status.write({
            "pid": self.pid,
            "config_file": self.cfg.config_file,
            "generation": self.generation,
            "state": "stopping" if self.stopping else "running",
            "listeners": [str(lst.bound) for lst in self.listeners],
            "admin_listeners": self._admin_status(),
            "children": [{"pid": c.pid, "kind": c.kind, "index": c.index, "count": c.count,
                          "generation": c.generation, "booted": c.booted,
                          "retiring": c.retiring}
                         for c in sorted(self.children.values(),
                                         key=lambda c: (c.generation, c.kind, c.index))],
            "started_at": self.started_at,
            "last_reload": self.last_reload,
        })

    def _admin_status(self) -> dict[str, str | None]:
        """Where /metrics and /health are served (bound addresses), None when off."""
        out: dict[str, str | None] = {observe.METRICS: None, observe.HEALTH: None}
        for (_, roles), lst in zip(observe.admin_endpoints(self.cfg), self.admin_listeners,
                                   strict=False):
            for role in roles:
                out[role] = str(lst.bound)
        return out

    # -- reload --------------------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the configuration; start a new generation of children with it (the old one
        is stopped once the new one runs). An invalid file changes nothing."""
        sd_notify("RELOADING=1")
        try:
            self._reload()
        finally:
            sd_notify("READY=1")

    def _reload(self) -> None:
        try:
            new = load_config(self.cfg.config_file)
        except ConfigError as exc:
            self._reload_refused(str(exc))
            return
        except Exception as exc:
            log.exception("reload failed")
            self._reload_refused(f"unexpected error: {exc}")
            return
        if new.spool.path != self.cfg.spool.path:
            # The old generation's claims live in the old spool: moving takes a restart.
            self._reload_refused("spool.path changed; that takes a restart")
            return
        # What the children would load (log file, certificates, DKIM keys) is loaded here
        # first: a broken file refuses the reload instead of breaking the new children.
        problems = preflight.runtime_problems(new)
        if problems:
            self._reload_refused("; ".join(problems))
            return
        try:
            listeners = bind_all([lc.address for lc in new.listeners], self.listeners)
        except ListenError as exc:
            self._reload_refused(str(exc))
            return
        try:
            admin_listeners = bind_all(_admin_addresses(new), self.admin_listeners)
        except ListenError as exc:
            for lst in listeners:
                if lst not in self.listeners:
                    lst.close()
            self._reload_refused(str(exc))
            return
        for key in ("pidfile", "user", "group"):
            if getattr(new, key) != getattr(self.cfg, key):
                log.warning("reload: %s changed; that takes a restart", key)
        if new.log != self.cfg.log:
            self._configure_log(new.log)
        for lst in listeners:
            if lst not in self.listeners:
                log.info("listening on %s", lst.bound)
        self.previous, self.current = self.current, self.current.successor(new, listeners,
                                                                           admin_listeners)
        self.removed_listeners += self.previous.left_behind(self.current)
        try:  # a new hostname, a key made readable by others: a new self-signed pair
            tlsfiles.ensure_self_signed(new, log)
        except OSError as exc:
            log.error("TLS: cannot write the self-signed certificate in %s: %s", new.tls_dir,
                      exc.strerror or exc)
        self._log_admin_listeners(list(self.previous.admin_listeners))
        self._prepare_metrics_dir()
        self.reloaded_at = time.monotonic()
        self.respawn.reset()
        log.info("configuration reloaded; starting generation %d", self.generation)
        self.last_reload = {"time": time.time(), "generation": self.generation, "ok": None,
                            "error": None}
        self.status_changed = True

    def _reload_refused(self, reason: str) -> None:
        log.error("reload failed, keeping the running configuration: %s", reason)
        self.last_reload = {"time": time.time(), "generation": self.generation, "ok": False,
                            "error": reason}
        self.status_changed = True

    def _configure_log(self, log_cfg: LogConfig) -> None:
        try:
            logsetup.configure(log_cfg)
        except OSError as exc:  # checked before; the file system may have changed since
            log.error("cannot switch logging to %s: %s; logging stays as it was",
                      log_cfg.file, exc.strerror or exc)

    def _retire_old_generation(self) -> None:
        """Once every child of the new generation has booted, stop the old one; a new
        generation that has not booted within NEW_GENERATION_WAIT is rolled back instead:
        the working generation is never retired for one that does not run."""
        old = [c for c in self.children.values()
               if c.generation < self.generation and not c.retiring]
        if not old:
            return
        new = [c for c in self.children.values() if c.generation == self.generation]
        complete = len(new) >= sum(self.wanted.values()) and all(c.booted for c in new)
        if complete:
            for rec in old:
                self._retire(rec)
            if self.last_reload is not None and self.last_reload["ok"] is None:
                self.last_reload["ok"] = True
                log.info("generation %d runs; generation %d stopping", self.generation,
                         old[0].generation)
            self.previous = None
            self.status_changed = True
        elif time.monotonic() - self.reloaded_at > NEW_GENERATION_WAIT:
            if not self._roll_back(f"generation {self.generation} did not boot within "
                                   f"{NEW_GENERATION_WAIT:g}s"):
                for rec in old:
                    self._retire(rec)

    def _roll_back(self, reason: str) -> bool:
        """The new generation cannot run (``reason``): go back to the previous configuration,
        whose children still run, instead of halting. False when there is nothing to go back
        to (start-up, or the old generation is already stopping)."""
        prev = self.previous
        old = [c for c in self.children.values()
               if prev is not None and c.generation == prev.number and not c.retiring]
        if prev is None or not old:
            return False
        log.critical("reload failed: %s; going back to the configuration of generation %d",
                     reason, prev.number)
        self.last_reload = {"time": time.time(), "generation": self.generation, "ok": False,
                            "error": reason}
        for rec in list(self.children.values()):
            if rec.generation == self.generation:
                self._retire(rec)
        keep = prev.sockets()
        self.removed_listeners = ([lst for lst in self.removed_listeners if lst not in keep]
                                  + self.current.left_behind(prev))
        if prev.cfg.log != self.cfg.log:
            self._configure_log(prev.cfg.log)
        # A fresh number: children of the failed generation must not count as current.
        self.current = prev.revived(self.generation + 1)
        for rec in old:
            rec.generation = self.generation
        self.previous = None
        self.respawn.reset()
        self.status_changed = True
        return True

    def _close_removed_listeners(self) -> None:
        if self.removed_listeners and not any(c.generation < self.generation
                                              for c in self.children.values()):
            for lst in self.removed_listeners:
                log.info("closed listener %s", lst.bound)
                lst.close()
            self.removed_listeners = []
            self.status_changed = True

    # -- stopping ------------------------------------------------------------------------------
    def begin_stop(self, graceful: bool) -> None:
        """Graceful: children finish within shutdown_timeout. Fast: they exit at once."""
        if self.stopping == "fast" or (self.stopping == "graceful" and graceful):
            return
        self.stopping = "graceful" if graceful else "fast"
        sd_notify("STOPPING=1")
        wait = self.cfg.shutdown_timeout + KILL_GRACE if graceful else FAST_STOP_WAIT
        self.stop_deadline = time.monotonic() + wait
        self.stop_killed = False
        sig = signal.SIGTERM if graceful else signal.SIGQUIT
        log.info("%s stop of %d children", self.stopping, len(self.children))
        for rec in self.children.values():
            rec.retiring = True
        self._signal_all(sig)
        # The children hold their own copies: the port stays open until the last one exits.
        for lst in self.current.sockets() + self.removed_listeners:
            lst.close()
        self.current, self.removed_listeners = self.current.stopped(), []
        self.status_changed = True

    def _stop_progress(self) -> bool:
        """True when every child is gone (or could not be killed)."""
        if not self.children:
            return True
        if time.monotonic() < self.stop_deadline:
            return False
        if self.stop_killed:
            log.error("children did not exit after SIGKILL: %s",
                      ", ".join(str(pid) for pid in self.children))
            return True
        log.warning("killing %d children still running", len(self.children))
        for rec in self.children.values():
            self._kill(rec)
        self.stop_killed = True
        self.stop_deadline = time.monotonic() + 5.0
        return False

    def _cleanup(self) -> None:
        for lst in self.current.sockets() + self.removed_listeners:
            lst.close()
        self.status.remove()
        for rec in self.children.values():
            rec.heartbeat.close()
        if self.beacon is not None:
            self.beacon.close()
        if self.metrics_dir is not None and not self.children:
            multiproc.remove(self.metrics_dir)


def _wanted(cfg: Config) -> dict[str, int]:
    """How many children of each kind the configuration asks for (one admin process when
    metrics or health checks are configured)."""
    return {"receiver": cfg.processes.receivers, "delivery": cfg.processes.delivery,
            "admin": 1 if observe.admin_enabled(cfg) else 0}


def _admin_addresses(cfg: Config) -> list[Address]:
    return [address for address, _ in observe.admin_endpoints(cfg)]


def _warn_loose_keys(cfg: Config) -> None:
    """A TLS private key readable by other users is worth a warning (it still works)."""
    for lc in cfg.listeners:
        key = lc.tls.key
        if key is None:
            continue
        with contextlib.suppress(OSError):
            mode = os.stat(key).st_mode & 0o777
            if mode & 0o077:
                log.warning("TLS key %s is readable by others (mode %03o); chmod 600 it",
                            key, mode)


# Modules the roles import on first use (not at the top of their own modules).
PRELOAD = ("uvloop", "concurrent.futures.thread", "empath.delivery.remote", "empath.delivery.lmtp",
           "encodings.idna")


def _preload_roles() -> None:
    """Import the children's code while still privileged.

    After the switch to ``user`` the children can only import what that user may read; the
    Python installation (or a virtualenv's base) may not be readable by it, as with an
    interpreter under a private home directory. Modules already imported here are inherited by
    every forked child. A role that fails to import is left to fail in the child, where the
    boot-failure rule reports it.
    """
    import importlib

    for target in [*ROLES.values(), *PRELOAD]:
        module = target.partition(":")[0]
        try:
            importlib.import_module(module)
        except Exception as exc:  # reported by the child that needs it
            log.warning("preloading %s failed: %s", module, exc)

