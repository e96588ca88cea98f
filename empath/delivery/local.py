"""Local delivery into Maildir (<maildir_root>/<user>/{tmp,new,cur}).

The Maildir protocol: write the message under a unique name in ``tmp/``, fsync it, rename it
into ``new/``, fsync ``new/``. A reader never sees a partial file and a crash leaves at worst a
stale file in ``tmp/``. This module never builds a spool path; it reads the message through the
MessageSource the worker hands it.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import time
from dataclasses import dataclass

from empath.spool import MessageSource

_counter = itertools.count()
# A mailbox name becomes a directory name: nothing that could walk out of maildir_root.
_SAFE_USER = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")


@dataclass(frozen=True, slots=True)
class LocalResult:
    ok: bool
    permanent: bool
    text: str


def mailbox_name(address: str) -> str | None:
    """The mailbox a local address delivers to, or None when it cannot be a directory name."""
    local = address.rpartition("@")[0] if "@" in address else address
    local = local.lower()
    if not _SAFE_USER.match(local) or local.startswith("."):
        return None
    return local


def unique_name(hostname: str) -> str:
    """A Maildir file name unique per delivery (time, microseconds, pid, counter, host)."""
    now = time.time()
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}.{host}"


def deliver_maildir(root: str, address: str, sender: str, source: MessageSource,
                    hostname: str | None = None) -> LocalResult:
    """Deliver one copy to the mailbox of ``address``. Blocking: run it in a thread."""
    user = mailbox_name(address)
    if user is None:
        return LocalResult(False, True, f"invalid local mailbox name in {address!r}")
    base = os.path.join(root, user)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(base, sub), mode=0o700, exist_ok=True)
    name = unique_name(hostname or socket.gethostname())
    tmp = os.path.join(base, "tmp", name)
    # Return-Path and Delivered-To are what a local delivery agent adds (RFC 5321 §4.4).
    header = f"Return-Path: <{sender}>\r\nDelivered-To: {address}\r\n".encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, header)
        src = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            offset, remaining = source.offset, source.length
            while remaining > 0:
                n = os.copy_file_range(src, fd, remaining, offset)
                if n == 0:
                    raise OSError("queue file shorter than its recorded length")
                offset += n
                remaining -= n
        finally:
            os.close(src)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, os.path.join(base, "new", name))
    dfd = os.open(os.path.join(base, "new"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return LocalResult(True, False, f"delivered to maildir {user}")
