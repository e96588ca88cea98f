# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled SMTP command-line parser; the twin of ``cmdparse_py.py``.

Owns the same grammar as its twin (RFC 5321 §4.1.1-4.1.3, RFC 6531, RFC 3461 xtext) and
must behave identically, down to the text of each error: the texts and the exception class
come from ``errors.py``. Here the work is done by walking ``const unsigned char*`` buffers
once, with no intermediate slices; Python objects are created only for the results.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Contains, PyDict_SetItem
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcmp

from empath._speedups import errors as E
from empath._speedups.errors import CommandSyntaxError

__all__ = ["CommandSyntaxError", "decode_xtext", "encode_xtext", "parse_path", "split_command"]

cdef extern from "Python.h":
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL

cdef enum:
    # Limits: RFC 5321 §4.5.3.1.3 (path, brackets included), §4.5.3.1.1 (local part),
    # §4.5.3.1.2 (domain), RFC 1035 §2.3.4 (ASCII label).
    MAX_PATH = 256
    MAX_LOCAL = 64
    MAX_DOMAIN = 255
    MAX_LABEL = 63

cdef enum:
    # Character classes, one bit each, in a 256-entry table built at import.
    C_ALNUM = 1     # ASCII letter or digit
    C_ATEXT = 2     # atext (RFC 5321 §4.1.2 via RFC 5322 §3.2.3)
    C_QTEXT = 4     # qtextSMTP (%d32-33 / %d35-91 / %d93-126), or non-ASCII
    C_VALUE = 8     # esmtp-value octet (%d33-60 / %d62-126); also the xtext alphabet
    C_HEX = 16      # HEXDIG, either case
    C_XTEXT = 32    # xtext octet that needs no escape (%d33-42 / %d44-60 / %d62-126)
    C_CTL = 64      # C0 control or DEL
    C_HIGH = 128    # non-ASCII octet: UTF8-non-ascii under SMTPUTF8 (RFC 6531 §3.3)

cdef unsigned char CLS[256]


cdef void _init_classes():
    cdef int c
    for c in range(256):
        CLS[c] = 0
        if (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122):
            CLS[c] |= C_ALNUM | C_ATEXT
        if (48 <= c <= 57) or (65 <= c <= 70) or (97 <= c <= 102):
            CLS[c] |= C_HEX
        if c < 32 or c == 127:
            CLS[c] |= C_CTL
        if c >= 128:
            CLS[c] |= C_HIGH | C_ATEXT | C_QTEXT
        if 32 <= c <= 126 and c != 34 and c != 92:
            CLS[c] |= C_QTEXT
        if 33 <= c <= 126 and c != 61:
            CLS[c] |= C_VALUE
            if c != 43:
                CLS[c] |= C_XTEXT
    for c in b"!#$%&'*+-/=?^_`{|}~":
        CLS[c] |= C_ATEXT


_init_classes()

# Verbs the session knows get a shared str each, so the hot path allocates no verb string.
cdef tuple _VERBS = (
    "HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "EXPN",
    "HELP", "STARTTLS", "AUTH", "ETRN", "LHLO",
)
cdef bytes _VERBS_B = b"".join([v.encode("ascii").ljust(8, b"\0") for v in _VERBS])
cdef Py_ssize_t _NVERBS = len(_VERBS)
cdef const char* POSTMASTER = b"POSTMASTER"


cdef inline unsigned char _upper(unsigned char c) nogil:
    if 97 <= c <= 122:
        return c - 32
    return c


cdef inline bytes _as_bytes(object data):
    if type(data) is bytes:
        return <bytes>data
    return bytes(memoryview(data))


cdef inline str _as_str(object s):
    # An exact str: a subclass instance is neither accepted by ``cdef str`` nor compact.
    if type(s) is str:
        return <str>s
    if isinstance(s, str):
        return str.__str__(s)
    raise TypeError(f"expected str, not {type(s).__name__}")


