# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled DATA-phase decoder and client dot-stuffing; the twin of ``datareader_py.py``.

Owns RFC 5321 §4.5.2 transparency on both sides and the server's SMTP-smuggling defence: only
``CRLF . CRLF`` ends the data (or ``. CRLF`` as the very first line). The state machine, the
line model and every attribute after every ``feed`` are those of the twin (whose docstrings
are the reference); here each chunk is scanned with ``memchr`` for CR and LF, runs of ordinary
octets are never touched one by one, and a chunk that needs no change is returned as is.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memchr, memcpy

__all__ = ["DataReader", "dot_stuff", "has_bare_eol"]

cdef enum:
    S_BOL = 0    # at a line start (after a real CRLF, or at the very beginning)
    S_MID = 1    # inside a line
    S_CR = 2     # the previous octet was a CR (already output): CRLF or bare CR?
    S_DOT = 3    # a line-start "." is held back: stuffing dot, terminator, or content?
    S_DOTCR = 4  # a line-start "." and a CR are held back: terminator unless no LF follows

cdef enum:
    CR = 13
    LF = 10
    DOT = 46


cdef struct Out:
    # The chunk's output when it differs from a slice of the input; allocated on first use,
    # freed before feed() returns (the reader keeps no buffer between chunks).
    char* buf
    Py_ssize_t len
    Py_ssize_t cap


cdef inline int _put(Out* o, const char* src, Py_ssize_t k) except -1:
    if k <= 0:
        return 0
    if o.buf == NULL:
        o.buf = <char*>PyMem_Malloc(o.cap)
        if o.buf == NULL:
            raise MemoryError()
    memcpy(o.buf + o.len, src, k)
    o.len += k
    return 0


cdef inline bytes _as_bytes(object data):
    if type(data) is bytes:
        return <bytes>data
    return bytes(memoryview(data))


