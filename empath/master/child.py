"""The life of a forked child: start-up, signals, heartbeat, master watch and shutdown deadline.

The master builds a ``ChildContext`` and forks; the child calls ``run_child(ctx, serve)``, which
makes the process its own (signal dispositions reset, title set, RNG reseeded, descriptors
close-on-exec), starts a uvloop event loop and awaits the role's ``serve(ctx)`` until it returns.
``serve`` returns when ``ctx.stopping`` is set and its work is drained; ``stopping`` is set by
SIGTERM/SIGINT and when the master disappears. ``run_child`` never returns: it ends the process
with an exit status the master understands (``EXIT_*`` below).

The master uses only the small pieces meant for both sides (``ChildContext``, ``Heartbeat``,
``block_signals``, the exit codes and ``describe_exit``); this module never touches the spool or
the master's bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import os
import random
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from empath import logsetup
from empath.config.typed import Config

log = logging.getLogger("empath.child")

EXIT_OK = 0
EXIT_ERROR = 1  # serve() raised, or returned without being asked to stop
EXIT_BOOT_FAILURE = 3  # the role could not even start (import error): respawning will not help
EXIT_SHUTDOWN_TIMEOUT = 4  # stopping took longer than shutdown_timeout; work left in the spool


def describe_exit(code: int) -> str:
    """"exited with status 1" / "killed by SIGKILL", from ``waitstatus_to_exitcode``."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with status {code}"


WATCH_INTERVAL = 1.0  # seconds between heartbeats and checks that the master is still there

Serve = Callable[["ChildContext"], Awaitable[None]]

# Dispositions a child starts from: the master's handlers only make sense in the master.
# HUP and TTIN/TTOU are meant for the master (a hang-up or terminal signal to the whole
# process group must not kill or stop the children); SIGPIPE stays ignored as Python expects.
_DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1,
                    signal.SIGUSR2, signal.SIGCHLD, signal.SIGALRM)
_IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
# Held back from fork until the event loop's handlers are installed: a SIGTERM that arrives
# while a child is still importing its role is then handled (a clean stop), not fatal.
HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1}


@dataclass
class ChildContext:
    """What a child's ``serve(ctx)`` gets from the master."""

    config: Config  # the validated configuration
    kind: str  # "receiver", "delivery" or "admin"
    index: int  # 1-based position among its kind
    count: int  # how many of its kind there were when it was started
    # bound, listening sockets: SMTP (receivers), /metrics and /health (admin); [] for delivery
    listeners: list[socket.socket]
    stopping: asyncio.Event  # set on SIGTERM/SIGINT or when the master is gone
    shutdown_timeout: float  # seconds to finish after ``stopping`` before exiting anyway
    # admin only: the master's own heartbeat (bumped on every pass of its loop), and the
    # master's status file (children, listeners) that /health reads
    master_heartbeat: Heartbeat | None = None
    status_file: str | None = None


class Heartbeat:
    """An unlinked temporary file whose change time the child bumps (fchmod) every second.

    Created by the master before the fork, so both ends share the open file; the master reads
    the change time to see that the child's event loop is still turning (gunicorn's WorkerTmp).
    """

    def __init__(self, directory: str | None = None) -> None:
        fd, path = tempfile.mkstemp(prefix="empath-heartbeat-", dir=directory)
        os.unlink(path)
        self.fd = fd
        self._mode = 0

    def beat(self) -> None:
        self._mode ^= 1
        os.fchmod(self.fd, self._mode)

    def change_ns(self) -> int:
        """The file's change time in ns (compare it with an earlier value: it moved or not)."""
        return os.fstat(self.fd).st_ctime_ns

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def block_signals() -> set[Any]:
    """Block the signals a child handles; returns the previous mask. The master calls it
    around fork(); the child unblocks them once its handlers exist."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)


def reset_signals() -> None:
    """Forget the master's signal handling (handlers, wake-up fd). Blocked signals stay
    blocked until the child's event loop handles them."""
    signal.set_wakeup_fd(-1)
    for sig in _DEFAULT_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    for sig in _IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def run_child(ctx: ChildContext, serve: Serve | str, *, heartbeat: Heartbeat | None = None,
              master_pid: int | None = None) -> NoReturn:
    """Run ``serve(ctx)`` in this freshly forked process, then end the process.

    ``serve`` is a coroutine function or ``"module:function"``, imported here (an import
    failure exits with ``EXIT_BOOT_FAILURE``). ``master_pid`` (default: the parent) is watched;
    when it is gone the child stops as if it had been sent SIGTERM.
    """
    code = EXIT_ERROR
    try:
        code = _run(ctx, serve, heartbeat, master_pid or os.getppid())
    except BaseException:
        log.exception("%s %d/%d failed", ctx.kind, ctx.index, ctx.count)
    finally:
        logging.shutdown()
        os._exit(code)


