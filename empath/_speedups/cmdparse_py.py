"""Pure-Python twin of ``cmdparse.pyx``: the SMTP command-line parser.

Owns the grammar of one command line (RFC 5321 §4.1.1-4.1.3): splitting the verb from its
argument, the MAIL/RCPT path and ESMTP parameters (with the RFC 6531 SMTPUTF8 extensions and
the §4.5.3.1 length limits), and RFC 3461 xtext. It does no I/O and keeps no state; the session
decides what to reply. Every function here behaves exactly like its compiled twin, down to the
text of each :class:`CommandSyntaxError` (the texts live in ``errors.py``).
"""

from __future__ import annotations

import re

from empath._speedups import errors as E
from empath._speedups.errors import CommandSyntaxError

__all__ = ["CommandSyntaxError", "decode_xtext", "encode_xtext", "parse_path", "split_command"]

# Control characters (C0 and DEL) are never legal in a command argument (RFC 5321 §4.1.2 has
# no production that admits them), so they are refused before anything else is looked at.
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# Dot-string (RFC 5321 §4.1.2); atext widened by UTF8-non-ascii (RFC 6531 §3.3). Whether
# non-ASCII is allowed at all is decided before these patterns are applied.
_ATEXT = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\xff-]"
_DOT_STRING = re.compile(_ATEXT + rb"+(?:\." + _ATEXT + rb"+)*")
# Quoted-string: qtextSMTP or quoted-pairSMTP (backslash + %d32-126).
_QUOTED = re.compile(rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\x20-\x7e])*"')
# sub-domain = Let-dig [Ldh-str]; U-labels (RFC 6531 §3.3) widen the letters by non-ASCII.
_LABEL = rb"[A-Za-z0-9\x80-\xff](?:[A-Za-z0-9\x80-\xff-]*[A-Za-z0-9\x80-\xff])?"
_DOMAIN = re.compile(_LABEL + rb"(?:\." + _LABEL + rb")*")
# esmtp-keyword and esmtp-value (RFC 5321 §4.1.2).
_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(rb"[\x21-\x3c\x3e-\x7e]+")
# xtext (RFC 3461 §4): printable ASCII except "=" ("+" only as the start of an escape).
_XTEXT_CHARS = re.compile(r"[!-<>-~]*")
_XTEXT_PLAIN = re.compile(rb"[!-*,-<>-~]*")
_HEX = frozenset(b"0123456789ABCDEFabcdef")

_MAX_PATH = 256  # RFC 5321 §4.5.3.1.3, brackets included
_MAX_LOCAL = 64  # §4.5.3.1.1
_MAX_DOMAIN = 255  # §4.5.3.1.2
_MAX_LABEL = 63  # RFC 1035 §2.3.4, for ASCII labels


def _as_bytes(data: object) -> bytes:
    if type(data) is bytes:
        return data
    return bytes(memoryview(data))  # type: ignore[arg-type]


def split_command(line: bytes) -> tuple[str, bytes]:
    """Split one command line (without its CRLF) into ``(VERB, argument)``.

    Trailing spaces and tabs are stripped first. A line that is then empty gives ``("", b"")``.
    The verb runs up to the first space and is returned upper-cased; the argument is everything
    after that one space (further leading spaces are kept: RFC 5321 allows exactly one). A verb
    that is not made only of ASCII letters and digits (a leading space, a tab, a control or a
    non-ASCII byte) gives ``("?", b"")``: an unrecognised command, which the session answers
    with 500.
    """
    line = _as_bytes(line).rstrip(b" \t")
    if not line:
        return "", b""
    sp = line.find(b" ")
    if sp < 0:
        verb, arg = line, b""
    else:
        verb, arg = line[:sp], line[sp + 1 :]
    if not verb.isalnum():  # bytes.isalnum() is ASCII-only, and False for b""
        return "?", b""
    return verb.decode("ascii").upper(), arg


