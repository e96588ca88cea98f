"""Per-process state of a receiver, shared by all of its connections: settings per listener,
the spool writer, module instances, the DKIM signer, the duplicate-suppression store, AUTH
credentials and failure throttling, connection counts, the free-space check and the timeout
sweep. ``server.py`` holds the per-connection protocol; this module holds no socket.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import ssl
import time
from typing import TYPE_CHECKING, Any

from empath import dkim as dkim_signing
from empath import modules as hooks
from empath import passwords
from empath.config import tlsfiles
from empath.smtp import session as S
from empath.spool import Spool
from empath.spool.dedup import DedupStore

if TYPE_CHECKING:
    from empath.smtp.server import SMTPProtocol

FREE_SPACE_CHECK = 1.0  # seconds a free-space reading is trusted

log = logging.getLogger("empath.smtp")


class Receiver:
    """Per-process state shared by all connections of one receiver."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        cfg = ctx.config
        self.cfg = cfg
        self.spool = Spool(cfg.spool.path, cfg.spool.recycle_files, cfg.spool.sync)
        self.modules = hooks.load_modules(cfg.smtp.modules)
        self.connections: set[SMTPProtocol] = set()
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.stopping = False
        self.writer: Any = None
        self.data_block = cfg.smtp.timeouts.data_block
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
        users = None
        if cfg.local_delivery.users:
            with open(cfg.local_delivery.users, encoding="utf-8") as fh:
                users = frozenset(line.strip().lower() for line in fh
                                  if line.strip() and not line.startswith("#"))
        self.base_settings = dict(
            hostname=cfg.hostname, banner=cfg.smtp.banner,
            max_message_size=cfg.smtp.max_message_size,
            max_recipients=cfg.smtp.max_recipients,
            max_line_length=cfg.smtp.max_line_length,
            max_command_line=cfg.smtp.max_command_line, max_errors=cfg.smtp.max_errors,
            bare_eol=cfg.smtp.bare_eol, require_helo=cfg.smtp.require_helo,
            local_domains=frozenset(cfg.local_domains),
            relay_domains=frozenset(cfg.relay_domains), local_users=users,
            hooks=hooks.stages(self.modules))

    def listener_settings(self, listener: Any) -> tuple[S.Settings, ssl.SSLContext | None]:
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

    def auth_blocked(self, ip: str) -> bool:
        """Whether ``ip`` had max_failures failed AUTHs within failure_window, counted across
        all receivers through a small file per address in the spool's control directory."""
        path = self.spool.auth_failures_path(ip)
        try:
            with open(path, "rb") as fh:
                times = [float(t) for t in fh.read().split()]
        except (FileNotFoundError, ValueError):
            return False
        cutoff: float = time.time() - self.cfg.smtp.auth.failure_window
        recent = sum(t >= cutoff for t in times)
        if not recent:
            with contextlib.suppress(OSError):
                os.unlink(path)
        limit: int = self.cfg.smtp.auth.max_failures
        return recent >= limit

    def auth_failed(self, ip: str) -> None:
        # One O_APPEND write per failure: concurrent receivers never interleave inside one.
        fd = os.open(self.spool.auth_failures_path(ip),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"%.3f\n" % time.time())
        finally:
            os.close(fd)

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
        for proto in list(self.connections):
            if proto.deadline < now or proto.end_of_life < now:
                proto.timed_out()


def message_id(head: bytes) -> bytes | None:
    """The Message-ID header's value in the header block at the start of ``head``."""
    end = head.find(b"\r\n\r\n")
    for line in (head[:end] if end >= 0 else head).split(b"\r\n"):
        if line[:11].lower() == b"message-id:":
            return line[11:].strip() or None
    return None


def message_priority(rules: Any, envelope: S.Envelope, listener: str,
                     auth_user: str | None) -> int:
    """The priority of the first rule that matches (every key it sets must match), else 0."""
    sender = envelope.sender.lower()
    domains = {r["address"].rpartition("@")[2].lower() for r in envelope.recipients}
    for rule in rules:
        if rule.sender is not None and not (
                sender == rule.sender or (rule.sender.startswith("@")
                                          and sender.endswith(rule.sender))):
            continue
        if rule.recipient_domain is not None and rule.recipient_domain not in domains:
            continue
        if rule.listener is not None and str(rule.listener) != listener:
            continue
        if rule.auth_user is not None and rule.auth_user != auth_user:
            continue
        prio: int = rule.priority
        return prio
    return 0

