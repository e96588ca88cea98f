"""The master as a Unix daemon: pidfile, detaching, start-up report, service-manager notices.

- ``Pidfile``: the master is found by a lock it holds, never by a pid and a command line.
  ``<pidfile>.lock`` is flock()ed by the master for its whole life (the kernel drops the lock
  when the master is gone, however it went) and holds its pid; the pidfile itself (for init
  scripts and systemd) is written atomically once the lock is held, and removed on exit only if
  it still names this process. ``lock_holder()``/``pidfile_state()`` say whether a master runs
  and which pid it has: a stale pidfile naming some other live process is only stale.
- ``detach()``: double fork and ``setsid``; the original process keeps a pipe on which the
  daemon reports "ready" or the error that stopped it, so ``empath start`` returns only once
  the listeners are bound (or fails with the reason).
- ``sd_notify()``: READY/RELOADING/STOPPING for systemd's ``Type=notify``.
- ``StatusFile``: the master's JSON status beside the pidfile (read by ``empath status``).

This module never reads the configuration and never forks children.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import socket
import time
from dataclasses import dataclass
from typing import Any

from empath.spool.layout import pid_alive

log = logging.getLogger("empath.master")

MASTER_TITLE = "empath: master"


class PidfileError(Exception):
    """The pidfile cannot be created (another master runs, or the file system said no)."""


def read_pid(path: str) -> int | None:
    """The pid in ``path``; None when the file is missing, empty or not a pid."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            text = fh.read(64).strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def process_running(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]

        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except Exception:  # no psutil; NoSuchProcess, AccessDenied on a process we cannot inspect
        return pid_alive(pid)


def is_empath_master(pid: int) -> bool:
    """True when ``pid`` runs and looks like an empath master (title or command line). A hint
    for people and tests only: whether a master runs is decided by its lock."""
    if not process_running(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no /proc, or not ours to read: trust the pid
    return MASTER_TITLE in cmdline or "empath" in cmdline


LOCK_READ_WAIT = 1.0  # most a reader waits for a new lock holder to write its pid
LOCK_PROBE_RETRIES = 20  # tries 10 ms apart before a held lock means a running master


def lock_path(pidfile: str) -> str:
    """The master's lock file, beside its pidfile."""
    return f"{pidfile}.lock"


def lock_holder(pidfile: str) -> int | None:
    """The pid of the master holding ``<pidfile>.lock``; None when no process holds it.

    Probing takes a shared lock for an instant (and drops it at once): it is refused exactly
    while a master holds its exclusive lock. The pid is read from the file the holder wrote
    after locking it; a holder that has not written it yet is waited for (briefly)."""
    path = lock_path(pidfile)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise PidfileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + LOCK_READ_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            else:
                return None  # nobody holds it (the shared lock goes with the descriptor)
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            if text.isdigit() and int(text) > 0:
                return int(text)
            if time.monotonic() >= deadline:
                raise PidfileError(f"{path} is locked but names no pid")
            time.sleep(0.01)
    finally:
        os.close(fd)


def pidfile_state(path: str) -> tuple[str, int | None]:
    """("running", pid of the lock holder), ("stale", pid in the pidfile, if any: no master
    holds the lock) or ("absent", None)."""
    holder = lock_holder(path)
    if holder is not None:
        return "running", holder
    pid = read_pid(path)
    if pid is None:
        return ("absent", None) if not os.path.exists(path) else ("stale", None)
    return "stale", pid


def _lock_exclusive(fd: int) -> None:
    """flock(LOCK_EX) without blocking on a master, but past the instant a reader's probe
    (``lock_holder``: a shared lock dropped at once) holds it; BlockingIOError when held."""
    for _ in range(LOCK_PROBE_RETRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.01)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class Pidfile:
    """The master's lock and pidfile."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid: int | None = None
        self.lock_fd: int | None = None

    def create(self, pid: int | None = None) -> None:
        """Take the lock (PidfileError naming the holder when a master runs), then write
        ``pid`` (default: this process) to the lock file and the pidfile.

        The pidfile is written to a private temporary name and renamed into place, so a
        reader never sees half of it; whatever it held before is replaced: the lock, not the
        pidfile, says that no master runs.
        """
        pid = os.getpid() if pid is None else pid
        directory = os.path.dirname(self.path) or "."
        lock = lock_path(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise PidfileError(f"cannot create {lock}: {exc.strerror}") from None
        try:
            _lock_exclusive(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PidfileError(f"cannot lock {lock}: {exc.strerror}") from None
            other = None
            with contextlib.suppress(PidfileError):
                other = lock_holder(self.path)
            raise PidfileError(f"empath is already running (pid {other}, pidfile "
                               f"{self.path})") from None
        tmp = f"{self.path}.{pid}.tmp"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{pid}\n".encode(), 0)
            with open(tmp, "w", encoding="ascii") as fh:
                fh.write(f"{pid}\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise PidfileError(f"cannot create {self.path}: {exc.strerror}") from None
        self.lock_fd = fd
        self.pid = pid

    def forget_in_child(self) -> None:
        """In a forked child: close the inherited lock descriptor (the master's lock stays:
        it belongs to the master's open file, which the master keeps), so a child that
        outlives its master never makes the next ``empath start`` think a master runs."""
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = None

    def remove(self) -> None:
        """Remove the pidfile if it still names the pid this object wrote; release the lock
        (the lock file stays: unlinking it would let two masters lock two different files)."""
        if self.pid is not None and read_pid(self.path) == self.pid:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.pid = None
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.lock_fd, 0)
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = None


@dataclass
class Detached:
    """The result of ``detach()``: which side of the fork we are on, and our end of the
    start-up report pipe (read end in the original process, write end in the daemon)."""

    is_daemon: bool
    fd: int


def detach() -> Detached:
    """Fork twice so the daemon has no controlling terminal and is not a session leader (it
    can never acquire a terminal again); the intermediate process exits at once."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        os.waitpid(pid, 0)
        return Detached(False, read_fd)
    try:
        os.close(read_fd)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        os.chdir("/")
        os.umask(0o022)
    except BaseException:
        os._exit(1)
    return Detached(True, write_fd)


def report(fd: int, message: str) -> None:
    """Daemon side: send one line of start-up report ("ready ..." or "error ...")."""
    data = (message.replace("\n", " ") + "\n").encode()
    with contextlib.suppress(OSError):
        os.write(fd, data)


def wait_for_report(fd: int, timeout: float) -> str | None:
    """Original side: the daemon's first report line; None on timeout, "" when the daemon
    closed the pipe (exited) without a word."""
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return ""
            buf += chunk
    finally:
        os.close(fd)
    return buf.split(b"\n", 1)[0].decode(errors="replace")


def sd_notify(state: str) -> None:
    """Tell systemd (``Type=notify``) about a state change; a no-op elsewhere."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


def status_path(pidfile: str) -> str:
    """The master's status file sits beside its pidfile."""
    return os.path.join(os.path.dirname(pidfile) or ".", "empath.status.json")


class StatusFile:
    """The master's JSON status document, replaced atomically (write, rename) on every change,
    so ``empath status`` never reads half of it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._failed = False

    def write(self, data: dict[str, Any]) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1)
                fh.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
            self._failed = False
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not self._failed:  # once per streak: a full disk must not flood the log
                log.error("cannot write %s: %s", self.path, exc.strerror or exc)
            self._failed = True

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    @staticmethod
    def read(path: str) -> dict[str, Any] | None:
        try:
            with open(path, encoding="utf-8") as fh:
                data: dict[str, Any] = json.load(fh)
        except (OSError, ValueError):
            return None
        return data