def _find_path_end(arg: bytes, lt: int) -> int:
    """Index of the ``>`` closing the path opened at ``lt``; quoted strings may hold ``<>``."""
    n = len(arg)
    gt = arg.find(b">", lt + 1)
    quote = arg.find(b'"', lt + 1)
    if gt >= 0 and (quote < 0 or quote > gt):
        if arg.find(b"<", lt + 1, gt) >= 0:
            raise CommandSyntaxError(E.E_UNBALANCED)
        return gt
    j = lt + 1
    in_quote = False
    while j < n:
        c = arg[j]
        if in_quote:
            if c == 0x5C:  # quoted-pair: skip the escaped octet
                j += 2
                continue
            if c == 0x22:
                in_quote = False
        elif c == 0x22:
            in_quote = True
        elif c == 0x3E:
            return j
        elif c == 0x3C:
            raise CommandSyntaxError(E.E_UNBALANCED)
        j += 1
    raise CommandSyntaxError(E.E_UNTERMINATED if in_quote else E.E_UNBALANCED)


def _parse_params(arg: bytes, start: int) -> dict[str, str | None]:
    """Mail-parameters / Rcpt-parameters (RFC 5321 §4.1.2), separated by runs of spaces."""
    params: dict[str, str | None] = {}
    for token in arg[start:].split(b" "):
        if not token:
            continue
        key, eq, value = token.partition(b"=")
        if _KEYWORD.fullmatch(key) is None:
            raise CommandSyntaxError(E.E_PARAM)
        name = key.decode("ascii").upper()
        val: str | None = None
        if eq:
            if _VALUE.fullmatch(value) is None:
                raise CommandSyntaxError(E.e_value(name))
            val = value.decode("ascii")
        if name in params:
            raise CommandSyntaxError(E.e_duplicate(name))
        params[name] = val
    return params


def _ipv4_ok(s: bytes) -> bool:
    """IPv4-address-literal: four Snum (1*3DIGIT, 0-255) joined by dots."""
    parts = s.split(b".")
    if len(parts) != 4:
        return False
    return all(0 < len(p) <= 3 and p.isdigit() and int(p) <= 255 for p in parts)


def _ipv6_ok(s: bytes) -> bool:
    """IPv6-addr of RFC 5321 §4.1.3 (full, compressed, and with a trailing IPv4 part).

    A compressed form may hold at most 6 groups besides the "::" (4 with an IPv4 tail);
    a full form exactly 8 (6 with an IPv4 tail).
    """
    full, comp = 8, 6
    head = s
    if b"." in s:
        idx = s.rfind(b":")
        if idx < 0 or not _ipv4_ok(s[idx + 1 :]):
            return False
        full, comp = 6, 4
        head = s[: idx + 1] if s[: idx + 1].endswith(b"::") else s[:idx]
    if head.count(b"::") > 1:
        return False
    if b"::" in head:
        left, _, right = head.partition(b"::")
        groups = (left.split(b":") if left else []) + (right.split(b":") if right else [])
        if len(groups) > comp:
            return False
    else:
        groups = head.split(b":")
        if len(groups) != full:
            return False
    return all(0 < len(g) <= 4 and _HEX.issuperset(g) for g in groups)


def _address_literal_ok(lit: bytes) -> bool:
    """``[1.2.3.4]`` or ``[IPv6:...]``; no other General-address-literal tag is registered."""
    if len(lit) < 2 or lit[-1] != 0x5D:
        return False
    body = lit[1:-1]
    if body[:5].upper() == b"IPV6:":
        return _ipv6_ok(body[5:])
    return _ipv4_ok(body)


def _domain_ok(domain: bytes) -> bool:
    if _DOMAIN.fullmatch(domain) is None:
        return False
    return all(len(label) <= _MAX_LABEL or not label.isascii() for label in domain.split(b"."))


def _strip_route(content: bytes) -> bytes:
    """Drop an RFC 5321 source route (``@a,@b:``), which §4.1.2 says SHOULD be ignored."""
    colon = content.find(b":")
    if colon < 0:
        raise CommandSyntaxError(E.E_ROUTE)
    for hop in content[:colon].split(b","):
        if hop[:1] != b"@" or not _domain_ok(hop[1:]):
            raise CommandSyntaxError(E.E_ROUTE)
    return content[colon + 1 :]


