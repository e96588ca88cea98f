"""The ``empath`` command: run, start, stop, reload and inspect the daemon; check and print the
configuration.

Exit statuses follow the LSB where they apply (``status``: 0 running, 1 dead with a pidfile,
3 not running; ``reload`` of a stopped daemon: 7). Configuration errors are printed on standard
error, naming file, line and key, with status 1, and nothing is started.

This module parses arguments and reports; the master's work lives in ``empath.master``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import os
import platform
import signal
import sys
import time
from typing import Any

import empath
from empath import logsetup
from empath.config import ConfigError, defaults
from empath.config.typed import Config

log = logging.getLogger("empath.master")

SYSTEM_CONFIG = defaults.SYSTEM_CONFIG
START_TIMEOUT = 60.0  # most `empath start` waits for the daemon's report


def default_config_path() -> str:
    """``$EMPATH_CONFIG``, else /etc/empath/empath.yaml if it exists, else the checkout's,
    else the embedded default (config/defaults.py)."""
    return defaults.config_path()


def speedups_implementation() -> str:
    try:
        from empath._speedups import IMPLEMENTATION
    except Exception:  # not built or not written yet: report, never fail
        return "unavailable"
    return str(IMPLEMENTATION)


def version_line() -> str:
    return (f"empath {empath.__version__} (Python {platform.python_version()}, "
            f"speedups: {speedups_implementation()})")


def _err(message: str) -> None:
    print(f"empath: {message}", file=sys.stderr)


def _load(args: argparse.Namespace, warnings: list[str] | None = None,
          check_contents: bool = True) -> Any | None:
    try:
        return defaults.load(args.config, warnings, check_contents)
    except ConfigError as exc:
        for line in str(exc).splitlines():  # one line per problem (ConfigErrors)
            _err(line)
        return None


def _refuse_without_speedups() -> bool:
    """True (after saying why) when EMPATH_REQUIRE_SPEEDUPS forbids the pure-Python twins."""
    from empath import _speedups

    problem = _speedups.required_error()
    if problem is not None:
        _err(problem)
    return problem is not None


def _starting(cfg: Config) -> None:
    """The master's first log lines (configuration, speedups), and the self-signed TLS
    certificate if a listener needs one that does not exist yet."""
    from empath import _speedups
    from empath.config import tlsfiles
    from empath.master import privileges

    log.info("empath %s starting; configuration: %s", empath.__version__,
             defaults.describe(cfg.config_file))
    if _speedups.FALLBACK_REASON is None:
        log.info("%s", _speedups.status_line())
    else:
        log.warning("%s", _speedups.status_line())
    from empath.config.checks import config_warnings

    for text in config_warnings(cfg):  # what check-config warns about (an open relay...)
        log.warning("configuration: %s", text)
    owner = None
    with contextlib.suppress(privileges.PrivilegeError):
        ident = privileges.lookup(cfg.user, cfg.group)
        if ident is not None and privileges.needs_switch(ident) and os.geteuid() == 0:
            owner = (ident.uid, ident.gid)
    try:
        tlsfiles.ensure_self_signed(cfg, log, owner)
    except OSError as exc:
        log.error("TLS: cannot write the self-signed certificate in %s: %s; listeners "
                  "without tls.cert offer no TLS", cfg.tls_dir, exc.strerror or exc)


def _pidfile_path(args: argparse.Namespace) -> str | None:
    if getattr(args, "pidfile", None):
        return str(args.pidfile)
    cfg = _load(args, check_contents=False)  # status and stop work with a broken certificate
    return None if cfg is None else str(cfg.pidfile)


# -- commands ---------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """Run the master in the foreground (systemd, containers)."""
    from empath.master.arbiter import Arbiter
    from empath.master.daemon import Pidfile, PidfileError

    if _refuse_without_speedups():
        return 1
    cfg = _load(args)
    if cfg is None:
        return 1
    problem = logsetup.check_log_file(cfg.log)
    if problem is not None:
        _err(problem)
        return 1
    logsetup.configure(cfg.log)
    _starting(cfg)
    pidfile = Pidfile(cfg.pidfile)
    try:
        pidfile.create()
    except PidfileError as exc:
        _err(str(exc))
        return 1
    try:
        arbiter = Arbiter(cfg, pidfile=pidfile)
        code = arbiter.run()
    finally:
        pidfile.remove()
    if code and arbiter.error and cfg.log.file is not None:
        _err(arbiter.error)  # the log has it too; a foreground user should see it here
    return code


def cmd_start(args: argparse.Namespace) -> int:
    """Start a detached daemon; return once it listens (0) or has failed (1)."""
    from empath.master.daemon import detach, wait_for_report

    if _refuse_without_speedups():
        return 1
    cfg = _load(args)
    if cfg is None:
        return 1
    state, pid = _pidfile_state(cfg.pidfile)
    if state == "error":
        return 1
    if state == "running":
        _err(f"already running (pid {pid}, pidfile {cfg.pidfile})")
        return 1
    problem = logsetup.check_log_file(cfg.log)
    if problem is not None:
        _err(problem)
        return 1
    if cfg.log.file is None:
        _err("warning: log.file is not set, so the detached daemon logs nowhere")
    sys.stdout.flush()
    sys.stderr.flush()
    detached = detach()
    if detached.is_daemon:
        return _daemon_main(cfg, detached.fd)
    line = wait_for_report(detached.fd, args.timeout)
    where = f"; see {cfg.log.file}" if cfg.log.file else ""
    if line is None:
        _err(f"no start-up report within {args.timeout:g}s{where}")
        return 1
    if not line:
        _err(f"the daemon exited during start-up{where}")
        return 1
    word, _, rest = line.partition(" ")
    if word != "ready":
        _err(rest or line)
        return 1
    pid_text, _, listening = rest.partition(" ")
    print(f"empath started (pid {pid_text}), listening on {', '.join(listening.split())}")
    return 0


def _daemon_main(cfg: Config, report_fd: int) -> int:
    from empath.master.arbiter import Arbiter
    from empath.master.daemon import Pidfile, PidfileError, report

    code = 1
    try:
        logsetup.redirect_stdio(cfg.log.file)
        logsetup.configure(cfg.log)
        _starting(cfg)
        pidfile = Pidfile(cfg.pidfile)
        try:
            pidfile.create()
        except PidfileError as exc:
            log.error("%s", exc)
            report(report_fd, f"error {exc}")
            return 1
        try:
            code = Arbiter(cfg, pidfile=pidfile, report_fd=report_fd).run()
        finally:
            pidfile.remove()
    except BaseException as exc:
        log.exception("master failed")
        report(report_fd, f"error {exc}")
    finally:
        logging.shutdown()
    return code


def _pidfile_state(path: str) -> tuple[str, int | None]:
    """``pidfile_state``, with ("error", None) (reported) when the lock cannot be read."""
    from empath.master.daemon import PidfileError, pidfile_state

    try:
        return pidfile_state(path)
    except PidfileError as exc:
        _err(str(exc))
        return "error", None


def cmd_stop(args: argparse.Namespace) -> int:
    """SIGTERM the master holding the lock and wait until it has released it (and so exited);
    a pid in a stale pidfile is never signalled."""
    from empath.master.daemon import lock_holder, process_running

    path = _pidfile_path(args)
    if path is None:
        return 1
    state, pid = _pidfile_state(path)
    if state == "error":
        return 1
    if state != "running" or pid is None:
        if state == "stale":
            with contextlib.suppress(OSError):
                os.unlink(path)
        print("empath is not running")
        return 0
    timeout = args.timeout
    if timeout is None:
        cfg = None if args.pidfile else _load(args, check_contents=False)
        timeout = (cfg.shutdown_timeout if cfg is not None else 30.0) + 10.0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    # Until the lock is free (the master is done), then until the pid has exited too (it
    # releases the lock just before): that pid is only waited for, never signalled again.
    while _still_held(lock_holder, path, pid) or process_running(pid):
        if time.monotonic() >= deadline:
            _err(f"pid {pid} did not stop within {timeout:g}s")
            return 1
        time.sleep(0.05)
    print(f"empath stopped (pid {pid})")
    return 0


def _still_held(lock_holder: Any, path: str, pid: int) -> bool:
    from empath.master.daemon import PidfileError

    try:
        return bool(lock_holder(path) == pid)
    except PidfileError:
        return True  # a new holder between its lock and its pid: not ours to judge yet


def cmd_reload(args: argparse.Namespace) -> int:
    """Validate the configuration, then SIGHUP the master holding the lock (an invalid file
    is not sent)."""
    cfg = _load(args)
    if cfg is None:
        return 1
    path = args.pidfile or cfg.pidfile
    state, pid = _pidfile_state(path)
    if state == "error":
        return 1
    if state != "running" or pid is None:
        print("empath is not running")
        return 7
    os.kill(pid, signal.SIGHUP)
    print(f"empath (pid {pid}): reload requested")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """LSB status: 0 running (with a report), 1 dead but the pidfile exists, 3 not running."""
    from empath.master.daemon import StatusFile, status_path

    path = _pidfile_path(args)
    if path is None:
        return 4  # LSB: status unknown
    state, pid = _pidfile_state(path)
    if state == "error":
        return 4
    if state == "absent":
        print("empath is not running")
        return 3
    if state == "stale":
        print(f"empath is not running, but the pidfile {path} remains"
              + (f" (pid {pid})" if pid else ""))
        return 1
    status = StatusFile.read(status_path(path))
    if status is None or status.get("pid") != pid:
        print(f"empath is running (pid {pid})")
        return 0
    up = _duration(time.time() - float(status.get("started_at", time.time())))
    print(f"empath is running (pid {pid}, up {up}, generation {status['generation']}, "
          f"{status.get('state', 'running')})")
    print(f"config: {status.get('config_file')}")
    print(f"listening on: {', '.join(status.get('listeners', [])) or '-'}")
    admin = {k: v for k, v in (status.get("admin_listeners") or {}).items() if v}
    if admin:
        print("admin: " + ", ".join(f"{k} on {v}" for k, v in admin.items()))
    reload_line = _last_reload(status.get("last_reload"))
    if reload_line:
        print(reload_line)
    print("children:")
    for c in status.get("children", []):
        extra = " stopping" if c.get("retiring") else ""
        print(f"  {c['kind']:<8} {c['index']}/{c.get('count', '?')}  pid {c['pid']:<8} "
              f"generation {c['generation']}{extra}")
    return 0


def _last_reload(last: Any) -> str | None:
    """"last reload: failed 5s ago (reason)" from the status file's ``last_reload``."""
    if not isinstance(last, dict):
        return None
    ago = _duration(time.time() - float(last.get("time") or time.time()))
    if last.get("ok") is False:
        return f"last reload: FAILED {ago} ago ({last.get('error')}); the previous " \
               "configuration is still running"
    word = "in progress" if last.get("ok") is None else "ok"
    return f"last reload: {word} ({ago} ago, generation {last.get('generation')})"


