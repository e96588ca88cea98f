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

``make_slots(dir_fd, paths, sources)`` makes a batch of slots: for each path, rename its source
(a recycled file's path, or None) to it, or, when there is none or that rename fails (another
receiver took the file), create it (O_CREAT|O_EXCL, 0600); then fsync ``dir_fd`` (the slots'
directory). OSError (naming the path when a creation failed) leaves the paths made so far for
the caller to remove.

``sync_and_unlink(dir_fd, paths)`` fsyncs ``dir_fd``, then (only if that succeeded) unlinks every
path, a missing one included without complaint; OSError with the first other errno after trying
them all.

The compiled twin runs each of these whole without the GIL.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["make_slots", "store", "sync_and_unlink", "write_all"]

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


def make_slots(dir_fd: int, paths: list[bytes], sources: list[bytes | None]) -> None:
    if len(sources) != len(paths):
        raise ValueError("paths and sources differ in length")
    for path, source in zip(paths, sources, strict=True):
        if source is not None:
            try:
                os.rename(source, path)
                continue
            except OSError:
                pass
        try:
            os.close(os.open(path, _NEW, 0o600))
        except OSError as exc:
            raise OSError(exc.errno, os.strerror(exc.errno or 0), os.fsdecode(path)) from None
    os.fsync(dir_fd)


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
