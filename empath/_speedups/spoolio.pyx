# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled spool write: the twin of ``spoolio_py.py`` (whose docstring is the reference).

The whole sequence (open or reuse, writev, fdatasync, close, rename or link) runs in one stretch
without the GIL. A receiver's writer threads call it while the event loop thread runs Python;
with one ``os.*`` call per step each thread would need the GIL back five or six times per
message and wait for the busy loop thread every time.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from posix.time cimport timespec
from posix.types cimport off_t

import os

__all__ = ["make_slots", "store", "sync_and_unlink", "write_all"]

cdef extern from "<errno.h>" nogil:
    int errno
    enum: EINTR
    enum: ENOENT

cdef extern from "<fcntl.h>" nogil:
    int c_open "open"(const char *path, int flags, ...)
    enum: O_WRONLY
    enum: O_CREAT
    enum: O_EXCL
    enum: O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int c_close "close"(int fd)
    int ftruncate(int fd, off_t length)
    off_t lseek(int fd, off_t offset, int whence)
    enum: SEEK_CUR
    int fdatasync(int fd)
    int unlink(const char *path)
    int link(const char *old, const char *new)
    int fsync(int fd)

cdef extern from "<stdio.h>" nogil:
    int rename(const char *old, const char *new)

cdef extern from "<string.h>" nogil:
    int strcmp(const char *a, const char *b)

cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/stat.h>" nogil:
    int futimens(int fd, const timespec times[2])

cdef enum:
    IOV_BATCH = 1024


cdef int _write_all(int fd, iovec *iov, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t k
    cdef ssize_t w
    while i < n:
        if iov[i].iov_len == 0:
            i += 1
            continue
        k = n - i
        if k > IOV_BATCH:
            k = IOV_BATCH
        w = writev(fd, iov + i, <int>k)
        if w < 0:
            if errno == EINTR:
                continue
            return -1
        while i < n and <size_t>w >= iov[i].iov_len:
            w -= iov[i].iov_len
            i += 1
        if i < n and w > 0:
            iov[i].iov_base = <char *>iov[i].iov_base + w
            iov[i].iov_len -= w
    return 0


cdef iovec *_vector(list parts, Py_ssize_t n) except NULL:
    """An iovec per part (bytes); the caller frees it."""
    cdef Py_ssize_t i
    cdef iovec *iov = <iovec *>PyMem_Malloc((n if n > 0 else 1) * sizeof(iovec))
    if iov == NULL:
        raise MemoryError()
    cdef bytes part
    try:
        for i in range(n):
            part = parts[i]
            if part is None:
                raise TypeError("parts must hold bytes, not None")
            iov[i].iov_base = PyBytes_AS_STRING(part)
            iov[i].iov_len = <size_t>PyBytes_GET_SIZE(part)
    except BaseException:
        PyMem_Free(iov)
        raise
    return iov


cdef const char **_paths(list items) except NULL:
    """A char* per item (bytes, or None for NULL); the caller frees the array."""
    cdef Py_ssize_t n = len(items)
    cdef Py_ssize_t i
    cdef const char **out = <const char **>PyMem_Malloc((n if n > 0 else 1) * sizeof(char *))
    if out == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            item = items[i]
            out[i] = NULL if item is None else PyBytes_AS_STRING(<bytes?>item)
    except BaseException:
        PyMem_Free(out)
        raise
    return out


def make_slots(int dir_fd, list paths, list sources):
    cdef Py_ssize_t n = len(paths)
    if len(sources) != n:
        raise ValueError("paths and sources differ in length")
    cdef const char **c_paths = _paths(paths)
    cdef const char **c_sources
    try:
        c_sources = _paths(sources)
    except BaseException:
        PyMem_Free(c_paths)
        raise
    cdef Py_ssize_t i
    cdef int fd
    cdef int err = 0
    cdef Py_ssize_t failed = -1
    with nogil:
        for i in range(n):
            if c_sources[i] != NULL and rename(c_sources[i], c_paths[i]) == 0:
                continue
            fd = c_open(c_paths[i], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            if fd < 0:
                err = errno
                failed = i
                break
            c_close(fd)
        if err == 0 and fsync(dir_fd) < 0:
            err = errno
    PyMem_Free(c_paths)
    PyMem_Free(c_sources)
    if err:
        raise OSError(err, os.strerror(err), os.fsdecode(paths[failed]) if failed >= 0 else None)


def sync_and_unlink(int dir_fd, list paths):
    cdef Py_ssize_t n = len(paths)
    cdef const char **c_paths = _paths(paths)
    cdef Py_ssize_t i
    cdef int err = 0
    with nogil:
        if fsync(dir_fd) < 0:
            err = errno
        else:
            for i in range(n):
                if unlink(c_paths[i]) < 0 and errno != ENOENT and err == 0:
                    err = errno
    PyMem_Free(c_paths)
    if err:
        raise OSError(err, os.strerror(err))


def write_all(int fd, list parts):
    cdef Py_ssize_t n = len(parts)
    cdef iovec *iov = _vector(parts, n)
    cdef int err = 0
    with nogil:
        if _write_all(fd, iov, n) < 0:
            err = errno
    PyMem_Free(iov)
    if err:
        raise OSError(err, os.strerror(err))


def store(int fd, bytes tmp, list parts, bytes dest, reuse, double mtime, bint datasync=True):
    cdef Py_ssize_t n = len(parts)
    cdef iovec *iov
    try:
        iov = _vector(parts, n)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    cdef const char *c_tmp = PyBytes_AS_STRING(tmp)
    cdef const char *c_dest = PyBytes_AS_STRING(dest)
    cdef const char *c_reuse = NULL
    if reuse is not None:
        c_reuse = PyBytes_AS_STRING(<bytes?>reuse)
    cdef int err = 0
    cdef int reused = 0
    cdef int slot = 0
    cdef timespec times[2]
    cdef off_t end
    with nogil:
        if c_reuse != NULL and strcmp(c_reuse, c_tmp) == 0:
            # a slot: a file whose name is already durable, written in place
            slot = 1
        if fd < 0 and slot:
            fd = c_open(c_tmp, O_WRONLY | O_CLOEXEC)
            if fd >= 0:
                reused = 1
            else:
                err = errno
        elif fd < 0 and c_reuse != NULL:
            if rename(c_reuse, c_tmp) == 0:
                fd = c_open(c_tmp, O_WRONLY | O_CLOEXEC)
                if fd >= 0:
                    reused = 1
                else:
                    unlink(c_tmp)
        if fd < 0 and err == 0:
            fd = c_open(c_tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            if fd < 0:
                err = errno
        if err == 0 and _write_all(fd, iov, n) < 0:
            err = errno
        if err == 0 and reused:
            end = lseek(fd, 0, SEEK_CUR)
            if end < 0 or ftruncate(fd, end) < 0:
                err = errno
        if err == 0 and mtime >= 0:
            times[0].tv_sec = <long>mtime
            times[0].tv_nsec = <long>((mtime - <long>mtime) * 1e9)
            times[1] = times[0]
            if futimens(fd, times) < 0:
                err = errno
        if err == 0 and datasync and fdatasync(fd) < 0:
            err = errno
        if fd >= 0 and c_close(fd) < 0 and err == 0:
            err = errno
        if err == 0 and slot:
            if link(c_tmp, c_dest) < 0:
                err = errno
        elif err == 0 and rename(c_tmp, c_dest) < 0:
            err = errno
    PyMem_Free(iov)
    if err:
        raise OSError(err, os.strerror(err), os.fsdecode(tmp))
    return bool(reused)
