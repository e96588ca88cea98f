"""Switching the master (and so every child) from root to ``cfg.user``/``cfg.group``.

The master binds its listeners first (so port 25 works), hands the files it must keep writing
to the target user (the spool's directories and, when the stamp of the last hand-over does not
hold, their entries; the log file, the pidfile and the directories holding them, unless those
are shared system directories; never through a symlink or a hard link), then drops:
supplementary groups, gid, uid, in that order, and checks that root cannot be regained.
``empathctl spool set-permissions`` runs the spool's hand-over on demand (``hand_over_spool``
with ``force``).

This module never binds, forks or reads the configuration file; it is given names and paths.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import stat
from dataclasses import dataclass

from empath.spool.layout import ALL_DIRS, DIR_NOFOLLOW, HANDED_OVER, Spool, open_dir_below

log = logging.getLogger("empath.master")

# Spool directories whose entries every hand-over walks: root wrote files in control/ before
# empathctl acted as the spool's owner (freeze, counts) and before start-up recovery ran as
# the user (control/boot after a reboot), and a spool may come from such a version. A few
# files.
ALWAYS_WALKED = frozenset({"control"})
STAMP = HANDED_OVER  # the name of the hand-over stamp in control/
_NODE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

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
    """chown to ``ident`` what Empath created and must keep writing as that user: the spool
    (``hand_over_spool``), the private directories ``dirs`` (the metrics directory) with their
    files, and ``files`` (log, pidfile, status, audit) with their directories unless shared.

    Nothing is followed: a symlink is never chowned nor its target, and a regular file with
    other hard links is left alone (it may be a link to a file elsewhere planted by the
    unprivileged user, hoping root gives it away at the next start)."""
    hand_over_spool(ident, spool_root)
    for directory in dirs or []:
        if _chown_nofollow(directory, ident):
            _chown_entries(directory, directory, ident, subdirs=False)
    for configured in files:
        directory = os.path.realpath(os.path.dirname(os.path.abspath(configured)))
        path = os.path.join(directory, os.path.basename(configured))
        if _is_private_dir(directory):
            _chown_nofollow(directory, ident)
        else:
            log.warning("%s: left owned by root (a shared directory); %s must be writable "
                        "by %s", directory, os.path.basename(path), ident.user)
        _chown_nofollow(path, ident)


@dataclass(frozen=True)
class SpoolHandOver:
    walked: list[str]  # spool directories whose entries were walked ("" the spool itself)
    changed: int  # files of ``walked`` found not the user's (handed over unless links)


def hand_over_spool(ident: Identity, spool_root: str, force: bool = False) -> SpoolHandOver:
    """chown the spool's directories to ``ident`` and, where needed, the entries Empath makes
    in them (not a walk of whatever the tree holds); control/ is always walked (a few files).

    The entries of a directory are walked when the stamp of the last completed hand-over
    (``control/handed-over``, "<uid>:<gid>") is missing or names another identity, when the
    directory itself was not yet ``ident``'s, or with ``force`` (``empathctl spool
    set-permissions``). Otherwise every file there was made by the daemon's own processes,
    which run as ``ident``, and a start with a million queued messages costs no million
    ``lstat``. What else makes a file in the spool keeps that true or removes the stamp: a
    start without the switch records nothing and removes a stamp of another identity
    (``note_running_identity``), ``empath sendmail`` and the embedding API run as root write
    their queue files as the spool's owner (spool/submit.py), empathctl only renames, and a
    delivery worker that meets a file not its own leaves it where it is and removes the stamp
    (``Spool.claim``). The stamp is removed before a walk and written after it, so a walk cut
    short is done again.

    Every directory below the spool is reached from the spool's own descriptor one name at a
    time, never through a symlink: the user owns the spool and could replace control/ with a
    link to /etc, hoping root writes or chowns there."""
    # The configured path itself may go through symlinks an administrator made (a spool on
    # another disk); what lies below it is never followed.
    spool = Spool(os.path.realpath(spool_root))
    stamp = f"{ident.uid}:{ident.gid}"
    names = ["", *ALL_DIRS]
    fds = _open_spool_dirs(spool.root, names)
    try:
        control = fds.get("control")
        recorded = None if force or control is None else read_stamp(STAMP, dir_fd=control)
        walked = [name for name, fd in fds.items() if name not in ALWAYS_WALKED
                  and (recorded != stamp or not _owned(fd, ident))]
        if walked and control is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(STAMP, dir_fd=control)
        changed = 0
        for name, fd in fds.items():
            _fchown(fd, ident)
            if name in walked or name in ALWAYS_WALKED:
                found = _chown_entries(fd, os.path.join(spool.root, name), ident,
                                       subdirs=name == "active")
                changed += found if name in walked else 0
        if not walked:
            log.info("spool: already handed over to %s (%s in control/%s): queue files not "
                     "walked", ident.user, stamp, STAMP)
            return SpoolHandOver(walked, changed)
        _write_stamp(control, spool.handed_over, stamp, ident)
    finally:
        for fd in fds.values():
            os.close(fd)
    where = (f"every spool directory (no stamp of a hand-over to {stamp})" if recorded != stamp
             else ", ".join(f"{name or '.'}/" for name in walked) + " (not yet the user's)")
    log.info("spool handed over to %s (uid %d, gid %d): the entries of %s checked, %d "
             "file(s) were not the user's", ident.user, ident.uid, ident.gid, where, changed)
    return SpoolHandOver(walked, changed)


def note_running_identity(spool_root: str) -> None:
    """A start without the switch (not root, or root without ``user``): the files it makes are
    the running process's, so a hand-over stamp of another identity no longer holds."""
    spool = Spool(os.path.realpath(spool_root))
    fds = _open_spool_dirs(spool.root, ["control"])
    try:
        control = fds.get("control")
        recorded = None if control is None else read_stamp(STAMP, dir_fd=control)
        if control is None or recorded is None or recorded == f"{os.geteuid()}:{os.getegid()}":
            return
        try:
            os.unlink(STAMP, dir_fd=control)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s: cannot remove the stamp of the hand-over to %s (%s): a start as "
                      "root with `user` may then find files of uid %d it does not hand over; "
                      "run `empathctl spool set-permissions` as root", spool.handed_over,
                      recorded, exc.strerror or exc, os.geteuid())
            return
    finally:
        for fd in fds.values():
            os.close(fd)
    log.info("spool: running as uid %d, gid %d; the stamp of the hand-over to %s is removed "
             "(the next start with `user` walks the queue)", os.geteuid(), os.getegid(),
             recorded)


