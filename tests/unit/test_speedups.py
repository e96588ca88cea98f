"""empath._speedups: the command parser and the DATA decoder, run against both twins.

Every behavioural test takes the ``speedups`` fixture, which yields the pure-Python twin and
the compiled module in turn. A missing build makes the Cython leg fail, not skip; only
``EMPATH_NO_EXTENSIONS=1`` removes that leg (and says so in a skipped test). Property tests
check that the twins agree with each other and with a small reference model written here.
"""

from __future__ import annotations

import importlib.machinery
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import empath._speedups as pkg
from empath._speedups import errors as E
from empath._speedups.errors import CommandSyntaxError

NO_EXTENSIONS = os.environ.get("EMPATH_NO_EXTENSIONS", "") not in ("", "0")
LEGS = ["python"] if NO_EXTENSIONS else ["python", "cython"]
BUILD_HINT = (
    "the Cython speedups are not built ({exc}); run `python setup.py build_ext --inplace`, "
    "or set EMPATH_NO_EXTENSIONS=1 to test the pure-Python twins only"
)
# EMPATH_FUZZ_EXAMPLES: examples per property test (tools/fuzz; docs/RELIABILITY.md).
PROPS = settings(max_examples=int(os.environ.get("EMPATH_FUZZ_EXAMPLES") or 300), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _load(name: str):
    try:
        return pkg.implementations()[name]
    except ImportError as exc:
        pytest.fail(BUILD_HINT.format(exc=exc), pytrace=False)


@pytest.fixture(scope="module", params=LEGS)
def speedups(request: pytest.FixtureRequest):
    """One implementation (a namespace with the public names), per leg."""
    return _load(request.param)


@pytest.fixture(scope="module")
def twins():
    """(python, cython), for the tests that compare them."""
    if NO_EXTENSIONS:
        pytest.skip("EMPATH_NO_EXTENSIONS is set: the twins are not compared")
    return _load("python"), _load("cython")


# --------------------------------------------------------------------------- selection


def test_build_did_not_silently_fall_back() -> None:
    if NO_EXTENSIONS:
        assert pkg.IMPLEMENTATION == "python"
        assert "EMPATH_NO_EXTENSIONS" in (pkg.FALLBACK_REASON or "")
        return
    assert pkg.IMPLEMENTATION == "cython", pkg.FALLBACK_REASON
    assert pkg.FALLBACK_REASON is None
    compiled = pkg.implementations()["cython"]
    for module in compiled.modules:
        assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), module


def test_cython_leg_is_run() -> None:
    if NO_EXTENSIONS:
        pytest.skip("EMPATH_NO_EXTENSIONS is set: the Cython leg of every test is deselected")
    assert LEGS == ["python", "cython"]


def test_package_reexports_the_active_implementation() -> None:
    active = pkg.implementations()[pkg.IMPLEMENTATION]
    for name in ("split_command", "parse_path", "decode_xtext", "encode_xtext", "DataReader",
                 "dot_stuff", "has_bare_eol"):
        assert getattr(pkg, name) is getattr(active, name)
    assert pkg.CommandSyntaxError is CommandSyntaxError
    with pytest.raises(KeyError):
        pkg.implementations()["rust"]
    assert list(pkg.implementations()) == ["python", "cython"]


def test_both_twins_raise_the_same_class(speedups) -> None:
    assert speedups.CommandSyntaxError is CommandSyntaxError
    with pytest.raises(CommandSyntaxError) as info:
        speedups.parse_path(b"FROM:a@b", b"FROM", False)
    assert info.value.text == E.E_BRACKETS
    assert str(info.value) == E.E_BRACKETS


# --------------------------------------------------------------------------- split_command

SPLIT_CASES = [
    (b"", ("", b"")),
    (b"   ", ("", b"")),
    (b" \t ", ("", b"")),
    (b"QUIT", ("QUIT", b"")),
    (b"quit", ("QUIT", b"")),
    (b"QUIT ", ("QUIT", b"")),
    (b"QUIT \t ", ("QUIT", b"")),
    (b"hElO", ("HELO", b"")),
    (b"EHLO mail.example.com", ("EHLO", b"mail.example.com")),
    (b"EHLO  mail.example.com", ("EHLO", b" mail.example.com")),
    (b"MAIL FROM:<a@b> SIZE=1  \t", ("MAIL", b"FROM:<a@b> SIZE=1")),
    (b"rcpt TO:<x@y>", ("RCPT", b"TO:<x@y>")),
    (b"STARTTLS", ("STARTTLS", b"")),
    (b"starttlsx", ("STARTTLSX", b"")),
    (b"XYZZY plugh", ("XYZZY", b"plugh")),
    (b"B2 x", ("B2", b"x")),
    (b"X-FOO bar", ("?", b"")),
    (b" HELO x", ("?", b"")),
    (b"HELO\tx", ("?", b"")),
    (b"HE\x00LO x", ("?", b"")),
    (b"\xc3\xa9HLO x", ("?", b"")),
    (b"DATA\r", ("?", b"")),
]


@pytest.mark.parametrize("line, expected", SPLIT_CASES)
def test_split_command(speedups, line: bytes, expected: tuple[str, bytes]) -> None:
    assert speedups.split_command(line) == expected


def test_split_command_accepts_buffers(speedups) -> None:
    assert speedups.split_command(bytearray(b"noop x")) == ("NOOP", b"x")
    assert speedups.split_command(memoryview(b"noop x")) == ("NOOP", b"x")


# --------------------------------------------------------------------------- parse_path

LONG_LOCAL = b"l" * 64
DOMAIN_189 = b".".join([b"d" * 62, b"e" * 62, b"f" * 63])  # 189 octets
assert len(DOMAIN_189) == 189

