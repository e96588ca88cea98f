"""``empathctl passwd USER``: add a user to (or change a password in) the SMTP AUTH password
file, as an argon2id hash (empath/passwords.py).

The file is ``--file PATH`` or the configuration's ``smtp.auth.password_file``. The password
is read from the terminal twice (no echo), or once from standard input with ``--stdin`` (for
scripts). Receivers read the file when they start: ``empath reload`` applies a change.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from empath.ctl.common import EXIT_OK, EXIT_USAGE, CtlError, load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user", metavar="USER", help="user name, e.g. alice@example.com")
    parser.add_argument("--file", metavar="PATH",
                        help="password file (default: the configuration's "
                             "smtp.auth.password_file)")
    parser.add_argument("-c", "--config", metavar="FILE", help="configuration file")
    parser.add_argument("--stdin", action="store_true",
                        help="read the password from standard input (one line)")


def cmd_passwd(args: argparse.Namespace) -> int:
    # Imported here: empath.passwords hashes a dummy password when loaded (argon2id, a
    # deliberately slow second or so), which every other empathctl command must not pay.
    from empath.passwords import set_password

    path = args.file
    if path is None:
        path = load_settings(args.config).smtp.auth.password_file
        if path is None:
            raise CtlError("smtp.auth.password_file is not set; give --file PATH", EXIT_USAGE)
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            raise CtlError("the passwords differ; nothing changed")
    if not password:
        raise CtlError("empty password; nothing changed", EXIT_USAGE)
    try:
        set_password(path, args.user, password)
    except ValueError as exc:
        raise CtlError(str(exc), EXIT_USAGE) from None
    print(f"{args.user}: password set in {path} (empath reload applies it)")
    return EXIT_OK
