"""``empathctl dkim keygen DOMAIN SELECTOR``: make a DKIM key pair and print the DNS record.

The private key is written 0600 (never over an existing file) to ``--dir`` as
``<domain>.<selector>.key``; the TXT record to publish is printed, followed by the lines to add
under ``dkim.domains`` in the configuration.
"""

from __future__ import annotations

import argparse
import os

from empath.ctl.common import EXIT_OK, EXIT_USAGE, CtlError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dkim_action", metavar="ACTION")
    gen = sub.add_parser("keygen", help="make a key pair and print its TXT record")
    gen.add_argument("domain", metavar="DOMAIN")
    gen.add_argument("selector", metavar="SELECTOR")
    gen.add_argument("--algorithm", choices=("rsa-sha256", "ed25519-sha256"),
                     default="rsa-sha256")
    gen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    gen.add_argument("--dir", default=".", metavar="PATH", help="where to write the key")
    gen.set_defaults(func=cmd_keygen)
    parser.set_defaults(usage_of=parser)


def cmd_keygen(args: argparse.Namespace) -> int:
    # Imported here, not when the parser is built: dkim and dnspython take a tenth of a
    # second to load, which the other empathctl commands must not pay.
    from empath.config.types import normalize_domain
    from empath.dkim import generate_key, txt_record, write_private_key

    try:
        domain = normalize_domain(args.domain)
    except ValueError as exc:
        raise CtlError(str(exc), EXIT_USAGE) from None
    if not args.selector.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise CtlError(f"invalid selector {args.selector!r}", EXIT_USAGE)
    if args.algorithm == "rsa-sha256" and not 1024 <= args.bits <= 4096:
        raise CtlError("--bits must be from 1024 to 4096", EXIT_USAGE)
    path = os.path.abspath(os.path.join(args.dir, f"{domain}.{args.selector}.key"))
    private, public = generate_key(args.algorithm, args.bits)
    try:
        write_private_key(path, private)
    except FileExistsError:
        raise CtlError(f"{path} exists; not overwriting a key") from None
    print(txt_record(domain, args.selector, args.algorithm, public))
    print()
    print("# configuration:")
    print("dkim:\n  domains:")
    print(f"    {domain}: {{selector: {args.selector}, key: {path}, "
          f"algorithm: {args.algorithm}}}")
    return EXIT_OK