def parse_path(arg: bytes, keyword: bytes, utf8: bool) -> tuple[str, dict[str, str | None]]:
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
    arg = _as_bytes(arg)
    keyword = _as_bytes(keyword)
    if _CONTROL.search(arg) is not None:
        raise CommandSyntaxError(E.E_CONTROL)
    kw = keyword.upper()
    k = len(kw)
    if arg[:k].upper() != kw or arg[k : k + 1] != b":":
        raise CommandSyntaxError(E.e_keyword(kw.decode("ascii", "replace")))
    n = len(arg)
    lt = k + 1
    while lt < n and arg[lt] == 0x20:
        lt += 1
    if lt >= n or arg[lt] != 0x3C:
        raise CommandSyntaxError(E.E_BRACKETS)
    gt = _find_path_end(arg, lt)
    if gt - lt + 1 > _MAX_PATH:
        raise CommandSyntaxError(E.E_PATH_LONG)
    params: dict[str, str | None] = {}
    if gt + 1 < n:
        c = arg[gt + 1]
        if c != 0x20:
            raise CommandSyntaxError(E.E_UNBALANCED if c in (0x3C, 0x3E) else E.E_SPACE)
        params = _parse_params(arg, gt + 2)

    content = arg[lt + 1 : gt]
    is_from = kw == b"FROM"
    if not content:
        if is_from:
            return "", params
        raise CommandSyntaxError(E.E_NULL_RCPT)
    ascii_only = content.isascii()
    if not ascii_only:
        if not (utf8 or (is_from and "SMTPUTF8" in params)):
            raise CommandSyntaxError(E.E_NON_ASCII)
        try:
            content.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandSyntaxError(E.E_BAD_UTF8) from None

    mailbox = _strip_route(content) if content[0] == 0x40 else content
    if mailbox[:1] == b'"':
        m = _QUOTED.match(mailbox)
        if m is None:
            raise CommandSyntaxError(E.E_LOCAL)
        at = m.end()
        if at < len(mailbox) and mailbox[at] != 0x40:
            raise CommandSyntaxError(E.E_LOCAL)
    else:
        at = mailbox.find(b"@")
        if at < 0:
            at = len(mailbox)
        if _DOT_STRING.fullmatch(mailbox, 0, at) is None:
            raise CommandSyntaxError(E.E_LOCAL)
    if at == len(mailbox):
        # RFC 5321 §4.1.1.3: "<Postmaster>" without a domain MUST be accepted for RCPT.
        if not is_from and mailbox.lower() == b"postmaster":
            return mailbox.decode("ascii"), params
        raise CommandSyntaxError(E.E_NO_DOMAIN)
    if at > _MAX_LOCAL:
        raise CommandSyntaxError(E.E_LOCAL_LONG)
    domain = mailbox[at + 1 :]
    if len(domain) > _MAX_DOMAIN:
        raise CommandSyntaxError(E.E_DOMAIN_LONG)
    if domain[:1] == b"[":
        if not _address_literal_ok(domain):
            raise CommandSyntaxError(E.E_LITERAL)
    elif not _domain_ok(domain):
        raise CommandSyntaxError(E.E_DOMAIN)
    return mailbox.decode("ascii" if ascii_only else "utf-8"), params


def decode_xtext(s: str) -> str:
    """Decode RFC 3461 xtext (``+HH`` escapes; either case of hex digit is accepted).

    The escaped octets are decoded as UTF-8 (RFC 6533 carries UTF-8 addresses this way).
    Raises :class:`CommandSyntaxError` for a character outside ``!``..``~`` or an ``=``, for a
    ``+`` not followed by two hex digits, or for octets that are not UTF-8; the first of these
    kinds found (in that order) is reported.
    """
    if _XTEXT_CHARS.fullmatch(s) is None:
        raise CommandSyntaxError(E.E_XTEXT_CHAR)
    if "+" not in s:
        return s
    pieces = s.split("+")
    out = bytearray(pieces[0].encode("ascii"))
    for piece in pieces[1:]:
        hexpair = piece[:2].encode("ascii")
        if len(hexpair) != 2 or not _HEX.issuperset(hexpair):
            raise CommandSyntaxError(E.E_XTEXT_ESCAPE)
        out.append(int(hexpair, 16))
        out += piece[2:].encode("ascii")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandSyntaxError(E.E_XTEXT_UTF8) from None


def encode_xtext(s: str) -> str:
    """Encode ``s`` as RFC 3461 xtext: its UTF-8 octets outside ``!``..``~``, and ``+``/``=``,
    become ``+HH`` (upper-case hex). A string with lone surrogates raises UnicodeEncodeError.
    """
    raw = s.encode("utf-8")
    if _XTEXT_PLAIN.fullmatch(raw) is not None:
        return s
    return "".join(
        chr(c) if 0x21 <= c <= 0x7E and c != 0x2B and c != 0x3D else f"+{c:02X}" for c in raw
    )
