"""``empathctl spool set-permissions``: hand the spool over to the daemon's ``user`` now.

A start as root with ``user`` set walks the queue files only when the stamp of the last
hand-over (``control/handed-over``) does not hold (empath/master/privileges.py): a file root
put in the spool by other means afterwards (a copy, a restore from a backup) stays root's, and
a delivery worker leaves it where it is and says so in the log. This command, run as root,
walks every spool directory as that start would (no symlink followed, no file with other hard
links changed), whether the daemon runs or not, and records the stamp again. The user and
group are the configuration's ``user``/``group`` (``-c``), or ``--user``/``--group``.
"""

from __future__ import annotations

import argparse
import os

from empath.ctl.common import EXIT_OK, EXIT_USAGE, CtlError, add_spool_options, load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    parser.set_defaults(usage_of=parser)
    sp = sub.add_parser("set-permissions",
                        help="hand the spool's files over to the daemon's user (as root)",
                        description="Hand every file of the spool's directories over to the "
                        "daemon's user and group (as root; symlinks and files with other "
                        "hard links are left alone).")
    add_spool_options(sp)
    sp.add_argument("--user", metavar="USER",
                    help="user to hand the spool to (default: the configuration's user)")
    sp.add_argument("--group", metavar="GROUP",
                    help="group (default: the configuration's group, else the user's)")
    sp.set_defaults(func=cmd_set_permissions)


def cmd_set_permissions(args: argparse.Namespace) -> int:
    from empath.master import privileges

    user, group, spool = args.user, args.group, args.spool
    if user is None or spool is None:
        if args.spool is not None:
            raise CtlError("--spool reads no configuration: give --user too", EXIT_USAGE)
        cfg = load_settings(args.config)
        if user is None:
            user, group = cfg.user, group or cfg.group
        spool = str(cfg.spool.path)
    try:
        ident = privileges.lookup(user, group)
    except privileges.PrivilegeError as exc:
        raise CtlError(str(exc)) from None
    if ident is None:
        raise CtlError("no `user` is configured: the daemon runs as the user that starts it "
                       "and the spool is not handed over (give --user)", EXIT_USAGE)
    if os.geteuid() != 0:
        raise CtlError(f"only root can hand the spool over to {ident.user!r}")
    if not os.path.isdir(spool):
        raise CtlError(f"{spool}: no such spool directory")
    done = privileges.hand_over_spool(ident, spool, force=True)
    print(f"{spool}: handed over to {ident.user} (uid {ident.uid}, gid {ident.gid}); "
          f"{done.changed} file(s) were not the user's")
    return EXIT_OK
