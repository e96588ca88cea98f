# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled spool write: the twin of ``spoolio_py.py`` (whose docstring is the reference).

The whole sequence (open or reuse, writev, fdatasync, close, rename or link) runs in one stretch
without the GIL. A receiver's writer threads call it while the event loop thread runs Python;
with one ``os.*`` call per step each thread would need the GIL back five or six times per
message and wait for the busy loop thread every time.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport PyObject, Py_DECREF, Py_INCREF
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcpy, strcmp, strlen
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.types cimport off_t

import os

__all__ = ["StorePool", "list_names", "make_slots", "store", "sync_and_unlink", "write_all"]

cdef extern from "<dirent.h>" nogil:
    ctypedef struct DIR:
        pass
    struct dirent:
        char d_name[256]
    DIR *opendir(const char *name)
    dirent *readdir(DIR *dirp)
    int closedir(DIR *dirp)

cdef extern from "Python.h":
    object PyUnicode_DecodeFSDefaultAndSize(const char *s, Py_ssize_t size)

cdef extern from "<errno.h>" nogil:
    int errno
    enum: EINTR
    enum: ENOENT
    enum: ENOMEM

cdef extern from "<fcntl.h>" nogil:
    int c_open "open"(const char *path, int flags, ...)
    enum: O_WRONLY
    enum: O_CREAT
    enum: O_EXCL
    enum: O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int c_close "close"(int fd)
    ssize_t c_read "read"(int fd, void *buf, size_t count)
    ssize_t c_write "write"(int fd, const void *buf, size_t count)
    int ftruncate(int fd, off_t length)
    off_t lseek(int fd, off_t offset, int whence)
    enum: SEEK_CUR
    int fdatasync(int fd)
    int unlink(const char *path)
    int link(const char *old, const char *new)
    int fsync(int fd)

cdef extern from "<stdio.h>" nogil:
    int rename(const char *old, const char *new)

cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/stat.h>" nogil:
    int futimens(int fd, const timespec times[2])

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum: EFD_NONBLOCK
    enum: EFD_CLOEXEC

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t *thread, const void *attr,
                       void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *mutex, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
    int pthread_cond_init(pthread_cond_t *cond, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *cond)
    int pthread_cond_wait(pthread_cond_t *cond, pthread_mutex_t *mutex)
    int pthread_cond_signal(pthread_cond_t *cond)
    int pthread_cond_broadcast(pthread_cond_t *cond)

cdef extern from "<sched.h>" nogil:
    struct sched_param:
        int sched_priority
    int sched_setscheduler(int pid, int policy, const sched_param *param)
    int sched_getscheduler(int pid)
    enum: SCHED_OTHER

cdef enum:
    IOV_BATCH = 1024
    LINUX_SCHED_BATCH = 3  # SCHED_BATCH (linux/sched.h), which <sched.h> hides without _GNU_SOURCE


cdef struct Job:
    # One call of store: its arguments, then its result.
    Job *next
    long long token
    PyObject *keep  # the Python objects the pointers below point into (a StorePool job)
    int fd
    const char *tmp
    const char *dest
    const char *reuse
    iovec *iov
    Py_ssize_t niov
    double mtime
    int datasync
    int err
    int reused
    double seconds


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


def list_names(path, Py_ssize_t limit=-1):
    """See spoolio_py.list_names. The whole readdir loop runs without the GIL: os.listdir
    and os.scandir release and take it back once per entry, and a thread listing a large
    directory then convoys with the event loop thread (each of its turns waits for the GIL)."""
    cdef bytes raw = os.fsencode(path)
    cdef const char *c_path = raw
    cdef DIR *d
    cdef dirent *e
    cdef char *buf = NULL
    cdef char *grown
    cdef size_t used = 0, cap = 0, n
    cdef Py_ssize_t count = 0
    cdef int err = 0
    cdef const char *name
    with nogil:
        d = opendir(c_path)
        if d == NULL:
            err = errno
        else:
            while limit < 0 or count < limit:
                e = readdir(d)
                if e == NULL:
                    break
                name = e.d_name
                if name[0] == 46 and (name[1] == 0 or (name[1] == 46 and name[2] == 0)):
                    continue  # "." and ".."
                n = strlen(name) + 1
                if used + n > cap:
                    cap = (used + n) * 2 + 4096
                    grown = <char *>realloc(buf, cap)
                    if grown == NULL:
                        err = ENOMEM
                        break
                    buf = grown
                memcpy(buf + used, name, n)
                used += n
                count += 1
            closedir(d)
    if err:
        free(buf)
        raise OSError(err, os.strerror(err), os.fsdecode(raw))
    out = []
    cdef size_t at = 0
    try:
        while at < used:
            n = strlen(buf + at)
            out.append(PyUnicode_DecodeFSDefaultAndSize(buf + at, n))  # as os.listdir
            at += n + 1
    finally:
        free(buf)
    return out


