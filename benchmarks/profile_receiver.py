"""Where an Empath receiver spends its CPU per message: py-spy (or perf) on receivers under load.

Starts Empath receive-only (delivery frozen, a deleter emptying incoming/), drives it with
Postfix's smtp-source (a C client, so the load generator takes little of the two cores; the
Python load generator with --loadgen), records one receiver process with py-spy (in
.venv/bin, installed by the test dependencies' environment) for the duration of the run, and
prints the functions with the most samples: by self time (the leaf frame) and inclusive.

    .venv/bin/python benchmarks/profile_receiver.py [--sessions 20] [--messages 20000]
                                                    [--size 1024] [--loadgen] [--perf]

The raw collapsed stacks go to benchmarks/results/receiver-profile.txt (open them with any
flame graph tool). py-spy samples only the thread holding the GIL (--gil), without pausing the
process (--nonblocking), so it shows the Python share; C functions called from a Python frame
count as that frame's self time (``transport.write`` inside ``_handle``, for one).

``--perf`` uses Linux perf instead (``perf record -e cpu-clock -g`` on every receiver for
5 seconds), which also shows the kernel: the split by shared object (kernel, libpython, uvloop,
the Cython speedups) and the top symbols, written to benchmarks/results/receiver-perf.txt.

Not part of benchmarks/run: profiling slows the receiver down.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

import empathd  # noqa: E402

from empath.spool import Spool  # noqa: E402

PYSPY = os.path.join(ROOT, ".venv", "bin", "py-spy")


def frame_name(frame: str) -> str:
    """'serve (empath/smtp/server.py:123)' -> 'serve (empath/smtp/server.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/empath/", "/site-packages/", "/lib/python3"):
        if marker in path:
            path = path[path.index(marker) + 1:]
            break
    return f"{name} ({path})" if path else name


def summarize(collapsed: str, top: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";")[1:]]  # drop the thread frame
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            incl_counts[name] += count
    return total, self_counts.most_common(top), incl_counts.most_common(top)


def report_perf(data: str, out: str, top: int) -> None:
    """Print and keep perf's split by shared object and its top symbols (self time)."""
    text = []
    for sort in ("dso", "sym"):
        done = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                               "--sort", sort, "-g", "none"], capture_output=True, text=True,
                              timeout=300)
        lines = [ln for ln in done.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
        text.append(f"-- by {sort} --")
        text += lines[:top]
    with open(out, "w") as fh:
        fh.write("\n".join(text) + "\n")
    print("\n".join(text))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--loadgen", action="store_true", help="drive with loadgen.py")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--perf", action="store_true", help="Linux perf, kernel included")
    args = ap.parse_args()
    if args.perf and not shutil.which("perf"):
        sys.exit("profile_receiver: perf is not installed (apt-get install linux-perf)")
    if not args.perf and not os.path.exists(PYSPY):
        sys.exit(f"profile_receiver: {PYSPY} is missing (pip install py-spy into .venv)")
    work = os.path.join(ROOT, "var", f"bench-profile-{os.getpid()}")
    out = os.path.join(HERE, "results", "receiver-profile.txt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
        os.unlink(out)
    daemon = empathd.start_empath(work, frozen=True)
    deleter = subprocess.Popen([sys.executable, os.path.join(HERE, "deleter.py"),
                                Spool(str(daemon.spool_path)).state_dir("incoming"),
                                "--spool", str(daemon.spool_path)],
                               stdout=subprocess.DEVNULL)
    spy = client = None
    spy_err = ""
    try:
        receiver = daemon.child_pids("receiver")[0]
        if args.loadgen:
            cmd = [sys.executable, os.path.join(HERE, "loadgen.py"), "--port", str(daemon.port),
                   "--messages", str(args.messages), "--sessions", str(args.sessions),
                   "--size", str(args.size)]
        else:
            cmd = ["smtp-source", "-d", "-s", str(args.sessions), "-m", str(args.messages),
                   "-l", str(args.size), "-f", "loadgen@example.org", "-t", "sink@example.net",
                   f"127.0.0.1:{daemon.port}"]
        started = time.perf_counter()
        client = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        time.sleep(1.0)  # past connection set-up
        if args.perf:
            perf_data = os.path.join(work, "perf.data")
            pids = ",".join(map(str, daemon.child_pids("receiver")))
            subprocess.run(["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-o",
                            perf_data, "-p", pids, "--", "sleep", "5"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
            client.wait(timeout=600)
            seconds = time.perf_counter() - started
            report_perf(perf_data, os.path.join(HERE, "results", "receiver-perf.txt"), args.top)
        else:
            spy_cmd = [PYSPY, "record", "-p", str(receiver), "-f", "raw", "-o", out, "-r",
                       "250", "-d", "600", "--gil", "--nonblocking"]
            spy = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
            client.wait(timeout=600)
            seconds = time.perf_counter() - started
            spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
            _, spy_err = spy.communicate(timeout=60)
    finally:
        for proc in (client, spy):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        deleter.terminate()
        deleter.wait()
        empathd.stop_empath(daemon)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.messages} messages, {args.sessions} sessions, {args.size} bytes: "
          f"{args.messages / seconds:.0f} msg/s while profiled")
    if args.perf:
        return 0
    if not os.path.exists(out):
        sys.exit(f"profile_receiver: py-spy wrote nothing: {spy_err.strip()[-500:]}")
    with open(out) as fh:
        total, by_self, by_incl = summarize(fh.read(), args.top)
    print(f"\n{total} samples of receiver {receiver} (active threads only)")
    print("\nself (leaf frame):")
    for name, n in by_self:
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\ninclusive:")
    for name, n in by_incl:
        print(f"  {100 * n / total:5.1f}%  {name}")
    print(f"\ncollapsed stacks: {os.path.relpath(out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