def cmd_check_config(args: argparse.Namespace) -> int:
    """Every error (file, line, key) on standard error with status 1; else the file, the
    resolved paths, any warnings (``warning: ...``) and ``ok`` on standard output."""
    from empath.config.checks import resolved_paths
    from empath.master import preflight

    warnings: list[str] = []
    cfg = _load(args, warnings)
    if cfg is None:
        return 1
    print(f"config: {defaults.describe(cfg.config_file)}")
    for what, where in resolved_paths(cfg):
        print(f"{what + ':':<17}{where}")
    for text in warnings:
        print(f"warning: {text}")
    # Beyond the values: what the daemon would load (log file, certificates, DKIM keys), and
    # how it would run (as root without user): on standard error.
    problems = preflight.runtime_problems(cfg)
    for warning in preflight.security_warnings(cfg):
        _err(f"warning: {warning}")
    if os.geteuid() != 0:
        # Files the daemon reads as root or as its user may be closed to whoever runs this.
        for problem in [p for p in problems if "Permission denied" in p]:
            _err(f"warning: {problem} (checked as uid {os.geteuid()}; run check-config as "
                 "root or as the daemon's user)")
            problems.remove(problem)
    for problem in problems:
        _err(f"{cfg.config_file}: {problem}")
    if problems:
        return 1
    print("ok")
    return 0


