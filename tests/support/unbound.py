"""A private validating resolver for tests: Debian's unbound, on a free loopback port.

    with Unbound(tmp_path, stubs={"dane.test": port, ".": port},
                 trust_anchors=[zone.trust_anchor()]) as resolver:
        resolver.port                      # -> delivery.dns.resolver 127.0.0.1:<port>

Its configuration is written into the test's directory: no daemonizing, no chroot, no user
switch, no remote control, no root hints and no trust anchor but the given ones, every zone
it may ask sent to a stub address on loopback (``"."`` too, so it never reaches for the
Internet). ``do-not-query-localhost: no`` lets it query 127.0.0.1; caching is capped at a few
seconds so tests that change a zone do not wait long. It is started with ``-d`` as a child of
the test and stopped by its pid. ``UNBOUND`` is None when the package is not installed
(tools/install-test-deps installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

UNBOUND = shutil.which("unbound") or ("/usr/sbin/unbound"
                                      if os.access("/usr/sbin/unbound", os.X_OK) else None)


def _free_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host`` (unbound binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise OSError("no free port for unbound")


class Unbound:
    def __init__(self, directory: str | Path, *, stubs: dict[str, int],
                 trust_anchors: list[str], host: str = "127.0.0.1",
                 probe: str = ".") -> None:
        self.directory = Path(directory)
        self.stubs = stubs
        self.trust_anchors = trust_anchors
        self.host = host
        self.probe = probe  # a name whose SOA answers once unbound serves
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "unbound.log"

    def config_text(self) -> str:
        server = [
            f"interface: {self.host}", f"port: {self.port}", "do-ip6: no",
            "do-daemonize: no", 'username: ""', 'chroot: ""',
            f'directory: "{self.directory}"', 'pidfile: ""', "use-syslog: no",
            f'logfile: "{self.log_path}"', "verbosity: 1", "val-log-level: 2",
            "num-threads: 1", "so-reuseport: no", "outgoing-range: 64",
            "access-control: 127.0.0.0/8 allow", "do-not-query-localhost: no",
            "qname-minimisation: no", "harden-referral-path: no",
            "target-fetch-policy: \"0 0 0 0 0\"", "prefetch: no", "minimal-responses: yes",
            "cache-max-ttl: 5", "cache-max-negative-ttl: 5", "infra-host-ttl: 5",
            "trust-anchor-signaling: no", "root-key-sentinel: no",
            'module-config: "validator iterator"',
            # RFC 6761 names are answered locally by default (NXDOMAIN); ours are real here.
            'local-zone: "test." nodefault',
        ]
        server += [f'trust-anchor: "{anchor}"' for anchor in self.trust_anchors]
        lines = ["server:"] + [f"    {line}" for line in server]
        lines += ["remote-control:", "    control-enable: no"]
        for name, port in self.stubs.items():
            lines += ["stub-zone:", f'    name: "{name}"', f"    stub-addr: 127.0.0.1@{port}"]
        return "\n".join(lines) + "\n"

    def start(self) -> Unbound:
        if UNBOUND is None:
            raise RuntimeError("unbound is not installed (Debian: unbound)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_port(self.host)
        conf = self.directory / "unbound.conf"
        conf.write_text(self.config_text())
        with open(self.directory / "unbound.err", "wb") as err:
            self.process = subprocess.Popen([UNBOUND, "-d", "-c", str(conf)],
                                            stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=err)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        query = dns.message.make_query(self.probe, "SOA")
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"unbound exited: {self.errors()}")
            try:
                reply = dns.query.udp(query, self.host, port=self.port, timeout=0.5)
            except (dns.exception.Timeout, OSError):
                time.sleep(0.05)
                continue
            if reply.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL):
                return
        raise RuntimeError(f"unbound did not answer within {timeout}s: {self.errors()}")

    def errors(self) -> str:
        texts = []
        for path in (self.directory / "unbound.err", self.log_path):
            if path.exists():
                texts.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(texts)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def __enter__(self) -> Unbound:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
