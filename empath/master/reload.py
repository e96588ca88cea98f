"""The master's reload path: validating a new configuration, the generation swap, and the
rollback of a generation that does not run.

SIGHUP reaches ``Reloader.reload`` from the arbiter's loop. What it keeps true:

- A reload that cannot work changes nothing: an invalid file, a changed ``spool.path``, a file
  the children would fail to load (``preflight.runtime_problems``: log file, certificates,
  DKIM keys) or a listener that cannot be bound is refused, logged and recorded in
  ``last`` (the status file's ``last_reload``); the running generation and its children stay.
- A valid one makes the successor generation current (``Generation.successor``) and keeps the
  one it replaced as ``previous``; sockets the successor does not use are kept open until no
  child of an older generation runs (``left_behind``, ``close_left_behind``).
- The previous generation is retired only once every child of its successor has booted
  (``settle``). A successor whose receiver or delivery worker exits before its first
  heartbeat, or that has not booted within ``NEW_GENERATION_WAIT``, is rolled back
  (``roll_back``): its children are stopped and the previous generation, whose children never
  stopped serving, becomes current again under a fresh number. A working generation is never
  retired for one that does not run.

The arbiter owns the children and the loop; this module decides and asks it to start, retire
or renumber children (``Arbiter.retire``), never forks or reaps.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from empath import logsetup
from empath.config import ConfigError, load_config, tlsfiles
from empath.config.typed import LogConfig
from empath.master import preflight
from empath.master.daemon import sd_notify
from empath.master.generation import Generation, admin_addresses
from empath.master.listeners import Listener, ListenError, bind_all

if TYPE_CHECKING:
    from empath.master.arbiter import Arbiter

log = logging.getLogger("empath.master")

# Most a new generation may take to boot before the reload is rolled back (the old one keeps
# serving until then): generous, as children boot in well under a second on an idle host.
NEW_GENERATION_WAIT = 30.0


class Reloader:
    """The reload state of one arbiter and the steps that change it."""

    def __init__(self, arbiter: Arbiter) -> None:
        self.arbiter = arbiter
        # The generation a reload replaced, until its successor runs (or is rolled back).
        self.previous: Generation | None = None
        self.reloaded_at = 0.0  # monotonic time of the last swap
        # The outcome of the last reload: time, generation, ok (None while the new generation
        # boots) and the reason it failed; in the status file (empath status, /health).
        self.last: dict[str, Any] | None = None
        # Sockets no current generation uses, open until the older children are gone.
        self.left_behind: list[Listener] = []

    def reload(self) -> None:
        """Re-read the configuration; start a new generation of children with it (the old one
        is stopped once the new one runs). An invalid file changes nothing."""
        sd_notify("RELOADING=1")
        try:
            self._reload()
        finally:
            sd_notify("READY=1")

    def _reload(self) -> None:
        master = self.arbiter
        cfg = master.cfg
        try:
            new = load_config(cfg.config_file)
        except ConfigError as exc:
            self._refuse(str(exc))
            return
        except Exception as exc:
            log.exception("reload failed")
            self._refuse(f"unexpected error: {exc}")
            return
        if new.spool.path != cfg.spool.path:
            # The old generation's claims live in the old spool: moving takes a restart.
            self._refuse("spool.path changed; that takes a restart")
            return
        # What the children would load (log file, certificates, DKIM keys) is loaded here
        # first: a broken file refuses the reload instead of breaking the new children.
        problems = preflight.runtime_problems(new)
        if problems:
            self._refuse("; ".join(problems))
            return
        try:
            listeners = bind_all([lc.address for lc in new.listeners], master.listeners)
        except ListenError as exc:
            self._refuse(str(exc))
            return
        try:
            admin_listeners = bind_all(admin_addresses(new), master.admin_listeners)
        except ListenError as exc:
            for lst in listeners:
                if lst not in master.listeners:
                    lst.close()
            self._refuse(str(exc))
            return
        for key in ("pidfile", "user", "group"):
            if getattr(new, key) != getattr(cfg, key):
                log.warning("reload: %s changed; that takes a restart", key)
        if new.log != cfg.log:
            configure_log(new.log)
        for lst in listeners:
            if lst not in master.listeners:
                log.info("listening on %s", lst.bound)
        self.previous = master.current
        master.current = master.current.successor(new, listeners, admin_listeners)
        self.left_behind += self.previous.left_behind(master.current)
        try:  # a new hostname, a key made readable by others: a new self-signed pair
            tlsfiles.ensure_self_signed(new, log)
        except OSError as exc:
            log.error("TLS: cannot write the self-signed certificate in %s: %s", new.tls_dir,
                      exc.strerror or exc)
        master.log_admin_listeners(list(self.previous.admin_listeners))
        master.prepare_metrics_dir()
        self.reloaded_at = time.monotonic()
        master.respawn.reset()
        log.info("configuration reloaded; starting generation %d", master.generation)
        self.last = {"time": time.time(), "generation": master.generation, "ok": None,
                     "error": None}
        master.status_changed = True

    def _refuse(self, reason: str) -> None:
        log.error("reload failed, keeping the running configuration: %s", reason)
        self._record_failure(reason)

    def _record_failure(self, reason: str) -> None:
        self.last = {"time": time.time(), "generation": self.arbiter.generation, "ok": False,
                     "error": reason}
        self.arbiter.status_changed = True

    def settle(self) -> None:
        """Once every child of the new generation has booted, stop the old one; a new
        generation that has not booted within NEW_GENERATION_WAIT is rolled back instead:
        the working generation is never retired for one that does not run."""
        master = self.arbiter
        old = [c for c in master.children.values()
               if c.generation < master.generation and not c.retiring]
        if not old:
            return
        new = [c for c in master.children.values() if c.generation == master.generation]
        complete = len(new) >= sum(master.wanted.values()) and all(c.booted for c in new)
        if complete:
            for rec in old:
                master.retire(rec)
            if self.last is not None and self.last["ok"] is None:
                self.last["ok"] = True
                log.info("generation %d runs; generation %d stopping", master.generation,
                         old[0].generation)
            self.previous = None
            master.status_changed = True
        elif time.monotonic() - self.reloaded_at > NEW_GENERATION_WAIT:
            if not self.roll_back(f"generation {master.generation} did not boot within "
                                  f"{NEW_GENERATION_WAIT:g}s"):
                for rec in old:
                    master.retire(rec)

    def roll_back(self, reason: str) -> bool:
        """The new generation cannot run (``reason``): go back to the previous configuration,
        whose children still run, instead of halting. False when there is nothing to go back
        to (start-up, or the old generation is already stopping)."""
        master = self.arbiter
        prev = self.previous
        old = [c for c in master.children.values()
               if prev is not None and c.generation == prev.number and not c.retiring]
        if prev is None or not old:
            return False
        log.critical("reload failed: %s; going back to the configuration of generation %d",
                     reason, prev.number)
        self._record_failure(reason)
        for rec in list(master.children.values()):
            if rec.generation == master.generation:
                master.retire(rec)
        keep = prev.sockets()
        self.left_behind = ([lst for lst in self.left_behind if lst not in keep]
                            + master.current.left_behind(prev))
        if prev.cfg.log != master.cfg.log:
            configure_log(prev.cfg.log)
        # A fresh number: children of the failed generation must not count as current.
        master.current = prev.revived(master.generation + 1)
        for rec in old:
            rec.generation = master.generation
        self.previous = None
        master.respawn.reset()
        master.status_changed = True
        return True

    def close_left_behind(self) -> None:
        """Close the sockets no generation uses once no child of an older generation runs."""
        master = self.arbiter
        if self.left_behind and not any(c.generation < master.generation
                                        for c in master.children.values()):
            for lst in self.left_behind:
                log.info("closed listener %s", lst.bound)
                lst.close()
            self.left_behind = []
            master.status_changed = True

    def drop_left_behind(self) -> list[Listener]:
        """Hand over the sockets left behind (the master is stopping and closes them all)."""
        out, self.left_behind = self.left_behind, []
        return out


def configure_log(log_cfg: LogConfig) -> None:
    """Switch logging to ``log_cfg``; on failure it stays as it was (logged)."""
    try:
        logsetup.configure(log_cfg)
    except OSError as exc:  # checked before; the file system may have changed since
        log.error("cannot switch logging to %s: %s; logging stays as it was",
                  log_cfg.file, exc.strerror or exc)
