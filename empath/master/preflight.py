"""What the master checks in a configuration before running children with it.

The configuration loader validates values and loads what the children will load (every
listener's certificate with its key, so a mismatched pair fails there; every DKIM key); this
module adds what only the running daemon touches: the log file is opened for appending. A
reload with any of these problems is refused and the running generation keeps serving;
``empath check-config`` reports the same problems (``runtime_problems``) and the warnings of
``security_warnings``.

Nothing here changes the configuration, the process or the files it checks (the log file may
be created, empty, as the daemon would create it).
"""

from __future__ import annotations

import os

from empath import logsetup
from empath.config.typed import Config


def runtime_problems(cfg: Config) -> list[str]:
    """Why the children could not run with ``cfg`` (one line per problem); [] when none."""
    problems: list[str] = []
    log_problem = logsetup.check_log_file(cfg.log)
    if log_problem is not None:
        problems.append(log_problem)
    return problems


def security_warnings(cfg: Config) -> list[str]:
    """Settings that work but that an operator should change."""
    warnings = []
    if cfg.user is None and os.geteuid() == 0:
        warnings.append("running as root: `user` is not set, so every process (receivers "
                        "parsing mail from the network included) keeps root's privileges; "
                        "set `user` (and `group`) to an unprivileged account")
    return warnings
