"""Fleet mode through real daemons: three Empath nodes (own ports, own spools) share one real
``redis-server`` and relay to one loopback sink that counts simultaneous connections and notes
arrival times.

- a domain's ``max_connections`` holds for the three nodes together;
- a ``rate_limit`` holds for the three nodes together, measured at the sink;
- a breaker opened on node A defers the domain on node B without B connecting, and after the
  cool-down one probe in the fleet goes out;
- Redis stopped in the middle of a run: delivery goes on at each node's share, nothing is
  lost or delivered twice, and the shared limits come back when Redis does;
- a SIGKILLed node's leases expire within ``cluster.lease_time``;
- a message accepted by one node and sent again to another is stored once.

Messages are put into each spool directly (``spool_messages``) while delivery is frozen, then
every node is thawed at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from empath.spool import Spool
from empath.spool.queue import state_counts
from tests.integration.test_limits_e2e import (
    TIMEOUTS,
    ZONE,
    AcceptAndClose,
    TimedSink,
    frozen,
    ids_per_worker,
    last_text,
    spool_messages,
)
from tests.integration.test_observability import admin_url, http_get, scrape_when
from tests.support.daemon import EmpathDaemon, deep_merge, wait_for
from tests.support.dnsserver import DNSServer
from tests.support.fixtures import DaemonFactory
from tests.support.redisserver import RedisServer
from tests.support.sink import Behaviour, SinkServer, start_sinks

WAIT = 60.0


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as server:
        yield server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    with server:
        yield server


def node_config(name: str, redis: RedisServer, dns: DNSServer, port: int, workers: int = 1,
                patient: bool = False, **delivery: Any) -> dict[str, Any]:
    """``patient``: a Redis reply may take 2 s and a lease lives 6 s, for tests of the limits
    themselves: on a machine loaded by the rest of the suite, a reply slower than 0.5 s marks
    Redis down (each node then applies its own share, by design) and a renewal that came late
    lets a lease expire under a live connection; neither is what those tests are about."""
    base = {"processes": {"receivers": 1, "delivery": workers},
            "cluster": {"url": redis.url, "node_name": name,
                        "lease_time": "6s" if patient else "2s", "heartbeat": "0.5s",
                        "timeout": "2s" if patient else "0.5s"},
            "delivery": {"port": port, "timeouts": TIMEOUTS, "queue_scan_interval": "0.2s",
                         "dns": {"resolver": f"127.0.0.1:{dns.port}", "timeout": "2s"},
                         "retry_base_delay": "1s", "retry_max_delay": "2s",
                         "retry_jitter_factor": 0,
                         "connection_reuse": {"max_idle": 0}}}
    return deep_merge(base, {"delivery": delivery})


def fleet(daemon_factory: DaemonFactory, n: int, config: Any) -> list[EmpathDaemon]:
    """``n`` nodes, frozen, started together; ``config(name)`` gives each one's overrides."""
    nodes = [daemon_factory(config(f"node{i}"), start=False) for i in range(n)]
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        node.wait_settled()
        frozen(node, True)
    return nodes


def thaw(nodes: list[EmpathDaemon]) -> None:
    for node in nodes:
        frozen(node, False)


def spooled(node: EmpathDaemon) -> int:
    counts, _ = state_counts(Spool(str(node.spool_path)))
    return sum(counts.values())


def subjects(sink: SinkServer) -> list[str]:
    out = []
    for message in sink.messages:
        for line in message.data.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                out.append(line[9:].decode())
    return out


