"""Chaos harness: SIGKILL Empath's processes under load and prove that no 250 is ever lost.

It runs the real daemon (``empath start``: 2 receivers, 2 delivery workers, spool under
``var/chaos-*``) relaying every message through ``delivery.smarthost`` to a recording SMTP sink
on loopback, drives it continuously with the benchmark load generator (``benchmarks/loadgen.py``,
several sessions; every message carries a unique ``X-Loadgen-Token``), and meanwhile SIGKILLs a
randomly chosen receiver, delivery worker or the master at random instants. A killed master is
restarted with ``empath start`` (its orphaned children stop on their own; start-up recovery
requeues ``active/`` and sweeps ``tmp/``). At the end it stops the load, lets the daemon drain
the spool, stops it, and checks message by message against the sink's journal:

- every message whose 250 (after the final dot) was received reached the sink (else: lost);
- duplicates are counted apart; each must be explained by a kill of a delivery worker (or of the
  master, whose workers then drain and may be cut off) between the sink's copy and the next one
  — the only window where a delivered message is not yet removed from the spool;
- a message without a 250 may arrive once or not at all, never twice unexplained;
- nothing is left in incoming/, deferred/, active/, tmp/, failed/, hold/ or corrupt/.

It prints a summary table and exits 1 on any loss, unexplained duplicate or leftover (2 when
the run itself could not be carried out). ``--flaky-sink`` makes the sink answer 4xx or drop
the connection after 354 for a fraction of transactions, so retries are exercised as well.
See docs/RELIABILITY.md.

    tools/chaos --kills 1000                 # the full run
    tools/chaos --kills 30 --duration 40     # the short profile of the test suite
    tools/chaos --kills 100 --flaky-sink 0.2 --seed 7 --json results.json

The harness only signals processes it started: daemon processes are recognised by the session
id of each master it started (``empath start`` makes the master a session's only ancestor),
and it makes itself their sub-reaper (PR_SET_CHILD_SUBREAPER) so that killed masters and their
orphaned children are reaped at once instead of lingering as zombies that look alive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from benchmarks.loadgen import run_load  # noqa: E402
from tests.support.sink import Behaviour, ReceivedMessage, SessionRecord, SinkServer  # noqa: E402

EMPATH = REPO / ".venv" / "bin" / "empath"
SHUTDOWN_TIMEOUT = 5.0
PR_SET_CHILD_SUBREAPER = 36
TOKEN_RE = re.compile(rb"^X-Loadgen-Token: (\S+)\r?$", re.MULTILINE | re.IGNORECASE)
QUEUE_ID_RE = re.compile(rb"\(Empath\) with \S+ id ([0-9A-Z]{26})")
LOG_RE = re.compile(r"^(\S+ \S+) (\w+) ([\w.]+)\[(\d+)\]: (.*)$")
KINDS = ("master", "receiver", "delivery")
SPOOL_DIRS = ("incoming", "deferred", "active", "tmp", "failed", "hold", "corrupt")
# A delivered copy followed by another one is explained by a kill in this window around it:
# a worker killed from just before the sink stored the copy (the final dot was in flight) until
# the next copy arrived; for a master kill, also while its orphaned workers drained (they are
# cut off after shutdown_timeout).
WORKER_KILL_LEAD = 1.0
MASTER_KILL_LEAD = SHUTDOWN_TIMEOUT + 3.0


# -- the sink (a subprocess of its own: `chaos_harness.py _sink ...`) ------------------------
class FlakyBehaviour:
    """A sink ``Behaviour`` whose replies fail at random for a fraction of transactions.

    Only fields the sink reads once per use are randomised (a field read twice for one reply
    would disagree with itself): a 451 to RCPT, a 451 after the final dot (message not stored),
    and a dropped connection right after the 354 (mid-DATA for the client). Everything else is
    the wrapped behaviour's.
    """

    def __init__(self, base: Behaviour, rate: float, rng: random.Random) -> None:
        self._base = base
        self._rate = rate / 3.0  # three independent chances per transaction
        self._rng = rng
        self.faults: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def _fail(self, what: str) -> bool:
        if self._rng.random() < self._rate:
            self.faults[what] += 1
            return True
        return False

    @property
    def rcpt_default(self) -> tuple[int, str]:
        if self._fail("rcpt_451"):
            return (451, "4.3.0 chaos sink: try again later")
        return self._base.rcpt_default

    @property
    def final_reply(self) -> tuple[int, str]:
        if self._fail("data_451"):
            return (451, "4.3.0 chaos sink: message not stored, try again")
        return self._base.final_reply

    @property
    def disconnect_after_data_bytes(self) -> int | None:
        return 0 if self._fail("drop_after_354") else None


class JournalSink(SinkServer):
    """The test sink, recording one journal line per stored message instead of keeping it.

    Line: ``<arrival unix time> <n> <sender|-> <token|-> <queue id|->``; ``-`` as sender is
    the null sender (a delivery status notification, not a delivery).
    """

    def __init__(self, behaviour: Any, journal: str, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        super().__init__(behaviour, host=host, port=port)
        self._journal = open(journal, "a", buffering=1, encoding="ascii")
        self.stored = 0

    def store(self, message: ReceivedMessage, record: SessionRecord) -> int:
        head = message.data.split(b"\r\n\r\n", 1)[0]
        token = TOKEN_RE.search(head)
        queue_id = QUEUE_ID_RE.search(head)
        with self._lock:
            self.stored += 1
            n = self.stored
        self._journal.write(
            f"{time.time():.6f} {n} {message.mail_from or '-'} "
            f"{token.group(1).decode('ascii', 'replace') if token else '-'} "
            f"{queue_id.group(1).decode() if queue_id else '-'}\n")
        return n

    def forget_closed_sessions(self) -> None:
        """Keep memory flat over a long run: closed sessions' transcripts are not needed."""
        with self._lock:
            self.sessions[:] = [s for s in self.sessions if not s.closed]

    def close_journal(self) -> None:
        self._journal.close()


