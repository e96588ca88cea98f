"""Make one message file durable in a queue directory: the reference twin of ``spoolio.pyx``.

``store(fd, tmp, parts, dest, reuse, mtime, datasync=True)``:

1. when ``fd`` is negative, open ``tmp`` for writing. When ``reuse`` equals ``tmp``, ``tmp`` is
   a slot (a file created ahead, whose name is already durable; ``fd``, if given, is open on
   it) and is opened in place: if
   that fails, so does the call (a new file there would have a name nobody made durable);
   and in step 4 the slot is *linked* to ``dest``, keeping its own name (the caller removes
   it once ``dest``'s directory is flushed).
   Otherwise first by renaming ``reuse`` (a recycled file's path, or None) to ``tmp`` and
   opening it; if that rename or open fails (another receiver took the file), by creating
   ``tmp`` (O_CREAT|O_EXCL, mode 0600);
2. write every octet of ``parts`` (a list of bytes), continuing after short writes and in
   writev calls of at most IOV_BATCH (1024, Linux's IOV_MAX) buffers; a recycled file or a slot
   is overwritten from its start and then cut (ftruncate) to what was written: its
   blocks are reused, so ``fdatasync`` has less metadata to write than after O_TRUNC;
3. when ``mtime`` is not negative, set the file's access and modification times to it;
4. fdatasync (unless ``datasync`` is false: the caller makes the file durable some other
   way, e.g. one syncfs for a batch), close, and rename ``tmp`` to ``dest`` (link, for a
   slot).

It returns whether a recycled file was used. The descriptor is always closed on return, the
caller's (a spilled message's ``fd``) included. Any failure raises OSError with the errno of
the failing step and ``tmp`` as the file name; ``tmp`` may then exist and is the caller's to
unlink.

``write_all(fd, parts)`` is step 2 alone, at the descriptor's offset (a message spilled to its
file as it arrives); OSError on failure.

``make_slots(dir_fd, paths, sources)`` makes a batch of slots: ``sources`` are candidates
(recycled files' paths, None entries skipped, as many as the caller likes), taken in order: for
each path, the next candidate whose rename to it succeeds is used (a failed rename means
another receiver took that file: the next one is tried); once the candidates are used up, the
path is created (O_CREAT|O_EXCL, 0600). Then fsync ``dir_fd`` (the slots' directory). Returns
how many candidates were tried: the rest are untouched, the caller's to offer again. OSError
(naming the path when a creation failed) leaves the paths made so far for the caller to
remove.

``sync_and_unlink(dir_fd, paths)`` fsyncs ``dir_fd``, then (only if that succeeded) unlinks every
path, a missing one included without complaint; OSError with the first other errno after trying
them all.

``StorePool(threads)`` runs ``store`` calls in threads of its own: ``submit(token, fd, tmp,
parts, dest, reuse, mtime, datasync=True)`` queues one call (the caller must not change
``parts`` until it has finished; a descriptor is closed on every path, as by ``store``);
``fileno()`` is an eventfd that becomes readable once calls have finished since the last
``completed()``, which returns them as ``(token, errno or 0, reused, seconds)`` in the order
they finished; ``close()`` finishes every queued call and stops the threads. The compiled
twin's threads are C threads that never take the GIL: a receiver's event loop hands a message
over and gets it back without the lock handoffs and wake-ups a Python thread costs.

The compiled twin runs each of these whole without the GIL.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time

__all__ = ["StorePool", "make_slots", "store", "sync_and_unlink", "write_all"]

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_REUSED = os.O_WRONLY | os.O_CLOEXEC
IOV_BATCH = 1024


def write_all(fd: int, parts: list[bytes]) -> None:
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        n = os.writev(fd, views[:IOV_BATCH])
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def make_slots(dir_fd: int, paths: list[bytes], sources: list[bytes | None]) -> int:
    used = 0
    for path in paths:
        renamed = False
        while used < len(sources) and not renamed:
            source = sources[used]
            used += 1
            if source is not None:
                try:
                    os.rename(source, path)
                    renamed = True
                except OSError:
                    pass
        if renamed:
            continue
        try:
            os.close(os.open(path, _NEW, 0o600))
        except OSError as exc:
            raise OSError(exc.errno, os.strerror(exc.errno or 0), os.fsdecode(path)) from None
    os.fsync(dir_fd)
    return used


def sync_and_unlink(dir_fd: int, paths: list[bytes]) -> None:
    os.fsync(dir_fd)
    first: OSError | None = None
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            first = first or exc
    if first is not None:
        raise OSError(first.errno, os.strerror(first.errno or 0))


def store(fd: int, tmp: bytes, parts: list[bytes], dest: bytes, reuse: bytes | None,
          mtime: float, datasync: bool = True) -> bool:
    reused = slot = False
    try:
        slot = reuse is not None and reuse == tmp
        if fd < 0 and slot:
            fd = os.open(tmp, _REUSED)
            reused = True
        elif fd < 0 and reuse is not None:
            try:
                os.rename(reuse, tmp)
            except OSError:
                pass
            else:
                try:
                    fd = os.open(tmp, _REUSED)
                    reused = True
                except OSError:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
        if fd < 0:
            fd = os.open(tmp, _NEW, 0o600)
        write_all(fd, parts)
        if reused:
            os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))
        if mtime >= 0:
            os.utime(fd, (mtime, mtime))
        if datasync:
            os.fdatasync(fd)
        fd, closing = -1, fd
        os.close(closing)
        if slot:
            os.link(tmp, dest)
        else:
            os.rename(tmp, dest)
    except BaseException as exc:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, os.strerror(exc.errno or 0), os.fsdecode(tmp)) from None
        raise
    return reused


def list_names(path: str | bytes, limit: int = -1) -> list[str]:
    """The names in directory ``path`` (not ``.`` nor ``..``), in directory order, at most
    ``limit`` of them (all when negative); OSError as os.listdir."""
    if limit < 0:
        return os.listdir(os.fsdecode(path))
    out: list[str] = []
    with os.scandir(os.fsdecode(path)) as entries:
        for entry in entries:
            if len(out) >= limit:
                break
            out.append(entry.name)
    return out


class StorePool:
    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError("a StorePool needs at least one thread")
        self._calls: queue.SimpleQueue[tuple[int, int, bytes, list[bytes], bytes,
                                             bytes | None, float, bool] | None]
        self._calls = queue.SimpleQueue()
        self._done: list[tuple[int, int, bool, float]] = []
        self._lock = threading.Lock()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._threads = [threading.Thread(target=self._work, name="spool-store", daemon=True)
                             for _ in range(threads)]
            for t in self._threads:
                t.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def fileno(self) -> int:
        return self._efd

    def submit(self, token: int, fd: int, tmp: bytes, parts: list[bytes], dest: bytes,
               reuse: bytes | None, mtime: float, datasync: bool = True) -> None:
        if self._closed:
            if fd >= 0:
                os.close(fd)
            raise RuntimeError("StorePool is closed")
        self._calls.put((token, fd, tmp, parts, dest, reuse, mtime, datasync))

    def _work(self) -> None:
        # As the compiled pool's threads: no wake-up preemption of the loop thread that
        # hands a store over (os.sched_setscheduler(0) is this thread on Linux).
        with contextlib.suppress(AttributeError, OSError):
            if os.sched_getscheduler(0) == os.SCHED_OTHER:  # not one an administrator chose
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        while True:
            call = self._calls.get()
            if call is None:
                return
            token, fd, tmp, parts, dest, reuse, mtime, datasync = call
            started = time.monotonic()
            err, reused = 0, False
            try:
                reused = store(fd, tmp, parts, dest, reuse, mtime, datasync)
            except OSError as exc:
                err = exc.errno or 0
            with self._lock:
                first = not self._done
                self._done.append((token, err, reused, time.monotonic() - started))
            if first:
                os.eventfd_write(self._efd, 1)

    def completed(self) -> list[tuple[int, int, bool, float]]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._calls.put(None)
        for t in self._threads:
            t.join()