def leases(redis: RedisServer, domain: str) -> int:
    """Leases alive now on ``domain`` (the members not yet expired)."""
    client = redis.client()
    seconds, micros = client.time()
    return int(client.zcount(f"empath:conn:{domain}", seconds * 1000 + micros // 1000, "+inf"))


def test_max_connections_hold_for_the_fleet(daemon_factory: DaemonFactory, dns: DNSServer,
                                            redis_server: RedisServer) -> None:
    # Three nodes of two workers: each node alone would open 4 connections, 12 together.
    # The sink answers QUIT at once: a lease outlives its delivery by QUIT_GRACE for the QUIT.
    with SinkServer(Behaviour(delay=0.05, quit_delay=0), host="127.0.0.2") as sink:
        nodes = fleet(daemon_factory, 3, lambda name: node_config(
            name, redis_server, dns, sink.port, workers=2, patient=True,
            domains={"example.test": {"max_connections": 4}}))
        for n, node in enumerate(nodes):
            spool_messages(node, ids_per_worker(2, 6), "example.test")
            assert spooled(node) == 12, n
        thaw(nodes)
        for node in nodes:
            node.wait_for(lambda n=node: spooled(n) == 0, WAIT, "every message delivered")
    assert sink.max_concurrent_sessions <= 4
    assert sink.max_concurrent_sessions >= 3  # the limit was used, not starved
    # Each message once: nothing lost, nothing twice.
    assert sorted(subjects(sink)) == sorted(f"message {i}" for i in range(12) for _ in range(3))


def test_rate_limit_holds_for_the_fleet(daemon_factory: DaemonFactory, dns: DNSServer,
                                        redis_server: RedisServer) -> None:
    # 240 a minute (4 a second, a burst of 4) over three nodes: 36 messages take ~8 s. Each
    # node alone would allow 240 a minute, so three would send all 36 at once.
    rate = 240
    with TimedSink(host="127.0.0.2") as sink:
        nodes = fleet(daemon_factory, 3, lambda name: node_config(
            name, redis_server, dns, sink.port, patient=True,
            domains={"example.test": {"rate_limit": rate}}))
        for node in nodes:
            spool_messages(node, ids_per_worker(1, 12), "example.test")
        thaw(nodes)
        for node in nodes:
            node.wait_for(lambda n=node: spooled(n) == 0, WAIT, "every message delivered")
    assert len(sink.messages) == 36
    arrivals = sorted(sink.arrivals)
    burst = rate // 60
    span = arrivals[-1] - arrivals[0]
    measured = (len(arrivals) - burst) / span * 60  # messages a minute after the first burst
    assert measured <= rate * 1.1, measured
    assert measured >= rate * 0.75, measured  # and the limit was used, not starved
    # GCRA's promise: in any stretch of t seconds at most burst + rate t (plus one for the time
    # between a token and the message's arrival).
    per_second = rate / 60
    for i in range(len(arrivals)):
        for j in range(i, len(arrivals)):
            assert j - i + 1 <= burst + per_second * (arrivals[j] - arrivals[i]) + 1


def test_breaker_opened_on_one_node_defers_on_another(
        daemon_factory: DaemonFactory, dns: DNSServer, redis_server: RedisServer) -> None:
    [placeholder, keeper] = start_sinks(["127.0.0.6", "127.0.0.2"])
    port = placeholder.port
    placeholder.stop()
    dead = AcceptAndClose("127.0.0.6", port)
    revived: SinkServer | None = None
    try:
        a, b = fleet(daemon_factory, 2, lambda name: {
            **node_config(name, redis_server, dns, port,
                          circuit_breaker={"failures": 2, "cooldown": "4s"}),
            "metrics": {"listen_addr": "127.0.0.1:0"}})
        thaw([a, b])
        spool_messages(a, ids_per_worker(1, 1), "dead.test")
        a.wait_for(lambda: "circuit breaker for dead.test open" in a.log_text(), WAIT,
                   "the breaker to open on node A")
        assert dead.accepted == 2
        client = redis_server.client()
        assert client.exists("empath:brk:open:dead.test") == 1
        assert client.hget("empath:breakers", "dead.test") == "node0"
        later = ids_per_worker(1, 3)
        spool_messages(b, later, "dead.test")
        for qid in later:  # deferred on B at once, without B connecting
            b.wait_for(lambda q=qid: "(circuit breaker)" in (last_text(b, q) or ""), WAIT,
                       f"{qid} deferred by the fleet's breaker on node B")
        assert dead.accepted == 2
        assert "circuit breaker for dead.test open" not in b.log_text()
        # After the cool-down one probe goes out in the whole fleet; it fails: open again.
        a.wait_for(lambda: dead.accepted >= 3, WAIT, "the probe")
        time.sleep(1.5)
        assert dead.accepted == 3
        # The destination comes back: the next probe reaches it and everything goes out.
        dead.stop()
        revived = SinkServer(host="127.0.0.6", port=port).start()
        a.wait_for(lambda: revived is not None and len(revived.messages) == 4, WAIT,
                   "all four messages delivered")
        assert client.exists("empath:brk:open:dead.test", "empath:brk:half:dead.test") == 0
    finally:
        dead.stop()
        keeper.stop()
        if revived is not None:
            revived.stop()


def test_redis_down_mid_run(daemon_factory: DaemonFactory, dns: DNSServer,
                            redis_server: RedisServer) -> None:
    # max_connections 4 over three nodes: shared while Redis runs; each node's share
    # (4 // 3 = 1) while it does not; shared again once it is back. 20 messages per node.
    per_node = 20
    with SinkServer(Behaviour(delay=0.03, quit_delay=0), host="127.0.0.2") as sink:
        nodes = fleet(daemon_factory, 3, lambda name: {
            **node_config(name, redis_server, dns, sink.port,
                          domains={"example.test": {"max_connections": 4}}),
            "metrics": {"listen_addr": "127.0.0.1:0"},
            "health": {"listen_addr": "127.0.0.1:0"}})
        for node in nodes:
            spool_messages(node, ids_per_worker(1, per_node), "example.test")
        scrape_when(nodes[0], "Redis up", empath_cluster_redis_up=1)
        thaw(nodes)
        nodes[0].wait_for(lambda: len(sink.messages) >= 6, WAIT, "the first messages")
        redis_server.stop()
        for node in nodes:
            node.wait_for(lambda n=node: "Redis at" in n.log_text()
                          and "unreachable" in n.log_text(), WAIT, "the warning")
        scrape_when(nodes[0], "Redis down", empath_cluster_redis_up=0)
        code, body = http_get(admin_url(nodes[0], "health", "/health/detailed"))
        detailed = json.loads(body)
        assert detailed["checks"]["cluster"]["ok"] is False, detailed
        assert "unreachable" in detailed["checks"]["cluster"]["detail"]
        assert http_get(admin_url(nodes[0], "health", "/health/ready"))[0] == 200
        time.sleep(0.5)  # deliveries that held leases when Redis went away finish
        before = len(sink.messages)
        with sink._lock:
            sink.max_concurrent_sessions = sink.active_sessions
        nodes[0].wait_for(lambda: len(sink.messages) >= before + 6, WAIT,
                          "delivery going on without Redis")
        assert sink.max_concurrent_sessions <= 3  # one per node
        assert len(sink.messages) < 3 * per_node  # still some left for the return
        redis_server.start()
        for node in nodes:
            node.wait_for(lambda n=node: "reachable again" in n.log_text(), WAIT,
                          "the return to shared limits")
        scrape_when(nodes[0], "Redis up again", empath_cluster_redis_up=1)
        code, body = http_get(admin_url(nodes[0], "health", "/health/detailed"))
        assert json.loads(body)["checks"]["cluster"]["ok"] is True
        seen: list[int] = []  # leases in Redis while the rest goes out

        def drained() -> bool:
            seen.append(leases(redis_server, "example.test"))
            return all(spooled(n) == 0 for n in nodes)

        wait_for(drained, WAIT, 0.05, "every message delivered")
        assert max(seen) > 0  # the shared limit is back in use
        assert max(seen) <= 4
    # Nothing lost, nothing delivered twice.
    assert len(sink.messages) == 3 * per_node
    assert sorted(subjects(sink)) == sorted(f"message {i}" for i in range(per_node)
                                            for _ in range(3))
    for node in nodes:
        assert spooled(node) == 0
    # The shared limits came back: the heartbeat and leases were written again.
    client = redis_server.client()
    assert {"node0", "node1", "node2"} <= set(client.zrange("empath:nodes", 0, -1))


def test_killed_nodes_leases_expire(daemon_factory: DaemonFactory, dns: DNSServer,
                                    redis_server: RedisServer) -> None:
    # Node A holds both connections to a slow sink and is SIGKILLed: node B, with mail of its
    # own, gets no connection while A's leases live, and delivers once they expired
    # (lease_time 2 s, never renewed by the dead node).
    client = redis_server.client()
    key = "empath:conn:example.test"
    with SinkServer(Behaviour(delay=1.0), host="127.0.0.2") as sink:
        a, b = fleet(daemon_factory, 2, lambda name: node_config(
            name, redis_server, dns, sink.port,
            domains={"example.test": {"max_connections": 2}}))
        spool_messages(a, ids_per_worker(1, 6), "example.test")
        frozen(a, False)
        a.wait_for(lambda: leases(redis_server, "example.test") == 2, WAIT, "A's two leases")
        held = set(client.zrange(key, 0, -1))
        a.kill()
        spool_messages(b, ids_per_worker(1, 2), "example.test")
        thaw([b])
        samples: list[tuple[bool, int]] = []  # (A's leases still live, sessions at the sink)

        def sample() -> bool:
            seconds, micros = client.time()
            now = seconds * 1000 + micros // 1000
            live = {m for m, score in client.zrange(key, 0, -1, withscores=True)
                    if score > now}
            samples.append((bool(held & live), len(sink.sessions)))
            return spooled(b) == 0

        wait_for(sample, WAIT, 0.05, "B delivering once A's leases expired")
    sessions_at_kill = samples[0][1]
    assert any(alive for alive, _ in samples)  # A's leases outlived A for a while
    assert all(n == sessions_at_kill for alive, n in samples if alive)  # B waited for them
    assert not samples[-1][0]  # and they expired on their own
    assert len(sink.messages) == 2  # B's two; A's were cut off by the kill


def test_dedup_across_two_nodes(daemon_factory: DaemonFactory,
                                redis_server: RedisServer) -> None:
    a, b = fleet(daemon_factory, 2, lambda name: {
        "cluster": {"url": redis_server.url, "node_name": name},
        "smtp": {"dedup_window": "1h"}, "processes": {"receivers": 1, "delivery": 1}})
    thaw([a, b])
    message = (b"From: a@example.org\r\nTo: u@example.org\r\nMessage-ID: <dup-1@example.org>\r\n"
               b"Subject: once\r\n\r\nHello.\r\n")
    replies = []
    for node in (a, b, a):
        with node.smtp() as client:
            client.ehlo("client.test")
            client.mail("a@example.org")
            client.rcpt("u@localhost")
            code, text = client.data(message)
            replies.append((code, text.decode()))
    assert [code for code, _ in replies] == [250, 250, 250]
    stored = replies[0][1].split()[-1]
    assert stored in replies[1][1] and stored in replies[2][1], replies
    assert "already queued" in replies[1][1]
    assert redis_server.client().keys("empath:dedup:*")
    b.wait_for(lambda: f"duplicate of {stored} suppressed" in b.log_text(), WAIT,
               "B's duplicate log line")
    # Stored once: by A, never by B.
    assert a.log_text().count("from=<a@example.org> size=") == 1
    assert b.log_text().count("from=<a@example.org> size=") == 0


def empathctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "empath.ctl.cli", *args], capture_output=True,
                          text=True, timeout=30)