def sink_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="chaos_harness.py _sink")
    ap.add_argument("--journal", required=True)
    ap.add_argument("--flaky", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    base = Behaviour()
    behaviour: Any = base
    if args.flaky > 0:
        behaviour = FlakyBehaviour(base, args.flaky, random.Random(args.seed))
    sink = JournalSink(behaviour, args.journal).start()
    print(sink.port, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(2.0):
        sink.forget_closed_sessions()
    sink.stop()
    sink.close_journal()
    faults = dict(behaviour.faults) if isinstance(behaviour, FlakyBehaviour) else {}
    print(json.dumps({"stored": sink.stored, "faults": faults}), flush=True)
    return 0


# -- processes -------------------------------------------------------------------------------
def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, session id) of a process, or None when there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[1]), int(fields[3])


def running(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


class Reaper:
    """Reaps the daemon processes re-parented to the harness (it is their sub-reaper)."""

    def __init__(self) -> None:
        self.own_session = os.getsid(0)
        self.daemon_sessions: set[int] = set()
        self.exits: dict[int, int] = {}

    def enable(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

    def reap(self) -> None:
        """waitpid every zombie child of ours that belongs to a daemon we started (the sink
        and the CLI commands are in our own session and are waited for by subprocess)."""
        me = os.getpid()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            st = proc_stat(int(name))
            if st is None or st[1] != me or st[0] != "Z" or st[2] not in self.daemon_sessions:
                continue
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(int(name), os.WNOHANG)
                if pid:
                    self.exits[pid] = os.waitstatus_to_exitcode(status)

    def daemon_processes(self) -> list[int]:
        """Live processes of every daemon session we started."""
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = proc_stat(int(name))
                if st and st[2] in self.daemon_sessions and st[0] not in ("Z", "X"):
                    out.append(int(name))
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """One Empath configuration, started and restarted with ``empath start``."""

    def __init__(self, run_dir: Path, listen_port: int, sink_port: int,
                 reaper: Reaper, env: dict[str, str] | None = None) -> None:
        self.dir = run_dir
        self.env = env or {}
        self.port = listen_port
        self.reaper = reaper
        self.config_path = run_dir / "empath.yaml"
        self.spool = run_dir / "spool"
        self.log_path = run_dir / "log" / "empath.log"
        self.status_path = run_dir / "run" / "empath.status.json"
        self.master_pid = 0
        self.masters: list[int] = []
        self.start_errors: list[str] = []
        config = {
            "base_dir": str(run_dir),
            "hostname": "chaos.empath.test",
            "pidfile": str(run_dir / "run" / "empath.pid"),
            "shutdown_timeout": f"{SHUTDOWN_TIMEOUT:g}s",
            "log": {"file": str(self.log_path), "level": "info"},
            "listeners": [{"address": f"127.0.0.1:{listen_port}"}],
            "processes": {"receivers": 2, "delivery": 2},
            "spool": {"path": str(self.spool), "min_free_space": 0},
            "local_delivery": {"maildir_root": str(run_dir / "mail")},
            "delivery": {
                "smarthost": f"127.0.0.1:{sink_port}",
                "retry_base_delay": "1s",
                "retry_max_delay": "5s",
                "queue_scan_interval": "1s",
            },
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, **self.env)
        env.pop("EMPATH_CONFIG", None)
        return subprocess.run([str(EMPATH), *args, "-c", str(self.config_path)], cwd=self.dir,
                              capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)

    def start(self, attempts: int = 120) -> float:
        """``empath start``, retried while the port is still held by a killed master's
        receivers (they close it within a second or so); seconds it took."""
        began = time.monotonic()
        for _ in range(attempts):
            result = self.cli("start")
            found = re.search(r"pid (\d+)", result.stdout)
            if result.returncode == 0 and found:
                self.master_pid = int(found.group(1))
                self.masters.append(self.master_pid)
                st = proc_stat(self.master_pid)
                if st is not None:
                    self.reaper.daemon_sessions.add(st[2])
                return time.monotonic() - began
            self.start_errors.append((result.stderr or result.stdout).strip()[-300:])
            time.sleep(0.25)
        raise RuntimeError("empath start kept failing: " + " | ".join(self.start_errors[-3:]))

    def stop(self) -> int:
        return self.cli("stop", timeout=SHUTDOWN_TIMEOUT + 30).returncode

    def master_running(self) -> bool:
        return bool(self.master_pid) and running(self.master_pid)

    def children(self) -> list[dict[str, Any]]:
        """Children in the status file that really are this master's live children."""
        try:
            status = json.loads(self.status_path.read_bytes())
        except (OSError, ValueError):
            return []
        if status.get("pid") != self.master_pid:
            return []
        out = []
        for child in status.get("children", []):
            st = proc_stat(int(child["pid"]))
            if st and st[1] == self.master_pid and st[0] not in ("Z", "X"):
                out.append(child)
        return out


# -- load --------------------------------------------------------------------------------------
class Load:
    """Continuous load: ``sessions`` loops, each sending rounds of ``per_connection`` messages
    over one connection (loadgen's run_load), reconnecting after errors."""

    def __init__(self, port: int, sessions: int, size: int, per_connection: int) -> None:
        self.port = port
        self.sessions = sessions
        self.size = size
        self.per_connection = per_connection
        self.accepted: set[str] = set()
        self.sent = self.rejected = self.errors = self.rounds = 0
        self.error_kinds: Counter[str] = Counter()
        self.stopping = False
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._loop(n)) for n in range(self.sessions)]

    async def _loop(self, n: int) -> None:
        rng = random.Random(n)
        while not self.stopping:
            try:
                result = await run_load("127.0.0.1", self.port, messages=self.per_connection,
                                        sessions=1, size=self.size, timeout=15.0)
            except Exception as exc:  # anything loadgen does not catch itself
                self.errors += 1
                self.error_kinds[type(exc).__name__] += 1
                await asyncio.sleep(0.2)
                continue
            self.rounds += 1
            self.sent += result.sent
            self.rejected += result.rejected
            self.errors += result.errors
            self.accepted.update(result.accepted_tokens)
            if result.first_error:
                self.error_kinds[result.first_error.split(":")[0]] += 1
            if result.errors:
                await asyncio.sleep(0.05 + 0.2 * rng.random())

    async def stop(self, timeout: float = 40.0) -> bool:
        """Let every session finish its round; True when none had to be cancelled (a cancelled
        round's 250s are unknown to the harness, which only weakens the check)."""
        self.stopping = True
        done, pending = await asyncio.wait(self.tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        return not pending


# -- the run -----------------------------------------------------------------------------------
@dataclass
class Kill:
    at: float  # unix time
    kind: str
    pid: int
    index: int = 0


@dataclass
class RunRecord:
    kills: list[Kill] = field(default_factory=list)
    restarts: list[float] = field(default_factory=list)  # seconds each restart took
    unexpected_master_exits: list[str] = field(default_factory=list)
    drained: bool = False
    drain_seconds: float = 0.0
    load_stopped_cleanly: bool = True
    leftover_processes: list[int] = field(default_factory=list)
    abort: str = ""
    skipped: int = 0  # planned kills that found no process of any child kind to kill


class Harness:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.reaper = Reaper()
        self.record = RunRecord()
        self.run_dir = Path(tempfile.mkdtemp(prefix="chaos-", dir=self._var()))
        self.journal = self.run_dir / "sink.journal"
        self.sink: subprocess.Popen[str] | None = None
        self.sink_report: dict[str, Any] = {}
        self.daemon: Daemon | None = None
        self.load: Load | None = None
        self.killed: set[int] = set()
        self.code = ""

    @staticmethod
    def _var() -> Path:
        var = REPO / "var"
        var.mkdir(exist_ok=True)
        return var

    def say(self, text: str) -> None:
        if not self.opts.quiet:
            print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", flush=True)

    # -- set-up and tear-down ------------------------------------------------------------
    def start_sink(self) -> int:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_sink", "--journal",
               str(self.journal), "--flaky", str(self.opts.flaky_sink or 0.0),
               "--seed", str(self.opts.seed)]
        self.sink = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO,
                                     stdin=subprocess.DEVNULL)
        assert self.sink.stdout is not None
        line = self.sink.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the sink did not start: {line!r}")
        return int(line)

    def stop_sink(self) -> None:
        if self.sink is None or self.sink.poll() is not None:
            return
        self.sink.send_signal(signal.SIGTERM)
        try:
            out, _ = self.sink.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.sink.kill()
            out, _ = self.sink.communicate()
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                self.sink_report = json.loads(line)

    def cleanup_processes(self) -> None:
        """After the final stop: nothing of ours may survive; SIGKILL (by pid) what did."""
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT + 5
        while time.monotonic() < deadline:
            self.reaper.reap()
            if not self.reaper.daemon_processes():
                return
            time.sleep(0.1)
        left = self.reaper.daemon_processes()
        self.record.leftover_processes = left
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        self.reaper.reap()

    # -- the chaos -----------------------------------------------------------------------
    def plan(self) -> list[tuple[float, str]]:
        """(instant, kind) of every kill: instants uniformly random over the duration; exactly
        round(kills * master_share) of them aimed at the master, the others at a receiver or a
        delivery worker with even odds, in random order."""
        n = self.opts.kills
        masters = round(n * self.opts.master_share)
        kinds = ["master"] * masters + [self.rng.choice(("receiver", "delivery"))
                                        for _ in range(n - masters)]
        self.rng.shuffle(kinds)
        instants = sorted(self.rng.uniform(0, self.opts.duration) for _ in range(n))
        return list(zip(instants, kinds, strict=True))

    async def choose_target(self, kind: str) -> tuple[str, int, int] | None:
        """A live process of ``kind`` (the other child kind when none is up, waiting up to
        10 s for a respawn when no child is up at all: a slot killed young is restarted after
        a growing delay)."""
        assert self.daemon is not None
        if kind == "master":
            return ("master", self.daemon.master_pid, 0) if self.daemon.master_running() else None
        other = "delivery" if kind == "receiver" else "receiver"
        for _ in range(100):
            # A pid already killed may still show in the status file until the master reaps it.
            children = [c for c in self.daemon.children() if int(c["pid"]) not in self.killed]
            for k in (kind, other):
                mine = [c for c in children if c["kind"] == k]
                if mine:
                    child = self.rng.choice(mine)
                    return (k, int(child["pid"]), int(child.get("index", 0)))
            await self.watch(0.1)
        return None

    async def restart(self, why: str) -> None:
        assert self.daemon is not None
        old = self.daemon.master_pid
        deadline = time.monotonic() + 10
        while running(old) and time.monotonic() < deadline:
            self.reaper.reap()
            await asyncio.sleep(0.02)
        self.reaper.reap()
        took = await asyncio.to_thread(self.daemon.start)
        self.record.restarts.append(took)
        self.say(f"restarted after {why} in {took:.2f}s: master {self.daemon.master_pid}")

    async def watch(self, seconds: float) -> None:
        """Sleep, reaping and restarting a master that died without being killed."""
        assert self.daemon is not None
        end = time.monotonic() + seconds
        while True:
            self.reaper.reap()
            if not self.daemon.master_running():
                pid = self.daemon.master_pid
                code = self.reaper.exits.get(pid)
                self.record.unexpected_master_exits.append(
                    f"{time.strftime('%H:%M:%S')} master {pid} exited on its own "
                    f"(status {code})")
                self.say(self.record.unexpected_master_exits[-1])
                await self.restart("an unexpected master exit")
            left = end - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(0.1, left))

    async def chaos(self) -> None:
        """SIGKILL at random instants over the duration; the clock of the schedule stops while
        a killed master is restarted, so the kills stay spread instead of bunching up after."""
        assert self.daemon is not None
        began = time.monotonic()
        for n, (at, planned) in enumerate(self.plan(), 1):
            await self.watch(max(0.0, began + at - time.monotonic()))
            for _ in range(5):  # a target that vanished before the signal: pick another
                target = await self.choose_target(planned)
                if target is None:
                    break
                kind, pid, index = target
                try:
                    os.kill(pid, signal.SIGKILL)
                    break
                except ProcessLookupError:
                    self.killed.add(pid)
                    target = None
            if target is None:
                self.record.skipped += 1
                continue
            self.killed.add(pid)
            self.record.kills.append(Kill(time.time(), kind, pid, index))
            if n % max(1, self.opts.kills // 20) == 0 or kind == "master":
                counts = Counter(k.kind for k in self.record.kills)
                self.say(f"kill {n}/{self.opts.kills}: {kind} {pid}; so far {dict(counts)}, "
                         f"{len(self.load.accepted) if self.load else 0} acknowledged")
            if kind == "master":
                paused = time.monotonic()
                await self.restart("a master kill")
                began += time.monotonic() - paused

    async def drain(self) -> None:
        assert self.daemon is not None
        began = time.monotonic()
        deadline = began + self.opts.drain_timeout
        next_report = began + 30
        while time.monotonic() < deadline:
            await self.watch(0.5)
            counts = spool_counts(self.daemon.spool)
            if not (counts["incoming"] or counts["deferred"] or counts["active"]):
                self.record.drained = True
                break
            if time.monotonic() >= next_report:
                next_report += 30
                self.say(f"draining: incoming {counts['incoming']}, deferred "
                         f"{counts['deferred']}, active {counts['active']}")
        self.record.drain_seconds = time.monotonic() - began

    def code_under_test(self) -> dict[str, str]:
        """Environment that makes the daemon run a snapshot of ``--snapshot REV`` (a tree
        other people edit meanwhile would change under a long run at every restart), and a
        description of the code for the results."""
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        if not self.opts.snapshot:
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "empath"],
                                   capture_output=True, text=True).stdout.split("\n")
            changed = [line[3:] for line in dirty if line.strip()]
            self.code = f"working tree at {head[:12]}" + (
                f" with uncommitted changes in {len(changed)} file(s) of empath/"
                if changed else "")
            return {}
        code = self.run_dir / "code"
        code.mkdir()
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", self.opts.snapshot],
                             capture_output=True, text=True, check=True).stdout.strip()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "empath"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
        env = {"PYTHONPATH": str(code)}
        speedups = REPO / "empath" / "_speedups"
        built = sorted(speedups.glob("*.so"))
        same = all((speedups / f"{so.name.split('.')[0]}.pyx").read_bytes()
                   == (code / "empath" / "_speedups" / f"{so.name.split('.')[0]}.pyx")
                   .read_bytes() for so in built) if built else False
        if same:
            for so in built:
                shutil.copy2(so, code / "empath" / "_speedups" / so.name)
        else:
            env["EMPATH_NO_EXTENSIONS"] = "1"
            env.pop("EMPATH_REQUIRE_SPEEDUPS", None)  # the twins are chosen on purpose here
        self.code = (f"snapshot of commit {rev[:12]}"
                     + ("" if same else " (pure-Python speedups: the .pyx differ)"))
        return env

    async def run_async(self) -> None:
        env = self.code_under_test()
        sink_port = self.start_sink()
        self.daemon = Daemon(self.run_dir, free_port(), sink_port, self.reaper, env)
        self.daemon.start()
        self.say(f"daemon {self.daemon.master_pid} on 127.0.0.1:{self.daemon.port}, sink on "
                 f"{sink_port}{' (flaky)' if self.opts.flaky_sink else ''}, run dir "
                 f"{self.run_dir}")
        self.load = Load(self.daemon.port, self.opts.sessions, self.opts.size,
                         self.opts.per_connection)
        self.load.start()
        try:
            await self.chaos()
        finally:
            self.record.load_stopped_cleanly = await self.load.stop()
        # Kept with the run directory, so a failed run can be examined token by token.
        (self.run_dir / "acknowledged.tokens").write_text(
            "".join(f"{t}\n" for t in sorted(self.load.accepted)))
        self.say(f"load stopped: {len(self.load.accepted)} acknowledged; draining")
        await self.drain()
        self.say(f"drained={self.record.drained} in {self.record.drain_seconds:.1f}s; stopping")

    def run(self) -> dict[str, Any]:
        self.reaper.enable()
        try:
            try:
                import uvloop

                uvloop.install()
            except ImportError:
                pass
            asyncio.run(self.run_async())
        except Exception as exc:
            self.record.abort = f"{type(exc).__name__}: {exc}"
            self.say(f"run aborted: {self.record.abort}")
        finally:
            if self.daemon is not None and self.daemon.master_running():
                self.daemon.stop()
            self.cleanup_processes()
            self.stop_sink()
        return check(self)


