"""The records a queue file's envelope holds: the envelope, its recipients and route records.

One typed definition per record and one constructor per record: every writer (the receiver,
local submission and ``empath.embed``, the delivery workers' notices, the transports' route
records) builds them here, so the JSON keys are the ones docs/SPOOL.md documents ("Envelope",
"Route records") and no writer spells a record of its own. The dicts are plain JSON objects on
disk and in memory (``fileformat.encode_tail`` writes them, ``read_queue_file`` returns them);
the TypedDicts let the type checker see their keys. Every reader gets its envelope through
``parse_envelope``, the one check of the shape delivery relies on (the types of the values it
reads and writes back), which names the key that is wrong: a file that fails it goes to
``corrupt/`` instead of failing every attempt.

Also here: the recipient statuses and the two questions every reader asks of a recipient list
(which recipients are still open, the domain of an address), answered once.

This module never touches a file, a clock or the network: ``received_at`` is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict, cast

# Recipient statuses (``recipients[].status``; absent means pending).
PENDING, DELIVERED, DEFERRED, FAILED, EXPIRED = (
    "pending", "delivered", "deferred", "failed", "expired")
OPEN_STATUSES = (PENDING, DEFERRED)
CLOSED_STATUSES = (DELIVERED, FAILED, EXPIRED)


class Result(TypedDict):
    """What one attempt did for one recipient (``attempts[].results[<address>]``)."""

    status: str
    code: int | None
    enhanced: str | None
    text: str
    server: str | None


class LastResult(TypedDict, total=False):
    """A recipient's last result (``recipients[].last``): the reply, and how the recipient
    was carried, which a success notice depends on (RFC 3461 §5.2.2, §6.2). The worker
    writes the reply's keys always, ``transport`` and ``next_hop_dsn`` when the route says
    (``state.record_attempt``); readers use ``.get``, so ``rcpt.get("last", {})`` is one."""

    at: float
    code: int | None
    enhanced: str | None
    text: str
    server: str | None
    transport: str | None
    next_hop_dsn: bool


class Recipient(TypedDict):
    """One recipient: the address with its RFC 3461 ORCPT and NOTIFY, and its delivery state
    once a worker has tried it."""

    address: str
    orcpt: str | None
    notify: list[str] | None
    status: NotRequired[str]
    attempts: NotRequired[int]
    last: NotRequired[LastResult]
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
    tls: dict[str, Any] | None  # free-form: what the TLS layer reports (version, cipher)
    listener: str
    auth: str | None
    uid: NotRequired[int]
    user: NotRequired[str]


class Envelope(TypedDict):
    """The envelope of a queue file (docs/SPOOL.md, "Envelope")."""

    id: str
    sender: str
    recipients: list[Recipient]
    # Every writer writes these four (new_envelope), but parse_envelope does not require
    # them (delivery needs none of them; ``metadata`` goes when the last module's is
    # dropped): readers use ``.get``.
    params: NotRequired[Params]
    client: NotRequired[Client]
    received_at: NotRequired[float]
    metadata: NotRequired[dict[str, Any]]  # free-form: each receiving module's own JSON
    priority: NotRequired[int]
    traceparent: NotRequired[str]
    notice_of: NotRequired[str]
    notice_kind: NotRequired[str]
    # Set by the spool writer when the data's length is known, and for a slot.
    data_size: NotRequired[int]
    slot_check: NotRequired[int]
    # Delivery state, added by the delivery workers.
    attempt_count: NotRequired[int]
    attempts: NotRequired[list[Attempt]]
    next_retry_at: NotRequired[float | None]
    delay_notified: NotRequired[bool]


class Attempt(TypedDict):
    """One record of the attempt history (``attempts[]``)."""

    at: float
    number: int
    duration: NotRequired[float]
    routes: NotRequired[list[Route]]
    results: dict[str, Result]


class AttemptInfo(TypedDict, total=False):
    """What the worker knows of an attempt besides its results: its duration and route
    records (copied into the ``Attempt``)."""

    duration: float
    routes: list[Route]


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
    tls: dict[str, Any] | None  # free-form: what the TLS layer reports
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
              **fields: Any) -> Route:
    """A route record: ``domain`` (``(local)`` for bare names), ``transport``, ``duration``
    (seconds) and the transport's own keys (``Route``), which transports fill in while the
    attempt runs."""
    unknown = set(fields) - set(Route.__annotations__)
    if unknown:
        raise TypeError(f"not a route record key: {', '.join(sorted(unknown))}")
    route: Route = {"domain": domain or "(local)", "transport": transport}
    route.update(fields)  # type: ignore[typeddict-item]  # keys checked above
    route["duration"] = duration
    return route


def recipient_domain(address: str) -> str:
    """The lower-cased domain of an address ("" for a bare local part)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def is_open(recipient: Recipient) -> bool:
    """A recipient still waiting for delivery (pending or deferred)."""
    return recipient.get("status", PENDING) in OPEN_STATUSES