def make_slots(int dir_fd, list paths, list sources):
    cdef Py_ssize_t n = len(paths)
    cdef Py_ssize_t m = len(sources)
    cdef const char **c_paths = _paths(paths)
    cdef const char **c_sources
    try:
        c_sources = _paths(sources)
    except BaseException:
        PyMem_Free(c_paths)
        raise
    cdef Py_ssize_t i
    cdef Py_ssize_t used = 0
    cdef int fd
    cdef int err = 0
    cdef Py_ssize_t failed = -1
    cdef bint renamed
    with nogil:
        for i in range(n):
            renamed = False
            while used < m and not renamed:
                if c_sources[used] != NULL and rename(c_sources[used], c_paths[i]) == 0:
                    renamed = True
                used += 1
            if renamed:
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
    return used


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


cdef void _store_job(Job *j) noexcept nogil:
    """The whole of ``store`` for one job, without the GIL: sets ``err`` (0: done) and
    ``reused``; the descriptor is closed in every case."""
    cdef int fd = j.fd
    cdef int err = 0
    cdef int reused = 0
    cdef int slot = 0
    cdef timespec times[2]
    cdef off_t end
    if j.reuse != NULL and strcmp(j.reuse, j.tmp) == 0:
        # a slot: a file whose name is already durable, written in place
        slot = 1
    if fd < 0 and slot:
        fd = c_open(j.tmp, O_WRONLY | O_CLOEXEC)
        if fd >= 0:
            reused = 1
        else:
            err = errno
    elif fd < 0 and j.reuse != NULL:
        if rename(j.reuse, j.tmp) == 0:
            fd = c_open(j.tmp, O_WRONLY | O_CLOEXEC)
            if fd >= 0:
                reused = 1
            else:
                unlink(j.tmp)
    if fd < 0 and err == 0:
        fd = c_open(j.tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        if fd < 0:
            err = errno
    if err == 0 and _write_all(fd, j.iov, j.niov) < 0:
        err = errno
    if err == 0 and reused:
        end = lseek(fd, 0, SEEK_CUR)
        if end < 0 or ftruncate(fd, end) < 0:
            err = errno
    if err == 0 and j.mtime >= 0:
        times[0].tv_sec = <long>j.mtime
        times[0].tv_nsec = <long>((j.mtime - <long>j.mtime) * 1e9)
        times[1] = times[0]
        if futimens(fd, times) < 0:
            err = errno
    if err == 0 and j.datasync and fdatasync(fd) < 0:
        err = errno
    if fd >= 0 and c_close(fd) < 0 and err == 0:
        err = errno
    if err == 0 and slot:
        if link(j.tmp, j.dest) < 0:
            err = errno
    elif err == 0 and rename(j.tmp, j.dest) < 0:
        err = errno
    j.err = err
    j.reused = reused


cdef int _fill(Job *j, int fd, bytes tmp, list parts, bytes dest, reuse, double mtime,
               bint datasync) except -1:
    """Point ``j`` at the arguments (which must outlive the job); closes ``fd`` on error."""
    try:
        j.iov = _vector(parts, len(parts))
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    j.niov = len(parts)
    j.fd = fd
    j.tmp = PyBytes_AS_STRING(tmp)
    j.dest = PyBytes_AS_STRING(dest)
    j.reuse = NULL if reuse is None else PyBytes_AS_STRING(<bytes?>reuse)
    j.mtime = mtime
    j.datasync = datasync
    return 0


def store(int fd, bytes tmp, list parts, bytes dest, reuse, double mtime, bint datasync=True):
    cdef Job j
    j.keep = NULL
    _fill(&j, fd, tmp, parts, dest, reuse, mtime, datasync)
    with nogil:
        _store_job(&j)
    PyMem_Free(j.iov)
    if j.err:
        raise OSError(j.err, os.strerror(j.err), os.fsdecode(tmp))
    return bool(j.reused)


cdef struct Pool:
    pthread_mutex_t lock
    pthread_cond_t wanted
    Job *head  # queued jobs, oldest first
    Job *tail
    Job *done_head  # finished jobs, for completed()
    Job *done_tail
    int stopping
    int efd


cdef double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef void *_pool_thread(void *arg) noexcept nogil:
    cdef Pool *p = <Pool *>arg
    cdef Job *j
    cdef bint wake
    cdef double started
    cdef unsigned long long one = 1
    cdef sched_param param
    param.sched_priority = 0
    if sched_getscheduler(0) == SCHED_OTHER:  # not a policy an administrator chose
        sched_setscheduler(0, LINUX_SCHED_BATCH, &param)
    while True:
        pthread_mutex_lock(&p.lock)
        while p.head == NULL and not p.stopping:
            pthread_cond_wait(&p.wanted, &p.lock)
        j = p.head
        if j == NULL:  # stopping, and every queued job is done
            pthread_mutex_unlock(&p.lock)
            return NULL
        p.head = j.next
        if p.head == NULL:
            p.tail = NULL
        pthread_mutex_unlock(&p.lock)
        started = _now()
        _store_job(j)
        j.seconds = _now() - started
        j.next = NULL
        pthread_mutex_lock(&p.lock)
        wake = p.done_head == NULL
        if p.done_tail != NULL:
            p.done_tail.next = j
        else:
            p.done_head = j
        p.done_tail = j
        pthread_mutex_unlock(&p.lock)
        if wake:  # the first finished job since completed() last ran
            c_write(p.efd, &one, sizeof(one))


cdef class StorePool:
    """See spoolio_py.StorePool: threads of C that run ``store`` calls without ever taking
    the GIL, reporting finished calls through an eventfd."""

    cdef Pool *_p
    cdef pthread_t *_threads
    cdef int _count
    cdef bint _closed

    def __cinit__(self, int threads):
        if threads < 1:
            raise ValueError("a StorePool needs at least one thread")
        self._p = <Pool *>calloc(1, sizeof(Pool))
        self._threads = <pthread_t *>calloc(threads, sizeof(pthread_t))
        if self._p == NULL or self._threads == NULL:
            raise MemoryError()
        self._p.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self._p.efd < 0:
            raise OSError(errno, os.strerror(errno))
        pthread_mutex_init(&self._p.lock, NULL)
        pthread_cond_init(&self._p.wanted, NULL)
        # The threads never run Python, so signals must not be delivered to them.
        import signal
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        cdef int err = 0
        try:
            while self._count < threads:
                err = pthread_create(&self._threads[self._count], NULL, _pool_thread,
                                     <void *>self._p)
                if err:
                    break
                self._count += 1
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if err:
            self.close()
            raise OSError(err, os.strerror(err))

    def fileno(self):
        """The eventfd that becomes readable when calls have finished."""
        return self._p.efd

    def submit(self, long long token, int fd, bytes tmp, list parts, bytes dest, reuse,
               double mtime, bint datasync=True):
        """Queue one ``store`` call; its result comes back from ``completed`` under
        ``token``. The bytes objects are kept alive until then."""
        if self._closed:
            if fd >= 0:
                os.close(fd)
            raise RuntimeError("StorePool is closed")
        cdef Job *j = <Job *>calloc(1, sizeof(Job))
        if j == NULL:
            if fd >= 0:
                os.close(fd)
            raise MemoryError()
        keep = (tmp, parts, dest, reuse)
        try:
            _fill(j, fd, tmp, parts, dest, reuse, mtime, datasync)
        except BaseException:
            free(j)
            raise
        Py_INCREF(keep)
        j.keep = <PyObject *>keep
        j.token = token
        with nogil:
            pthread_mutex_lock(&self._p.lock)
            if self._p.tail != NULL:
                self._p.tail.next = j
            else:
                self._p.head = j
            self._p.tail = j
            pthread_cond_signal(&self._p.wanted)
            pthread_mutex_unlock(&self._p.lock)

    def completed(self):
        """The calls finished since the last call: (token, errno or 0, whether a file was
        reused, seconds) each, in the order they finished."""
        cdef unsigned long long value
        c_read(self._p.efd, &value, sizeof(value))  # reset first: no wake-up is lost
        pthread_mutex_lock(&self._p.lock)
        cdef Job *j = self._p.done_head
        self._p.done_head = self._p.done_tail = NULL
        pthread_mutex_unlock(&self._p.lock)
        cdef Job *after
        out = []
        while j != NULL:
            after = j.next
            out.append((j.token, j.err, bool(j.reused), j.seconds))
            Py_DECREF(<object>j.keep)
            PyMem_Free(j.iov)
            free(j)
            j = after
        return out

    def close(self):
        """Finish every queued call, then stop the threads (``completed`` still reports
        what finished)."""
        if self._closed:
            return
        self._closed = True
        cdef int i
        with nogil:
            pthread_mutex_lock(&self._p.lock)
            self._p.stopping = 1
            pthread_cond_broadcast(&self._p.wanted)
            pthread_mutex_unlock(&self._p.lock)
            for i in range(self._count):
                pthread_join(self._threads[i], NULL)

    def __dealloc__(self):
        if self._p == NULL:
            return
        if not self._closed:
            self.close()
        self.completed()
        c_close(self._p.efd)
        pthread_cond_destroy(&self._p.wanted)
        pthread_mutex_destroy(&self._p.lock)
        free(self._threads)
        free(self._p)