# -- checking ----------------------------------------------------------------------------------
def spool_counts(spool: Path) -> dict[str, int]:
    counts = {}
    for name in SPOOL_DIRS:
        d = spool / name
        if name == "active":
            n = 0
            with contextlib.suppress(FileNotFoundError):
                for slot in os.listdir(d):
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                        n += len(os.listdir(d / slot))
            counts[name] = n
        else:
            try:
                counts[name] = len(os.listdir(d))
            except FileNotFoundError:
                counts[name] = 0
    return counts


def spool_tokens(spool: Path) -> dict[str, str]:
    """Token -> state of every queue file still in the spool (the headers are read)."""
    out: dict[str, str] = {}
    for state, files in spool_leftovers(spool).items():
        for name in files:
            with contextlib.suppress(OSError), open(spool / state / name, "rb") as fh:
                found = TOKEN_RE.search(fh.read(4096).split(b"\r\n\r\n", 1)[0])
            if found:
                out[found.group(1).decode("ascii", "replace")] = state
    return out


def spool_leftovers(spool: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in SPOOL_DIRS:
        d = spool / name
        if name == "active":
            files = []
            with contextlib.suppress(FileNotFoundError):
                for slot in os.listdir(d):
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                        files += [f"{slot}/{f}" for f in os.listdir(d / slot)]
        else:
            try:
                files = os.listdir(d)
            except FileNotFoundError:
                files = []
        if files:
            out[name] = sorted(files)
    return out


@dataclass
class Copy:
    at: float
    queue_id: str


def read_journal(path: Path) -> tuple[dict[str, list[Copy]], list[str]]:
    """Deliveries per token, and the notices (null-sender messages) as raw lines."""
    deliveries: dict[str, list[Copy]] = defaultdict(list)
    notices: list[str] = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="ascii") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) != 5:
                continue
            at, _, sender, token, queue_id = parts
            if sender == "-":
                notices.append(line.strip())
                continue
            deliveries[token].append(Copy(float(at), queue_id))
    return deliveries, notices


