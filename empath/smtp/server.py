"""The receiver process: uvloop protocol glue between sockets, SMTP sessions and the spool.

``serve(ctx)`` runs one receiver: it accepts on the listening sockets the master bound,
gives each connection an ``SMTPProtocol`` that feeds bytes to a sans-IO ``ServerSession`` and
carries out the session's events: replies are written, message data is streamed into the
spool writer, a finished message is committed (fsync, rename, group-committed directory fsync)
before its 250 is released, module hooks are awaited, STARTTLS is begun with ``loop.start_tls``.
This module owns transports, timers, back-pressure and connection limits; it never parses SMTP
(session.py does), never decides whether a message is accepted (acceptance.py does: free space,
hooks, duplicates, priority, DKIM, the envelope record, audit) and never builds a spool path
(empath.spool does).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
import time
from typing import Any

from empath import cluster, passwords
from empath import modules as hooks
from empath.config.checks import files_needed
from empath.config.typed import ListenerConfig
from empath.master.child import ChildContext
from empath.observe import audit, metrics, tracing
from empath.smtp import capacity
from empath.smtp import replies as R
from empath.smtp import session as S
from empath.smtp.acceptance import Acceptance, Arrival, module_reply
from empath.smtp.received import received_header
from empath.smtp.receiver import Receiver
from empath.spool import new_message_id

log = logging.getLogger("empath.smtp")

SWEEP_INTERVAL = 1.0  # seconds between timeout sweeps over all connections
DEDUP_HEAD = 64 * 1024  # where the Message-ID header is looked for
DEDUP_SWEEP = 60.0  # seconds between removals of expired duplicate-suppression entries
SLOW_SWEEP = 60.0  # seconds between re-reads of the known local users, and AUTH-file sweeps

# This process's instruments and audit log (serve() sets them; no-ops until then).
_metrics = metrics.current()
_audit = audit.current()


class _Storing:
    """``SMTPProtocol.committing`` while a store begun without a task runs: like a task that
    is not done (the store's callback replaces it with None)."""

    @staticmethod
    def done() -> bool:
        return False


STORING = _Storing()


class SMTPProtocol(asyncio.Protocol):
    """One SMTP connection: transport + ServerSession + the message being received."""

    def __init__(self, receiver: Receiver, listener: ListenerConfig, settings: S.Settings,
                 tls_context: ssl.SSLContext | None) -> None:
        self.receiver = receiver
        self.listener = listener
        self.settings = settings
        self.tls_context = tls_context
        self.transport: Any = None
        self.session: S.ServerSession | None = None
        self.message: Any = None
        self.queue_id = ""
        self.deadline = float("inf")
        self.commands_seen = 0
        self.end_of_life = float("inf")
        self.greeted = False
        self.paused = False
        self.closed = False
        self.hook_ctx: hooks.HookContext | None = None
        self.digest: Any = None  # with dedup: hash of the client's data, and its head
        self.head = b""
        self.peer = ("", 0)
        self.tls_info: dict[str, str] | None = None
        # Tasks this connection started (hooks, commit, AUTH, STARTTLS): referenced until
        # done, so none is garbage-collected mid-flight, and any error they end with is
        # logged and closes the connection (_task_done).
        self.tasks: set[asyncio.Task[None]] = set()
        # The message's commit while it runs: its task, or STORING while a store started by
        # Acceptance.store_soon has not called back.
        self.committing: asyncio.Task[None] | _Storing | None = None
        # Whether this connection counts in the in-flow's messages under way (from DATA to
        # the message's reply, its abort, or the connection's end).
        self.under_way = False

    # -- asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        r = self.receiver
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1])) if len(peer) >= 2 else (str(peer), 0)
        self.trace = tracing.session(self.peer[0], self.peer[1], self.listener)
        ip = self.peer[0]
        r.connections.add(self)
        total, from_ip, own = r.table.opened(ip)
        cfg = r.cfg
        r.gate.update(own, total, cfg.smtp.max_connections)
        _metrics.connections_accepted.inc()
        _metrics.connections_active.inc()
        hostname = cfg.hostname
        now = time.monotonic()
        self.end_of_life = now + cfg.smtp.timeouts.connection
        self.deadline = now + cfg.smtp.timeouts.command
        if r.stopping:
            return self._reject("shutting_down", R.SHUTTING_DOWN.format(hostname=hostname))
        # Daemon-wide counts (capacity.py): every receiver's connections together.
        if total > cfg.smtp.max_connections:
            return self._reject("too_many_connections",
                                R.TOO_MANY_CONNECTIONS.format(hostname=hostname))
        if from_ip > cfg.smtp.max_connections_per_ip:
            return self._reject("too_many_from_ip", R.TOO_MANY_FROM_IP.format(hostname=hostname))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.session = S.ServerSession(self.settings, trusted=S.client_is_trusted(
            ip, cfg.mynetworks))
        self.session.hold_mail = r.inflow.congested
        if self.listener.mode == "smtps":
            self._note_tls(transport)
            self.session.tls_established()
        self.hook_ctx = hooks.HookContext(ip, self.peer[1], str(self.listener.address),
                                          tls=self.tls_info)
        if r.modules and any("on_connect" in m.hooks for m in r.modules):
            self._spawn(self._connect_hooks())
        elif cfg.smtp.greeting_delay > 0:
            asyncio.get_running_loop().call_later(cfg.smtp.greeting_delay, self._greet)
        else:
            self._greet()

    def data_received(self, data: bytes) -> None:
        if not self.greeted:
            # RFC 5321 §4.3.1: the client waits for the greeting; talking first is a protocol
            # violation typical of spam engines (early talker).
            if not self.closed:
                self._reject("early_talker",
                             R.EARLY_TALKER.format(hostname=self.receiver.cfg.hostname))
            return
        session = self.session
        assert session is not None
        try:
            self._handle(session.feed(data))
        except Exception:
            # A bug must not leave the client waiting for a reply that never comes.
            log.exception("unexpected error in a session with [%s]", self.peer[0])
            self._fail_connection()
            return
        # The command timeout runs from the last complete command, so a client trickling a
        # line a byte at a time (slowloris) is still cut. In DATA each block of message data
        # restarts the data_block timeout instead (RFC 5321 §4.5.3.2.5; see _handle).
        if session.commands != self.commands_seen:
            self.commands_seen = session.commands
            if session.phase in (S.GREET, S.READY, S.MAIL, S.RCPT, S.CHUNKED):
                self.deadline = time.monotonic() + self.receiver.cfg.smtp.timeouts.command

    def eof_received(self) -> bool | None:
        if self.session is not None:
            self._handle(self.session.feed(b""))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        _metrics.connections_active.dec()
        self.trace.close()
        r = self.receiver
        if self in r.connections:
            r.connections.discard(self)
            r.table.closed(self.peer[0])
            if not r.stopping:
                r.update_gate()
        if self.message is not None and self.session is not None \
                and self.session.phase != S.WAIT:
            self.message.abort()
            self.message = None
        if self.committing is None:
            self._no_longer_under_way()

    def pause_writing(self) -> None:
        self._pause_reading()

    def resume_writing(self) -> None:
        self._resume_reading()

    # -- events ----------------------------------------------------------------------------
    def _handle(self, events: list[S.Event]) -> None:
        transport = self.transport
        for ev in events:
            kind = type(ev)
            if kind is S.Send:
                transport.write(ev.data)  # type: ignore[union-attr]
                _metrics.count_replies(ev.data)  # type: ignore[union-attr]
            elif kind is S.Data:
                self.message.write(ev.chunk)  # type: ignore[union-attr]
                if self.digest is not None:
                    self.digest.update(ev.chunk)  # type: ignore[union-attr]
                    if len(self.head) < DEDUP_HEAD:
                        self.head += ev.chunk[:DEDUP_HEAD]  # type: ignore[union-attr]
                self.deadline = time.monotonic() + self.receiver.data_block
            elif kind is S.DataStart:
                self._start_message(ev.envelope)  # type: ignore[union-attr]
            elif kind is S.DataEnd:
                self._pause_reading()
                self._commit(ev.envelope)  # type: ignore[union-attr,arg-type]
            elif kind is S.DataAbort:
                self._no_longer_under_way()
                if self.message is not None:
                    self.message.abort()
                    self.message = None
                    if ev.reply is not None:  # type: ignore[union-attr]
                        log.info("%s: refused after data from [%s]: %s", self.queue_id,
                                 self.peer[0],
                                 ev.reply.line.decode().strip())  # type: ignore[union-attr]
            elif kind is S.Check:
                self._pause_reading()
                if ev.stage == "mail_from" and not self.receiver.mail_hooks:  # type: ignore[union-attr]
                    self._hold_mail()
                else:
                    self._spawn(self._check(ev))  # type: ignore[arg-type]
            elif kind is S.StartTLS:
                self._pause_reading()
                self._spawn(self._start_tls())
            elif kind is S.Authenticate:
                self._pause_reading()
                self._spawn(self._authenticate(ev))  # type: ignore[arg-type]
            elif kind is S.Close:
                self._close()
        if self.receiver.stopping:
            self.close_for_shutdown()

    def _start_message(self, envelope: S.Envelope | None) -> None:
        session = self.session
        assert session is not None and envelope is not None
        r = self.receiver
        self.queue_id = new_message_id()
        self.trace.message_started(self.queue_id)
        if not self.under_way:
            self.under_way = True
            r.inflow.began()
        self.message = r.writer.begin(self.queue_id)
        if r.dedup is not None:
            self.digest, self.head = hashlib.sha256(), b""
        self.message.write(received_header(
            session, self.peer[0], r.cfg.hostname, self.queue_id, self.tls_info, envelope))
        self.deadline = time.monotonic() + r.cfg.smtp.timeouts.data_init

    def _no_longer_under_way(self) -> None:
        if self.under_way:
            self.under_way = False
            self.receiver.inflow.ended()

    def _commit(self, envelope: S.Envelope) -> None:
        """Store the message: its 250 (or refusal) is sent by _committed, straight from the
        callback that sees the store finish when Acceptance.store_soon can take it, else
        at the end of a task that awaits Acceptance.store."""
        session, message, r = self.session, self.message, self.receiver
        assert session is not None and message is not None and self.hook_ctx is not None
        self.deadline = time.monotonic() + r.cfg.smtp.timeouts.data_termination
        policy = Acceptance(r, self._arrival(session), self.hook_ctx, self.trace, message,
                            self.head, self.digest)

        def done(reply: R.Reply | None) -> None:
            if self.committing is STORING:
                self.committing = None
            try:
                self._committed(envelope, message, policy, reply)
            except Exception:  # as _task_done does for the task's path
                log.exception("unexpected error in a session with [%s]", self.peer[0])
                self._fail_connection()

        try:
            soon = policy.store_soon(envelope, done)
        except Exception:
            self._unexpected(envelope, message)
            asyncio.get_running_loop().call_soon(done, R.SPOOL_ERROR)
            soon = True
        if soon:
            self.committing = STORING
        else:
            self.committing = self._spawn(self._store(envelope, policy))

    async def _store(self, envelope: S.Envelope, policy: Acceptance) -> None:
        message = self.message
        try:
            reply = await policy.store(envelope)
        except Exception:
            self._unexpected(envelope, message)
            reply = R.SPOOL_ERROR
        self._committed(envelope, message, policy, reply)

    def _unexpected(self, envelope: S.Envelope, message: Any) -> None:
        """Anything unforeseen while storing (a parser's RecursionError, a module's bad
        value): the message is not stored, the client hears 451 and may retry, the session
        goes on."""
        log.exception("%s: not stored: unexpected error (from=<%s> client=[%s])",
                      self.queue_id, envelope.sender, self.peer[0])
        with contextlib.suppress(Exception):
            message.abort()

    def _committed(self, envelope: S.Envelope, message: Any, policy: Acceptance,
                   reply: R.Reply | None) -> None:
        """The message is stored (``reply`` None) or refused: count it, log it, answer."""
        session, r = self.session, self.receiver
        assert session is not None and self.hook_ctx is not None
        self.message = None
        self._no_longer_under_way()
        self.trace.message_done(message.size, None if reply is None else reply.code)
        if reply is None:
            log.info("%s: from=<%s> size=%d nrcpt=%d client=[%s]", self.queue_id,
                     envelope.sender, message.size, len(envelope.recipients), self.peer[0])
            policy.received(envelope, message.size)
        else:
            policy.refused(reply)
        if self.closed:
            return
        self.deadline = time.monotonic() + r.cfg.smtp.timeouts.command
        events = (session.message_stored(self.queue_id) if reply is None
                  else session.message_failed(reply))
        self.hook_ctx.metadata = {}
        self.hook_ctx.priority = None  # a module's priority is for its message only
        self._resume_reading()
        self._handle(events)

    def _arrival(self, session: S.ServerSession) -> Arrival:
        """The connection's facts as the acceptance policy sees them now."""
        return Arrival(queue_id=self.queue_id, ip=self.peer[0], port=self.peer[1],
                       listener=str(self.listener.address), tls=self.tls_info,
                       helo=session.helo, esmtp=session.esmtp, auth_user=session.auth_user,
                       trusted=session.trusted, local_domains=self.settings.local_domains)

    def _hold_mail(self) -> None:
        """A MAIL FROM that only the in-flow control holds (no module sees it): no task,
        a callback when it may go on."""
        if self.receiver.inflow.admit(self._mail_admitted):
            asyncio.get_running_loop().call_soon(self._mail_admitted, 0.0)

    def _mail_admitted(self, waited: float) -> None:
        if waited:
            _metrics.in_flow_wait(waited)
        session, ctx = self.session, self.hook_ctx
        if self.closed or session is None or ctx is None:
            return
        ctx.metadata = {}
        self._resume_reading()
        try:
            self._handle(session.check_done(None))
        except Exception:
            log.exception("unexpected error in a session with [%s]", self.peer[0])
            self._fail_connection()

    async def _check(self, ev: S.Check) -> None:
        session, r, ctx = self.session, self.receiver, self.hook_ctx
        assert session is not None and ctx is not None
        try:
            if ev.stage == "helo":
                ctx.helo = ev.value
                rej = await hooks.run_hook(r.modules, "on_helo", ctx, ev.value)
            elif ev.stage == "mail_from":
                waited = await r.inflow.wait()
                if waited:
                    _metrics.in_flow_wait(waited)
                ctx.metadata = {}
                rej = await hooks.run_hook(r.modules, "on_mail_from", ctx, ev.value.sender,
                                           ev.value.params())
            else:
                rej = await hooks.run_hook(r.modules, "on_rcpt_to", ctx, ev.value)
            reply = module_reply(rej)
        except hooks.ModuleError:
            reply = R.MODULE_ERROR
        if self.closed:
            return
        self._resume_reading()
        self._handle(session.check_done(reply))

    async def _authenticate(self, ev: S.Authenticate) -> None:
        session, r = self.session, self.receiver
        assert session is not None
        ip = self.peer[0]
        reply: R.Reply | None
        # Counted before the (slow) password check: attempts in flight count against
        # max_failures, so a burst of simultaneous attempts is not all tried.
        stamp = r.auth_attempt(ip)
        if stamp is None:
            reply = R.AUTH_TOO_MANY.format(hostname=r.cfg.hostname)
        else:
            loop = asyncio.get_running_loop()
            try:
                ok = await loop.run_in_executor(r.auth_pool, passwords.verify, r.passwords,
                                                ev.user, ev.password)
            except Exception:
                log.exception("AUTH check for [%s] failed", ip)
                ok, reply = False, R.AUTH_TEMPORARY
            else:
                reply = None if ok else R.AUTH_FAILED
            if reply is not R.AUTH_FAILED:
                r.auth_cancel(ip, stamp)
            else:
                _metrics.auth_failures.inc()
                log.warning("AUTH failed for user %r from [%s]", ev.user[:64], ip)
                if r.auth_blocked(ip):
                    reply = R.AUTH_TOO_MANY.format(hostname=r.cfg.hostname)
        if self.closed:
            return
        if reply is None:
            log.info("AUTH as %s from [%s]", ev.user, ip)
        self._resume_reading()
        self._handle(session.auth_done(ev.user, reply))

    async def _connect_hooks(self) -> None:
        assert self.hook_ctx is not None
        try:
            rej = await hooks.run_hook(self.receiver.modules, "on_connect", self.hook_ctx)
            reply = module_reply(rej)
        except hooks.ModuleError:
            reply = R.MODULE_ERROR
        if self.closed:
            return
        if reply is not None and reply.is_error:
            self._reject("module", reply)
        else:
            self._greet()

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.tls_context is not None  # STARTTLS is only offered with a certificate
        try:
            transport = await loop.start_tls(
                self.transport, self, self.tls_context, server_side=True,
                ssl_handshake_timeout=self.receiver.cfg.smtp.timeouts.command)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            _metrics.tls_in_failures.inc()
            log.info("TLS handshake with [%s] failed: %s", self.peer[0], exc)
            self._close()
            return
        if transport is None:
            self._close()
            return
        self.transport = transport
        self._note_tls(transport)
        assert self.session is not None and self.hook_ctx is not None
        self.session.tls_established()
        self.hook_ctx.tls = self.tls_info
        self.paused = True
        self._resume_reading()

    # -- helpers ---------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if task is self.committing:
            self.committing = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("unexpected error in a session with [%s]", self.peer[0],
                      exc_info=(type(exc), exc, exc.__traceback__))
            self._fail_connection()

    def _drop_message(self) -> None:
        """Abort the message being received, unless its commit is running (that one ends
        stored or refused on its own; an abort would race its spool write)."""
        if self.message is not None and (self.committing is None or self.committing.done()):
            with contextlib.suppress(Exception):
                self.message.abort()
            self.message = None

    def _fail_connection(self) -> None:
        """After an unexpected error: 421, close, and drop any message being received."""
        self._drop_message()
        if not self.closed:
            self._refuse(R.LOCAL_ERROR_CLOSING.format(hostname=self.receiver.cfg.hostname))

    def _greet(self) -> None:
        if self.closed or self.session is None:
            return
        self.greeted = True
        self._handle(self.session.start())

    def _note_tls(self, transport: Any) -> None:
        obj = transport.get_extra_info("ssl_object")
        if obj is not None:
            cipher = obj.cipher()
            self.tls_info = {"version": obj.version() or "", "cipher": cipher[0] if cipher
                             else ""}
            _metrics.tls_in.labels(self.tls_info["version"]).inc()

    def _reject(self, reason: str, reply: R.Reply) -> None:
        """Refuse a connection at its start (counted by reason)."""
        _metrics.rejected[reason].inc()
        self._refuse(reply)

    def _refuse(self, reply: R.Reply) -> None:
        line = reply.line
        self.transport.write(line)
        _metrics.count_replies(line)
        self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def _pause_reading(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            with contextlib.suppress(Exception):
                self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    def timed_out(self) -> None:
        if self.closed:
            return
        if self.committing is not None and not self.committing.done() \
                and self.end_of_life >= time.monotonic():
            # The commit decides (its module hooks are bounded by data_termination, and the
            # spool write is never cut short), within the connection's lifetime.
            return
        log.info("timeout: closing connection from [%s]", self.peer[0])
        self._refuse(R.LIFETIME.format(hostname=self.receiver.cfg.hostname)
                     if self.end_of_life < time.monotonic()
                     else R.TIMEOUT.format(hostname=self.receiver.cfg.hostname))
        self._drop_message()

    def close_for_shutdown(self) -> None:
        """While draining: idle sessions get 421 now, busy ones after their transaction."""
        session = self.session
        if session is None or self.closed:
            return
        if session.phase in (S.GREET, S.READY) and not self.paused:
            self._refuse(R.SHUTTING_DOWN.format(hostname=self.receiver.cfg.hostname))


async def serve(ctx: ChildContext) -> None:
    """Run one receiver process until ctx.stopping is set, then drain its sessions."""
    global _metrics, _audit
    _metrics = metrics.init(ctx.config)
    _audit = audit.init(ctx.config)
    tracing.init(ctx.config)
    await cluster.start(ctx)  # fleet mode only: the duplicate window shared through Redis
    receiver = Receiver(ctx)
    loop = asyncio.get_running_loop()
    receiver.writer = receiver.spool.open_receiver_writer()
    receiver.writer.on_settled = receiver.inflow.store_settled
    needed = files_needed(ctx.config.smtp.max_connections)
    soft, _hard = capacity.raise_file_limit(needed)
    if soft < needed:
        log.warning("the open-file limit is %d, under the %d that smtp.max_connections (%d) "
                    "needs; raise it (ulimit -n, LimitNOFILE=) or lower smtp.max_connections",
                    soft, needed, ctx.config.smtp.max_connections)
    gate = receiver.gate
    for sock, listener in zip(ctx.listeners, ctx.config.listeners, strict=False):
        settings, tls = receiver.listener_settings(listener)
        ssl_ctx = tls if listener.mode == "smtps" else None

        def factory(listener: ListenerConfig = listener, settings: S.Settings = settings,
                    tls: ssl.SSLContext | None = tls) -> SMTPProtocol:
            return SMTPProtocol(receiver, listener, settings, tls)

        await gate.serve(sock, factory, ssl_ctx)
    sweeper = loop.create_task(_sweep(receiver))
    receiver.inflow.start()
    try:
        await ctx.stopping.wait()
    finally:
        receiver.inflow.stop()
        receiver.stopping = True
        gate.close()
        # A connection accepted in the loop's last turns before the close may not have
        # run connection_made yet: let it run (it is answered 421) before the connections
        # are counted, or the process would exit and close it unanswered.
        await gate.settle(ctx.shutdown_timeout)
        await asyncio.sleep(0)
        for proto in list(receiver.connections):
            proto.close_for_shutdown()
        deadline = time.monotonic() + ctx.shutdown_timeout
        while receiver.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proto in list(receiver.connections):
            proto.timed_out()
        sweeper.cancel()
        receiver.table.close()
        receiver.writer.close()
        receiver.auth_pool.shutdown(wait=False)
        await cluster.stop()
        _metrics.stop_flushing()
        tracing.shutdown()


async def _sweep(receiver: Receiver) -> None:
    """Timeouts every SWEEP_INTERVAL; in a thread now and then: expired duplicate entries,
    expired AUTH-failure files (at least once per failure_window), the known local users."""
    now = time.monotonic()
    last = {"dedup": now, "auth": now, "users": now}
    every = {"dedup": DEDUP_SWEEP, "auth": min(SLOW_SWEEP, receiver.cfg.smtp.auth.failure_window),
             "users": SLOW_SWEEP}
    jobs = {"dedup": receiver.dedup.sweep if receiver.dedup is not None else None,
            "auth": receiver.sweep_auth_failures, "users": receiver.local_users.refresh}
    while True:
        await asyncio.sleep(SWEEP_INTERVAL)
        try:
            receiver.sweep()
        except Exception:
            log.exception("receiver sweep (timeouts) failed")
        for name, job in jobs.items():
            if job is None or time.monotonic() - last[name] < every[name]:
                continue
            last[name] = time.monotonic()
            try:
                await asyncio.to_thread(job)
            except Exception:  # the sweeper must outlive any one failure
                log.exception("receiver sweep (%s) failed", name)

