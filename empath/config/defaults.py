"""Which configuration file the commands read, and the embedded default.

``-c FILE``, else ``$EMPATH_CONFIG``, else ``/etc/empath/empath.yaml`` if it exists, else the
checkout's ``conf/empath.yaml`` when Empath runs from a checkout, else the default embedded in
the package (``default.yaml``): SMTP on 127.0.0.1:2525, and the spool, mail, pidfile and
self-signed certificate under the per-user state directory (:func:`state_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from empath.config.typed import Config

SYSTEM_CONFIG = "/etc/empath/empath.yaml"
EMBEDDED = str(Path(__file__).resolve().parent / "default.yaml")
CHECKOUT = str(Path(__file__).resolve().parent.parent.parent / "conf" / "empath.yaml")


def state_dir() -> str:
    """$XDG_STATE_HOME/empath when XDG_STATE_HOME is set (to an absolute path: an explicit
    choice, root's too); else /var/lib/empath for root; else ~/.local/state/empath."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "empath")
    if os.geteuid() == 0:
        return "/var/lib/empath"
    return os.path.join(os.path.expanduser("~"), ".local", "state", "empath")


def config_path(given: str | None = None) -> str:
    """The file to read: ``given``, $EMPATH_CONFIG, the system file, the checkout's, else
    the embedded default (:data:`EMBEDDED`)."""
    if given:
        return given
    env = os.environ.get("EMPATH_CONFIG")
    if env:
        return env
    if os.path.exists(SYSTEM_CONFIG):
        return SYSTEM_CONFIG
    if os.path.exists(CHECKOUT):
        return CHECKOUT
    return EMBEDDED


def describe(path: str) -> str:
    """How a start-up line names the file (the embedded default says where its state goes)."""
    if path == EMBEDDED:
        return f"the embedded default (state directory {state_dir()})"
    return path


def load(given: str | None = None, warnings: list[str] | None = None,
         check_contents: bool = True) -> Config:
    """Load the resolved configuration (ConfigError when it is invalid)."""
    from empath.config.loader import load_config

    return load_config(config_path(given), warnings=warnings, check_contents=check_contents)
