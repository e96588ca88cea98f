"""What the master checks in a configuration before running children with it.

The configuration loader validates values and files that must exist; this module goes one
step further and *uses* what the children will use, in the master, before any child is
started with it: the log file is opened for appending, every listener's certificate is loaded
with its key into a TLS context (a mismatched pair fails here), every DKIM key is parsed. A
reload with any of these problems is refused and the running generation keeps serving;
``empath check-config`` reports the same problems (``runtime_problems``) and the warnings of
``security_warnings``.

Nothing here changes the configuration, the process or the files it checks (the log file may
be created, empty, as the daemon would create it).
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from empath import logsetup


def runtime_problems(cfg: Any) -> list[str]:
    """Why the children could not run with ``cfg`` (one line per problem); [] when none."""
    problems: list[str] = []
    log_problem = logsetup.check_log_file(cfg.log)
    if log_problem is not None:
        problems.append(log_problem)
    for i, listener in enumerate(cfg.listeners):
        problem = certificate_problem(listener.tls.cert, listener.tls.key)
        if problem is not None:
            problems.append(f"listeners[{i}].tls ({listener.address}): {problem}")
    problems.extend(dkim_problems(cfg))
    return problems


def certificate_problem(cert: str | None, key: str | None) -> str | None:
    """Why ``cert`` and ``key`` cannot serve TLS (unreadable, unparsable, not a pair)."""
    if cert is None or key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            return f"the key {key} does not belong to the certificate {cert}"
        return f"cannot load {cert} with {key}: {reason}"
    except OSError as exc:
        return f"cannot load {cert} with {key}: {exc.strerror or exc}"
    return None


def dkim_problems(cfg: Any) -> list[str]:
    """Why a DKIM key of ``dkim.domains`` cannot sign (unreadable or unparsable)."""
    if not cfg.dkim.domains:
        return []
    from cryptography.hazmat.primitives import serialization

    from empath import dkim

    problems = []
    for domain, entry in cfg.dkim.domains.items():
        try:
            key = dkim.load_key(domain, entry.selector, entry.algorithm, entry.key)
            if entry.algorithm != "ed25519-sha256":
                serialization.load_pem_private_key(key.private, password=None)
        except dkim.DkimError as exc:
            problems.append(str(exc))
        except (ValueError, TypeError) as exc:
            problems.append(f"dkim.domains.{domain}.key: {entry.key}: not a usable private "
                            f"key ({exc})")
    return problems


def security_warnings(cfg: Any) -> list[str]:
    """Settings that work but that an operator should change."""
    warnings = []
    if cfg.user is None and os.geteuid() == 0:
        warnings.append("running as root: `user` is not set, so every process (receivers "
                        "parsing mail from the network included) keeps root's privileges; "
                        "set `user` (and `group`) to an unprivileged account")
    return warnings