def read_stamp(path: str, dir_fd: int | None = None) -> str | None:
    """The identity recorded in a hand-over stamp ("<uid>:<gid>"); None when there is none
    (or it is no regular file: nothing is followed)."""
    try:
        fd = os.open(path, _NODE, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def _write_stamp(control: int | None, shown: str, stamp: str, ident: Identity) -> None:
    tmp = f"{STAMP}.new"
    try:
        if control is None:
            raise NotADirectoryError(errno.ENOTDIR, "control/ is not a directory")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=control)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=control)
        try:
            os.write(fd, f"{stamp}\n".encode())
            os.fchown(fd, ident.uid, ident.gid)
        finally:
            os.close(fd)
        os.rename(tmp, STAMP, src_dir_fd=control, dst_dir_fd=control)
    except OSError as exc:
        log.warning("%s: cannot record the hand-over (%s); the next start walks the queue "
                    "files again", shown, exc.strerror or exc)
        if control is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=control)


def _open_spool_dirs(root: str, names: list[str]) -> dict[str, int]:
    """Descriptors of the spool's directories ``names`` ("" the spool itself), each reached
    from the spool one name at a time without following a symlink; one that is missing or
    is no directory is left out."""
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return {}
    fds: dict[str, int] = {}
    try:
        for name in names:
            with contextlib.suppress(OSError):  # ELOOP: a symlink; ENOTDIR, ENOENT
                fds[name] = open_dir_below(root_fd, name)
    finally:
        os.close(root_fd)
    return fds


def _owned(fd: int, ident: Identity) -> bool:
    st = os.fstat(fd)
    return (st.st_uid, st.st_gid) == (ident.uid, ident.gid)


def _fchown(fd: int, ident: Identity) -> None:
    # Not when it is already the user's: a chown would change a directory's ctime and so
    # invalidate its count in control/counts (spool/counts.py).
    if not _owned(fd, ident):
        os.fchown(fd, ident.uid, ident.gid)


def _chown_entries(directory: int | str, shown: str, ident: Identity, subdirs: bool) -> int:
    """chown the regular files directly in ``directory`` (a descriptor, or a path; ``shown``
    names it in the log) and, with ``subdirs``, its subdirectories and their files
    (active/<pid>/); how many were handed over."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    at = directory if isinstance(directory, int) else None
    changed = 0
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if not subdirs:
                continue
            try:
                fd = os.open(entry.name, DIR_NOFOLLOW, dir_fd=at) if at is not None else \
                    os.open(entry.path, DIR_NOFOLLOW)
            except OSError:
                continue
            try:
                _fchown(fd, ident)
                changed += _chown_entries(fd, os.path.join(shown, entry.name), ident, False)
            finally:
                os.close(fd)
        elif entry.is_file(follow_symlinks=False):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid == ident.uid and st.st_gid == ident.gid:
                continue  # already the user's (a restart): one lstat, not four calls
            _chown_nofollow(entry.name if at is not None else entry.path, ident, dir_fd=at,
                            shown=os.path.join(shown, entry.name))
            changed += st.st_nlink == 1  # one with other hard links is left as it is
    return changed


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


def _chown_nofollow(path: str, ident: Identity, dir_fd: int | None = None,
                    shown: str | None = None) -> bool:
    """chown the directory or regular file at ``path`` (relative to ``dir_fd`` when given)
    itself through a descriptor opened without following a symlink; True when ``path`` is such
    a directory (owned now). A symlink, a special file or a regular file with other hard links
    is left as it is."""
    try:
        fd = os.open(path, _NODE, dir_fd=dir_fd)
    except OSError:  # ELOOP: a symlink; ENOENT: gone
        return False
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            log.warning("%s: has %d hard links; left owned by uid %d", shown or path,
                        st.st_nlink, st.st_uid)
            return False
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return False
        _fchown(fd, ident)
        return stat.S_ISDIR(st.st_mode)
    finally:
        os.close(fd)
