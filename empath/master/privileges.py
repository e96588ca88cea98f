"""Switching the master (and so every child) from root to ``cfg.user``/``cfg.group``.

The master binds its listeners first (so port 25 works), hands the files it must keep writing
to the target user (the spool's directories and their entries, the log file, the pidfile and
the directories holding them, unless those are shared system directories; never through a
symlink or a hard link), then drops: supplementary groups, gid, uid, in
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

from empath.spool.layout import ALL_DIRS

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
    """chown to ``ident`` what Empath created and must keep writing as that user: the spool's
    directories and the entries Empath makes in them (not a walk of whatever the tree holds),
    the private directories ``dirs`` (the metrics directory) with their files, and ``files``
    (log, pidfile, status, audit) with their directories unless shared.

    Nothing is followed: a symlink is never chowned nor its target, and a regular file with
    other hard links is left alone (it may be a link to a file elsewhere planted by the
    unprivileged user, hoping root gives it away at the next start)."""
    # The configured paths themselves may go through symlinks an administrator made (a spool
    # on another disk); what lies below them is never followed.
    spool_root = os.path.realpath(spool_root)
    for name in ["", *ALL_DIRS]:
        directory = os.path.join(spool_root, name) if name else spool_root
        if _chown_nofollow(directory, ident):
            _chown_entries(directory, ident, subdirs=name == "active")
    for directory in dirs or []:
        if _chown_nofollow(directory, ident):
            _chown_entries(directory, ident, subdirs=False)
    for configured in files:
        directory = os.path.realpath(os.path.dirname(os.path.abspath(configured)))
        path = os.path.join(directory, os.path.basename(configured))
        if _is_private_dir(directory):
            _chown_nofollow(directory, ident)
        else:
            log.warning("%s: left owned by root (a shared directory); %s must be writable "
                        "by %s", directory, os.path.basename(path), ident.user)
        _chown_nofollow(path, ident)


def _chown_entries(directory: str, ident: Identity, subdirs: bool) -> None:
    """chown the regular files directly in ``directory`` (and, with ``subdirs``, its
    subdirectories and their files: active/<pid>/)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if subdirs and _chown_nofollow(entry.path, ident):
                _chown_entries(entry.path, ident, subdirs=False)
        elif entry.is_file(follow_symlinks=False):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid == ident.uid and st.st_gid == ident.gid:
                continue  # already the user's (a restart): one lstat, not four calls
            _chown_nofollow(entry.path, ident)


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


def _chown_nofollow(path: str, ident: Identity) -> bool:
    """chown the directory or regular file at ``path`` itself through a descriptor opened
    without following a symlink; True when ``path`` is such a directory (owned now). A
    symlink, a special file or a regular file with other hard links is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except OSError:  # ELOOP: a symlink; ENOENT: gone
        return False
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            log.warning("%s: has %d hard links; left owned by uid %d", path, st.st_nlink,
                        st.st_uid)
            return False
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return False
        os.fchown(fd, ident.uid, ident.gid)
        return stat.S_ISDIR(st.st_mode)
    finally:
        os.close(fd)