PATH_VALID = [
    # (arg, keyword, utf8, address, params)
    (b"FROM:<a@b>", b"FROM", False, "a@b", {}),
    (b"FROM:<>", b"FROM", False, "", {}),
    (b"from:<A@B.example>", b"FROM", False, "A@B.example", {}),
    (b"From:<a@b>", b"from", False, "a@b", {}),
    (b"FROM: <a@b>", b"FROM", False, "a@b", {}),
    (b"FROM:   <>", b"FROM", False, "", {}),
    (b"FROM:<a@b> SIZE=1234 BODY=8BITMIME", b"FROM", False, "a@b",
     {"SIZE": "1234", "BODY": "8BITMIME"}),
    (b"FROM:<a@b> size=1 body=7bit", b"FROM", False, "a@b", {"SIZE": "1", "BODY": "7bit"}),
    (b"FROM:<a@b>   SIZE=1   BODY=8BITMIME  ", b"FROM", False, "a@b",
     {"SIZE": "1", "BODY": "8BITMIME"}),
    (b"FROM:<a@b> SMTPUTF8", b"FROM", False, "a@b", {"SMTPUTF8": None}),
    (b"FROM:<> RET=HDRS ENVID=QQ314159+2B", b"FROM", False, "",
     {"RET": "HDRS", "ENVID": "QQ314159+2B"}),
    (b"FROM:<a@b> X-VENDOR-1=a,b;c!~", b"FROM", False, "a@b", {"X-VENDOR-1": "a,b;c!~"}),
    (b"FROM:<@r1.example,@r2.example:user@d.example>", b"FROM", False, "user@d.example", {}),
    (b"FROM:<@r1.example:user@d.example> SIZE=5", b"FROM", False, "user@d.example",
     {"SIZE": "5"}),
    (b'FROM:<"john doe"@example.com>', b"FROM", False, '"john doe"@example.com', {}),
    (b'FROM:<"a>b<c"@example.com>', b"FROM", False, '"a>b<c"@example.com', {}),
    (b'FROM:<"a\\"b\\\\"@example.com>', b"FROM", False, '"a\\"b\\\\"@example.com', {}),
    (b'FROM:<""@example.com>', b"FROM", False, '""@example.com', {}),
    (b"FROM:<user.name+tag@sub-domain.example.org>", b"FROM", False,
     "user.name+tag@sub-domain.example.org", {}),
    (b"FROM:<!#$%&'*+-/=?^_`{|}~@x>", b"FROM", False, "!#$%&'*+-/=?^_`{|}~@x", {}),
    (b"FROM:<a@localhost>", b"FROM", False, "a@localhost", {}),
    (b"FROM:<a@0.example>", b"FROM", False, "a@0.example", {}),
    (b"FROM:<a@[192.0.2.1]>", b"FROM", False, "a@[192.0.2.1]", {}),
    (b"FROM:<a@[0.00.255.010]>", b"FROM", False, "a@[0.00.255.010]", {}),
    (b"FROM:<a@[IPv6:::1]>", b"FROM", False, "a@[IPv6:::1]", {}),
    (b"FROM:<a@[IPv6:::]>", b"FROM", False, "a@[IPv6:::]", {}),
    (b"FROM:<a@[ipv6:2001:DB8::1]>", b"FROM", False, "a@[ipv6:2001:DB8::1]", {}),
    (b"FROM:<a@[IPv6:1:2:3:4:5:6:7:8]>", b"FROM", False, "a@[IPv6:1:2:3:4:5:6:7:8]", {}),
    (b"FROM:<a@[IPv6:1:2:3::6:7:8]>", b"FROM", False, "a@[IPv6:1:2:3::6:7:8]", {}),
    (b"FROM:<a@[IPv6:1::]>", b"FROM", False, "a@[IPv6:1::]", {}),
    (b"FROM:<a@[IPv6:::ffff:192.0.2.1]>", b"FROM", False, "a@[IPv6:::ffff:192.0.2.1]", {}),
    (b"FROM:<a@[IPv6:1:2:3:4:5:6:1.2.3.4]>", b"FROM", False,
     "a@[IPv6:1:2:3:4:5:6:1.2.3.4]", {}),
    (b"FROM:<a@[IPv6:1::1.2.3.4]>", b"FROM", False, "a@[IPv6:1::1.2.3.4]", {}),
    (b"FROM:<" + LONG_LOCAL + b"@" + DOMAIN_189 + b">", b"FROM", False,
     (LONG_LOCAL + b"@" + DOMAIN_189).decode(), {}),
    (b"FROM:<a@" + b"x" * 63 + b".example>", b"FROM", False, "a@" + "x" * 63 + ".example", {}),
    # RFC 6531: non-ASCII with SMTPUTF8 on MAIL, or with utf8=True.
    ("FROM:<jöran@bücher.example> SMTPUTF8".encode(), b"FROM", False,
     "jöran@bücher.example", {"SMTPUTF8": None}),
    ("FROM:<jöran@bücher.example>".encode(), b"FROM", True, "jöran@bücher.example", {}),
    ('FROM:<"jö ran"@x> SMTPUTF8'.encode(), b"FROM", False, '"jö ran"@x', {"SMTPUTF8": None}),
    ("TO:<用户@例子.广告>".encode(), b"TO", True, "用户@例子.广告", {}),
    # A U-label longer than 63 octets: the label limit applies to the A-label, not checked here.
    (("TO:<a@" + "ü" * 40 + ".example>").encode(), b"TO", True, "a@" + "ü" * 40 + ".example", {}),
    # RCPT.
    (b"TO:<x@y>", b"TO", False, "x@y", {}),
    (b"to:<x@y> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y", b"TO", False, "x@y",
     {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;x@y"}),
    (b"TO:<postmaster>", b"TO", False, "postmaster", {}),
    (b"TO:<Postmaster>", b"TO", False, "Postmaster", {}),
    (b"TO: <POSTMASTER> NOTIFY=NEVER", b"TO", False, "POSTMASTER", {"NOTIFY": "NEVER"}),
    (b"TO:<Postmaster@example.com>", b"TO", False, "Postmaster@example.com", {}),
    (b"TO:<@relay.example:postmaster>", b"TO", False, "postmaster", {}),
]


@pytest.mark.parametrize("arg, keyword, utf8, address, params", PATH_VALID)
def test_parse_path_valid(speedups, arg, keyword, utf8, address, params) -> None:
    got_address, got_params = speedups.parse_path(arg, keyword, utf8)
    assert got_address == address
    assert got_params == params
    assert list(got_params) == list(params)


PATH_INVALID = [
    # (arg, keyword, utf8, error text)
    (b"FROM<a@b>", b"FROM", False, E.e_keyword("FROM")),
    (b"FRM:<a@b>", b"FROM", False, E.e_keyword("FROM")),
    (b"TO:<a@b>", b"FROM", False, E.e_keyword("FROM")),
    (b"FROM :<a@b>", b"FROM", False, E.e_keyword("FROM")),
    (b"", b"TO", False, E.e_keyword("TO")),
    (b"FROM:a@b", b"FROM", False, E.E_BRACKETS),
    (b"FROM:", b"FROM", False, E.E_BRACKETS),
    (b"FROM:   ", b"FROM", False, E.E_BRACKETS),
    (b"FROM:a@b>", b"FROM", False, E.E_BRACKETS),
    (b"FROM:<a@b", b"FROM", False, E.E_UNBALANCED),
    (b"FROM:<", b"FROM", False, E.E_UNBALANCED),
    (b"FROM:<<a@b>>", b"FROM", False, E.E_UNBALANCED),
    (b"FROM:<a<b@c>", b"FROM", False, E.E_UNBALANCED),
    (b"FROM:<a@b>>", b"FROM", False, E.E_UNBALANCED),
    (b"FROM:<a@b><", b"FROM", False, E.E_UNBALANCED),
    (b'FROM:<"a@b>', b"FROM", False, E.E_UNTERMINATED),
    (b'FROM:<"a\\">', b"FROM", False, E.E_UNTERMINATED),
    (b"FROM:<a@b>SIZE=1", b"FROM", False, E.E_SPACE),
    (b"TO:<>", b"TO", False, E.E_NULL_RCPT),
    (b"TO:<> NOTIFY=NEVER", b"TO", True, E.E_NULL_RCPT),
    (b"FROM:<ab>", b"FROM", False, E.E_NO_DOMAIN),
    (b"FROM:<postmaster>", b"FROM", False, E.E_NO_DOMAIN),
    (b"TO:<postmaster2>", b"TO", False, E.E_NO_DOMAIN),
    (b'TO:<"postmaster">', b"TO", False, E.E_NO_DOMAIN),
    (b"FROM:<" + b"l" * 65 + b"@b>", b"FROM", False, E.E_LOCAL_LONG),
    (b"FROM:<" + LONG_LOCAL + b"@" + DOMAIN_189 + b"x>", b"FROM", False, E.E_PATH_LONG),
    # A domain over 255 octets cannot fit in a 256-octet path: the path limit fires first.
    (b"FROM:<a@" + b"d." * 127 + b"dd>", b"FROM", False, E.E_PATH_LONG),
    (b"FROM:<a@" + b"x" * 64 + b".example>", b"FROM", False, E.E_DOMAIN),
    (b"FROM:<a@-b.example>", b"FROM", False, E.E_DOMAIN),
    (b"FROM:<a@b-.example>", b"FROM", False, E.E_DOMAIN),
    (b"FROM:<a@b..example>", b"FROM", False, E.E_DOMAIN),
    (b"FROM:<a@b.example.>", b"FROM", False, E.E_DOMAIN),
    (b"FROM:<a@.example>", b"FROM", False, E.E_DOMAIN),
    (b"FROM:<a@b_c.example>", b"FROM", False, E.E_DOMAIN),
    (b"FROM:<a@>", b"FROM", False, E.E_DOMAIN),
    (b"FROM:<a@b c>", b"FROM", False, E.E_DOMAIN),
    (b"FROM:<a@b@c>", b"FROM", False, E.E_DOMAIN),
    (b"FROM:<a@[1.2.3]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[256.1.1.1]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[1.2.3.4.5]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[1.2.3.0004]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[1.2.3.4>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[IPv6:1::2::3]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[IPv6:1:2:3:4:5:6:7]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[IPv6:1:2:3:4:5:6:7:8:9]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[IPv6:1:2:3:4:5:6:7::]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[IPv6:12345::]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[IPv6::1]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[IPv6:1:]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[IPv6:fe80::1%eth0]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[IPv6:1:2:3:4:5::1.2.3.4]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[IPv6:1.2.3.4]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<a@[x-tag:anything]>", b"FROM", False, E.E_LITERAL),
    (b"FROM:<.a@b>", b"FROM", False, E.E_LOCAL),
    (b"FROM:<a.@b>", b"FROM", False, E.E_LOCAL),
    (b"FROM:<a..b@c>", b"FROM", False, E.E_LOCAL),
    (b"FROM:<a b@c>", b"FROM", False, E.E_LOCAL),
    (b"FROM:<a(b)@c>", b"FROM", False, E.E_LOCAL),
    (b'FROM:<"a"b@c>', b"FROM", False, E.E_LOCAL),
    (b'FROM:<a"b"@c>', b"FROM", False, E.E_LOCAL),
    (b"FROM:<@a:>", b"FROM", False, E.E_LOCAL),
    (b"FROM:<@a>", b"FROM", False, E.E_ROUTE),
    (b"FROM:<@a,b:c@d>", b"FROM", False, E.E_ROUTE),
    (b"FROM:<@-a:c@d>", b"FROM", False, E.E_ROUTE),
    (b"FROM:<@a,:c@d>", b"FROM", False, E.E_ROUTE),
    (b"FROM:<@:c@d>", b"FROM", False, E.E_ROUTE),
    (b"FROM:<a@b> =1", b"FROM", False, E.E_PARAM),
    (b"FROM:<a@b> -X=1", b"FROM", False, E.E_PARAM),
    (b"FROM:<a@b> X_Y=1", b"FROM", False, E.E_PARAM),
    (b"FROM:<a@b> \xc3\xa9=1", b"FROM", True, E.E_PARAM),
    (b"FROM:<a@b> SIZE=", b"FROM", False, E.e_value("SIZE")),
    (b"FROM:<a@b> size=a=b", b"FROM", False, E.e_value("SIZE")),
    (b"FROM:<a@b> ENVID=\xc3\xa9", b"FROM", True, E.e_value("ENVID")),
    (b"FROM:<a@b> SIZE=1 size=2", b"FROM", False, E.e_duplicate("SIZE")),
    (b"FROM:<a@b> SMTPUTF8 SMTPUTF8", b"FROM", False, E.e_duplicate("SMTPUTF8")),
    (b"FROM:<a\x00@b>", b"FROM", False, E.E_CONTROL),
    (b"FROM:<a@b>\tSIZE=1", b"FROM", False, E.E_CONTROL),
    (b"FROM:<a@b> X=\x7f", b"FROM", False, E.E_CONTROL),
    (b"FROM:<a@b\r>", b"FROM", False, E.E_CONTROL),
    (b"\x00FROM:<a@b>", b"FROM", False, E.E_CONTROL),
    ("FROM:<jöran@x>".encode(), b"FROM", False, E.E_NON_ASCII),
    ("FROM:<a@bücher.example> BODY=8BITMIME".encode(), b"FROM", False, E.E_NON_ASCII),
    ("TO:<jöran@x> SMTPUTF8".encode(), b"TO", False, E.E_NON_ASCII),
    (b"FROM:<\xff@x> SMTPUTF8", b"FROM", False, E.E_BAD_UTF8),
    (b"TO:<a@\xed\xa0\x80.example>", b"TO", True, E.E_BAD_UTF8),
    (b"TO:<\xc3@x>", b"TO", True, E.E_BAD_UTF8),
    ("TO:<a@[IPv6:::ü]>".encode(), b"TO", True, E.E_LITERAL),
]


@pytest.mark.parametrize("arg, keyword, utf8, text", PATH_INVALID)
def test_parse_path_invalid(speedups, arg, keyword, utf8, text) -> None:
    with pytest.raises(CommandSyntaxError) as info:
        speedups.parse_path(arg, keyword, utf8)
    assert info.value.text == text


def test_parse_path_accepts_buffers(speedups) -> None:
    assert speedups.parse_path(bytearray(b"FROM:<a@b>"), memoryview(b"FROM"), False) == (
        "a@b", {})


# --------------------------------------------------------------------------- xtext

XTEXT = [
    ("", ""),
    ("plain", "plain"),
    ("a+b", "a+2Bb"),
    ("a=b", "a+3Db"),
    ("a b", "a+20b"),
    ("rfc822;x@y", "rfc822;x@y"),
    ("é", "+C3+A9"),
    ("\x7f\x00~!", "+7F+00~!"),
    ("用户@例子", "+E7+94+A8+E6+88+B7@+E4+BE+8B+E5+AD+90"),
]


@pytest.mark.parametrize("text, xtext", XTEXT)
def test_xtext(speedups, text: str, xtext: str) -> None:
    assert speedups.encode_xtext(text) == xtext
    assert speedups.decode_xtext(xtext) == text


def test_xtext_accepts_str_subclasses(speedups) -> None:
    class Text(str):
        pass

    assert speedups.decode_xtext(Text("a+2Bb")) == "a+b"
    assert speedups.encode_xtext(Text("a b")) == "a+20b"
    with pytest.raises(TypeError):
        speedups.decode_xtext(b"abc")


def test_decode_xtext_lower_case_hex(speedups) -> None:
    assert speedups.decode_xtext("a+2bb+c3+a9") == "a+bé"


@pytest.mark.parametrize("bad, text", [
    ("a=b", E.E_XTEXT_CHAR),
    ("a b", E.E_XTEXT_CHAR),
    ("é", E.E_XTEXT_CHAR),
    ("a\x00", E.E_XTEXT_CHAR),
    ("+2=", E.E_XTEXT_CHAR),  # a bad character is reported before a bad escape
    ("a+2", E.E_XTEXT_ESCAPE),
    ("a+", E.E_XTEXT_ESCAPE),
    ("+G0", E.E_XTEXT_ESCAPE),
    ("++41", E.E_XTEXT_ESCAPE),
    ("+FF", E.E_XTEXT_UTF8),
    ("+C3", E.E_XTEXT_UTF8),
])
def test_decode_xtext_invalid(speedups, bad: str, text: str) -> None:
    with pytest.raises(CommandSyntaxError) as info:
        speedups.decode_xtext(bad)
    assert info.value.text == text


# --------------------------------------------------------------------------- DataReader


def feed_all(reader, chunks) -> bytes:
    out = []
    for chunk in chunks:
        out.append(reader.feed(chunk))
        if reader.done:
            break
    return b"".join(out)


def rest_of(chunks, consumed: int) -> bytes:
    """What follows offset ``consumed`` in the chunk that reached it: the reader's ``rest``."""
    data, end = b"".join(chunks), 0
    for chunk in chunks:
        end += len(chunk)
        if end >= consumed:
            return data[consumed:end]
    raise AssertionError("terminator not in the data")


def state(reader) -> tuple:
    return (reader.done, reader.rest, reader.size, reader.too_big, reader.bad_eol,
            reader.line_too_long)


def test_reader_simple_message(speedups) -> None:
    r = speedups.DataReader(1000)
    out = r.feed(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert out == b"Subject: x\r\n\r\nbody\r\n"
    assert (r.done, r.rest, r.size, r.too_big, r.bad_eol, r.line_too_long) == (
        True, b"", len(out), False, False, False)


def test_reader_empty_message(speedups) -> None:
    r = speedups.DataReader(1000)
    assert r.feed(b".\r\nQUIT\r\n") == b""
    assert r.done and r.rest == b"QUIT\r\n" and r.size == 0


def test_reader_not_done_until_terminator(speedups) -> None:
    r = speedups.DataReader(1000)
    assert r.feed(b"a\r\n") == b"a\r\n"
    assert not r.done and r.rest == b""
    assert r.feed(b"") == b""
    assert r.feed(b".") == b""
    assert r.feed(b"\r") == b""
    assert not r.done
    assert r.feed(b"\n") == b""
    assert r.done and r.size == 3


def test_reader_rest_after_terminator(speedups) -> None:
    r = speedups.DataReader(1000)
    assert r.feed(b"a\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n") == b"a\r\n"
    assert r.rest == b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"


def test_reader_feed_after_done(speedups) -> None:
    r = speedups.DataReader(1000)
    r.feed(b".\r\n")
    with pytest.raises(ValueError):
        r.feed(b"more")


def test_reader_accepts_buffers(speedups) -> None:
    r = speedups.DataReader(1000)
    assert r.feed(bytearray(b"..a\r\n")) == b".a\r\n"
    assert r.feed(memoryview(b".\r\n")) == b""
    assert r.done


@pytest.mark.parametrize("kwargs", [
    {"bare_eol": "strip"}, {"max_size": -1}, {"max_line": -1},
])
def test_reader_rejects_bad_arguments(speedups, kwargs) -> None:
    args = {"max_size": 10, **kwargs}
    with pytest.raises(ValueError):
        speedups.DataReader(**args)


UNSTUFF_CASES = [
    (b"..a\r\n.\r\n", b".a\r\n"),
    (b"...\r\n.\r\n", b"..\r\n"),
    (b"..\r\n.\r\n", b".\r\n"),
    (b". x\r\n.\r\n", b" x\r\n"),
    (b".x\r\n.y\r\n..z\r\n.\r\n", b"x\r\ny\r\n.z\r\n"),
    (b"a.b\r\na..\r\n.\r\n", b"a.b\r\na..\r\n"),
    (b"\r\n..\r\n\r\n.\r\n", b"\r\n.\r\n\r\n"),
]


@pytest.mark.parametrize("wire, message", UNSTUFF_CASES)
def test_reader_unstuffs(speedups, wire: bytes, message: bytes) -> None:
    for mode in ("reject", "normalize"):
        r = speedups.DataReader(1000, mode)
        assert r.feed(wire) == message
        assert r.done and not r.bad_eol and r.size == len(message)


MULTILINE = b"From: a@b\r\n\r\n.first\r\n..second\r\nmid.dle\r\n.\r\n..\r\n...\r\nend\r\n"
MULTILINE_WIRE = MULTILINE.replace(b"\r\n.", b"\r\n..") + b".\r\nNEXT"


def test_reader_unstuffs_at_every_split(speedups) -> None:
    assert MULTILINE_WIRE.count(b"\r\n.\r\n") == 1
    for i in range(len(MULTILINE_WIRE) + 1):
        r = speedups.DataReader(1000)
        out = feed_all(r, [MULTILINE_WIRE[:i], MULTILINE_WIRE[i:]])
        assert (out, r.done) == (MULTILINE, True), i
        assert r.rest == rest_of([MULTILINE_WIRE[:i], MULTILINE_WIRE[i:]], len(MULTILINE_WIRE) - 4)
        assert r.size == len(MULTILINE) and not r.bad_eol


def test_reader_byte_by_byte(speedups) -> None:
    r = speedups.DataReader(1000)
    out = feed_all(r, [MULTILINE_WIRE[i:i + 1] for i in range(len(MULTILINE_WIRE))])
    assert (out, r.done, r.rest) == (MULTILINE, True, b"")


def test_reader_terminator_split_at_every_pair_of_offsets(speedups) -> None:
    wire = b"a\r\n..b\r\n.\r\nZ"
    for i in range(len(wire) + 1):
        for j in range(i, len(wire) + 1):
            r = speedups.DataReader(1000)
            out = feed_all(r, [wire[:i], wire[i:j], wire[j:]])
            assert (out, r.done) == (b"a\r\n.b\r\n", True), (i, j)
            # The rest is what followed the terminator in the chunk that completed it.
            assert r.rest == rest_of([wire[:i], wire[i:j], wire[j:]], 11), (i, j)


# Every way a sloppy or hostile client can try to end the data early, RFC 5321 §4.5.2 aside.
SMUGGLING_VECTORS = [
    b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\n.\r", b"\r\n.\r",
    b"\r\n.\r\r\n", b"\n.\n\n", b"\r\r\n.\r\r\n",
]
SMUGGLED = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"


@pytest.mark.parametrize("vector", SMUGGLING_VECTORS, ids=repr)
@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_smuggling_vectors_never_end_the_data(speedups, vector: bytes, mode: str) -> None:
    wire = b"Subject: hi\r\n\r\nhello" + vector + SMUGGLED + b"tail\r\n.\r\nQUIT\r\n"
    expected = None
    for i in range(len(wire) + 1):
        r = speedups.DataReader(10_000, mode)
        out = feed_all(r, [wire[:i], wire[i:]])
        assert r.done, i
        assert r.rest == rest_of([wire[:i], wire[i:]], len(wire) - 6), i
        assert r.bad_eol, i
        assert SMUGGLED in out, i
        if expected is None:
            expected = out
        assert out == expected, i
    r = speedups.DataReader(10_000, mode)
    out = feed_all(r, [wire[i:i + 1] for i in range(len(wire))])
    assert out == expected and r.done
    if mode == "reject":
        # Passed through untouched: the session refuses it after the real terminator.
        assert expected == b"Subject: hi\r\n\r\nhello" + vector + SMUGGLED + b"tail\r\n"
    else:
        assert b"\r\n.\r\n" in expected
        assert expected.count(b"\r") == expected.count(b"\n") == expected.count(b"\r\n")


@pytest.mark.parametrize("mode", ["reject", "normalize"])
@pytest.mark.parametrize("vector", [b".\n", b".\r", b".\rX", b".\n.\r\n"], ids=repr)
def test_first_line_vectors(speedups, mode: str, vector: bytes) -> None:
    r = speedups.DataReader(1000, mode)
    out = r.feed(vector + b"x\r\n")
    assert not r.done and r.bad_eol
    assert out.startswith(b".")


def test_normalize_smuggling_vectors_become_a_dot_line(speedups) -> None:
    for vector in (b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r"):
        r = speedups.DataReader(1000, "normalize")
        out = r.feed(b"hello" + vector + b"MAIL\r\n.\r\n")
        assert out == b"hello\r\n.\r\nMAIL\r\n", vector
        assert r.bad_eol and r.done


@pytest.mark.parametrize("wire, normalized", [
    (b"a\nb\rc\r\n.\r\n", b"a\r\nb\r\nc\r\n"),
    (b"a\r\r\n.\r\n", b"a\r\n\r\n"),
    (b"a\n\r\n.\r\n", b"a\r\n\r\n"),
    (b"a\n\n\r\n.\r\n", b"a\r\n\r\n\r\n"),
    (b"\r\r\r\n.\r\n", b"\r\n\r\n\r\n"),
    (b"a\n..b\r\n.\r\n", b"a\r\n..b\r\n"),  # a dot after a bare LF is content, never stuffing
    (b".\rb\r\n.\r\n", b".\r\nb\r\n"),
    (b".\nb\r\n.\r\n", b".\r\nb\r\n"),
])
def test_normalize(speedups, wire: bytes, normalized: bytes) -> None:
    for i in range(len(wire) + 1):
        r = speedups.DataReader(1000, "normalize")
        out = feed_all(r, [wire[:i], wire[i:]])
        assert out == normalized, i
        assert r.done and r.bad_eol and r.size == len(normalized)


def test_reject_mode_passes_bare_endings_through(speedups) -> None:
    wire = b"a\nb\rc\r\n.\r\n"
    r = speedups.DataReader(1000)
    assert r.feed(wire) == b"a\nb\rc\r\n"
    assert r.bad_eol and r.done


def test_crlf_split_across_chunks_is_not_bare(speedups) -> None:
    r = speedups.DataReader(1000)
    assert feed_all(r, [b"a\r", b"\nb\r", b"\n.\r", b"\n"]) == b"a\r\nb\r\n"
    assert r.done and not r.bad_eol


def test_bare_cr_at_end_of_chunk(speedups) -> None:
    r = speedups.DataReader(1000, "normalize")
    assert r.feed(b"a\r") == b"a\r"
    assert not r.bad_eol  # not known yet
    assert r.feed(b"b\r\n") == b"\nb\r\n"
    assert r.bad_eol


@pytest.mark.parametrize(("data", "bare"), [
    (b"", False), (b"plain", False), (b"a\r\nb\r\n", False), (b"\r\n\r\n", False),
    (b"a\nb", True), (b"a\rb", True), (b"\n", True), (b"\r", True), (b"a\r", True),
    (b"\na", True), (b"a\r\n\n", True), (b"a\r\r\n", True), (b"a\n\r", True),
    (b"x" * 5000 + b"\r\n" + b"y\n", True), (b"\r\n" * 1000 + b".\r", True),
])
def test_has_bare_eol(speedups, data: bytes, bare: bool) -> None:
    assert speedups.has_bare_eol(data) is bare
    assert speedups.has_bare_eol(bytearray(data)) is bare


def test_has_bare_eol_twins_agree_on_every_short_input() -> None:
    """Every string of up to 7 octets over CR, LF and "a": both twins give the same answer."""
    import itertools

    impls = [pkg.implementations()[leg] for leg in LEGS]
    for n in range(8):
        for combo in itertools.product(b"\r\na", repeat=n):
            data = bytes(combo)
            answers = {impl.has_bare_eol(data) for impl in impls}
            assert len(answers) == 1, data


def test_size_and_too_big(speedups) -> None:
    r = speedups.DataReader(10)
    assert r.feed(b"12345678\r\n") == b"12345678\r\n"
    assert r.size == 10 and not r.too_big
    assert r.feed(b"x") == b""
    assert r.too_big and r.size == 11
    assert r.feed(b"yz\r\n..w\r\n") == b""
    assert r.size == 19 and not r.done  # 11 + "yz\r\n" + ".w\r\n"
    assert r.feed(b".\r\nQUIT\r\n") == b""
    assert r.done and r.too_big and r.size == 19 and r.rest == b"QUIT\r\n"


def test_too_big_in_one_chunk(speedups) -> None:
    r = speedups.DataReader(3)
    assert r.feed(b"abcd\r\n.\r\nX") == b""
    assert (r.done, r.too_big, r.size, r.rest) == (True, True, 6, b"X")


def test_size_counts_normalized_output(speedups) -> None:
    r = speedups.DataReader(100, "normalize")
    assert r.feed(b"a\nb\r\n.\r\n") == b"a\r\nb\r\n"
    assert r.size == 6
    r = speedups.DataReader(5, "normalize")
    r.feed(b"a\nb\r\n.\r\n")  # "a\r\nb\r\n" is 6 octets
    assert r.too_big and r.size == 6 and r.done


def test_line_too_long(speedups) -> None:
    r = speedups.DataReader(10_000, max_line=10)
    r.feed(b"12345678\r\n")
    assert not r.line_too_long
    r.feed(b".12345678\r\n")  # the stuffing dot does not count (RFC 5321 §4.5.3.1.6)
    assert not r.line_too_long
    r.feed(b"1234")
    r.feed(b"56789\r")
    assert not r.line_too_long
    r.feed(b"\n.\r\n")
    assert r.line_too_long and r.done


def test_line_length_default_is_1000(speedups) -> None:
    r = speedups.DataReader(10_000)
    r.feed(b"x" * 998 + b"\r\n")
    assert not r.line_too_long
    r.feed(b"y" * 999 + b"\r\n.\r\n")
    assert r.line_too_long


def test_line_length_and_bare_endings(speedups) -> None:
    wire = b"12345678\n12345678\r\n.\r\n"
    r = speedups.DataReader(10_000, "normalize", max_line=10)
    r.feed(wire)
    assert not r.line_too_long  # normalized: two lines of 10 octets
    r = speedups.DataReader(10_000, "reject", max_line=10)
    r.feed(wire)
    assert r.line_too_long  # one line of 19 octets with a bare LF inside


def test_reader_keeps_no_message_in_memory(speedups) -> None:
    # Each feed returns only what its own chunk carried (plus at most the two held octets).
    r = speedups.DataReader(1 << 30)
    chunk = (b"." + b"x" * 70 + b"\r\n") * 100
    total = 0
    for _ in range(50):
        out = r.feed(chunk)
        assert len(out) <= len(chunk) + 2
        total += len(out)
    assert total == r.size == 50 * (len(chunk) - 100)


# --------------------------------------------------------------------------- dot_stuff

STUFF_CASES = [
    (b"", True, b""),
    (b".", True, b".."),
    (b".", False, b"."),
    (b"a\r\n.b", True, b"a\r\n..b"),
    (b"a\r\n.b", False, b"a\r\n..b"),
    (b"a\n.b", True, b"a\n.b"),
    (b"a\r.b", True, b"a\r.b"),
    (b"\r\n.", True, b"\r\n.."),
    (b"..\r\n..\r\n", True, b"...\r\n...\r\n"),
    (b".\r\n.\r\n.", True, b"..\r\n..\r\n.."),
    (b"no dots\r\nhere\r\n", True, b"no dots\r\nhere\r\n"),
    (b"\r\n", True, b"\r\n"),
    (b"\n.", True, b"\n."),
]


@pytest.mark.parametrize("data, at_line_start, stuffed", STUFF_CASES)
def test_dot_stuff(speedups, data: bytes, at_line_start: bool, stuffed: bytes) -> None:
    assert speedups.dot_stuff(data, at_line_start) == stuffed
    if at_line_start:
        assert speedups.dot_stuff(data) == stuffed
    assert speedups.dot_stuff(bytearray(data), at_line_start) == stuffed


def test_dot_stuff_then_read(speedups) -> None:
    wire = speedups.dot_stuff(MULTILINE) + b".\r\n"
    assert wire == MULTILINE_WIRE[:-4]
    r = speedups.DataReader(10_000)
    assert r.feed(wire) == MULTILINE and r.done


# --------------------------------------------------------------------------- properties

# Messages made mostly of the octets that matter to the reader.
message_bytes = st.lists(
    st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"bc", b"\r\n.", b"\r\n.\r\n",
                     b"x" * 40, b"\x00", b"\xff"]),
    max_size=60,
).map(b"".join) | st.binary(max_size=200)


@st.composite
def chunked(draw, data_strategy=message_bytes):
    data = draw(data_strategy)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    chunks, prev = [], 0
    for c in cuts + [len(data)]:
        chunks.append(data[prev:c])
        prev = c
    return data, chunks


def reference(data: bytes, normalize: bool) -> tuple[bytes, bool, bytes, bool] | None:
    """The reader's contract, stated line by line: (message, done, rest, bad_eol), or None
    when ``data`` holds no terminator."""
    out, at_bol, bad = [], True, False
    for m in re.finditer(rb"([^\r\n]*)(\r\n|\r|\n)", data):
        text, eol = m.groups()
        bad = bad or eol != b"\r\n"
        if at_bol and text == b"." and eol == b"\r\n":
            return b"".join(out), True, data[m.end():], bad
        if at_bol and text.startswith(b".") and len(text) > 1:
            text = text[1:]  # a stuffing dot
        out.append(text + (b"\r\n" if normalize else eol))
        at_bol = eol == b"\r\n"
    return None


def run_reader(impl, chunks, mode, max_size=1 << 20, max_line=1000):
    r = impl.DataReader(max_size, mode, max_line)
    outs = []
    for chunk in chunks:
        outs.append(r.feed(chunk))
        if r.done:
            break
    return r, b"".join(outs)


@PROPS
@given(chunked(), st.sampled_from(["reject", "normalize"]))
def test_reader_matches_reference(speedups, case, mode) -> None:
    data, chunks = case
    data += b"\r\n.\r\nREST"
    chunks = chunks[:-1] + [chunks[-1] + b"\r\n.\r\nREST"]
    expected = reference(data, mode == "normalize")
    assert expected is not None
    message, _, rest, bad = expected
    r, out = run_reader(speedups, chunks, mode)
    assert out == message
    assert r.done and r.size == len(message) and r.bad_eol == bad
    assert r.rest == rest_of(chunks, len(data) - len(rest))
    lines = out.split(b"\r\n")[:-1]
    assert r.line_too_long == any(len(line) + 2 > 1000 for line in lines)


@PROPS
@given(chunked(), st.sampled_from(["reject", "normalize"]), st.integers(0, 300),
       st.integers(0, 60))
def test_twins_agree_on_data(twins, case, mode, max_size, max_line) -> None:
    _, chunks = case
    py = twins[0].DataReader(max_size, mode, max_line)
    cy = twins[1].DataReader(max_size, mode, max_line)
    for chunk in chunks:
        assert py.feed(chunk) == cy.feed(chunk)
        assert state(py) == state(cy)
        if py.done:
            with pytest.raises(ValueError):
                py.feed(b"x")
            with pytest.raises(ValueError):
                cy.feed(b"x")
            break


@PROPS
@given(chunked(), st.sampled_from(["reject", "normalize"]))
def test_chunking_does_not_matter(speedups, case, mode) -> None:
    data, chunks = case
    whole = speedups.DataReader(1 << 20, mode)
    out_whole = whole.feed(data)
    r, out = run_reader(speedups, chunks, mode)
    assert out == out_whole
    if whole.done:
        assert r.rest == rest_of(chunks, len(data) - len(whole.rest))
    # Attributes other than rest do not depend on where the chunks were cut.
    assert (r.done, r.size, r.bad_eol, r.line_too_long) == (
        whole.done, whole.size, whole.bad_eol, whole.line_too_long)


@PROPS
@given(chunked())
def test_dot_stuff_round_trip(speedups, case) -> None:
    content, cuts = case
    if content == b"" or content.endswith(b"\r\n"):
        wire, message = speedups.dot_stuff(content) + b".\r\n", content
    else:
        wire, message = speedups.dot_stuff(content) + b"\r\n.\r\n", content + b"\r\n"
    # Re-cut the wire at the same offsets as the content.
    chunks, prev = [], 0
    for c in [len(x) for x in cuts][:-1]:
        chunks.append(wire[prev:prev + c])
        prev += c
    chunks.append(wire[prev:] + b"NEXT")
    r, out = run_reader(speedups, chunks, "reject")
    assert out == message
    assert r.done and r.rest == b"NEXT"
    assert r.bad_eol == (message.count(b"\r") != message.count(b"\r\n")
                         or message.count(b"\n") != message.count(b"\r\n"))


crlf_lines = st.lists(
    st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=20,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@PROPS
@given(crlf_lines, st.integers(1, 64))
def test_dot_stuff_round_trip_normalize(speedups, content, step) -> None:
    wire = speedups.dot_stuff(content) + b".\r\n"
    r, out = run_reader(speedups, [wire[i:i + step] for i in range(0, len(wire), step)],
                        "normalize")
    assert out == content and r.done and not r.bad_eol


@PROPS
@given(st.binary(max_size=200), st.booleans())
def test_twins_agree_on_dot_stuff(twins, data, at_line_start) -> None:
    assert twins[0].dot_stuff(data, at_line_start) == twins[1].dot_stuff(data, at_line_start)


CRLF_CASES = [
    (b"", b""),
    (b"clean\r\n.dot\r\n", b"clean\r\n..dot\r\n"),
    (b"a\n.\nb", b"a\r\n..\r\nb"),  # the smuggling vector: a bare-LF "." line
    (b"a\r.\rb", b"a\r\n..\r\nb"),
    (b"\n\r", b"\r\n\r\n"),  # LF then CR: two bare line ends, not one CRLF
    (b"x\r", b"x\r\n"),  # a CR at the very end is bare
    (b"\r\r\n", b"\r\n\r\n"),
    (b".\n", b"..\r\n"),
]


@pytest.mark.parametrize("data, wire", CRLF_CASES)
def test_dot_stuff_crlf(speedups, data: bytes, wire: bytes) -> None:
    assert speedups.dot_stuff(data, True, True) == wire
    assert speedups.dot_stuff(bytearray(data), True, crlf=True) == wire
    clean = b"no bare line ends\r\n"
    assert speedups.dot_stuff(clean, True, True) == clean


@PROPS
@given(message_bytes, st.booleans())
def test_dot_stuff_crlf_leaves_no_bare_line_end(twins, data, at_line_start) -> None:
    """Both twins agree, and the output read back (normalize mode, which keeps CRLF lines
    as they are) is the input with every line end as CRLF."""
    out = twins[0].dot_stuff(data, at_line_start, True)
    assert out == twins[1].dot_stuff(data, at_line_start, True)
    assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")
    lines = re.split(rb"\r\n|\r|\n", data)
    expected = b"\r\n".join(lines)
    wire = out if not at_line_start or not out.startswith(b".") else out[1:]
    assert wire.replace(b"\r\n..", b"\r\n.") == expected


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except CommandSyntaxError as exc:
        return ("error", exc.text)


path_fragments = st.lists(
    st.sampled_from([b"FROM:", b"TO:", b"from:", b" ", b"<", b">", b"@", b'"', b"\\", b".",
                     b"..", b"[", b"]", b"IPv6:", b":", b"::", b",", b"a", b"Z", b"0", b"255",
                     b"1.2.3.4", b"-", b"=", b"SIZE", b"SMTPUTF8", b"x@y", b"\xc3\xa9",
                     b"\xff", b"\x00", b"postmaster", b"+", b"ffff"]),
    max_size=30,
).map(b"".join)


@PROPS
@given(path_fragments | st.binary(max_size=80), st.sampled_from([b"FROM", b"TO", b"to"]),
       st.booleans())
def test_parse_path_raises_only_syntax_errors(speedups, arg, keyword, utf8) -> None:
    kind, value = outcome(speedups.parse_path, arg, keyword, utf8)
    if kind == "ok":
        address, params = value
        assert isinstance(address, str) and isinstance(params, dict)


@PROPS
@given(path_fragments | st.binary(max_size=80), st.sampled_from([b"FROM", b"TO", b"to"]),
       st.booleans())
def test_twins_agree_on_parse_path(twins, arg, keyword, utf8) -> None:
    assert outcome(twins[0].parse_path, arg, keyword, utf8) == outcome(
        twins[1].parse_path, arg, keyword, utf8)


@PROPS
@given(st.binary(max_size=60) | path_fragments)
def test_split_command_never_raises(speedups, line) -> None:
    verb, arg = speedups.split_command(line)
    assert verb == "?" or verb == verb.upper() and verb.isascii()
    assert isinstance(arg, bytes)


@PROPS
@given(st.binary(max_size=60) | path_fragments)
def test_twins_agree_on_split_command(twins, line) -> None:
    assert twins[0].split_command(line) == twins[1].split_command(line)


@PROPS
@given(st.text(max_size=40))
def test_xtext_round_trip(speedups, text) -> None:
    encoded = speedups.encode_xtext(text)
    assert re.fullmatch(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*", encoded)
    assert speedups.decode_xtext(encoded) == text


@PROPS
@given(st.text(alphabet="+=AbF09 é\x00zZ", max_size=20) | st.text(max_size=20))
def test_twins_agree_on_xtext(twins, text) -> None:
    assert outcome(twins[0].decode_xtext, text) == outcome(twins[1].decode_xtext, text)
    assert twins[0].encode_xtext(text) == twins[1].encode_xtext(text)
