"""Local delivery into Maildir (<maildir_root>/<user>/{tmp,new,cur}).

The Maildir protocol (as qmail defined it): write the message under a unique name in
``tmp/``, fsync it, link it into ``new/``, fsync ``new/``, then drop the name in ``tmp/``. A
reader never sees a partial file, and a crash leaves at worst a stale file in ``tmp/``.

- Names are unique per delivery: seconds, microseconds, pid, a per-process counter and random
  bits, then the host. ``tmp/`` files are created with O_EXCL and ``new/`` names are taken
  with link(), which fails rather than replaces, so two deliveries (threads, workers, or
  another agent writing the same mailbox) can never overwrite each other; a taken name is
  simply drawn again.
- Directories this delivery creates are fsynced into their parents, so a new mailbox
  survives a crash along with the message in it.
- A user name that cannot be a directory name fails the recipient permanently; anything the
  file system says (no space, quota, permissions) defers it. The receiver refuses such names at
  RCPT with the same function (``mailbox_name``), so none is accepted only to bounce later.
- ``KnownUsers`` is the receiver's RCPT check for local domains: the names delivery accepts,
  the users file or, when unknown users are rejected, the system users and existing
  Maildirs. Local parts are compared by ``local_part_key``: ASCII letters fold to lower case,
  anything else is compared as it is, and a local part that Unicode compatibility
  normalisation (NFKC) would change is refused (U+212A KELVIN SIGN must not reach ``kate``).

Blocking: the dispatcher runs it in a thread. This module never builds a spool path; it reads
the message through the MessageSource the worker hands it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import pwd
import re
import socket
import string
import time
import unicodedata
from dataclasses import dataclass

from empath.delivery.state import DEFERRED, DELIVERED, FAILED, RecipientOutcome
from empath.spool import MessageSource

log = logging.getLogger("empath.delivery")

_counter = itertools.count()
# A mailbox name becomes a directory name: nothing that could walk out of maildir_root. ASCII
# only, checked before any case folding (str.lower() maps U+212A KELVIN SIGN to "k").
_SAFE_USER = re.compile(r"[A-Za-z0-9._+-]{1,64}")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
# Always a known user (RFC 5321 §4.5.1: postmaster@<every domain> must be accepted).
POSTMASTER = "postmaster"
NAME_TRIES = 10  # fresh names drawn when one is taken (each has 64 random bits: never, really)
COPY_BLOCK = 1 << 20
# copy_file_range cannot serve these (another file system, an old kernel, a special file):
# the bytes are copied by hand instead.
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                            errno.EPERM, errno.EBADF})
# link() is not available on this file system: rename, after checking the name is free.
_NO_LINK = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK})

# What Maildir delivery says about a recipient (RFC 3463 subjects in the comments).
MAILDIR_REPLIES: dict[str, tuple[str, int, str, str]] = {
    "delivered": (DELIVERED, 250, "2.0.0", "delivered to maildir {user}"),
    # X.1.1: bad destination mailbox address.
    "bad_mailbox": (FAILED, 550, "5.1.1", "invalid local mailbox name in {address!r}"),
    # X.2.2: mailbox full (a disk quota).
    "quota": (DEFERRED, 452, "4.2.2", "mailbox {user} is over quota: {reason}"),
    # X.3.1: mail system full.
    "no_space": (DEFERRED, 452, "4.3.1", "no space left for mailbox {user}: {reason}"),
    # X.2.0: other mailbox status (permissions, I/O errors, a file where a directory goes).
    "error": (DEFERRED, 451, "4.2.0", "maildir delivery to {user} failed: {reason}"),
}


@dataclass(frozen=True, slots=True)
class LocalResult:
    """The verdict of one Maildir delivery."""

    status: str  # delivered | deferred | failed
    code: int
    enhanced: str
    text: str

    @classmethod
    def make(cls, kind: str, **fields: str) -> LocalResult:
        status, code, enhanced, template = MAILDIR_REPLIES[kind]
        return cls(status, code, enhanced, template.format(**fields))

    @property
    def ok(self) -> bool:
        return self.status == DELIVERED

    @property
    def permanent(self) -> bool:
        return self.status == FAILED

    def outcome(self) -> RecipientOutcome:
        return RecipientOutcome(self.status, self.code, self.enhanced, self.text, "maildir")


def mailbox_name(address: str) -> str | None:
    """The mailbox a local address delivers to, or None when it cannot be a directory name
    (``%``, ``!``, ``/``, quoted or non-ASCII local parts, a leading dot)."""
    local = address.rpartition("@")[0] if "@" in address else address
    if not _SAFE_USER.fullmatch(local) or local.startswith("."):
        return None
    return local.lower()


def local_part_key(local: str) -> str | None:
    """The form in which a local part is compared with user names, or None when it must be
    refused: ASCII letters folded to lower case (as logins are), other characters kept as
    they are; a local part that NFKC normalisation would change (compatibility characters:
    the Kelvin sign, fullwidth letters, ligatures) is refused rather than folded, so no
    program that folds more than Empath can deliver it to another user."""
    if not local.isascii() and unicodedata.normalize("NFKC", local) != local:
        return None
    return local.translate(_ASCII_LOWER)


class KnownUsers:
    """The local parts of local domains the receiver accepts at RCPT (``in``), so that mail
    delivery would refuse, or for nobody, is refused at once instead of bounced (backscatter).

    - ``maildir``: Maildir delivery (no LMTP): what ``mailbox_name`` refuses is refused.
    - ``listed``: the users file (keys as ``local_part_key`` makes them); when given, only
      those users (and postmaster).
    - ``reject_unknown`` (no users file): only system users (pwd), existing Maildirs under
      ``maildir_root`` and postmaster; ``refresh`` re-reads them (the receiver calls it in a
      thread, once a minute), so ``in`` never blocks on a lookup. Otherwise any user.
    """

    def __init__(self, *, maildir: bool, listed: frozenset[str] | None = None,
                 reject_unknown: bool = False, maildir_root: str = "") -> None:
        self.maildir = maildir
        self.listed = listed
        self.reject_unknown = reject_unknown and listed is None
        self.maildir_root = maildir_root
        self.known: frozenset[str] = frozenset()
        if self.reject_unknown:
            self.refresh()

    def __contains__(self, local: object) -> bool:
        if not isinstance(local, str):
            return False
        if self.maildir and mailbox_name(local) is None:
            return False
        key = local_part_key(local)
        if key is None:
            return False
        if key == POSTMASTER:
            return True
        if self.listed is not None:
            return key in self.listed
        if self.reject_unknown:
            return key in self.known
        return True

    def refresh(self) -> None:
        """Re-read the system users and the Maildirs (blocking: a pwd scan and a listdir)."""
        if not self.reject_unknown:
            return
        names = {entry.pw_name for entry in pwd.getpwall()}
        if self.maildir:
            try:
                with os.scandir(self.maildir_root) as it:
                    names.update(e.name for e in it if e.is_dir(follow_symlinks=False))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot list %s for known users: %s", self.maildir_root, exc)
        self.known = frozenset(key for key in map(local_part_key, names) if key is not None)

    @classmethod
    def read_file(cls, path: str) -> frozenset[str]:
        """The users of a ``local_delivery.users`` file (one per line, # comments)."""
        with open(path, encoding="utf-8") as fh:
            keys = (local_part_key(line.strip()) for line in fh
                    if line.strip() and not line.startswith("#"))
            return frozenset(key for key in keys if key is not None)


def unique_name(hostname: str) -> str:
    """A Maildir file name unique per delivery (time, microseconds, pid, counter, random, host).

    ``/`` and ``:`` cannot appear in the host part (a path separator, and the separator of
    the flags a reader appends), so they are written as octal escapes, as Dovecot does.
    """
    now = time.time_ns()
    seconds, micro = divmod(now // 1000, 1_000_000)
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return (f"{seconds}.M{micro}P{os.getpid()}Q{next(_counter)}R{os.urandom(8).hex()}"
            f".{host}")


def deliver_maildir(root: str, address: str, sender: str, source: MessageSource,
                    hostname: str | None = None) -> LocalResult:
    """Deliver one copy to the mailbox of ``address``. Blocking: run it in a thread."""
    user = mailbox_name(address)
    if user is None:
        return LocalResult.make("bad_mailbox", address=address)
    # Return-Path and Delivered-To are what a local delivery agent adds (RFC 5321 §4.4).
    header = f"Return-Path: <{sender}>\r\nDelivered-To: {address}\r\n".encode()
    try:
        base = ensure_maildir(root, user)
        store(base, header, source, hostname or socket.gethostname())
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EDQUOT:
            return LocalResult.make("quota", user=user, reason=reason)
        if exc.errno == errno.ENOSPC:
            return LocalResult.make("no_space", user=user, reason=reason)
        return LocalResult.make("error", user=user, reason=reason)
    return LocalResult.make("delivered", user=user)


def ensure_maildir(root: str, user: str) -> str:
    """``<root>/<user>`` with its tmp, new and cur, created (and made durable) when missing."""
    base = os.path.join(root, user)
    if all(os.path.isdir(os.path.join(base, sub)) for sub in ("tmp", "new", "cur")):
        return base
    os.makedirs(root, mode=0o700, exist_ok=True)
    created: list[str] = []
    for path in (base, *(os.path.join(base, sub) for sub in ("tmp", "new", "cur"))):
        try:
            os.mkdir(path, 0o700)
            created.append(path)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
    # A directory entry is only durable once its parent is fsynced; otherwise a crash could
    # take the mailbox, and the message about to be written into it, away.
    for parent in dict.fromkeys(os.path.dirname(path) for path in created):
        fsync_directory(parent)
    return base


def store(base: str, header: bytes, source: MessageSource, hostname: str) -> str:
    """Write ``header`` and the message into ``base``/tmp, then publish it in new/.

    Returns the file name in ``new/``."""
    fd, name = _create_unique(os.path.join(base, "tmp"), hostname)
    tmp = os.path.join(base, "tmp", name)
    try:
        try:
            _write_all(fd, header)
            src = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                copy_range(src, fd, source.offset, source.length)
            finally:
                os.close(src)
            os.fsync(fd)
        finally:
            os.close(fd)
        final = _publish(tmp, os.path.join(base, "new"), name, hostname)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return final


def _create_unique(directory: str, hostname: str) -> tuple[int, str]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    for _ in range(NAME_TRIES):
        name = unique_name(hostname)
        try:
            return os.open(os.path.join(directory, name), flags, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free file name in", directory)


def _publish(tmp: str, new_dir: str, name: str, hostname: str) -> str:
    """Give the finished file a name in ``new/`` that nobody else has, durably."""
    for _ in range(NAME_TRIES):
        target = os.path.join(new_dir, name)
        try:
            os.link(tmp, target)
        except FileExistsError:
            name = unique_name(hostname)
            continue
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            if os.path.lexists(target):
                name = unique_name(hostname)
                continue
            os.rename(tmp, target)
        fsync_directory(new_dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a stale tmp/ name is harmless; readers look in new/ only
        return name
    raise FileExistsError(errno.EEXIST, "no free file name in", new_dir)


def copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes of ``src`` from ``offset`` to ``dst``'s current position.

    In the kernel when it can (copy_file_range), by hand when the two files are on file
    systems it cannot copy between."""
    remaining = length
    in_kernel = hasattr(os, "copy_file_range")
    while remaining > 0:
        if in_kernel:
            try:
                n = os.copy_file_range(src, dst, min(remaining, 1 << 30), offset)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                in_kernel = False
                continue
        else:
            block = os.pread(src, min(remaining, COPY_BLOCK), offset)
            n = len(block)
            _write_all(dst, block)
        if n == 0:
            raise OSError(errno.EIO, "queue file shorter than its recorded length")
        offset += n
        remaining -= n


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