def scan_log(path: Path, queue_ids: set[str]) -> dict[str, Any]:
    """What the daemon's log says: child deaths by cause, errors (with the tracebacks that
    follow them, one of each kind), and every line about the queue ids of duplicated
    messages."""
    deaths: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    about: dict[str, list[str]] = defaultdict(list)
    removed: Counter[str] = Counter()
    tracebacks: dict[str, list[str]] = {}  # last line of the traceback -> the whole entry
    entry: list[str] = []
    death_re = re.compile(r"^(receiver|delivery) \d+/\d+ \(pid \d+\), generation \d+, (.*)$")

    def keep(block: list[str]) -> None:
        if len(block) > 1 and len(tracebacks) < 10:
            tracebacks.setdefault(block[-1], block)

    with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as fh:
        for line in fh:
            line = line.rstrip("\n")
            m = LOG_RE.match(line)
            if not m:
                if entry:
                    entry.append(line)
                continue
            keep(entry)
            entry = []
            _, level, _, _, text = m.groups()
            dm = death_re.match(text)
            if dm:
                deaths[f"{dm.group(1)} {dm.group(2)}"] += 1
            if level in ("ERROR", "CRITICAL"):
                # Strip ids and numbers so that one kind of error is one line.
                errors[re.sub(r"[0-9A-Z]{26}|\d+", "N", text)[:160]] += 1
                entry = [line]
            qid = text[:26]
            if qid in queue_ids:
                about[qid].append(line)
                if text[26:].startswith(": removed"):
                    removed[qid] += 1
    keep(entry)
    return {"deaths": dict(deaths), "errors": dict(errors), "about": dict(about),
            "removed": dict(removed), "tracebacks": list(tracebacks.values())}


