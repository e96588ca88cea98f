"""The shapes of ``empathctl`` output: one JSON record per message (``queue list``), the full
record of ``queue view``, and their text renderings.

The JSON shapes are a documented interface (docs/OPERATIONS.md, "JSON output"): fields are
only ever added, never renamed or removed. Pure functions of a ``QueueEntry`` and the time,
except ``message_parts``, which reads the message data.
"""

from __future__ import annotations

import time
from typing import Any, TypedDict

from empath.ctl.common import format_age, format_size
from empath.spool import MessageSource, read_data
from empath.spool.queue import QueueEntry
from empath.spool.records import Envelope, LastResult, Recipient

FINAL_FAILURES = ("deferred", "failed", "expired")


class RecipientRecord(TypedDict):
    """One recipient in ``queue list --json``."""

    address: str
    status: str
    attempts: int
    last: LastResult | None


class ListRecord(TypedDict):
    """One message as ``queue list --json`` prints it (docs/OPERATIONS.md, "JSON output")."""

    id: str
    status: str
    worker: int | None
    arrival: float
    age: float
    size: int
    file_size: int
    sender: str | None
    recipients: list[RecipientRecord]
    attempts: int
    next_retry_at: float | None
    last_error: str | None
    error: str | None


class ViewRecord(ListRecord):
    """``queue view --json``: the list record plus path, envelope, headers (and body)."""

    path: str
    envelope: Envelope | None
    headers: list[list[str]]
    body: str | None


def stamp(when: float | None) -> str:
    if when is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def recipient_record(rcpt: Recipient) -> RecipientRecord:
    return {"address": rcpt.get("address", ""), "status": rcpt.get("status", "pending"),
            "attempts": int(rcpt.get("attempts", 0)), "last": rcpt.get("last")}


def last_error(envelope: Envelope | None) -> str | None:
    """The newest result of a recipient not delivered: ``451 4.3.0 text (server)``."""
    if envelope is None:
        return None
    newest: LastResult | None = None
    for r in envelope.get("recipients", []):
        last = r.get("last")
        if r.get("status") in FINAL_FAILURES and isinstance(last, dict):
            if newest is None or float(last.get("at") or 0) >= float(newest.get("at") or 0):
                newest = last
    if newest is None:
        return None
    words = [str(w) for w in (newest.get("code"), newest.get("enhanced"), newest.get("text"))
             if w not in (None, "")]
    text = " ".join(words)
    if newest.get("server"):
        text += f" ({newest['server']})"
    return text


def entry_record(entry: QueueEntry, now: float) -> ListRecord:
    """One message as ``queue list --json`` prints it."""
    env = entry.envelope
    return {
        "id": entry.id,
        "status": entry.status,
        "worker": entry.worker,
        "arrival": entry.arrival,
        "age": round(max(0.0, now - entry.arrival), 3),
        "size": int(env.get("data_size", entry.file_size)) if env else entry.file_size,
        "file_size": entry.file_size,
        "sender": None if env is None else env.get("sender", ""),
        "recipients": [] if env is None else [recipient_record(r)
                                              for r in env.get("recipients", [])],
        "attempts": 0 if env is None else int(env.get("attempt_count", 0)),
        "next_retry_at": entry.mtime if entry.status == "deferred" else None,
        "last_error": last_error(env),
        "error": entry.error,
    }


def message_parts(entry: QueueEntry) -> tuple[list[list[str]], bytes]:
    """Header fields ([name, unfolded value]) and the raw body of a message."""
    env = entry.envelope
    length = int(env.get("data_size", 0)) if env is not None else 0
    data = read_data(MessageSource(entry.path, 0, length)) if length else b""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    fields: list[list[str]] = []
    for raw in head.replace(b"\r\n", b"\n").split(b"\n"):
        line = raw.decode("utf-8", "replace")
        if line[:1] in (" ", "\t") and fields:
            fields[-1][1] += line  # RFC 5322 §2.2.3 unfolding: only the line break goes
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append([name, value.lstrip(" ")])
    return fields, body


def view_record(entry: QueueEntry, now: float, headers: list[list[str]],
                body: bytes | None) -> ViewRecord:
    """``queue view --json``: the list record plus path, envelope, headers (and body)."""
    view = ViewRecord(**entry_record(entry, now), path=entry.path, envelope=entry.envelope,
                      headers=headers,
                      body=None if body is None else body.decode("utf-8", "replace"))
    return view


# -- text ------------------------------------------------------------------------------------
LIST_HEADER = (f"{'ID':<26}  {'STATUS':<8}  {'AGE':>6}  {'SIZE':>6}  {'TRIES':>5}  "
               f"{'NEXT RETRY':<10}  SENDER")