def split_command(line):
    """Split one command line (without its CRLF) into ``(VERB, argument)``.

    Trailing spaces and tabs are stripped first. A line that is then empty gives ``("", b"")``.
    The verb runs up to the first space and is returned upper-cased; the argument is everything
    after that one space (further leading spaces are kept: RFC 5321 allows exactly one). A verb
    that is not made only of ASCII letters and digits (a leading space, a tab, a control or a
    non-ASCII byte) gives ``("?", b"")``: an unrecognised command, which the session answers
    with 500.
    """
    cdef bytes data = _as_bytes(line)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i, vlen, k
    cdef unsigned char up[8]
    cdef const char* table
    while n > 0 and (p[n - 1] == 32 or p[n - 1] == 9):
        n -= 1
    if n == 0:
        return "", b""
    vlen = 0
    while vlen < n and p[vlen] != 32:
        if not (CLS[p[vlen]] & C_ALNUM):
            return "?", b""
        vlen += 1
    if vlen == 0:
        return "?", b""
    if vlen + 1 < n:
        arg = PyBytes_FromStringAndSize(<const char*>p + vlen + 1, n - vlen - 1)
    else:
        arg = b""
    if vlen <= 8:
        for i in range(8):
            up[i] = _upper(p[i]) if i < vlen else 0
        table = PyBytes_AS_STRING(_VERBS_B)
        for k in range(_NVERBS):
            if memcmp(table + 8 * k, up, 8) == 0:
                return _VERBS[k], arg
    return PyUnicode_DecodeASCII(<const char*>p, vlen, NULL).upper(), arg


cdef Py_ssize_t _find_path_end(const unsigned char* p, Py_ssize_t n, Py_ssize_t lt) except -1:
    """Index of the ``>`` closing the path opened at ``lt``; quoted strings may hold ``<>``."""
    cdef Py_ssize_t j = lt + 1
    cdef bint in_quote = False
    cdef unsigned char c
    while j < n:
        c = p[j]
        if in_quote:
            if c == 92:  # quoted-pair: skip the escaped octet
                j += 2
                continue
            if c == 34:
                in_quote = False
        elif c == 34:
            in_quote = True
        elif c == 62:
            return j
        elif c == 60:
            raise CommandSyntaxError(E.E_UNBALANCED)
        j += 1
    raise CommandSyntaxError(E.E_UNTERMINATED if in_quote else E.E_UNBALANCED)


cdef dict _parse_params(const unsigned char* p, Py_ssize_t n, Py_ssize_t i):
    """Mail-parameters / Rcpt-parameters (RFC 5321 §4.1.2), separated by runs of spaces."""
    cdef dict params = {}
    cdef Py_ssize_t ks, ke, vs
    cdef object name, val
    while True:
        while i < n and p[i] == 32:
            i += 1
        if i >= n:
            return params
        ks = i
        # esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
        if not (CLS[p[i]] & C_ALNUM):
            raise CommandSyntaxError(E.E_PARAM)
        i += 1
        while i < n and ((CLS[p[i]] & C_ALNUM) or p[i] == 45):
            i += 1
        ke = i
        if i < n and p[i] != 32 and p[i] != 61:
            raise CommandSyntaxError(E.E_PARAM)
        name = PyUnicode_DecodeASCII(<const char*>p + ks, ke - ks, NULL).upper()
        val = None
        if i < n and p[i] == 61:
            i += 1
            vs = i
            while i < n and p[i] != 32:
                if not (CLS[p[i]] & C_VALUE):
                    raise CommandSyntaxError(E.e_value(name))
                i += 1
            if i == vs:
                raise CommandSyntaxError(E.e_value(name))
            val = PyUnicode_DecodeASCII(<const char*>p + vs, i - vs, NULL)
        if PyDict_Contains(params, name):
            raise CommandSyntaxError(E.e_duplicate(name))
        PyDict_SetItem(params, name, val)