def cmd_config_template(args: argparse.Namespace) -> int:
    from empath.config.template import render_template

    sys.stdout.write(render_template())
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from empath.config.template import render_reference

    sys.stdout.write(render_reference())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(f"empath {empath.__version__}")
    print(f"python: {platform.python_version()} ({platform.python_implementation()}) "
          f"{sys.executable}")
    reason: str | None = None
    with contextlib.suppress(Exception):
        from empath._speedups import FALLBACK_REASON as reason
    print(f"speedups: {speedups_implementation()}" + (f" ({reason})" if reason else ""))
    try:
        print(f"uvloop: {importlib.metadata.version('uvloop')}")
    except importlib.metadata.PackageNotFoundError:
        print("uvloop: unavailable")
    print(f"config: {defaults.describe(defaults.config_path(args.config))}")
    import sysconfig

    share = os.path.join(sysconfig.get_path("data"), "share", "empath")
    if os.path.isdir(share):  # an installed wheel: init script, systemd unit, logrotate
        print(f"shared files: {share}")
    return 0


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    parts.append(f"{seconds}s")
    return " ".join(parts[:2])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="empath", description="Empath mail transfer agent.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    with_config = argparse.ArgumentParser(add_help=False)
    with_config.add_argument("-c", "--config", metavar="FILE",
                             help="configuration file (default: $EMPATH_CONFIG, "
                                  f"{SYSTEM_CONFIG} if it exists, the checkout's, else the "
                                  "embedded default)")
    with_pidfile = argparse.ArgumentParser(add_help=False)
    with_pidfile.add_argument("--pidfile", metavar="FILE",
                              help="use this pidfile instead of the configuration's")

    def add(name: str, func: Any, help_text: str,
            parents: tuple[argparse.ArgumentParser, ...] = (with_config,)
            ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=list(parents), help=help_text)
        p.set_defaults(func=func)
        return p

    add("run", cmd_run, "run in the foreground (for systemd and containers)")
    p = add("start", cmd_start, "start a detached daemon; returns once it listens")
    p.add_argument("--timeout", type=float, default=START_TIMEOUT, metavar="SECONDS",
                   help="most seconds to wait for the daemon to report")
    p = add("stop", cmd_stop, "stop gracefully and wait", (with_config, with_pidfile))
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="most seconds to wait (default: shutdown_timeout + 10)")
    add("reload", cmd_reload, "validate the configuration and apply it (SIGHUP)",
        (with_config, with_pidfile))
    add("status", cmd_status, "report whether the daemon runs (LSB exit codes)",
        (with_config, with_pidfile))
    add("check-config", cmd_check_config, "validate the configuration file")
    add("config-template", cmd_config_template, "print the documented default configuration",
        ())
    add("config-reference", cmd_config_reference,
        "print the configuration reference (docs/CONFIGURATION.md)", ())
    add("info", cmd_info, "print version, Python and speedups information")
    sub.add_parser("sendmail", help="submit a message from standard input (sendmail options)")
    sub.add_parser("mailq", help="print the mail queue")
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["sendmail"]:  # sendmail's own option syntax: not argparse's
        from empath.ctl import sendmail
        return sendmail.main(words[1:])
    if words[:1] == ["mailq"]:
        from empath.ctl import mailq
        return mailq.main(words[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version_line())
        return 0
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
