"""The one exception of the speedups: a syntax error in an SMTP command argument.

Both twins raise this same class (the compiled modules import it from here), so the session
catches one type and answers with the same reply whichever implementation is active.
"""

from __future__ import annotations


class CommandSyntaxError(Exception):
    """An SMTP command argument that cannot be parsed; ``text`` says what is wrong.

    ``text`` is plain ASCII meant for the reply line (e.g. ``501 5.5.4 <text>``); it never
    echoes client bytes other than an already validated parameter keyword.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


# The reply texts, shared by both twins so that they fail with the same words.
E_CONTROL = "control character in command argument"
E_BRACKETS = "syntax error: the address must be enclosed in <>"
E_UNBALANCED = "syntax error: unbalanced angle brackets"
E_UNTERMINATED = "syntax error: unterminated quoted string"
E_PATH_LONG = "path longer than 256 octets"
E_SPACE = "syntax error: expected a space after the address"
E_PARAM = "bad ESMTP parameter syntax"
E_NULL_RCPT = "the null path <> is not a valid recipient"
E_NON_ASCII = "non-ASCII address requires SMTPUTF8"
E_BAD_UTF8 = "address is not valid UTF-8"
E_ROUTE = "malformed source route"
E_LOCAL = "malformed local part"
E_NO_DOMAIN = "address has no domain"
E_LOCAL_LONG = "local part longer than 64 octets"
E_DOMAIN_LONG = "domain longer than 255 octets"
E_DOMAIN = "malformed domain"
E_LITERAL = "malformed address literal"
E_XTEXT_CHAR = "invalid character in xtext"
E_XTEXT_ESCAPE = "malformed xtext escape"
E_XTEXT_UTF8 = "xtext does not decode to UTF-8"


def e_keyword(keyword: str) -> str:
    return f"syntax error: expected {keyword}:"


def e_value(key: str) -> str:
    return f"bad value for ESMTP parameter {key}"


def e_duplicate(key: str) -> str:
    return f"duplicate ESMTP parameter {key}"
