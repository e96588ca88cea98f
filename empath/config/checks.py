"""Warnings about a valid configuration, and the paths it resolves to (``empath check-config``).

A warning names something that is likely a mistake: an open relay (``mynetworks`` wider than
the networks of this host's own interfaces, or 0.0.0.0/0, ::/0), a listener on a public address
without TLS, SMTP AUTH allowed without TLS, an open-file limit too low for
``smtp.max_connections``, and a copied file whose relative ``base_dir`` now
resolves the spool, mail and pidfile to places that do not exist. Nothing here changes or
creates a file.
"""

from __future__ import annotations

import ipaddress
import os
import socket

from empath.config.typed import Config

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def files_needed(max_connections: int) -> int:
    """Open files one receiver may need: any receiver may hold every connection for a moment
    (its share is a target, not a cap), plus a spilled message file each, plus its own."""
    return 2 * max_connections + 256


def open_file_limit() -> int:
    """The hard RLIMIT_NOFILE a receiver could raise itself to (root may raise it further)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or os.geteuid() == 0:
        return 1 << 30
    return int(hard)


def _within(net: IPNetwork, other: IPNetwork) -> bool:
    """``net`` lies inside ``other`` (False across IPv4 and IPv6)."""
    if isinstance(net, ipaddress.IPv4Network) and isinstance(other, ipaddress.IPv4Network):
        return net.subnet_of(other)
    if isinstance(net, ipaddress.IPv6Network) and isinstance(other, ipaddress.IPv6Network):
        return net.subnet_of(other)
    return False


def host_networks() -> list[IPNetwork]:
    """The networks of this host's interfaces (loopback included)."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    nets: list[IPNetwork] = [ipaddress.ip_network("127.0.0.0/8"),
                             ipaddress.ip_network("::1/128")]
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6) or not a.netmask:
                continue
            try:
                nets.append(ipaddress.ip_interface(
                    f"{a.address.split('%')[0]}/{a.netmask}").network)
            except ValueError:
                continue
    return nets


def _public_host(host: str) -> bool:
    """Whether a listener's host is reachable from other machines (not loopback)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower() not in ("localhost", "localhost.localdomain")
    return not ip.is_loopback


def config_warnings(cfg: Config, base_dir_relative: bool = False,
                    own: list[IPNetwork] | None = None) -> list[str]:
    """Each warning as ``file: key: text`` (the configuration is valid; these may be
    mistakes)."""
    where = cfg.config_file
    out: list[str] = []
    own = host_networks() if own is None else own
    for i, net in enumerate(cfg.mynetworks):
        key = f"mynetworks[{i}]"
        if net.prefixlen == 0:
            out.append(f"{where}: {key}: {net} lets every address on the Internet relay "
                       "through this server (an open relay)")
        elif not any(_within(net, o) for o in own):
            out.append(f"{where}: {key}: {net} is wider than this host's own networks "
                       f"({', '.join(str(o) for o in own if o.version == net.version)}): "
                       "everyone in it may relay through this server")
    for i, lst in enumerate(cfg.listeners):
        if lst.tls.enabled is False and _public_host(lst.address.host):
            out.append(f"{where}: listeners[{i}].tls: {lst.address} is on a public address "
                       "with TLS off: mail and passwords cross the network in clear")
    auth = cfg.smtp.auth
    submission = [lst for lst in cfg.listeners if lst.mode in ("submission", "smtps")]
    if submission and auth.allow_plaintext:
        out.append(f"{where}: smtp.auth.allow_plaintext: AUTH is offered without TLS: "
                   "passwords cross the network in clear")
    for i, lst in enumerate(cfg.listeners):
        if lst.mode == "submission" and lst.tls.enabled is False and not auth.allow_plaintext:
            out.append(f"{where}: listeners[{i}].tls: submission listener {lst.address} has "
                       "TLS off, so it can never offer AUTH (allow_plaintext is false)")
    needed = files_needed(cfg.smtp.max_connections)
    limit = open_file_limit()
    if limit < needed:
        out.append(f"{where}: smtp.max_connections: {cfg.smtp.max_connections} connections "
                   f"need about {needed} open files per receiver, but the hard limit here is "
                   f"{limit}; raise it (LimitNOFILE= in the systemd unit, ulimit -Hn, "
                   "/etc/security/limits.conf) or lower smtp.max_connections")
    if base_dir_relative:
        absent = [f"{name} {path}" for name, path in resolved_paths(cfg)
                  if name in ("spool", "mail", "pidfile") and path.startswith("/")
                  and not os.path.exists(path if name != "pidfile" else os.path.dirname(path))]
        if absent:
            out.append(f"{where}: base_dir: relative to the file's directory, it resolves to "
                       f"{cfg.base_dir}, where these do not exist: {'; '.join(absent)} "
                       "(a copied file? set base_dir to an absolute path)")
    return out


def resolved_paths(cfg: Config) -> list[tuple[str, str]]:
    """(what, where) of the spool, mail, pidfile, logs and TLS files, as absolute paths."""
    out = [("spool", os.path.abspath(cfg.spool.path))]
    ld = cfg.local_delivery
    out.append(("mail", f"LMTP {ld.lmtp}" if ld.lmtp is not None
                else os.path.abspath(ld.maildir_root)))
    out.append(("pidfile", os.path.abspath(cfg.pidfile)))
    if cfg.log.syslog:
        logs = f"syslog ({cfg.log.syslog}, {cfg.log.syslog_socket})"
    elif cfg.log.file:
        logs = os.path.abspath(cfg.log.file)
    else:
        logs = "standard error"
    out.append(("logs", logs))
    if cfg.audit.log_path:
        out.append(("audit log", os.path.abspath(cfg.audit.log_path)))
    from empath.config.tlsfiles import needs_self_signed, self_signed_paths

    if needs_self_signed(cfg):
        out.append(("self-signed TLS", os.path.abspath(self_signed_paths(cfg)[0])))
    return out