def leftover_owners(leftovers: dict[str, list[str]], kills: list[Kill]) -> list[str]:
    """Who left each tmp/ and active/ file behind: the writer's (or claimer's) pid, as named
    by the file, and whether the harness killed that process."""
    killed = {k.pid: k for k in kills}
    out = []
    for state, sep in (("tmp", "-"), ("active", "/")):
        for name in leftovers.get(state, []):
            pid_text = name.split(sep, 1)[0]
            k = killed.get(int(pid_text)) if pid_text.isdigit() else None
            how = (f"{k.kind} {k.pid} SIGKILLed by the harness at {k.at:.3f}" if k
                   else f"pid {pid_text}, not killed by the harness")
            out.append(f"{state}/{name}: {how}")
    return out


def explain(copies: list[Copy], kills: list[Kill]) -> list[str]:
    """For each copy after the first, the kill that explains it ("" when none does): the
    delivery-worker kill nearest to the earlier copy within its window, else a master kill."""
    out = []
    for first, second in zip(copies, copies[1:], strict=False):
        best: Kill | None = None
        for k in kills:
            if k.kind not in ("delivery", "master"):
                continue
            lead = MASTER_KILL_LEAD if k.kind == "master" else WORKER_KILL_LEAD
            if not first.at - lead <= k.at <= second.at:
                continue
            rank = (k.kind == "master", abs(k.at - first.at))
            if best is None or rank < (best.kind == "master", abs(best.at - first.at)):
                best = k
        out.append("" if best is None else
                   f"{best.kind} {best.pid} killed {best.at - first.at:+.3f}s after the sink "
                   f"stored the copy at {first.at:.3f}")
    return out


