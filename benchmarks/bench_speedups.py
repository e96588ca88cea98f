"""Times the two implementations of empath._speedups side by side.

Command parsing (EHLO, MAIL and RCPT lines, a pipelined batch) and the DATA path (DataReader
on 1 KiB, 100 KiB and 10 MiB messages fed in 64 KiB chunks, and the client's dot_stuff of the
same messages), and the spool's file write (store_file of a 1 KiB message into a recycled file on
tmpfs, without fdatasync: the call's own cost; what it is for, one GIL release for the whole
sequence while the event loop thread runs Python, only shows with many writer threads, see
benchmarks/bench_spool.py). Prints a table with the Cython/Python speed ratio and writes the
numbers to benchmarks/results/speedups.json. Exits non-zero when the compiled module is not
built, or is not what would be used (EMPATH_NO_EXTENSIONS set), so a silent fallback never
passes for a measurement.

    .venv/bin/python benchmarks/bench_speedups.py [--quick] [--guard]

``--guard`` is the hot-path check CI runs (``.ci/run``): every case must keep its Cython/Python
ratio at or above its floor in ``FLOORS``. Ratios are measured in one run, both twins on the same
machine at the same moment, so a loaded or slow machine moves both sides; a case under its floor
is measured twice more and judged by its best ratio before the run fails. The floors sit well
under the ratios recorded in benchmarks/README.md: they catch a speedup that stopped being
compiled or lost its fast path, not a few percent.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import empath._speedups as speedups  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "speedups.json"
CHUNK = 64 * 1024

# Lowest acceptable Cython/Python ratio per case (by name prefix), for --guard. store_file is
# syscall-bound (about 1x by design: its point is releasing the GIL), so it has no floor.
FLOORS: dict[str, float] = {
    "EHLO line": 2.0,
    "MAIL FROM": 1.5,
    "RCPT TO": 2.0,
    "pipelined": 2.0,
    "DataReader": 5.0,
    "dot_stuff": 1.5,
}


def floor_of(case: str) -> float | None:
    return next((v for k, v in FLOORS.items() if case.startswith(k)), None)

EHLO = b"EHLO mail.example.com"
MAIL = b"MAIL FROM:<a@b> SIZE=1234 BODY=8BITMIME"
RCPT = b"RCPT TO:<x@y> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y"
BATCH = b"".join(
    [b"MAIL FROM:<bounces+1234@lists.example.org> SIZE=48213 BODY=8BITMIME\r\n"]
    + [b"RCPT TO:<user%d@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;user%d@example.com\r\n"
       % (i, i) for i in range(10)]
    + [b"DATA\r\n"]
)

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there been one all we their has would when "
         "message delivery queue relay domain recipient sender server header").split()


def make_message(size: int, seed: int = 5321) -> bytes:
    """Header block and body text of ~76-octet lines, one line in 20 starting with a dot."""
    rnd = random.Random(seed)
    lines = [b"From: Sender <sender@example.org>", b"To: rcpt@example.com",
             b"Subject: benchmark message", b"Message-ID: <bench@example.org>", b""]
    total = sum(len(x) + 2 for x in lines)
    while total < size:
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < 70:
            words.append(rnd.choice(WORDS))
        line = " ".join(words).encode()
        if rnd.random() < 0.05:
            line = b"." + line
        lines.append(line)
        total += len(line) + 2
    return (b"\r\n".join(lines) + b"\r\n")[: size - 2] + b"\r\n"


def parse_batch(impl) -> Callable[[], None]:
    split_command, parse_path = impl.split_command, impl.parse_path

    def run() -> None:
        pos = 0
        while True:
            end = BATCH.find(b"\r\n", pos)
            if end < 0:
                break
            verb, arg = split_command(BATCH[pos:end])
            if verb == "MAIL":
                parse_path(arg, b"FROM", False)
            elif verb == "RCPT":
                parse_path(arg, b"TO", False)
            pos = end + 2

    return run


INNER = 100  # calls per timed run for single commands, so call overhead of the harness is small


def command_case(impl, line: bytes, keyword: bytes | None) -> Callable[[], None]:
    split_command, parse_path = impl.split_command, impl.parse_path
    calls = range(INNER)
    if keyword is None:
        def run() -> None:
            for _ in calls:
                split_command(line)
    else:
        def run() -> None:
            for _ in calls:
                _, arg = split_command(line)
                parse_path(arg, keyword, False)

    return run


def reader_case(impl, chunks: list[bytes]) -> Callable[[], None]:
    DataReader = impl.DataReader

    def run() -> None:
        reader = DataReader(1 << 40)
        for chunk in chunks:
            reader.feed(chunk)
        assert reader.done

    return run


def stuff_case(impl, message: bytes) -> Callable[[], None]:
    dot_stuff = impl.dot_stuff
    return lambda: dot_stuff(message)


def store_case(impl, directory: str) -> Callable[[], None]:
    """One 1 KiB message in three parts into a recycled file, renamed back after each call."""
    store_file = impl.store_file
    tmp, dest, spare = (os.fsencode(os.path.join(directory, n)) for n in ("tmp", "dest", "spare"))
    with open(spare, "wb") as fh:
        fh.write(b"x" * 2048)
    parts = [b"Received: from a by b\r\n", b"y" * 960 + b"\r\n", b"EMPATH1 trailer\n"]

    def run() -> None:
        store_file(-1, tmp, parts, dest, spare, -1.0, False)
        os.rename(dest, spare)

    return run


def measure(fn: Callable[[], None], budget: float, repeats: int) -> float:
    """Best seconds per call over ``repeats`` runs of about ``budget`` seconds each."""
    loops = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= budget / 4:
            break
        loops *= 4
    loops = max(1, int(loops * budget / max(elapsed, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - t0) / loops)
    return best


def compiled_or_exit():
    try:
        compiled = speedups.implementations()["cython"]
    except ImportError as exc:
        sys.exit(f"bench_speedups: the Cython speedups are not built ({exc}); "
                 "run `.venv/bin/python setup.py build_ext --inplace`")
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for module in compiled.modules:
        if not (module.__file__ or "").endswith(suffixes):
            sys.exit(f"bench_speedups: {module.__name__} is not a compiled module "
                     f"({module.__file__})")
    if speedups.IMPLEMENTATION != "cython":
        sys.exit(f"bench_speedups: the active implementation is {speedups.IMPLEMENTATION!r} "
                 f"({speedups.FALLBACK_REASON}); the server would not use what is measured")
    return compiled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    parser.add_argument("--guard", action="store_true",
                        help="fail (exit 1) when a case's ratio is under its floor (FLOORS)")
    args = parser.parse_args()
    budget, repeats = (0.05, 3) if args.quick else (0.4, 5)
    impls = {"python": speedups.implementations()["python"], "cython": compiled_or_exit()}

    # (name, kind, message octets or 0, calls per run, factory)
    cases: list[tuple[str, str, int, int, Callable]] = [
        ("EHLO line", "command", 0, INNER, lambda i: command_case(i, EHLO, None)),
        ("MAIL FROM + SIZE, BODY", "command", 0, INNER, lambda i: command_case(i, MAIL, b"FROM")),
        ("RCPT TO + NOTIFY, ORCPT", "command", 0, INNER, lambda i: command_case(i, RCPT, b"TO")),
        ("pipelined MAIL+10 RCPT+DATA", "command", 0, 1, parse_batch),
    ]
    for label, size in (("1 KiB", 1024), ("100 KiB", 100 * 1024), ("10 MiB", 10 * 1024 * 1024)):
        message = make_message(size)
        wire = message.replace(b"\r\n.", b"\r\n..") + b".\r\n"
        if wire[:1] == b".":
            wire = b"." + wire
        chunks = [wire[i:i + CHUNK] for i in range(0, len(wire), CHUNK)]
        cases.append((f"DataReader {label}", "data", len(message), 1,
                      lambda i, c=chunks: reader_case(i, c)))
        cases.append((f"dot_stuff {label}", "data", len(message), 1,
                      lambda i, m=message: stuff_case(i, m)))

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    scratch = tempfile.mkdtemp(prefix="empath-bench-", dir=shm)
    cases.append(("store_file 1 KiB (tmpfs, no sync)", "spool", 0, 1,
                  lambda i: store_case(i, os.path.join(scratch, i.name))))
    for name in impls:
        os.makedirs(os.path.join(scratch, name))

    rows = []
    print(f"{'case':<30} {'python':>12} {'cython':>12} {'ratio':>7}")
    failures = []
    for name, kind, nbytes, calls, make in cases:
        floor = floor_of(name) if args.guard else None
        for _ in range(3):
            times = {impl: measure(make(ns), budget, repeats) / calls
                     for impl, ns in impls.items()}
            ratio = times["python"] / times["cython"]
            if floor is None or ratio >= floor:
                break
        if floor is not None and ratio < floor:
            failures.append(f"{name}: {ratio:.1f}x, floor {floor:.1f}x")
        rows.append({"case": name, "kind": kind, "bytes": nbytes, "python_s": times["python"],
                     "cython_s": times["cython"], "ratio": round(ratio, 2)})

        def fmt(seconds: float, nbytes: int = nbytes) -> str:
            if nbytes:
                return f"{nbytes / seconds / 1e6:8.0f} MB/s"
            return f"{seconds * 1e9:8.0f} ns"

        print(f"{name:<30} {fmt(times['python']):>12} {fmt(times['cython']):>12} "
              f"{ratio:6.1f}x", flush=True)

    shutil.rmtree(scratch, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "python": platform.python_version(),
        "machine": platform.machine(),
        "implementation": speedups.IMPLEMENTATION,
        "quick": args.quick,
        "no_extensions_env": os.environ.get("EMPATH_NO_EXTENSIONS", ""),
        "cases": rows,
    }, indent=2) + "\n")
    print(f"written to {RESULTS.relative_to(ROOT)}")
    if failures:
        print("hot-path guard: under the floor: " + "; ".join(failures), file=sys.stderr)
        return 1
    if args.guard:
        print("hot-path guard: every case at or above its floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
