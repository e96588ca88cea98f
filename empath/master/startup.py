"""The master's start-up steps that stand on their own: the spool tree and its recovery, the
audit log and metrics directory made before privileges are dropped, warnings about loose
keys, the children's code imported while still privileged, and where the admin process
serves.

``Arbiter.setup`` calls them in order. What they keep true: a spool that cannot be created
and an audit log that cannot be opened stop the start (``SetupError``, the CLI's exit status
1); a failed recovery or metrics directory does not (the periodic sweep retries, metrics stay
off); nothing here forks or binds.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterable

from empath import observe
from empath.config.typed import Config
from empath.master.listeners import Listener
from empath.observe import multiproc
from empath.spool import Spool, pid_alive

log = logging.getLogger("empath.master")

# Modules the roles import on first use (not at the top of their own modules).
PRELOAD = ("uvloop", "concurrent.futures.thread", "empath.delivery.remote", "empath.delivery.lmtp",
           "encodings.idna")


class SetupError(Exception):
    """The master cannot start (a listener cannot be bound, the spool is unusable...)."""


def create_spool(spool: Spool) -> None:
    """Create the spool tree; SetupError when it cannot be (or a directory of it is a
    symlink: nothing below the spool is followed, Spool.create_tree)."""
    try:
        spool.create_tree()
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename and exc.filename != spool.root else ""
        raise SetupError(f"spool {spool.root}: {where}{exc.strerror or exc}") from None


def recover_spool(spool: Spool) -> None:
    """Requeue what a previous run left claimed or half-written. Runs as the daemon's user
    (after the hand-over and the switch): recovery renames and removes files by path in
    directories that user owns, which root must not do for it."""
    try:
        moved = spool.recover_all(pid_alive)
    except OSError as exc:  # the periodic sweep tries again
        log.error("start-up recovery failed: %s; retrying in the background",
                  exc.strerror or exc)
        moved = 0
    if moved:
        log.info("start-up recovery requeued %d message(s)", moved)


def prepare_audit_log(cfg: Config) -> str | None:
    """Create the audit log (so it can be handed over to ``user``); its path or None."""
    path = cfg.audit.log_path
    if path is None:
        return None
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640))
    except OSError as exc:
        raise SetupError(f"audit log {path}: {exc.strerror or exc}") from None
    return path


def prepare_metrics_dir(cfg: Config, spool: Spool) -> str | None:
    """With metrics on: the multiprocess directory, emptied and exported before any fork
    (observe/multiproc.py); None when metrics are off. A failure leaves metrics off rather
    than the master down."""
    if not observe.metrics_enabled(cfg):
        return None
    try:
        path = multiproc.prepare(cfg, spool.root, spool.control)
    except OSError as exc:
        log.error("metrics: cannot prepare the multiprocess directory: %s; metrics are "
                  "off", exc.strerror or exc)
        return None
    log.info("metrics: per-process files in %s", path)
    return path


def log_admin_listeners(cfg: Config, admin_listeners: Iterable[Listener],
                        known: list[Listener]) -> None:
    """Log where /metrics and /health are served (those not in ``known`` only)."""
    for (_, roles), lst in zip(observe.admin_endpoints(cfg), admin_listeners, strict=False):
        if lst not in known:
            log.info("%s on http://%s/", " and ".join(sorted(roles)), lst.bound)


def admin_status(cfg: Config, admin_listeners: Iterable[Listener]) -> dict[str, str | None]:
    """Where /metrics and /health are served (bound addresses), None when off."""
    out: dict[str, str | None] = {observe.METRICS: None, observe.HEALTH: None}
    for (_, roles), lst in zip(observe.admin_endpoints(cfg), admin_listeners, strict=False):
        for role in roles:
            out[role] = str(lst.bound)
    return out


def warn_loose_keys(cfg: Config) -> None:
    """A TLS private key readable by other users is worth a warning (it still works)."""
    for lc in cfg.listeners:
        key = lc.tls.key
        if key is None:
            continue
        with contextlib.suppress(OSError):
            mode = os.stat(key).st_mode & 0o777
            if mode & 0o077:
                log.warning("TLS key %s is readable by others (mode %03o); chmod 600 it",
                            key, mode)


def preload_roles(roles: Iterable[str]) -> None:
    """Import the children's code (``module:function`` targets, and PRELOAD) while still
    privileged.

    After the switch to ``user`` the children can only import what that user may read; the
    Python installation (or a virtualenv's base) may not be readable by it, as with an
    interpreter under a private home directory. Modules already imported here are inherited by
    every forked child. A role that fails to import is left to fail in the child, where the
    boot-failure rule reports it.
    """
    for target in [*roles, *PRELOAD]:
        module = target.partition(":")[0]
        try:
            importlib.import_module(module)
        except Exception as exc:  # reported by the child that needs it
            log.warning("preloading %s failed: %s", module, exc)
