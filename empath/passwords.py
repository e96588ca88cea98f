"""The password file of SMTP AUTH: ``user:argon2-hash`` lines, verified with argon2-cffi.

Hashes are argon2id (RFC 9106) made by ``empathctl passwd``; plain or fast hashes are never
accepted. Verification is deliberately slow (tens of milliseconds and 64 MiB): callers run it
in a thread, a few at a time. An unknown user is checked against a dummy hash, so the answer
takes as long as for a known one and does not tell which users exist.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()
_DUMMY = _hasher.hash("empath: this password is never valid")


class PasswordFileError(Exception):
    """The file cannot be read or has a malformed line (the message names file and line)."""


def read_password_file(path: str) -> dict[str, str]:
    """user → hash. Blank lines and ``#`` comments are ignored."""
    users: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                user, sep, digest = line.partition(":")
                if not sep or not user or not digest.startswith("$argon2"):
                    raise PasswordFileError(f"{path}:{number}: expected user:$argon2id$... ")
                users[user.lower()] = digest
    except OSError as exc:
        raise PasswordFileError(f"{path}: {exc.strerror or exc}") from None
    return users


def verify(users: dict[str, str], user: str, password: str) -> bool:
    """Whether ``password`` is ``user``'s. Blocking and slow: run it in a thread."""
    digest = users.get(user.lower())
    try:
        return _hasher.verify(digest or _DUMMY, password) and digest is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def set_password(path: str, user: str, password: str) -> None:
    """Add or replace ``user`` in the file, atomically (write a temporary file, rename)."""
    if ":" in user or not user.strip() or any(c.isspace() for c in user):
        raise ValueError(f"invalid user name {user!r}")
    lines: list[str] = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as fh:
        lines = [ln.rstrip("\n") for ln in fh
                 if ln.partition(":")[0].strip().lower() != user.lower()]
    lines.append(f"{user}:{hash_password(password)}")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".passwd-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