cdef class DataReader:
    """Server side of DATA: turns the dot-stuffed stream back into the message.

    See ``empath._speedups.datareader_py.DataReader`` for the full contract; this class
    behaves identically.
    """

    cdef readonly Py_ssize_t max_size
    cdef readonly Py_ssize_t max_line
    cdef readonly str bare_eol
    cdef readonly bint done
    cdef readonly bytes rest
    cdef readonly Py_ssize_t size
    cdef readonly bint too_big
    cdef readonly bint bad_eol
    cdef readonly bint line_too_long
    cdef bint _normalize
    cdef int _state
    cdef Py_ssize_t _lstart  # output offset at which the current line started

    def __init__(self, Py_ssize_t max_size, str bare_eol="reject", Py_ssize_t max_line=1000):
        if bare_eol != "reject" and bare_eol != "normalize":
            raise ValueError(f"bare_eol must be 'reject' or 'normalize', not {bare_eol!r}")
        if max_size < 0 or max_line < 0:
            raise ValueError("max_size and max_line must not be negative")
        self.max_size = max_size
        self.max_line = max_line
        self.bare_eol = bare_eol
        self.done = False
        self.rest = b""
        self.size = 0
        self.too_big = False
        self.bad_eol = False
        self.line_too_long = False
        self._normalize = bare_eol == "normalize"
        self._state = S_BOL
        self._lstart = 0

    def feed(self, chunk):
        """Consume ``chunk``; return the message octets it carried."""
        if self.done:
            raise ValueError("DataReader.feed() after the end of the data")
        cdef bytes data = _as_bytes(chunk)
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef const char* q
        cdef Py_ssize_t pos = 0, seg = 0, nl, cr, end
        # ``seg``: start of the current unchanged run of input; ``base``: its output offset.
        cdef Py_ssize_t base = self.size
        cdef Py_ssize_t lstart = self._lstart
        cdef Py_ssize_t max_line = self.max_line
        cdef int state = self._state
        cdef bint keep = not self.too_big
        cdef bint normalize = self._normalize
        cdef bint bad = self.bad_eol
        cdef bint too_long = self.line_too_long
        cdef bint done = False
        cdef unsigned char c
        cdef Out o
        cdef object result
        # Worst case: every octet doubled by normalization, plus a released ". CR".
        o.buf = NULL
        o.len = 0
        o.cap = 2 * n + 2
        try:
            while pos < n:
                if state == S_MID:
                    q = <const char*>memchr(p + pos, LF, n - pos)
                    nl = q - p if q != NULL else n
                    q = <const char*>memchr(p + pos, CR, nl - pos)
                    if q == NULL:
                        if nl == n:
                            pos = n
                            break
                        # A bare LF.
                        bad = True
                        pos = nl + 1
                        if normalize:
                            if keep:
                                _put(&o, p + seg, nl - seg)
                                _put(&o, b"\r", 1)
                            base += nl - seg + 1
                            seg = nl
                            end = base + pos - seg
                            if end - lstart > max_line:
                                too_long = True
                            lstart = end
                        continue
                    cr = q - p
                    if cr + 1 == nl and nl < n:
                        # CRLF: the end of an ordinary line.
                        pos = nl + 1
                        end = base + pos - seg
                        if end - lstart > max_line:
                            too_long = True
                        lstart = end
                        if pos < n and p[pos] != DOT:
                            continue
                        state = S_BOL
                    else:
                        pos = cr + 1
                        state = S_CR
                elif state == S_BOL:
                    if p[pos] == DOT:
                        # Hold the dot back until the next octet says what it is.
                        if keep:
                            _put(&o, p + seg, pos - seg)
                        base += pos - seg
                        pos += 1
                        seg = pos
                        state = S_DOT
                    else:
                        state = S_MID
                elif state == S_CR:
                    if p[pos] == LF:
                        pos += 1
                        end = base + pos - seg
                        if end - lstart > max_line:
                            too_long = True
                        lstart = end
                        state = S_BOL
                    else:
                        # A bare CR; the octet after it is looked at again in S_MID.
                        bad = True
                        if normalize:
                            if keep:
                                _put(&o, p + seg, pos - seg)
                                _put(&o, b"\n", 1)
                            base += pos - seg + 1
                            seg = pos
                            if base - lstart > max_line:
                                too_long = True
                            lstart = base
                        state = S_MID
                elif state == S_DOT:
                    c = <unsigned char>p[pos]
                    if c == CR:
                        # Hold the CR too: ". CRLF" would be the terminator.
                        pos += 1
                        seg = pos
                        state = S_DOTCR
                    elif c == LF:
                        # ". LF": not a terminator, and the dot is content, not stuffing.
                        if keep:
                            _put(&o, b".", 1)
                        base += 1
                        state = S_MID
                    else:
                        # A stuffing dot (RFC 5321 §4.5.2): it stays dropped.
                        state = S_MID
                else:  # S_DOTCR
                    if p[pos] == LF:
                        # CRLF . CRLF: the end of the data.
                        done = True
                        self.rest = PyBytes_FromStringAndSize(p + pos + 1, n - pos - 1)
                        n = pos
                        break
                    # ". CR" + something else: a bare CR after a content dot.
                    if keep:
                        _put(&o, b".\r", 2)
                    base += 2
                    state = S_CR
            base += n - seg
            self.size = base
            self._state = state
            self._lstart = lstart
            self.bad_eol = bad
            self.line_too_long = too_long
            self.done = done
            if base > self.max_size:
                self.too_big = True
                return b""
            if o.len == 0:
                if seg == 0 and n == PyBytes_GET_SIZE(data):
                    return data
                return PyBytes_FromStringAndSize(p + seg, n - seg)
            _put(&o, p + seg, n - seg)
            result = PyBytes_FromStringAndSize(o.buf, o.len)
            return result
        finally:
            if o.buf != NULL:
                PyMem_Free(o.buf)