def check(h: Harness) -> dict[str, Any]:
    rec = h.record
    load = h.load
    acked = load.accepted if load else set()
    deliveries, notices = read_journal(h.journal)
    delivered = set(deliveries)
    undelivered = acked - delivered
    # An acknowledged message not at the sink is lost only if it is nowhere in the spool
    # either; one still queued (a spool that did not drain) is counted apart.
    queued = spool_tokens(h.daemon.spool) if h.daemon and undelivered else {}
    still_queued = sorted(t for t in undelivered if t in queued)
    lost = sorted(undelivered - set(still_queued))
    dup_tokens = sorted(t for t, c in deliveries.items() if len(c) > 1)
    queue_ids = {c.queue_id for t in dup_tokens for c in deliveries[t]}
    log = scan_log(h.daemon.log_path, queue_ids) if h.daemon else {}
    duplicates = []
    for token in dup_tokens:
        copies = sorted(deliveries[token], key=lambda c: c.at)
        reasons = explain(copies, rec.kills)
        ids = {c.queue_id for c in copies}
        problems = []
        if len(ids) > 1:
            problems.append("stored under several queue ids (received twice)")
        if any(not r for r in reasons):
            problems.append("no delivery-worker or master kill in the window")
        removed = max((log.get("removed", {}).get(q, 0) for q in ids), default=0)
        if removed > 1:
            problems.append(f"the spool recorded it as finished {removed} times")
        duplicates.append({
            "token": token, "acknowledged": token in acked, "copies": len(copies),
            "queue_ids": sorted(ids), "arrivals": [round(c.at, 3) for c in copies],
            "explained_by": reasons, "problems": problems,
            "log": [line for q in sorted(ids) for line in log.get("about", {}).get(q, [])][-12:],
        })
    unexplained = [d for d in duplicates if d["problems"]]
    prefix = f"{os.getpid()}-"
    foreign = sorted(t for t in delivered if not t.startswith(prefix))
    leftovers = spool_leftovers(h.daemon.spool) if h.daemon else {}
    owners = leftover_owners(leftovers, rec.kills)
    kills = Counter(k.kind for k in rec.kills)
    failures = []
    if rec.abort:
        failures.append(f"run aborted: {rec.abort}")
    if lost:
        failures.append(f"{len(lost)} acknowledged message(s) lost")
    if still_queued:
        failures.append(f"{len(still_queued)} acknowledged message(s) still queued, "
                        "not delivered")
    if unexplained:
        failures.append(f"{len(unexplained)} unexplained duplicate(s)")
    if leftovers:
        failures.append("spool not empty: " + ", ".join(f"{k} {len(v)}"
                                                         for k, v in leftovers.items()))
    if notices:
        failures.append(f"{len(notices)} delivery status notice(s) reached the sink")
    if foreign:
        failures.append(f"{len(foreign)} message(s) with unknown tokens in the sink")
    if not rec.drained:
        failures.append("the spool did not drain in time")
    if rec.unexpected_master_exits:
        failures.append(f"{len(rec.unexpected_master_exits)} unexpected master exit(s)")
    if rec.leftover_processes:
        failures.append(f"{len(rec.leftover_processes)} daemon process(es) survived the stop")
    if not rec.load_stopped_cleanly:
        failures.append("load sessions had to be cancelled (their 250s are unknown)")
    # Not losses, but bugs all the same: children that died of something else than our kills.
    warnings = [f"{count} x {what}" for what, count in sorted(log.get("deaths", {}).items())
                if "SIGKILL" not in what and "exited with status 0" not in what]
    return {
        "verdict": "FAIL" if failures else "PASS",
        "failures": failures,
        "options": {k: v for k, v in vars(h.opts).items() if k not in ("json",)},
        "run_dir": str(h.run_dir),
        "code": h.code,
        "kills": {"total": len(rec.kills), **{k: kills.get(k, 0) for k in KINDS},
                  "skipped": rec.skipped},
        "restarts": {"count": len(rec.restarts),
                     "mean_s": round(sum(rec.restarts) / len(rec.restarts), 3)
                     if rec.restarts else 0.0,
                     "max_s": round(max(rec.restarts, default=0.0), 3),
                     "start_retries": len(h.daemon.start_errors) if h.daemon else 0},
        "messages": {
            "sent": load.sent if load else 0,
            "acknowledged": len(acked),
            "rejected": load.rejected if load else 0,
            "session_errors": load.errors if load else 0,
            "delivered_distinct": len(delivered),
            "delivered_copies": sum(len(c) for c in deliveries.values()),
            "acknowledged_delivered": len(acked & delivered),
            "unacknowledged_delivered": len(delivered - acked),
            "lost": len(lost),
            "still_queued": len(still_queued),
        },
        "duplicates": {
            "total": len(duplicates),
            "acknowledged": sum(d["acknowledged"] for d in duplicates),
            "unacknowledged": sum(not d["acknowledged"] for d in duplicates),
            "explained": len(duplicates) - len(unexplained),
            "unexplained": len(unexplained),
            "details": duplicates,
        },
        "lost_tokens": lost[:100],
        "notices": notices[:20],
        "spool_leftovers": {k: v[:20] for k, v in leftovers.items()},
        "spool_leftover_counts": {k: len(v) for k, v in leftovers.items()},
        "still_queued_where": dict(Counter(queued[t] for t in still_queued)),
        "leftover_owners": owners[:20],
        "drain": {"drained": rec.drained, "seconds": round(rec.drain_seconds, 1)},
        "sink": h.sink_report,
        "load_errors": dict(load.error_kinds) if load else {},
        "log": {"child_deaths": log.get("deaths", {}), "errors": log.get("errors", {}),
                "tracebacks": log.get("tracebacks", [])},
        "warnings": warnings,
        "unexpected_master_exits": rec.unexpected_master_exits,
        "leftover_processes": rec.leftover_processes,
        "kill_log": [asdict(k) for k in rec.kills],
    }


