"""Switching the master (and so every child) from root to ``cfg.user``/``cfg.group``.

The master binds its listeners first (so port 25 works), hands the files it must keep writing
to the target user (the spool tree, the log file, the pidfile and the directories holding them,
unless those are shared system directories), then drops: supplementary groups, gid, uid, in
that order, and checks that root cannot be regained.

This module never binds, forks or reads the configuration file; it is given names and paths.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import stat
from dataclasses import dataclass

log = logging.getLogger("empath.master")

# Directories shared with the rest of the system: never chowned, even when a pidfile or log
# file sits directly in them.
SHARED_DIRS = frozenset({"/", "/run", "/var/run", "/var", "/var/log", "/tmp", "/var/tmp",
                         "/etc", "/usr", "/home", "/root"})


class PrivilegeError(Exception):
    """The configured user or group cannot be used."""


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int


def lookup(user: str | None, group: str | None) -> Identity | None:
    """The identity to run as; None when no user is configured."""
    if user is None:
        return None
    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise PrivilegeError(f"user: no such user {user!r}") from None
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            raise PrivilegeError(f"group: no such group {group!r}") from None
    return Identity(pw.pw_name, pw.pw_uid, gid)


def needs_switch(ident: Identity | None) -> bool:
    return ident is not None and (os.geteuid() != ident.uid or os.getegid() != ident.gid)


def check_can_switch(ident: Identity | None) -> None:
    """Fail early (before anything is bound) when a switch is needed and we are not root."""
    if needs_switch(ident) and os.geteuid() != 0:
        assert ident is not None
        raise PrivilegeError(f"user: running as {pwd.getpwuid(os.geteuid()).pw_name}; only "
                             f"root can switch to {ident.user!r}")


def hand_over(ident: Identity, spool_root: str, files: list[str],
              dirs: list[str] | None = None) -> None:
    """chown the spool tree, the private directories ``dirs`` (the metrics directory) and
    ``files`` (with their directories, unless shared) to ``ident``, so the unprivileged
    master and children can keep writing them."""
    for root in [spool_root, *(dirs or [])]:
        for dirpath, dirnames, filenames in os.walk(root):
            _chown(dirpath, ident)
            for name in dirnames + filenames:
                _chown(os.path.join(dirpath, name), ident)
    for path in files:
        directory = os.path.dirname(os.path.abspath(path))
        if _is_private_dir(directory):
            _chown(directory, ident)
        else:
            log.warning("%s: left owned by root (a shared directory); %s must be writable "
                        "by %s", directory, os.path.basename(path), ident.user)
        if os.path.exists(path):
            _chown(path, ident)


def drop(ident: Identity) -> None:
    """Become ``ident`` for good: groups, then gid, then uid (after setuid, setgid would be
    refused)."""
    if not needs_switch(ident):
        return
    os.initgroups(ident.user, ident.gid)
    os.setgid(ident.gid)
    os.setuid(ident.uid)
    with contextlib.suppress(PermissionError):
        os.setuid(0)
        raise PrivilegeError("still able to become root after dropping privileges")
    log.info("running as user %s (uid %d, gid %d)", ident.user, ident.uid, ident.gid)


def _is_private_dir(path: str) -> bool:
    if os.path.realpath(path) in SHARED_DIRS or path in SHARED_DIRS:
        return False
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not mode & stat.S_ISVTX  # sticky: a /tmp-like directory shared by many users


def _chown(path: str, ident: Identity) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.lchown(path, ident.uid, ident.gid)