cdef bytes _crlf_lines(bytes src):
    """``src`` with every bare LF and bare CR made CRLF; ``src`` itself when it has none."""
    cdef const char* p = PyBytes_AS_STRING(src)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(src)
    cdef const char* stop = p + n
    cdef const char* q = p
    cdef Py_ssize_t bare = 0, i = 0
    cdef bytes out
    cdef char* o
    cdef char c
    # Pass 1 (memchr): each bare LF or bare CR needs one more octet.
    while True:
        q = <const char*>memchr(q, LF, stop - q)
        if q == NULL:
            break
        if q == p or (q - 1)[0] != CR:
            bare += 1
        q += 1
    q = p
    while True:
        q = <const char*>memchr(q, CR, stop - q)
        if q == NULL:
            break
        if q + 1 == stop or q[1] != LF:
            bare += 1
        q += 1
    if not bare:
        return src
    # Pass 2 (rare: the message has bare line ends): copy, each line end as CRLF.
    out = PyBytes_FromStringAndSize(NULL, n + bare)
    o = PyBytes_AS_STRING(out)
    while i < n:
        c = p[i]
        if c == CR or c == LF:
            o[0] = CR
            o[1] = LF
            o += 2
            i += 2 if (c == CR and i + 1 < n and p[i + 1] == LF) else 1
        else:
            o[0] = c
            o += 1
            i += 1
    return out


def has_bare_eol(data):
    """Whether ``data`` holds a bare CR or a bare LF (see the twin): every LF found with
    ``memchr`` must follow a CR, and every CR must precede an LF."""
    cdef bytes src = _as_bytes(data)
    cdef const char* p = PyBytes_AS_STRING(src)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(src)
    cdef const char* stop = p + n
    cdef const char* q = p
    while q < stop:
        q = <const char*>memchr(q, LF, stop - q)
        if q == NULL:
            break
        if q == p or (q - 1)[0] != CR:
            return True
        q += 1
    q = p
    while q < stop:
        q = <const char*>memchr(q, CR, stop - q)
        if q == NULL:
            break
        if q + 1 == stop or q[1] != LF:
            return True
        q += 1
    return False


def dot_stuff(data, bint at_line_start=True, bint crlf=False):
    """Client side of RFC 5321 §4.5.2: double the leading dot of every line.

    Lines are separated by CRLF only; a dot at offset 0 counts when ``at_line_start`` (the data
    begins a line). The terminator is not appended. To stuff a message in pieces, pass
    ``at_line_start=previous.endswith(b"\\r\\n")`` and do not split a CRLF between pieces.

    With ``crlf`` every bare LF and every bare CR first becomes CRLF; see the twin.
    """
    cdef bytes src = _as_bytes(data)
    if crlf:
        src = _crlf_lines(src)
    cdef const char* p = PyBytes_AS_STRING(src)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(src)
    cdef const char* stop = p + n
    cdef const char* q
    cdef const char* run
    cdef Py_ssize_t extra = 0, k
    cdef bytes out
    cdef char* o
    cdef bint first = at_line_start and n > 0 and p[0] == DOT
    # Pass 1: count the dots to double ("CRLF ." and perhaps offset 0).
    q = p
    while True:
        q = <const char*>memchr(q, LF, stop - q)
        if q == NULL or q + 1 >= stop:
            break
        if q[1] == DOT and q > p and (q - 1)[0] == CR:
            extra += 1
        q += 1
    if not extra and not first:
        return src
    out = PyBytes_FromStringAndSize(NULL, n + extra + first)
    o = PyBytes_AS_STRING(out)
    if first:
        o[0] = DOT
        o += 1
    # Pass 2: copy, inserting a dot before each counted one.
    run = p
    q = p
    while extra:
        q = <const char*>memchr(q, LF, stop - q)
        if q[1] == DOT and q > p and (q - 1)[0] == CR:
            k = q + 1 - run
            memcpy(o, run, k)
            o += k
            o[0] = DOT
            o += 1
            run = q + 1
            extra -= 1
        q += 1
    memcpy(o, run, stop - run)
    return out