def print_summary(r: dict[str, Any]) -> None:
    k, m, d = r["kills"], r["messages"], r["duplicates"]
    rows = [
        ("kills", f"{k['total']} (master {k['master']}, receiver {k['receiver']}, "
                  f"delivery {k['delivery']}; {k['skipped']} planned found no target)"),
        ("restarts", f"{r['restarts']['count']} (mean {r['restarts']['mean_s']}s, "
                     f"max {r['restarts']['max_s']}s, {r['restarts']['start_retries']} "
                     "start attempts refused while the port was still held)"),
        ("sent", m["sent"]),
        ("acknowledged (250)", m["acknowledged"]),
        ("rejected / session errors", f"{m['rejected']} / {m['session_errors']}"),
        ("delivered (distinct tokens)", m["delivered_distinct"]),
        ("delivered copies", m["delivered_copies"]),
        ("acknowledged and delivered", m["acknowledged_delivered"]),
        ("delivered without a 250 received", m["unacknowledged_delivered"]),
        ("LOST (acknowledged, not delivered)", m["lost"]),
        ("duplicates", f"{d['total']} (acknowledged {d['acknowledged']}, unacknowledged "
                       f"{d['unacknowledged']}; explained {d['explained']}, unexplained "
                       f"{d['unexplained']})"),
        ("acknowledged, still queued", m["still_queued"]),
        ("spool leftovers", ", ".join(f"{n} {c}" for n, c in
                                      r["spool_leftover_counts"].items()) or "none"),
        ("drain", f"{'done' if r['drain']['drained'] else 'TIMED OUT'} in "
                  f"{r['drain']['seconds']}s"),
        ("child deaths (log)", ", ".join(f"{n}: {c}" for n, c in
                                         sorted(r["log"]["child_deaths"].items())) or "none"),
        ("error lines (log)", sum(r["log"]["errors"].values())),
    ]
    if r["sink"].get("faults"):
        rows.append(("sink faults injected", ", ".join(
            f"{n} {c}" for n, c in sorted(r["sink"]["faults"].items()))))
    width = max(len(str(a)) for a, _ in rows)
    print()
    print("Empath chaos run" + (" (flaky sink)" if r["options"].get("flaky_sink") else "")
          + f": {r['code']}, seed {r['options']['seed']}")
    print("-" * (width + 50))
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    print("-" * (width + 50))
    for dup in d["details"][:10]:
        why = "; ".join(x or "UNEXPLAINED" for x in dup["explained_by"])
        print(f"duplicate {dup['token']} ({'250' if dup['acknowledged'] else 'no 250'}, "
              f"{dup['copies']} copies, {','.join(dup['queue_ids'])}): {why}"
              + (f" PROBLEMS: {'; '.join(dup['problems'])}" if dup["problems"] else ""))
    for line in r["leftover_owners"][:10]:
        print(f"leftover {line}")
    for text, count in sorted(r["log"]["errors"].items(), key=lambda x: -x[1])[:8]:
        print(f"log error x{count}: {text}")
    for block in r["log"]["tracebacks"][:3]:
        print("log traceback:\n  " + "\n  ".join(block[-12:]))
    for text in r["warnings"]:
        print(f"warning: child deaths not caused by the harness: {text}")
    print(f"verdict: {r['verdict']}" + (": " + "; ".join(r["failures"]) if r["failures"]
                                        else ""))
    print(f"run directory: {r['run_dir']}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="tools/chaos", description="SIGKILL Empath's processes under load; check that "
        "every acknowledged message reaches the sink (docs/RELIABILITY.md).")
    ap.add_argument("--kills", type=int, default=1000, help="SIGKILLs to send (default 1000)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds over which the kills are spread at random instants "
                         "(default: 1.5 s per kill)")
    ap.add_argument("--sessions", type=int, default=4, help="concurrent SMTP sessions")
    ap.add_argument("--size", type=int, default=1024, help="message size in bytes")
    ap.add_argument("--per-connection", type=int, default=20,
                    help="messages per SMTP connection before reconnecting")
    ap.add_argument("--master-share", type=float, default=0.1,
                    help="fraction of kills aimed at the master (the rest split evenly)")
    ap.add_argument("--flaky-sink", type=float, nargs="?", const=0.2, default=0.0,
                    metavar="RATE", help="sink fails this fraction of transactions with 4xx "
                    "or a drop after 354 (default 0.2 when given without a value)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    ap.add_argument("--drain-timeout", type=float, default=180.0,
                    help="most seconds to wait for the spool to empty at the end")
    ap.add_argument("--snapshot", metavar="REV", nargs="?", const="HEAD", default=None,
                    help="run the daemon from a snapshot of commit REV (default HEAD) instead "
                    "of the working tree, which may change under a long run")
    ap.add_argument("--keep", action="store_true",
                    help="keep the run directory (it is always kept when the run fails or "
                    "the log holds a traceback)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON ('-': stdout)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    opts = ap.parse_args(argv)
    if opts.seed is None:
        opts.seed = random.SystemRandom().randrange(1 << 30)
    if opts.duration is None:
        opts.duration = 1.5 * opts.kills
    if not 0 <= opts.master_share <= 1 or opts.kills < 0 or opts.sessions < 1:
        ap.error("--master-share must be in [0, 1], --kills >= 0, --sessions >= 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["_sink"]:
        return sink_main(args[1:])
    opts = parse_args(args)
    if not EMPATH.exists():
        print(f"chaos: {EMPATH} is missing; run tools/bootstrap", file=sys.stderr)
        return 2
    harness = Harness(opts)
    results = harness.run()
    if opts.json == "-":
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        print_summary(results)
        if opts.json:
            Path(opts.json).write_text(json.dumps(results, indent=1) + "\n")
    if (results["verdict"] == "PASS" and not results["warnings"]
            and not results["log"]["tracebacks"] and not opts.keep):
        shutil.rmtree(harness.run_dir, ignore_errors=True)
    if harness.record.abort:
        return 2
    return 0 if results["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