def test_cluster_status(daemon_factory: DaemonFactory, dns: DNSServer,
                        redis_server: RedisServer) -> None:
    # Two nodes: both listed alive with their queue counts; a domain's leases and breaker in
    # the destinations; a node SIGKILLed is listed as gone once its heartbeats stop.
    with SinkServer(Behaviour(delay=2.0), host="127.0.0.2") as sink:
        a, b = fleet(daemon_factory, 2, lambda name: node_config(
            name, redis_server, dns, sink.port,
            domains={"example.test": {"max_connections": 3, "rate_limit": 600}}))
        spool_messages(a, ids_per_worker(1, 2), "example.test")
        thaw([a, b])
        a.wait_for(lambda: leases(redis_server, "example.test") == 2, WAIT, "two leases")
        r = empathctl("cluster", "status", "--json", "-c", str(a.config_path))
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["this_node"] == "node0"
        assert {n["name"]: n["alive"] for n in doc["nodes"]} == {"node0": True, "node1": True}
        node0 = next(n for n in doc["nodes"] if n["name"] == "node0")
        assert node0["version"] and "pending" in node0["queue"]
        dest = doc["destinations"]["example.test"]
        assert (dest["connections"], dest["max_connections"], dest["rate_limit"]) == (2, 3, 600)
        text = empathctl("cluster", "status", "-c", str(b.config_path))
        assert text.returncode == 0, text.stderr
        assert "2 of 2 nodes alive" in text.stdout and "example.test" in text.stdout
        b.kill()
        from empath.cluster.view import fleet_view
        from empath.config import load_config

        cfg = load_config(str(a.config_path))
        a.wait_for(lambda: fleet_view(cfg)["alive"] == 1, WAIT, "node1 listed as gone")
        gone = {n["name"]: n["alive"] for n in fleet_view(cfg)["nodes"]}
        assert gone == {"node0": True, "node1": False}
    redis_server.stop()
    down = empathctl("cluster", "status", "-c", str(a.config_path))
    assert down.returncode == 1 and "cannot read the fleet" in down.stderr
    single = daemon_factory(start=False)
    off = empathctl("cluster", "status", "-c", str(single.config_path))
    assert off.returncode == 1 and "cluster.url is not set" in off.stderr


