"""Example module: reject senders and recipients listed in files.

Options (``smtp.modules: [{name: empath.modules.blocklist, options: {...}}]``):

    senders: path of a file of blocked senders
    recipients: path of a file of blocked recipients
    code / text: the reply (default 550 5.7.1 "... is blocked by local policy")

Each file has one entry per line: a whole address (``spam@example.com``) or a domain
(``@example.com``, matching any address at it); ``#`` starts a comment; matching ignores case.
The files are read at setup (a reload re-reads them). A message that passes records which
lists it was checked against in its metadata, so delivery-side hooks can see it.
"""

from __future__ import annotations

from typing import Any

from empath.modules import HookContext, Reject


def read_list(path: str | None) -> frozenset[str]:
    if not path:
        return frozenset()
    entries = set()
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            entry = line.split("#", 1)[0].strip().lower()
            if entry:
                entries.add(entry)
    return frozenset(entries)


class Blocklist:
    def __init__(self, options: dict[str, Any]) -> None:
        unknown = set(options) - {"senders", "recipients", "code", "text"}
        if unknown:
            raise ValueError(f"blocklist: unknown options {sorted(unknown)}")
        self.senders = read_list(options.get("senders"))
        self.recipients = read_list(options.get("recipients"))
        self.code = int(options.get("code", 550))
        self.text = str(options.get("text", "<{address}> is blocked by local policy"))

    def _blocked(self, address: str, entries: frozenset[str]) -> bool:
        address = address.lower()
        return address in entries or ("@" + address.rpartition("@")[2]) in entries

    def _reject(self, address: str) -> Reject:
        return Reject(self.code, self.text.format(address=address),
                      "5.7.1" if self.code >= 500 else "4.7.1")

    def on_mail_from(self, ctx: HookContext, sender: str, params: dict[str, Any]) -> Reject | None:
        if sender and self._blocked(sender, self.senders):
            return self._reject(sender)
        ctx.metadata["sender_checked"] = bool(self.senders)
        return None

    def on_rcpt_to(self, ctx: HookContext, recipient: dict[str, Any]) -> Reject | None:
        if self._blocked(recipient["address"], self.recipients):
            return self._reject(recipient["address"])
        ctx.metadata["recipients_checked"] = ctx.metadata.get("recipients_checked", 0) + 1
        return None


def setup(options: dict[str, Any]) -> Blocklist:
    return Blocklist(options)
