"""A private Postfix instance for side-by-side runs: loopback only, no DNS, own queue.

Debian's postfix package is installed unconfigured by benchmarks/run; nothing here touches
/etc/postfix or the system instance. ``PostfixInstance`` writes ``main.cf`` and ``master.cf``
into its own configuration directory, puts the queue under the checkout's ``var/`` (the same
filesystem as Empath's spool), and runs ``postfix -c DIR start`` / ``stop``.

- SMTP on one loopback address:port (a ``host:port inet`` line in master.cf); the usual port-25
  service is not configured. ``inet_interfaces = loopback-only``, IPv4 only.
- Relaying: ``mynetworks = 127.0.0.0/8``; everything goes to ``relayhost = [127.0.0.1]:PORT``
  (brackets: no MX lookup) with ``smtp_dns_support_level = disabled``; ``smtpd_peername_lookup
  = no`` so no reverse lookup is tried for the client.
- No chroot (the stock master.cf chroots most services into the queue directory, which would
  need copies of /etc files there), no TLS, no local delivery (``mydestination`` empty).
- Receive-only (``deliver=False``): master.cf has no ``qmgr`` line, so accepted mail stays in
  ``incoming/`` (the benchmark's deleter removes it), and ``in_flow_delay = 0`` because with no
  queue manager there is nobody to hand cleanup its in-flow tokens (each message would
  otherwise wait up to the default 1 s). The receive path is unchanged: smtpd hands the message
  to cleanup, which writes the queue file and fsyncs it before smtpd answers 250.
- Logging goes to syslog, which has no reader on these machines (no /dev/log), as it would
  cost Postfix a line or three per message that Empath (log level warning) does not write.
- Everything else is Postfix's default (process limit 100, destination concurrency 20,
  connection cache on demand).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time

SERVICES = [
    # name, type, private, unpriv, chroot, wakeup, maxproc, command
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
]


def available() -> bool:
    return all(shutil.which(tool) for tool in ("postfix", "postconf", "smtp-source"))


def version() -> str:
    try:
        out = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


class PostfixInstance:
    def __init__(self, base: str, port: int, relay_port: int | None, deliver: bool) -> None:
        self.base = os.path.abspath(base)
        self.config_dir = os.path.join(self.base, "etc")
        self.queue_dir = os.path.join(self.base, "queue")
        self.data_dir = os.path.join(self.base, "data")
        self.port = port
        self.relay_port = relay_port
        self.deliver = deliver
        self.running = False

    # -- configuration ---------------------------------------------------------------------
    def main_cf(self) -> str:
        lines = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.bench.test",
            "mydomain": "bench.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "relayhost": f"[127.0.0.1]:{self.relay_port or 9}",
            "default_transport": "smtp",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
        }
        if not self.deliver:
            lines["in_flow_delay"] = "0"
        return "".join(f"{k} = {v}\n" for k, v in lines.items())

    def master_cf(self) -> str:
        rows = [(f"127.0.0.1:{self.port}", "inet", "n", "-", "n", "-", "-", "smtpd")]
        rows += [s for s in SERVICES if self.deliver or s[0] != "qmgr"]
        return "".join("{:<14} {:<10} {} {} {} {:<5} {:<3} {}\n".format(*r) for r in rows)

    def write_config(self) -> None:
        os.makedirs(self.config_dir, exist_ok=True)
        os.makedirs(self.data_dir, exist_ok=True)
        os.makedirs(self.queue_dir, exist_ok=True)
        with open(os.path.join(self.config_dir, "main.cf"), "w") as fh:
            fh.write(self.main_cf())
        with open(os.path.join(self.config_dir, "master.cf"), "w") as fh:
            fh.write(self.master_cf())
        shutil.chown(self.data_dir, "postfix")

    # -- life cycle ------------------------------------------------------------------------
    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["postfix", "-c", self.config_dir, *args], capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> PostfixInstance:
        self.write_config()
        # "postfix check" creates the queue's subdirectories with the right owners.
        self._postfix("check")
        done = self._postfix("start")
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed: {done.stdout}{done.stderr}")
        self.running = True
        self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 20.0) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
            time.sleep(0.1)
        raise RuntimeError(f"postfix did not answer on 127.0.0.1:{self.port}")

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.data_dir, "master.lock")) as fh:
                return int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def queue_state_dir(self, name: str) -> str:
        return os.path.join(self.queue_dir, name)

    def queued(self) -> int:
        """Files in incoming/, active/ and deferred/ (hashed one level)."""
        total = 0
        for name in ("incoming", "active", "deferred", "maildrop"):
            for _root, _dirs, files in os.walk(self.queue_state_dir(name)):
                total += len(files)
        return total

    def stop(self) -> None:
        if not self.running:
            return
        done = self._postfix("stop")
        self.running = False
        if done.returncode != 0:
            pid = self.master_pid()
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 15)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.master_pid_alive():
            time.sleep(0.1)

    def master_pid_alive(self) -> bool:
        pid = self.master_pid()
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
