"""ESMTP parameters of MAIL and RCPT (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8,
RFC 3461 DSN: RET, ENVID, NOTIFY, ORCPT), and who counts as a trusted client.

Pure functions: each returns the reply that refuses a bad parameter, or records a good one.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from empath import _speedups
from empath._speedups import CommandSyntaxError
from empath.smtp import replies as R
from empath.smtp.events import Envelope
from empath.smtp.replies import Reply
from empath.spool.records import Recipient, new_recipient

NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})
MAX_ENVID = 100  # RFC 3461 §4.4


def xtext(value: str | None) -> str | None:
    """The decoded RFC 3461 xtext, or None when it is malformed."""
    if value is None:
        return None
    try:
        decoded: str = _speedups.decode_xtext(value)
    except CommandSyntaxError:
        return None
    return decoded


def mail_param(env: Envelope, name: str, value: str | None, max_size: int) -> Reply | None:
    """Record one MAIL parameter in ``env``; the refusal when it is bad or unknown."""
    if name == "SIZE":
        if value is None or not value.isdigit() or len(value) > 20:
            return R.PARAM_BAD.format(name=name)
        env.size = int(value)
        if env.size > max_size:
            return R.SIZE_EXCEEDED.format(limit=max_size)
    elif name == "BODY":
        if value is None or value.upper() not in ("7BIT", "8BITMIME"):
            return R.PARAM_BAD.format(name=name)
        env.body = value.upper()
    elif name == "SMTPUTF8":
        if value is not None:
            return R.PARAM_BAD.format(name=name)
        env.smtputf8 = True
    elif name == "RET":
        if value is None or value.upper() not in ("FULL", "HDRS"):
            return R.PARAM_BAD.format(name=name)
        env.ret = value.upper()
    elif name == "ENVID":
        decoded = xtext(value)
        if decoded is None or len(value or "") > MAX_ENVID:
            return R.PARAM_BAD.format(name=name)
        env.envid = decoded
    else:
        return R.PARAM_UNKNOWN.format(name=name)
    return None


def recipient(address: str, params: dict[str, str | None]) -> Recipient | Reply:
    """The recipient record ``{"address", "orcpt", "notify"}``, or the refusal of a bad
    parameter."""
    rcpt = new_recipient(address)
    for name, value in params.items():
        if name == "NOTIFY":
            # RFC 3461 §4.1: NEVER alone, or a list of SUCCESS, FAILURE, DELAY.
            notify = (value or "").upper().split(",")
            if not (notify == ["NEVER"] or (notify and set(notify) <= NOTIFY_VALUES
                                            and len(set(notify)) == len(notify))):
                return R.PARAM_BAD.format(name=name)
            rcpt["notify"] = notify
        elif name == "ORCPT":
            # RFC 3461 §4.2: ORCPT=addr-type ";" xtext, both parts non-empty.
            kind, sep, text = (value or "").partition(";")
            decoded = xtext(text)
            if not sep or not kind or not decoded or not kind.replace("-", "").isalnum():
                return R.PARAM_BAD.format(name=name)
            rcpt["orcpt"] = f"{kind.lower()};{decoded}"
        else:
            return R.PARAM_UNKNOWN.format(name=name)
    return rcpt


def sender_owned(sender: str, user: str, local_domains: frozenset[str]) -> bool:
    """Whether an authenticated ``user`` may use ``sender``: the same domain as a user named
    by address, or a local domain for a bare user name; the null sender always."""
    if not sender:
        return True
    return domain_owned(sender.rpartition("@")[2], user, local_domains)


def domain_owned(domain: str, user: str, local_domains: frozenset[str]) -> bool:
    """Whether an authenticated ``user`` may send as ``domain`` (MAIL FROM with
    require_sender_match, and DKIM signing): the domain of a user named by address, or a local
    domain for a bare user name."""
    domain = domain.lower().rstrip(".")
    if "@" in user:
        return domain == user.rpartition("@")[2].lower().rstrip(".")
    return domain in local_domains


def client_is_trusted(ip: str, networks: tuple[Any, ...]) -> bool:
    """Whether ``ip`` is inside one of ``networks`` (mynetworks)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)
