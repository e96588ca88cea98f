"""Per-process state of a receiver, shared by all of its connections: settings per listener,
the spool writer, module instances, the DKIM signer, the duplicate-suppression store, AUTH
credentials and failure throttling, connection counts, the free-space check and the timeout
sweep. ``server.py`` holds the per-connection protocol; this module holds no socket.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import ssl
import time
from collections.abc import Iterable
from typing import Any, Protocol

from empath import dkim as dkim_signing
from empath import modules as hooks
from empath import passwords
from empath.config import tlsfiles
from empath.config.typed import Config, ListenerConfig, PriorityRuleConfig
from empath.delivery.local import KnownUsers
from empath.master.child import ChildContext
from empath.smtp import capacity
from empath.smtp import session as S
from empath.smtp.inflow import InFlow
from empath.spool import Spool
from empath.spool.dedup import DedupStore
from empath.spool.records import recipient_domain


class Connection(Protocol):
    """What the receiver's sweep and shutdown need of a connection (server.SMTPProtocol);
    this module imports nothing of server.py."""

    deadline: float  # monotonic time its current timeout passes
    end_of_life: float  # monotonic time its whole lifetime passes
    under_way: bool  # counts in the in-flow's messages under way

    def timed_out(self) -> None: ...

    def close_for_shutdown(self) -> None: ...


FREE_SPACE_CHECK = 1.0  # seconds a free-space reading is trusted

log = logging.getLogger("empath.smtp")


class Receiver:
    """Per-process state shared by all connections of one receiver."""

    def __init__(self, ctx: ChildContext) -> None:
        self.ctx = ctx
        cfg = ctx.config
        self.cfg = cfg
        self.spool = Spool(cfg.spool.path, cfg.spool.recycle_files, cfg.spool.sync)
        self.modules = hooks.load_modules(cfg.smtp.modules)
        self.data_hooks = any("on_data" in m.hooks for m in self.modules)
        self.mail_hooks = any("on_mail_from" in m.hooks for m in self.modules)
        self.connections: set[Connection] = set()
        # Connection counts of the whole daemon, and this receiver's share of the accepts.
        self.table = capacity.ConnectionTable()
        self.gate = capacity.AcceptGate(capacity.share_of(cfg.smtp.max_connections,
                                                          getattr(ctx, "count", 1)),
                                        self.table)
        self.stopping = False
        self.writer: Any = None
        self.data_block = cfg.smtp.timeouts.data_block
        self.inflow = InFlow(self.spool.state_dir("incoming"), cfg.smtp.in_flow_delay,
                             cfg.smtp.in_flow_backlog, cfg.smtp.in_flow_lag)
        self.signer = dkim_signing.Signer(cfg.dkim) if cfg.dkim.domains else None
        window = cfg.smtp.dedup_window
        self.dedup = DedupStore(self.spool, window) if window else None
        auth = cfg.smtp.auth
        self.passwords = (passwords.read_password_file(auth.password_file)
                          if auth.password_file else {})
        # argon2 takes ~64 MiB and tens of ms per check: two at a time per receiver.
        self.auth_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="auth")
        self._free_checked = 0.0
        self._free_ok = True
        self.local_users = known_users(cfg)
        self.base_settings: dict[str, Any] = dict(
            hostname=cfg.hostname, banner=cfg.smtp.banner,
            max_message_size=cfg.smtp.max_message_size,
            max_recipients=cfg.smtp.max_recipients,
            max_line_length=cfg.smtp.max_line_length,
            max_command_line=cfg.smtp.max_command_line, max_errors=cfg.smtp.max_errors,
            bare_eol=cfg.smtp.bare_eol, hop_limit=cfg.smtp.hop_limit,
            require_helo=cfg.smtp.require_helo,
            local_domains=frozenset(cfg.local_domains),
            relay_domains=frozenset(cfg.relay_domains), local_users=self.local_users,
            hooks=hooks.stages(self.modules))

    def listener_settings(self, listener: ListenerConfig
                          ) -> tuple[S.Settings, ssl.SSLContext | None]:
        """A listener's session settings and TLS context (config/tlsfiles.py): its own
        certificate, else the generated self-signed one, else none with ``tls: off``. A pair
        that does not load is an ERROR, not an exit: the listener goes on without STARTTLS
        (as Postfix's smtpd "disabling TLS support"); an smtps listener gets a context with
        no certificate, so its handshakes fail and no plain text is spoken there."""
        ctx = None
        pair = tlsfiles.listener_pair(self.cfg, listener)
        if pair is not None:
            try:
                ctx = tlsfiles.server_context(*pair)
            except (ssl.SSLError, OSError) as exc:
                reason = getattr(exc, "reason", None) or exc.strerror or exc
                if listener.mode == "smtps":
                    log.error("listener %s: cannot load the certificate %s with the key %s "
                              "(%s); its TLS handshakes fail until it is fixed and reloaded",
                              listener.address, pair[0], pair[1], reason)
                    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                else:
                    log.error("listener %s: cannot load the certificate %s with the key %s "
                              "(%s); disabling TLS support (no STARTTLS) until it is fixed "
                              "and reloaded", listener.address, pair[0], pair[1], reason)
        auth = self.cfg.smtp.auth
        submission = listener.mode in ("submission", "smtps")
        return S.Settings(tls_available=ctx is not None, auth_offered=submission,
                          auth_required=submission, auth_plaintext_ok=auth.allow_plaintext,
                          require_sender_match=auth.require_sender_match,
                          **self.base_settings), ctx

    # AUTH throttling. Each client address has a small file in the spool's control directory,
    # shared by all receivers: one line per attempt ("<time>"), written before the password is
    # checked, so attempts in flight count as failures; a success or a temporary failure
    # appends "-<time>", which cancels its attempt. Reading and appending happen with no await
    # in between, so within a receiver no two attempts see the same count; across receivers
    # at most one attempt per other receiver can slip past max_failures.

    def _auth_failures(self, ip: str) -> int:
        """Failed or unfinished attempts of ``ip`` within failure_window; the file is removed
        when none is left."""
        path = self.spool.auth_failures_path(ip)
        try:
            with open(path, "rb") as fh:
                lines = fh.read().split()
        except FileNotFoundError:
            return 0
        entries = []  # (stamp, is a cancellation)
        for line in lines:
            with contextlib.suppress(ValueError):
                entries.append((float(line.lstrip(b"-")), line.startswith(b"-")))
        cutoff: float = time.time() - self.cfg.smtp.auth.failure_window
        recent = sum(-1 if cancel else 1 for stamp, cancel in entries if stamp >= cutoff)
        if all(stamp < cutoff for stamp, _ in entries):
            with contextlib.suppress(OSError):
                os.unlink(path)
        return max(recent, 0)

    def auth_blocked(self, ip: str) -> bool:
        """Whether ``ip`` has max_failures failed (or unfinished) AUTHs within
        failure_window."""
        limit: int = self.cfg.smtp.auth.max_failures
        return self._auth_failures(ip) >= limit

    def auth_attempt(self, ip: str) -> float | None:
        """Count an AUTH attempt before its password is checked: its stamp (for
        ``auth_cancel``), or None when ``ip`` is blocked and the attempt must not be tried."""
        if self.auth_blocked(ip):
            return None
        stamp = time.time()
        self._auth_append(ip, b"%.6f\n" % stamp)
        return stamp

    def auth_cancel(self, ip: str, stamp: float) -> None:
        """The attempt of ``stamp`` succeeded (or could not be checked): not a failure."""
        self._auth_append(ip, b"-%.6f\n" % stamp)

    def _auth_append(self, ip: str, line: bytes) -> None:
        # One O_APPEND write per line: concurrent receivers never interleave inside one.
        fd = os.open(self.spool.auth_failures_path(ip),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def sweep_auth_failures(self) -> int:
        """Remove the files of addresses with no attempt left in failure_window (blocking: a
        directory scan); returns how many were removed."""
        directory = os.path.dirname(self.spool.auth_failures_path("0.0.0.0"))
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return 0
        removed = 0
        for name in names:
            try:
                path = self.spool.auth_failures_path(name)
            except ValueError:
                continue
            self._auth_failures(name)
            removed += not os.path.lexists(path)
        return removed

    def space_ok(self) -> bool:
        """Whether the spool's filesystem has more free space than spool.min_free_space."""
        now = time.monotonic()
        if now - self._free_checked > FREE_SPACE_CHECK:
            st = os.statvfs(self.spool.root)
            floor: int = self.cfg.spool.min_free_space
            self._free_ok = st.f_bavail * st.f_frsize >= floor
            self._free_checked = now
        return self._free_ok

    def sweep(self) -> None:
        """Close connections whose current timeout, or whole lifetime (a busy client too),
        has passed (one timer for all of them)."""
        now = time.monotonic()
        under_way = 0
        for proto in list(self.connections):
            if proto.deadline < now or proto.end_of_life < now:
                proto.timed_out()
            under_way += proto.under_way
        # The in-flow count of messages under way, made true again: a path that ends a message
        # without telling it would otherwise hold the room it took for good.
        self.inflow.under_way = under_way
        self.table.refresh()
        if not self.stopping:
            self.update_gate()

    def update_gate(self) -> None:
        self.gate.update(len(self.connections), self.table.total(), self.cfg.smtp.max_connections)


def known_users(cfg: Config) -> KnownUsers:
    """The RCPT check for local domains (delivery/local.py KnownUsers) from
    ``local_delivery``: unknown_users null rejects unknown users unless every listener is on
    a loopback address (the embedded default configuration accepts any user)."""
    ld = cfg.local_delivery
    listed = KnownUsers.read_file(ld.users) if ld.users else None
    policy = ld.unknown_users
    if policy is None:
        policy = "accept" if all(_is_loopback(lst.address.host) for lst in cfg.listeners) \
            else "reject"
    maildir = ld.lmtp is None
    # With LMTP the LMTP server knows its users: only a users file narrows them here.
    return KnownUsers(maildir=maildir, listed=listed,
                      reject_unknown=policy == "reject" and maildir,
                      maildir_root=ld.maildir_root)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def message_id(head: bytes) -> bytes | None:
    """The Message-ID header's value in the header block at the start of ``head``."""
    end = head.find(b"\r\n\r\n")
    for line in (head[:end] if end >= 0 else head).split(b"\r\n"):
        if line[:11].lower() == b"message-id:":
            return line[11:].strip() or None
    return None


def message_priority(rules: Iterable[PriorityRuleConfig], envelope: S.Envelope, listener: str,
                     auth_user: str | None) -> int:
    """The priority of the first rule that matches (every key it sets must match), else 0."""
    sender = envelope.sender.lower()
    domains = {recipient_domain(r["address"]) for r in envelope.recipients}
    for rule in rules:
        if rule.sender is not None and not (
                sender == rule.sender or (rule.sender.startswith("@")
                                          and sender.endswith(rule.sender))):
            continue
        if rule.recipient_domain is not None and rule.recipient_domain not in domains:
            continue
        if rule.listener is not None and str(rule.listener) != listener:
            continue
        # Logins are case-insensitive (passwords.verify), so the rule is too.
        if rule.auth_user is not None and (
                auth_user is None or rule.auth_user.lower() != auth_user.lower()):
            continue
        prio: int = rule.priority
        return prio
    return 0