def _run(ctx: ChildContext, serve: Serve | str, heartbeat: Heartbeat | None,
         master_pid: int) -> int:
    block_signals()
    reset_signals()
    _die_with_master(master_pid)
    set_title(f"empath: {ctx.kind} {ctx.index}/{ctx.count}")
    # The forked RNG state is the master's: every child would draw the same "random" jitter.
    random.seed()
    _close_on_exec_all()
    try:
        import uvloop

        serve_fn = _load(serve) if isinstance(serve, str) else serve
    except Exception:
        log.critical("%s %d/%d cannot start", ctx.kind, ctx.index, ctx.count, exc_info=True)
        return EXIT_BOOT_FAILURE

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    _settle_heap()
    try:
        return loop.run_until_complete(_main(ctx, serve_fn, heartbeat, master_pid))
    finally:
        with contextlib.suppress(Exception):
            _cancel_remaining(loop)
        loop.close()


# Allocations (net) between two collections of the youngest generation: the default, 700,
# runs one for every few messages handled, and every tenth of those collects the older ones.
GC_YOUNGEST = 20_000


def freeze_heap() -> None:
    """In the master, right before a fork: collect, then move every object out of the cycle
    collector's reach (``gc.freeze``). The child then inherits a heap its collector never
    walks: a full collection looks only at what the child allocated since, and no collection
    writes to the pages shared with the master (a collection in the child would copy them
    all, one object header at a time: about 20 MiB more private memory per process)."""
    gc.collect()
    gc.freeze()


def _settle_heap() -> None:
    """In the child: what it loaded since the fork joins the frozen objects (``gc.freeze``
    only splices lists, it touches no object), and collections of the youngest generation
    run less often (GC_YOUNGEST). Reference counting still frees everything that is not in a
    cycle at once; the collector is only for cycles."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNGEST, older, oldest)


_PR_SET_PDEATHSIG = 1


def _die_with_master(master_pid: int) -> None:
    """Have the kernel send SIGTERM when the master dies, so that a killed master's
    receivers close the shared listening socket at once (a restarted master can bind it)
    instead of within a heartbeat. The signal stays pending until the loop handles it;
    a master that died before this call is caught by the watcher's parent-pid check."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watcher alone notices
        return
    if os.getppid() != master_pid:
        os.kill(os.getpid(), signal.SIGTERM)


async def _main(ctx: ChildContext, serve: Serve, heartbeat: Heartbeat | None,
                master_pid: int) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stop, ctx, signal.Signals(sig).name)
    # Fast stop: acknowledged messages are already durable, claims go back to incoming/.
    loop.add_signal_handler(signal.SIGQUIT, os._exit, EXIT_OK)
    loop.add_signal_handler(signal.SIGUSR1, logsetup.reopen_logs)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    watcher = asyncio.create_task(_watch(ctx, heartbeat, master_pid))
    deadline = asyncio.create_task(_enforce_shutdown_timeout(ctx))
    try:
        await serve(ctx)
    except Exception:
        log.exception("%s %d/%d crashed", ctx.kind, ctx.index, ctx.count)
        return EXIT_ERROR
    finally:
        watcher.cancel()
        deadline.cancel()
    if not ctx.stopping.is_set():
        log.error("%s %d/%d: serve() returned without being asked to stop",
                  ctx.kind, ctx.index, ctx.count)
        return EXIT_ERROR
    return EXIT_OK


def _stop(ctx: ChildContext, why: str) -> None:
    if not ctx.stopping.is_set():
        log.info("%s %d/%d stopping (%s)", ctx.kind, ctx.index, ctx.count, why)
        ctx.stopping.set()


async def _watch(ctx: ChildContext, heartbeat: Heartbeat | None, master_pid: int) -> None:
    """Report to the master every second, and stop when the master is gone."""
    while True:
        if heartbeat is not None:
            heartbeat.beat()
        # Orphans are re-parented (to init or a subreaper): the parent pid changes.
        if os.getppid() != master_pid:
            _stop(ctx, f"master {master_pid} is gone")
        await asyncio.sleep(WATCH_INTERVAL)


async def _enforce_shutdown_timeout(ctx: ChildContext) -> None:
    await ctx.stopping.wait()
    # Backstop for an event loop that blocks: SIGALRM's default action ends the process.
    signal.setitimer(signal.ITIMER_REAL, ctx.shutdown_timeout + 2 * WATCH_INTERVAL)
    await asyncio.sleep(ctx.shutdown_timeout)
    log.warning("%s %d/%d did not finish within %gs; exiting, unfinished work stays in the "
                "spool", ctx.kind, ctx.index, ctx.count, ctx.shutdown_timeout)
    logging.shutdown()
    os._exit(EXIT_SHUTDOWN_TIMEOUT)


def _load(spec: str) -> Serve:
    module_name, _, attr = spec.partition(":")
    fn: Serve = getattr(importlib.import_module(module_name), attr or "serve")
    return fn


def set_title(title: str) -> None:
    """The process title shown by ps and top."""
    try:
        import setproctitle
    except ImportError:  # cosmetic only: ps shows the command line instead
        return
    setproctitle.setproctitle(title)


def _close_on_exec_all() -> None:
    """Mark every inherited descriptor above stderr close-on-exec: nothing the child might
    exec (a pipe command, a helper) should inherit sockets, spool files or heartbeats."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