def next_retry_text(record: ListRecord, now: float) -> str:
    due = record["next_retry_at"]
    if due is None:
        return "-"
    return "now" if due <= now else "in " + format_age(due - now)


def list_lines(record: ListRecord, now: float) -> list[str]:
    """A message as two or more lines of ``queue list``: a summary, then its recipients."""
    sender = "-" if record["sender"] is None else f"<{record['sender']}>"
    lines = [f"{record['id']:<26}  {record['status']:<8}  {format_age(record['age']):>6}  "
             f"{format_size(record['size']):>6}  {record['attempts']:>5}  "
             f"{next_retry_text(record, now):<10}  {sender}"]
    if record["error"]:
        lines.append(f"    ! {record['error']}")
    for r in record["recipients"]:
        line = f"    {r['status']:<9} {r['address']}"
        last = r.get("last")
        if r["status"] != "delivered" and isinstance(last, dict) and last.get("text"):
            code = " ".join(str(x) for x in (last.get("code"), last.get("enhanced")) if x)
            line += f"  tries={r['attempts']}: {code} {last['text']}".rstrip()
        lines.append(line)
    return lines


def view_lines(record: ViewRecord, now: float) -> list[str]:
    """``queue view`` as text."""
    env = record["envelope"]
    status = record["status"]
    if record["worker"] is not None:
        status += f" (claimed by delivery worker {record['worker']})"
    if record["next_retry_at"] is not None:
        status += (f" (next attempt {next_retry_text(record, now)}, "
                   f"{stamp(record['next_retry_at'])})")
    out = [
        f"id:          {record['id']}",
        f"status:      {status}",
        f"arrival:     {stamp(record['arrival'])} ({format_age(record['age'])} ago)",
        f"size:        {record['size']} bytes (queue file {record['file_size']} bytes)",
        f"file:        {record['path']}",
    ]
    if record["error"] or env is None:
        out.append(f"error:       {record['error']}")
        return out
    client = env.get("client", {})
    out += [
        f"sender:      <{env.get('sender', '')}>",
        "client:      " + ", ".join(f"{k}={_short(v)}" for k, v in client.items()),
        "params:      " + ", ".join(f"{k}={_short(v)}"
                                    for k, v in env.get("params", {}).items()),
        f"attempts:    {env.get('attempt_count', 0)}",
        "recipients:",
    ]
    for r in env.get("recipients", []):
        out.append(f"  {r.get('status', 'pending'):<9} {r.get('address')}  "
                   f"attempts={r.get('attempts', 0)} notify={_short(r.get('notify'))} "
                   f"orcpt={_short(r.get('orcpt'))}")
        last = r.get("last")
        if last is not None:
            out.append(f"            last {stamp(last.get('at'))}: {last.get('code') or ''} "
                       f"{last.get('enhanced') or ''} {last.get('text', '')} "
                       f"[{last.get('server') or '-'}]")
    history = env.get("attempts", [])
    out.append(f"history:     {len(history)} attempt(s) recorded")
    for a in history:
        out.append(f"  #{a.get('number', '?')} {stamp(a.get('at'))} "
                   f"({float(a.get('duration') or 0):.2f}s)")
        for route in a.get("routes", []):
            out.append("     route " + ", ".join(f"{k}={_short(v)}" for k, v in route.items()))
        for addr, res in a.get("results", {}).items():
            out.append(f"     {addr}: {res.get('status')} {res.get('code') or ''} "
                       f"{res.get('enhanced') or ''} {res.get('text', '')}")
    metadata = env.get("metadata", {})
    out.append("metadata:" + ("" if metadata else "    -"))
    for module, data in metadata.items():
        out.append(f"  {module}: {_short(data)}")
    extra = {k: v for k, v in env.items() if k not in _SHOWN}
    for key, value in extra.items():
        out.append(f"{key + ':':<12} {_short(value)}")
    out.append("headers:")
    out += [f"  {name}: {value.replace(chr(9), ' ')}" for name, value in record["headers"]]
    return out


def audit_lines(events: list[dict[str, Any]]) -> list[str]:  # audit records: free-form
    """The audit records of one message (``queue view``), one line each, oldest first."""
    out = [f"audit:       {len(events)} record(s)"]
    for ev in events:
        rest = ", ".join(f"{k}={_short(v)}" for k, v in ev.items()
                         if k not in ("time", "event", "id"))
        out.append(f"  {ev.get('time', '-')} {ev.get('event', '?'):<9} {rest}")
    return out


_SHOWN = {"id", "sender", "recipients", "params", "client", "received_at", "metadata",
          "data_size", "attempt_count", "attempts", "next_retry_at"}


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(_short(v) for v in value) or "-"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_short(v)}" for k, v in value.items()) + "}"
    return str(value)