cdef bint _domain_ok(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Domain = sub-domain *("." sub-domain); sub-domain = Let-dig [Ldh-str] (§4.1.2)."""
    cdef Py_ssize_t i = 0, start
    cdef bint ascii
    cdef unsigned char c
    if n == 0:
        return False
    while True:
        start = i
        ascii = True
        while i < n and p[i] != 46:
            c = p[i]
            if CLS[c] & C_HIGH:
                ascii = False
            elif not (CLS[c] & C_ALNUM) and c != 45:
                return False
            i += 1
        if i == start or p[start] == 45 or p[i - 1] == 45:
            return False
        if ascii and i - start > MAX_LABEL:
            return False
        if i == n:
            return True
        i += 1  # the dot; a trailing one leaves an empty label and fails above
        if i == n:
            return False


cdef bint _ipv4_ok(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """IPv4-address-literal: four Snum (1*3DIGIT, 0-255) joined by dots."""
    cdef Py_ssize_t i = 0, digits
    cdef int part, value
    for part in range(4):
        if part:
            if i >= n or p[i] != 46:
                return False
            i += 1
        digits = 0
        value = 0
        while i < n and 48 <= p[i] <= 57:
            value = value * 10 + (p[i] - 48)
            digits += 1
            if digits > 3:
                return False
            i += 1
        if digits == 0 or value > 255:
            return False
    return i == n


cdef bint _ipv6_ok(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """IPv6-addr of RFC 5321 §4.1.3 (full, compressed, and with a trailing IPv4 part).

    A compressed form may hold at most 6 groups besides the "::" (4 with an IPv4 tail);
    a full form exactly 8 (6 with an IPv4 tail).
    """
    cdef int full = 8, comp = 6, groups = 0
    cdef Py_ssize_t end = n, i = 0, idx, g
    cdef bint dbl = False
    if memchr(p, 46, n) != NULL:
        idx = n - 1
        while idx >= 0 and p[idx] != 58:
            idx -= 1
        if idx < 0 or not _ipv4_ok(p + idx + 1, n - idx - 1):
            return False
        full = 6
        comp = 4
        end = idx + 1 if idx >= 1 and p[idx - 1] == 58 else idx
    if end >= 2 and p[0] == 58 and p[1] == 58:
        dbl = True
        i = 2
    while i < end:
        g = 0
        while i < end and g < 5 and (CLS[p[i]] & C_HEX):
            i += 1
            g += 1
        if g == 0 or g > 4:
            return False
        groups += 1
        if i == end:
            break
        if p[i] != 58:
            return False
        i += 1
        if i < end and p[i] == 58:
            if dbl:
                return False
            dbl = True
            i += 1
        elif i == end:
            return False
    if dbl:
        return groups <= comp
    return groups == full


cdef bint _address_literal_ok(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """``[1.2.3.4]`` or ``[IPv6:...]``; no other General-address-literal tag is registered."""
    if n < 2 or p[n - 1] != 93:
        return False
    p += 1
    n -= 2
    if (n >= 5 and _upper(p[0]) == 73 and _upper(p[1]) == 80 and _upper(p[2]) == 86
            and p[3] == 54 and p[4] == 58):
        return _ipv6_ok(p + 5, n - 5)
    return _ipv4_ok(p, n)


cdef Py_ssize_t _strip_route(const unsigned char* p, Py_ssize_t n) except -1:
    """Length of an RFC 5321 source route (``@a,@b:``) at ``p``, to be dropped (§4.1.2
    says it SHOULD be ignored); validates each hop."""
    cdef const unsigned char* colon = <const unsigned char*>memchr(p, 58, n)
    cdef Py_ssize_t end, i = 0, j
    if colon == NULL:
        raise CommandSyntaxError(E.E_ROUTE)
    end = colon - p
    while True:
        j = i
        while j < end and p[j] != 44:
            j += 1
        if p[i] != 64 or not _domain_ok(p + i + 1, j - i - 1):
            raise CommandSyntaxError(E.E_ROUTE)
        if j == end:
            return end + 1
        i = j + 1
        if i == end:  # a trailing comma: an empty hop
            raise CommandSyntaxError(E.E_ROUTE)


cdef bint _dot_string_ok(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Dot-string = Atom *("." Atom), atext widened by UTF8-non-ascii."""
    cdef Py_ssize_t i
    if n == 0 or p[0] == 46 or p[n - 1] == 46:
        return False
    for i in range(n):
        if p[i] == 46:
            if p[i - 1] == 46:
                return False
        elif not (CLS[p[i]] & C_ATEXT):
            return False
    return True


cdef Py_ssize_t _quoted_end(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Length of the Quoted-string at ``p`` (which starts with a quote), or -1."""
    cdef Py_ssize_t i = 1
    while i < n:
        if p[i] == 34:
            return i + 1
        if p[i] == 92:
            if i + 1 >= n or not (32 <= p[i + 1] <= 126):
                return -1
            i += 2
        elif CLS[p[i]] & C_QTEXT:
            i += 1
        else:
            return -1
    return -1


def parse_path(arg, keyword, utf8):
    """Parse the argument of MAIL (``keyword=b"FROM"``) or RCPT (``keyword=b"TO"``).

    ``arg`` is e.g. ``FROM:<a@b> SIZE=10 BODY=8BITMIME``. Returns ``(address, params)``: the
    mailbox as text (``""`` for the null path ``<>``, which only FROM accepts; a source route is
    dropped; a quoted local part is returned as written, quotes included; for TO, a bare
    ``<postmaster>`` in any case is accepted and returned as written) and the ESMTP parameters
    in order, keys upper-cased, ``None`` for a keyword without a value.

    Tolerated: any case for the keyword, spaces between the colon and ``<`` (a common client
    bug), runs of spaces between parameters. Non-ASCII octets in the path need ``utf8=True``
    (the transaction is SMTPUTF8) or, for FROM, an ``SMTPUTF8`` parameter, and must then be
    valid UTF-8. Anything else raises :class:`CommandSyntaxError`.
    """
    cdef bytes data = _as_bytes(arg)
    cdef bytes kwb = _as_bytes(keyword)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const unsigned char* kp = <const unsigned char*>PyBytes_AS_STRING(kwb)
    cdef Py_ssize_t k = PyBytes_GET_SIZE(kwb)
    cdef Py_ssize_t i, lt, gt, cs, cn, at, ms, mn
    cdef bint is_from, ascii_only
    cdef unsigned char c
    cdef dict params
    for i in range(n):
        if CLS[p[i]] & C_CTL:
            raise CommandSyntaxError(E.E_CONTROL)
    # The keyword, compared without regard to ASCII case, then the colon.
    if n < k + 1 or p[k] != 58:
        raise CommandSyntaxError(E.e_keyword(kwb.upper().decode("ascii", "replace")))
    for i in range(k):
        if _upper(p[i]) != _upper(kp[i]):
            raise CommandSyntaxError(E.e_keyword(kwb.upper().decode("ascii", "replace")))
    is_from = k == 4 and (_upper(kp[0]) == 70 and _upper(kp[1]) == 82 and _upper(kp[2]) == 79
                          and _upper(kp[3]) == 77)
    lt = k + 1
    while lt < n and p[lt] == 32:
        lt += 1
    if lt >= n or p[lt] != 60:
        raise CommandSyntaxError(E.E_BRACKETS)
    gt = _find_path_end(p, n, lt)
    if gt - lt + 1 > MAX_PATH:
        raise CommandSyntaxError(E.E_PATH_LONG)
    if gt + 1 < n:
        c = p[gt + 1]
        if c != 32:
            raise CommandSyntaxError(E.E_UNBALANCED if c == 60 or c == 62 else E.E_SPACE)
        params = _parse_params(p, n, gt + 2)
    else:
        params = {}

    cs = lt + 1
    cn = gt - cs
    if cn == 0:
        if is_from:
            return "", params
        raise CommandSyntaxError(E.E_NULL_RCPT)
    ascii_only = True
    for i in range(cs, gt):
        if p[i] >= 128:
            ascii_only = False
            break
    if not ascii_only:
        if not (utf8 or (is_from and PyDict_Contains(params, "SMTPUTF8"))):
            raise CommandSyntaxError(E.E_NON_ASCII)
        try:
            PyUnicode_DecodeUTF8(<const char*>p + cs, cn, NULL)
        except UnicodeDecodeError:
            raise CommandSyntaxError(E.E_BAD_UTF8) from None

    ms = cs
    if p[cs] == 64:
        ms = cs + _strip_route(p + cs, cn)
    mn = gt - ms
    if mn > 0 and p[ms] == 34:
        at = _quoted_end(p + ms, mn)
        if at < 0 or (at < mn and p[ms + at] != 64):
            raise CommandSyntaxError(E.E_LOCAL)
    else:
        at = 0
        while at < mn and p[ms + at] != 64:
            at += 1
        if not _dot_string_ok(p + ms, at):
            raise CommandSyntaxError(E.E_LOCAL)
    if at == mn:
        # RFC 5321 §4.1.1.3: "<Postmaster>" without a domain MUST be accepted for RCPT.
        if not is_from and mn == 10:
            i = 0
            while i < 10 and _upper(p[ms + i]) == <unsigned char>POSTMASTER[i]:
                i += 1
            if i == 10:
                return PyUnicode_DecodeASCII(<const char*>p + ms, mn, NULL), params
        raise CommandSyntaxError(E.E_NO_DOMAIN)
    if at > MAX_LOCAL:
        raise CommandSyntaxError(E.E_LOCAL_LONG)
    i = ms + at + 1  # the domain
    if gt - i > MAX_DOMAIN:
        raise CommandSyntaxError(E.E_DOMAIN_LONG)
    if i < gt and p[i] == 91:
        if not _address_literal_ok(p + i, gt - i):
            raise CommandSyntaxError(E.E_LITERAL)
    elif not _domain_ok(p + i, gt - i):
        raise CommandSyntaxError(E.E_DOMAIN)
    if ascii_only:
        return PyUnicode_DecodeASCII(<const char*>p + ms, mn, NULL), params
    return PyUnicode_DecodeUTF8(<const char*>p + ms, mn, NULL), params


def decode_xtext(s):
    """Decode RFC 3461 xtext (``+HH`` escapes; either case of hex digit is accepted).

    The escaped octets are decoded as UTF-8 (RFC 6533 carries UTF-8 addresses this way).
    Raises :class:`CommandSyntaxError` for a character outside ``!``..``~`` or an ``=``, for a
    ``+`` not followed by two hex digits, or for octets that are not UTF-8; the first of these
    kinds found (in that order) is reported.
    """
    cdef str text = _as_str(s)
    cdef Py_ssize_t n = 0, i, j
    cdef const unsigned char* p
    cdef bint plus = False
    cdef unsigned char c, hi, lo
    cdef bytes out
    cdef char* o
    if not PyUnicode_IS_COMPACT_ASCII(text):
        raise CommandSyntaxError(E.E_XTEXT_CHAR)
    # For a compact ASCII str the UTF-8 form is the string's own buffer: no copy.
    p = <const unsigned char*>PyUnicode_AsUTF8AndSize(text, &n)
    for i in range(n):
        c = p[i]
        if c == 43:
            plus = True
        elif not (CLS[c] & C_VALUE):
            raise CommandSyntaxError(E.E_XTEXT_CHAR)
    if not plus:
        return text
    out = PyBytes_FromStringAndSize(NULL, n)
    o = PyBytes_AS_STRING(out)
    i = 0
    j = 0
    while i < n:
        c = p[i]
        if c == 43:
            if i + 2 >= n or not (CLS[p[i + 1]] & C_HEX) or not (CLS[p[i + 2]] & C_HEX):
                raise CommandSyntaxError(E.E_XTEXT_ESCAPE)
            hi = p[i + 1]
            lo = p[i + 2]
            hi = hi - 48 if hi <= 57 else (hi | 32) - 87
            lo = lo - 48 if lo <= 57 else (lo | 32) - 87
            o[j] = <char>((hi << 4) | lo)
            i += 3
        else:
            o[j] = <char>c
            i += 1
        j += 1
    try:
        return PyUnicode_DecodeUTF8(o, j, NULL)
    except UnicodeDecodeError:
        raise CommandSyntaxError(E.E_XTEXT_UTF8) from None


def encode_xtext(s):
    """Encode ``s`` as RFC 3461 xtext: its UTF-8 octets outside ``!``..``~``, and ``+``/``=``,
    become ``+HH`` (upper-case hex). A string with lone surrogates raises UnicodeEncodeError.
    """
    cdef str text = _as_str(s)
    cdef bytes raw = text.encode("utf-8")
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    cdef Py_ssize_t i, extra = 0, j
    cdef bytes out
    cdef char* o
    cdef const char* hexdigits = b"0123456789ABCDEF"
    for i in range(n):
        if not (CLS[p[i]] & C_XTEXT):
            extra += 2
    if extra == 0:
        return text
    out = PyBytes_FromStringAndSize(NULL, n + extra)
    o = PyBytes_AS_STRING(out)
    j = 0
    for i in range(n):
        if CLS[p[i]] & C_XTEXT:
            o[j] = <char>p[i]
            j += 1
        else:
            o[j] = 43
            o[j + 1] = hexdigits[p[i] >> 4]
            o[j + 2] = hexdigits[p[i] & 15]
            j += 3
    return PyUnicode_DecodeASCII(o, j, NULL)