def test_redis_password_only_from_a_file(tmp_path: Path) -> None:
    from empath.config import ConfigError, load_config

    conf = tmp_path / "empath.yaml"
    conf.write_text(f"base_dir: {tmp_path}\ncluster:\n  url: redis://:secret@127.0.0.1:6379\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(conf))
    assert "password_file" in str(err.value) and "secret" not in str(err.value)
    conf.write_text(f"base_dir: {tmp_path}\ncluster:\n  url: http://127.0.0.1:6379\n")
    with pytest.raises(ConfigError, match="redis://"):
        load_config(str(conf))


def test_redis_password_file(tmp_path: Path) -> None:
    # A Redis that requires a password: the right one from cluster.password_file gets in,
    # a wrong one is refused with a clear error.
    with RedisServer(tmp_path / "redis", password="s3cret-pw") as server:
        secret = tmp_path / "redis.pass"
        conf = tmp_path / "empath.yaml"
        for password, ok in (("s3cret-pw", True), ("wrong", False)):
            secret.write_text(password + "\n")
            conf.write_text(f"base_dir: {tmp_path}\nspool: {{path: {tmp_path}/spool}}\n"
                            f"cluster:\n  url: {server.url}\n  password_file: {secret}\n")
            r = empathctl("cluster", "status", "--json", "-c", str(conf))
            assert (r.returncode == 0) is ok, r.stderr
            if ok:
                assert json.loads(r.stdout)["nodes"] == []
            else:
                assert "cannot read the fleet" in r.stderr and "wrong" not in r.stderr


def test_single_node_never_imports_redis(tmp_path: Path) -> None:
    # Every role's code path of a node without cluster.url, in a fresh interpreter.
    code = ("import sys, empath.delivery.worker, empath.smtp.server, empath.observe.admin, "
            "empath.observe.health, empath.ctl.cli, empath.cluster;"
            "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_global_rate_limit(tmp_path: Path, redis_server: RedisServer) -> None:
    # delivery.rate_limits.global: 60 a minute for all destinations together, on a single
    # node (each worker's token bucket) and in a fleet (GCRA key rate:* in Redis, a burst of
    # one): after the first message, the next one to any domain waits.
    import asyncio

    from empath.cluster.fleet import Fleet
    from empath.config import load_config
    from empath.delivery import limits

    conf = tmp_path / "empath.yaml"
    conf.write_text(f"base_dir: {tmp_path}\nspool: {{path: {tmp_path}/spool}}\n"
                    "delivery: {rate_limits: {global: 60}}\n"
                    f"cluster: {{url: '{redis_server.url}', node_name: n1}}\n")
    cfg = load_config(str(conf))

    async def run() -> list[bool]:
        got = []
        for fleet_mode in (False, True):
            fleet = Fleet(cfg, "delivery") if fleet_mode else None
            if fleet is not None:
                await fleet.start()
            try:
                dl = limits.DestinationLimits(cfg.delivery, (1, 1))
                if not fleet_mode:  # a bucket of one for a quick test: 60/min, capacity 60
                    dl._rates[limits.GLOBAL] = limits.RateLimiter(60, capacity=1)
                await asyncio.wait_for(dl.pace("one.test"), 5)
                try:
                    await asyncio.wait_for(dl.pace("two.test"), 0.3)
                    got.append(False)
                except TimeoutError:
                    got.append(True)
            finally:
                if fleet is not None:
                    await fleet.close()
        return got

    assert asyncio.run(run()) == [True, True]
    assert redis_server.client().exists("empath:rate:*") == 1
