"""``empathctl cluster status [--json]``: the fleet's nodes and shared limits (fleet mode).

Reads Redis only (``empath.cluster.view``); exit status 1 when the configuration has no
``cluster.url`` or Redis does not answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from empath.ctl.common import EXIT_OK, CtlError, load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    p = sub.add_parser("status", help="the nodes of the fleet, which are alive, and the "
                       "fleet-wide limits in use per destination")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="configuration file (default: $EMPATH_CONFIG, /etc/empath/empath.yaml "
                        "if it exists, else the checkout's)")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(func=cmd_status)
    parser.set_defaults(usage_of=parser)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_settings(args.config)
    from empath import cluster

    if not cluster.enabled(cfg):
        raise CtlError("fleet mode is off: cluster.url is not set in the configuration")
    from empath.cluster import view

    try:
        doc = view.fleet_view(cfg)
    except Exception as exc:  # redis' errors: connection refused, timeout, auth
        raise CtlError(f"cannot read the fleet from {cfg.cluster.url}: {exc}") from None
    if args.json:
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        _print(doc)
    return EXIT_OK


def _print(doc: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(f"fleet at {doc['redis']}: {doc['alive']} of {len(doc['nodes'])} nodes alive "
              f"(this node: {doc['this_node']})\n\n")
    out.write(f"{'NODE':<24} {'STATE':<6} {'SEEN':>7} {'VERSION':<9} {'PENDING':>8} "
              f"{'ACTIVE':>7} {'DEFERRED':>9} {'LEASES':>7}  BREAKERS\n")
    for n in doc["nodes"]:
        q = n["queue"]
        out.write(f"{n['name']:<24} {'alive' if n['alive'] else 'gone':<6} "
                  f"{n['seen_ago']:>6.1f}s {n['version'] or '-':<9} {q.get('pending', 0):>8} "
                  f"{q.get('active', 0):>7} {q.get('deferred', 0):>9} {n['leases']:>7}  "
                  f"{', '.join(n['open_breakers']) or '-'}\n")
    out.write(f"\n{'DESTINATION':<32} {'CONNECTIONS':>11} {'RATE/MIN':>9} {'AHEAD':>7}  "
              "BREAKER\n")
    for domain, d in doc["destinations"].items():
        limit = d["max_connections"]
        conns = f"{d['connections']}/{limit}" if limit else str(d["connections"])
        brk = d["breaker"]
        breaker = (f"{brk['state']} ({brk['seconds_left']:.0f}s, by {brk['opened_by']})"
                   if brk else "-")
        out.write(f"{domain:<32} {conns:>11} {d['rate_limit'] or '-':>9} "
                  f"{d['rate_ahead']:>6.1f}s  {breaker}\n")