def open_recipients(envelope: Envelope | None) -> list[Recipient]:
    """The recipients of ``envelope`` still waiting for delivery, in envelope order (none
    for a file whose envelope could not be read)."""
    if envelope is None:
        return []
    return [r for r in envelope.get("recipients", []) if is_open(r)]


# -- reading -------------------------------------------------------------------------------
STATUSES = (PENDING, DELIVERED, DEFERRED, FAILED, EXPIRED)


class EnvelopeError(ValueError):
    """An envelope that delivery cannot use as it is; the message names the key."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_recipient(index: int, rcpt: object) -> None:
    # Messages are built only on failure: this runs for every recipient of every read.
    if not isinstance(rcpt, dict) or not isinstance(rcpt.get("address"), str):
        raise EnvelopeError(
            f"envelope has a recipient without an address (recipients[{index}].address)")
    notify = rcpt.get("notify")
    if notify is not None and not isinstance(notify, list):
        raise EnvelopeError(f"envelope has a malformed NOTIFY (recipients[{index}].notify)")
    status = rcpt.get("status", PENDING)
    if status not in STATUSES:
        raise EnvelopeError(f"envelope has a recipient with an unknown status {status!r} "
                            f"(recipients[{index}].status)")
    if "attempts" in rcpt and not _is_int(rcpt["attempts"]):
        raise EnvelopeError(f"envelope has a recipient with a malformed attempt count "
                            f"(recipients[{index}].attempts)")
    if "last" in rcpt and not isinstance(rcpt["last"], dict):
        if rcpt["last"] is not None:
            raise EnvelopeError(f"envelope has a recipient with a malformed last result "
                                f"(recipients[{index}].last)")
        del rcpt["last"]  # null: no result yet, as if absent (readers use .get("last", {}))


def parse_envelope(obj: object, data_length: int | None = None) -> Envelope:
    """``obj`` (a queue file's envelope JSON) as an ``Envelope``, after checking what
    delivery reads and writes back: EnvelopeError names the key that is wrong.

    Sender and recipients present (each a dict with an address, a known status, an integer
    attempt count, a list NOTIFY); ``received_at``, ``attempt_count``, ``next_retry_at``
    numbers; ``params``, ``client`` and ``metadata`` objects, the history a list;
    ``data_size`` a non-negative integer equal to ``data_length`` (the data length of the
    file's trailer) when that is given. Keys a writer always writes but delivery does not
    need (``params``, ``client``, ``metadata``, ``received_at``) may be missing: readers
    of those use ``.get``. The dict is returned as it is, not copied.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        raise EnvelopeError("envelope is not an object with an id (id)")
    if not isinstance(obj.get("sender"), str):
        raise EnvelopeError("envelope has no sender (sender)")
    recipients = obj.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        what = ("missing" if recipients is None else "empty" if recipients == []
                else f"a {type(recipients).__name__}, not a list")
        raise EnvelopeError(f"envelope has no recipients (recipients: {what})")
    for index, rcpt in enumerate(recipients):
        _check_recipient(index, rcpt)
    for key in ("received_at", "attempt_count"):
        if key in obj and not _is_number(obj[key]):
            raise EnvelopeError(f"envelope has a malformed {key}")
    if obj.get("next_retry_at") is not None and not _is_number(obj["next_retry_at"]):
        raise EnvelopeError("envelope has a malformed next_retry_at")
    if "data_size" in obj:
        size = obj["data_size"]
        if not _is_int(size) or size < 0:
            raise EnvelopeError(f"envelope has a malformed data_size {size!r}")
        if data_length is not None and size != data_length:
            raise EnvelopeError(f"envelope's data_size {size} differs from the file's data "
                                f"length {data_length}")
    for key in ("params", "client", "metadata"):
        if not isinstance(obj.get(key, {}), dict):
            raise EnvelopeError(f"envelope has malformed {key}")
    if not isinstance(obj.get("attempts", []), list):
        raise EnvelopeError("envelope has a malformed attempt history (attempts)")
    return cast(Envelope, obj)
