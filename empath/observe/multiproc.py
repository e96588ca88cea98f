"""The master's side of prometheus_client's multiprocess mode.

Every child writes its metric values into memory-mapped files of its own
(``counter_<pid>.db``, ``histogram_<pid>.db``, ``gauge_livesum_<pid>.db``) in the directory
named by ``PROMETHEUS_MULTIPROC_DIR``; the admin process sums them at scrape time. The master:

- chooses the directory (``metrics.multiproc_dir``, else a tmpfs directory in /dev/shm named
  after the spool, else ``control/metrics`` in the spool), empties it at start (a new master
  starts counting from zero, which Prometheus reads as a counter reset) and exports the
  variable before it forks, so every child imports prometheus_client in multiprocess mode;
- never uses a directory someone else prepared: /dev/shm is writable by every local user, so
  the predictable name may have been taken first, as a directory or a symlink, to make root
  write files through planted links. The directory is created with mkdir (0700), then opened
  with O_NOFOLLOW and checked with fstat: a directory, owned by this process's user (or by
  ``user``, to whom the master hands it), mode reset to 0700. A default name that fails the
  check is left alone and a fresh directory with a random suffix (mkdtemp) is used instead;
  a configured ``metrics.multiproc_dir`` that fails it is an error;
- calls ``mark_process_dead(pid)`` when it reaps a child: the dead child's live gauges
  (connections in progress) are removed, while its counter and histogram files stay, so a
  killed and respawned worker never makes a counter go backwards, nor count twice.

tmpfs is preferred: the files are written through mmap on every update, and a page of a
sparse file on a full disk would kill its writer with SIGBUS.

Never imports prometheus_client until a child is reaped with metrics on.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import stat
import tempfile

from empath.config.typed import Config

log = logging.getLogger("empath.master")

ENV = "PROMETHEUS_MULTIPROC_DIR"
SHM = "/dev/shm"
DOMAIN_STATE = "domains.json"  # the admin's per-domain label state (domains.py), kept here


def default_dir(spool_root: str, control_dir: str) -> str:
    """/dev/shm/empath-metrics-<hash of the spool path> when /dev/shm is writable, else
    ``control_dir``/metrics: one directory per spool, so two instances never share one."""
    if os.path.isdir(SHM) and os.access(SHM, os.W_OK):
        tag = hashlib.sha256(os.path.abspath(spool_root).encode()).hexdigest()[:12]
        return os.path.join(SHM, f"empath-metrics-{tag}")
    return os.path.join(control_dir, "metrics")


def prepare(cfg: Config, spool_root: str, control_dir: str) -> str:
    """Create (or check) and empty the directory, export it to the environment (children
    inherit it); returns its path. OSError when it cannot be made or is not ours."""
    owners = _owners(cfg)
    path = cfg.metrics.multiproc_dir or default_dir(spool_root, control_dir)
    if cfg.metrics.multiproc_dir or not path.startswith(SHM + os.sep):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        make_private_dir(path, owners)
    else:
        try:
            make_private_dir(path, owners)
        except OSError as exc:
            fresh = tempfile.mkdtemp(prefix=os.path.basename(path) + "-", dir=SHM)
            log.warning("metrics: not using %s (%s); using %s instead", path,
                        exc.strerror or exc, fresh)
            path = fresh
    for name in os.listdir(path):
        if name.endswith(".db") or name.startswith(DOMAIN_STATE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, name))
    os.environ[ENV] = path
    return path


def make_private_dir(path: str, owners: frozenset[int]) -> None:
    """Create ``path`` 0700, or accept an existing one only when it is a real directory (not a
    symlink to one) owned by one of ``owners``; its mode is then reset to 0700. OSError
    (PermissionError naming the owner) otherwise."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    # O_NOFOLLOW: a symlink fails with ELOOP; O_DIRECTORY: anything else with ENOTDIR.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid not in owners:
            raise PermissionError(f"{path} is owned by uid {st.st_uid}, not by this "
                                  "process's user")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _owners(cfg: Config) -> frozenset[int]:
    """This process's user, and the configured ``user`` (who owns the directory after a
    previous run handed it over)."""
    uids = {os.geteuid()}
    user = getattr(cfg, "user", None)
    if user:
        with contextlib.suppress(KeyError, ValueError):
            uids.add(int(user) if str(user).isdigit() else pwd.getpwnam(str(user)).pw_uid)
    return frozenset(uids)


def remove(path: str) -> None:
    """At the master's exit: the files are of no use to the next run (which empties the
    directory anyway); the directory goes too when it is empty (tmpfs is memory)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            if name.endswith(".db") or name.startswith(DOMAIN_STATE):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(path, name))
        os.rmdir(path)


def mark_dead(pid: int, path: str) -> None:
    """Forget a dead child's live gauges (its counters and histograms are kept)."""
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    except Exception:  # metrics must never disturb the master
        log.exception("cannot mark process %d dead in %s", pid, path)
