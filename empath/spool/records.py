"""The records a queue file's envelope holds: the envelope, its recipients and route records.

One typed definition per record and one constructor per record: every writer (the receiver,
local submission and ``empath.embed``, the delivery workers' notices, the transports' route
records) builds them here, so the JSON keys are the ones docs/SPOOL.md documents ("Envelope",
"Route records") and no writer spells a record of its own. The dicts are plain JSON objects on
disk and in memory (``fileformat.encode_tail`` writes them, ``read_queue_file`` returns them);
the TypedDicts only let the type checker see their keys.

Also here: the recipient statuses and the two questions every reader asks of a recipient list
(which recipients are still open, the domain of an address), answered once.

This module never touches a file, a clock or the network: ``received_at`` is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NotRequired, TypedDict

# Recipient statuses (``recipients[].status``; absent means pending).
PENDING, DELIVERED, DEFERRED, FAILED, EXPIRED = (
    "pending", "delivered", "deferred", "failed", "expired")
OPEN_STATUSES = (PENDING, DEFERRED)
CLOSED_STATUSES = (DELIVERED, FAILED, EXPIRED)


class Recipient(TypedDict):
    """One recipient: the address with its RFC 3461 ORCPT and NOTIFY, and its delivery state
    once a worker has tried it."""

    address: str
    orcpt: str | None
    notify: list[str] | None
    status: NotRequired[str]
    attempts: NotRequired[int]
    last: NotRequired[dict[str, Any]]
    expired_by: NotRequired[str]
    dsn: NotRequired[str]
    marked_done: NotRequired[bool]


class Params(TypedDict):
    """The transaction's ESMTP parameters (RFC 6152, 6531, 1870, 3461)."""

    body: str | None
    smtputf8: bool
    size: int | None
    ret: str | None
    envid: str | None


class Client(TypedDict):
    """Where the message came from: the SMTP client, or a local submission (``uid``, ``user``)."""

    ip: str | None
    port: int | None
    helo: str | None
    esmtp: bool
    tls: dict[str, Any] | None
    listener: str
    auth: str | None
    uid: NotRequired[int]
    user: NotRequired[str]


class Envelope(TypedDict):
    """The envelope of a queue file (docs/SPOOL.md, "Envelope")."""

    id: str
    sender: str
    recipients: list[Recipient]
    params: Params
    client: Client
    received_at: float
    metadata: dict[str, Any]
    priority: NotRequired[int]
    traceparent: NotRequired[str]
    notice_of: NotRequired[str]
    notice_kind: NotRequired[str]
    # Set by the spool writer when the data's length is known, and for a slot.
    data_size: NotRequired[int]
    slot_check: NotRequired[int]
    # Delivery state, added by the delivery workers.
    attempt_count: NotRequired[int]
    attempts: NotRequired[list[dict[str, Any]]]
    next_retry_at: NotRequired[float | None]
    delay_notified: NotRequired[bool]


class Route(TypedDict, total=False):
    """How one attempt reached one destination domain (docs/SPOOL.md, "Route records").
    ``domain``, ``transport`` and ``duration`` always; the rest per transport."""

    domain: str
    transport: str
    duration: float
    server: str | None
    status: int | None
    ip: str | None
    port: int | None
    tls: dict[str, Any] | None
    dsn: bool | None
    mx_index: int | None
    dnssec: str | None
    dnssec_lookups: dict[str, str]
    dane: str | None
    dane_match: str
    mta_sts: str
    mta_sts_result: str | None
    mta_sts_failure: str
    breaker: str


def new_recipient(address: str, *, orcpt: str | None = None,
                  notify: list[str] | None = None) -> Recipient:
    """A recipient as RCPT TO (or a submission) names it, not yet tried."""
    return {"address": address, "orcpt": orcpt, "notify": notify}


def new_params(*, body: str | None, smtputf8: bool, size: int | None = None,
               ret: str | None = None, envid: str | None = None) -> Params:
    return {"body": body, "smtputf8": smtputf8, "size": size, "ret": ret, "envid": envid}


def new_client(*, listener: str, ip: str | None = None, port: int | None = None,
               helo: str | None = None, esmtp: bool = False,
               tls: dict[str, Any] | None = None, auth: str | None = None,
               uid: int | None = None, user: str | None = None) -> Client:
    client: Client = {"ip": ip, "port": port, "helo": helo, "esmtp": esmtp, "tls": tls,
                      "listener": listener, "auth": auth}
    if uid is not None:
        client["uid"] = uid
    if user is not None:
        client["user"] = user
    return client


def new_envelope(*, message_id: str, sender: str, recipients: list[Recipient],
                 params: Params, client: Client, received_at: float,
                 metadata: dict[str, Any] | None = None, priority: int | None = None,
                 trace: Mapping[str, str] | None = None, notice_of: str | None = None,
                 notice_kind: str | None = None) -> Envelope:
    """The envelope a writer stores with a new message. ``priority`` is written when the
    writer decided one (the receiver); ``trace`` holds the tracing keys (``traceparent``);
    ``notice_of``/``notice_kind`` mark a delivery status notice."""
    env: Envelope = {"id": message_id, "sender": sender, "recipients": recipients,
                     "params": params, "client": client, "received_at": received_at,
                     "metadata": {} if metadata is None else metadata}
    if priority is not None:
        env["priority"] = priority
    if trace:
        if "traceparent" in trace:
            env["traceparent"] = trace["traceparent"]
    if notice_of is not None:
        env["notice_of"] = notice_of
    if notice_kind is not None:
        env["notice_kind"] = notice_kind
    return env


def new_route(domain: str, transport: str, duration: float = 0.0,
              **fields: Any) -> dict[str, Any]:
    """A route record: ``domain`` (``(local)`` for bare names), ``transport``, ``duration``
    (seconds) and the transport's own keys (``Route``). Returned as a plain dict because
    transports fill it in while the attempt runs."""
    unknown = set(fields) - set(Route.__annotations__)
    if unknown:
        raise TypeError(f"not a route record key: {', '.join(sorted(unknown))}")
    return {"domain": domain or "(local)", "transport": transport, **fields,
            "duration": duration}


def recipient_domain(address: str) -> str:
    """The lower-cased domain of an address ("" for a bare local part)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def is_open(recipient: Mapping[str, Any]) -> bool:
    """A recipient still waiting for delivery (pending or deferred)."""
    return recipient.get("status", PENDING) in OPEN_STATUSES


def open_recipients(envelope: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The recipients of ``envelope`` still waiting for delivery, in envelope order (none
    for a file whose envelope could not be read)."""
    if envelope is None:
        return []
    rcpts: Iterable[dict[str, Any]] = envelope.get("recipients", [])
    return [r for r in rcpts if is_open(r)]
