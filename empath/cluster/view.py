"""The fleet as an operator sees it, read from Redis with a blocking client.

``fleet_view(cfg)`` is what ``empathctl cluster status`` prints: every node that has written a
heartbeat in the last day (alive: one within three heartbeats), its version, queue counts and
the breakers it opened, and per destination the connection leases in use, the configured
limits (from this node's configuration), the open breakers and how far ahead of now each rate
limit has been taken. ``redis_check(cfg)`` is the admin process's ``/health/detailed`` check.
Never writes to Redis.
"""

from __future__ import annotations

import json
import time
from typing import Any

from empath.cluster import node_name
from empath.cluster.fleet import ALIVE_HEARTBEATS, connection_options
from empath.config.typed import Config

SCAN_COUNT = 500


def client(cfg: Config) -> Any:
    import redis

    assert cfg.cluster.url is not None  # fleet mode: cluster.url is set
    return redis.Redis.from_url(cfg.cluster.url, **connection_options(cfg))


def _domain_limits(cfg: Config, domain: str) -> tuple[int, int | None]:
    own = (cfg.delivery.domains or {}).get(domain)
    connections = (own.max_connections if own is not None and own.max_connections
                   else cfg.delivery.max_connections)
    rate = own.rate_limit if own is not None and own.rate_limit else None
    return connections, rate or cfg.delivery.rate_limits.default


def fleet_view(cfg: Config, redis_client: Any = None) -> dict[str, Any]:
    """The fleet's nodes and shared limits as a JSON-ready document."""
    r = redis_client or client(cfg)
    prefix = cfg.cluster.key_prefix
    seconds, micros = r.time()
    now_ms = seconds * 1000 + micros // 1000
    alive_after = now_ms - cfg.cluster.heartbeat * ALIVE_HEARTBEATS * 1000
    nodes = []
    for name, seen in r.zrange(prefix + "nodes", 0, -1, withscores=True):
        records = r.hgetall(f"{prefix}node:{name}")
        workers = {}
        for key, value in records.items():
            try:
                workers[key] = json.loads(value)
            except ValueError:
                continue
        first = workers.get("worker:1", {})
        breakers = sorted({d for w in workers.values() for d in w.get("breakers", [])})
        nodes.append({"name": name, "alive": seen >= alive_after,
                      "last_seen": round(seen / 1000, 3),
                      "seen_ago": round(max(0.0, now_ms - seen) / 1000, 3),
                      "version": first.get("version"), "hostname": first.get("hostname"),
                      "workers": first.get("workers", len(workers)),
                      "queue": first.get("queue", {}),
                      "leases": sum(int(w.get("leases", 0)) for w in workers.values()),
                      "open_breakers": breakers})
    destinations: dict[str, dict[str, Any]] = {}

    def entry(domain: str) -> dict[str, Any]:
        if domain not in destinations:
            connections, rate = _domain_limits(cfg, domain) if domain != "*" else (None, None)
            if domain == "*":
                rate = getattr(cfg.delivery.rate_limits, "global", None)
            destinations[domain] = {"connections": 0, "max_connections": connections,
                                    "rate_limit": rate, "rate_ahead": 0.0, "breaker": None}
        return destinations[domain]

    for key in r.scan_iter(match=prefix + "conn:*", count=SCAN_COUNT):
        in_use = int(r.zcount(key, now_ms, "+inf"))
        if in_use:
            entry(key[len(prefix) + 5:])["connections"] = in_use
    for key in r.scan_iter(match=prefix + "rate:*", count=SCAN_COUNT):
        tat = r.get(key)
        if tat is not None and float(tat) > now_ms:
            entry(key[len(prefix) + 5:])["rate_ahead"] = round((float(tat) - now_ms) / 1000, 3)
    for domain, opener in r.hgetall(prefix + "breakers").items():
        left = int(r.pttl(f"{prefix}brk:open:{domain}"))
        probing = bool(r.exists(f"{prefix}brk:probe:{domain}"))
        entry(domain)["breaker"] = {
            "state": "open" if left > 0 else ("probing" if probing else "probe"),
            "opened_by": opener, "seconds_left": round(max(0, left) / 1000, 3)}
    return {"redis": cfg.cluster.url, "this_node": node_name(cfg),
            "time": round(now_ms / 1000, 3), "nodes": nodes,
            "alive": sum(1 for n in nodes if n["alive"]),
            "destinations": dict(sorted(destinations.items()))}


def redis_check(cfg: Config, redis_client: Any = None) -> tuple[bool, str]:
    """Whether Redis answers a PING from here, and a line saying so."""
    started = time.monotonic()
    try:
        (redis_client or client(cfg)).ping()
    except Exception as exc:  # any failure is the answer
        return False, (f"Redis at {cfg.cluster.url} unreachable ({exc}); the nodes keep to "
                       "their shares of the limits")
    took = (time.monotonic() - started) * 1000
    return True, f"Redis at {cfg.cluster.url} answers ({took:.1f} ms)"
