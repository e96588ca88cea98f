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

The arbiter keeps the loop, the signals, and the children: starting, watching (heartbeats),
retiring, reaping, stopping. Beside it: ``generation.py`` (the running configuration and its
sockets as one value, replaced whole), ``reload.py`` (SIGHUP: validation, the swap, and the
rollback of a generation that does not boot), ``startup.py`` (spool, audit log, metrics
directory, preloading before privileges are dropped), ``housekeeping.py`` (claims and tmp/
files of children that are gone, throttled fault logging), ``respawn.py`` (backoff and boot
failures) and ``child.py`` (what runs in a forked child). What the arbiter keeps true: signal
handlers only enqueue; every child it started is reaped, and a delivery worker's claims are
requeued once it is gone; the generation is only ever replaced whole.
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
from typing import Any

from empath import logsetup
from empath.config.typed import Config
from empath.master import child as child_mod
from empath.master import preflight, privileges, startup
from empath.master.child import ChildContext, Heartbeat, run_child
from empath.master.daemon import Pidfile, StatusFile, report, sd_notify, status_path
from empath.master.generation import Generation, admin_addresses
from empath.master.housekeeping import FAULT_RETRY, LogThrottle, SpoolKeeper
from empath.master.listeners import Listener, ListenError, bind_all
from empath.master.reload import Reloader
from empath.master.respawn import KINDS, Child, RespawnPolicy
from empath.master.startup import SetupError
from empath.observe import multiproc
from empath.smtp import capacity
from empath.spool import Spool

log = logging.getLogger("empath.master")

ROLES = {"receiver": "empath.smtp.server:serve", "delivery": "empath.delivery.worker:serve",
         "admin": "empath.observe.admin:serve"}
HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                   signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
MAX_RECEIVERS = 32  # processes.receivers' maximum: two generations fill smtp/capacity.py's table
KILL_GRACE = 1.0  # past shutdown_timeout before SIGKILL: children enforce it themselves first
FAST_STOP_WAIT = 2.0  # after SIGQUIT, before SIGKILL
READY_WAIT = 10.0  # most start-up waits for the first children to boot before reporting ready


class HaltError(Exception):
    """Respawning cannot help (children fail to boot); the master stops."""


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
        self.respawn = RespawnPolicy()
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.wakeup: tuple[int, int] | None = None
        self.stopping: str | None = None  # None, "graceful" or "fast"
        self.stop_deadline = 0.0
        self.stop_killed = False
        self.exit_code = 0
        self.error: str | None = None  # why the master failed or halted, for the CLI
        self.reloads = Reloader(self)  # SIGHUP: the generation swap and its rollback
        self.started = time.monotonic()
        self.ready_reported = False
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
        self.keeper = SpoolKeeper(self.spool, self.faults)

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
                admin_listeners = bind_all(admin_addresses(self.cfg), [])
            except ListenError:
                for lst in listeners:
                    lst.close()
                raise
            self.current = self.current.bound(listeners, admin_listeners)
        except ListenError as exc:
            raise SetupError(str(exc)) from None
        for lst in self.listeners:
            log.info("listening on %s", lst.bound)
        self.log_admin_listeners([])
        startup.warn_loose_keys(self.cfg)
        startup.create_spool(self.spool)
        self.prepare_metrics_dir()
        audit_log = startup.prepare_audit_log(self.cfg)
        if ident is not None and privileges.needs_switch(ident):
            files = [p for p in (logsetup.current_log_file(),
                                 self.pidfile.path if self.pidfile else None,
                                 self.status.path, audit_log) if p]
            privileges.hand_over(ident, self.spool.root, files,
                                 dirs=[self.metrics_dir] if self.metrics_dir else [])
            startup.preload_roles(ROLES.values())
            privileges.drop(ident)
        else:
            privileges.note_running_identity(self.spool.root)
        startup.recover_spool(self.spool)
        # The receivers' shared connection counts (smtp/capacity.py): made once, kept across
        # reloads, so every generation's receivers count together.
        capacity.create_shared_table()
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            self.heartbeat_dir = "/dev/shm"  # tmpfs: a heartbeat never touches a disk
        self.beacon = Heartbeat(self.heartbeat_dir)
        log.info("master %d started (config %s)", self.pid, self.cfg.config_file)

    def prepare_metrics_dir(self) -> None:
        """Metrics on: make the multiprocess directory once (kept across reloads)."""
        if self.metrics_dir is None:
            self.metrics_dir = startup.prepare_metrics_dir(self.cfg, self.spool)

    def log_admin_listeners(self, known: list[Listener]) -> None:
        """Log where /metrics and /health are served (those not in ``known`` only)."""
        startup.log_admin_listeners(self.cfg, self.admin_listeners, known)

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
                    self.reloads.settle()
                    self.reloads.close_left_behind()
                    self.keeper.sweep_orphans(self.children)
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
            self.reloads.reload()
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
                    self.retire(c)

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
        child_mod.freeze_heap()  # before the fork: the child's collector never touches it
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
        for lst in self.current.sockets() + self.reloads.left_behind:
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
        self.keeper.child_gone(rec.pid, delivery=rec.kind == "delivery")
        if self.metrics_dir is not None:
            # Its live gauges go; its counters stay in the sum (they never go backwards).
            try:
                multiproc.mark_dead(rec.pid, self.metrics_dir)
            except OSError as exc:
                self.faults.error("metrics", "metrics: cannot mark %s dead: %s", rec.name,
                                  exc.strerror or exc)
        if expected or rec.generation != self.generation:
            return
        if not rec.booted and self.reloads.previous is not None and rec.kind != "admin":
            # A reload's new child died before it was ready: the old generation still serves;
            # go back to it rather than retire it for children that cannot run.
            if self.reloads.roll_back(f"{rec.kind} {rec.index} of generation {rec.generation} "
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

    def retire(self, rec: Child) -> None:
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
            "admin_listeners": startup.admin_status(self.cfg, self.admin_listeners),
            "children": [{"pid": c.pid, "kind": c.kind, "index": c.index, "count": c.count,
                          "generation": c.generation, "booted": c.booted,
                          "retiring": c.retiring}
                         for c in sorted(self.children.values(),
                                         key=lambda c: (c.generation, c.kind, c.index))],
            "started_at": self.started_at,
            "last_reload": self.reloads.last,
        })

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
        for lst in self.current.sockets() + self.reloads.drop_left_behind():
            lst.close()
        self.current = self.current.stopped()
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
        for lst in self.current.sockets() + self.reloads.drop_left_behind():
            lst.close()
        self.status.remove()
        for rec in self.children.values():
            rec.heartbeat.close()
        if self.beacon is not None:
            self.beacon.close()
        if self.metrics_dir is not None and not self.children:
            multiproc.remove(self.metrics_dir)
