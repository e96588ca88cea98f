"""Render benchmarks/results/{speedups,pipeline}.json as the Markdown tables of the README.

    .venv/bin/python benchmarks/report.py > /tmp/results.md
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SIZES = (1024, 100 * 1024)
SESSIONS = (1, 20, 100)


def load(name: str) -> dict[str, Any]:
    with open(os.path.join(RESULTS, name)) as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def pick(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def kib(size: int) -> str:
    return f"{size // 1024} KiB"


def machine(m: dict[str, Any]) -> list[str]:
    return [f"- {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, kernel {m['kernel']}",
            f"- filesystem under `var/`: {m['filesystem']}",
            f"- Python {m['python']}, Postfix {m['postfix'] or 'not installed'}",
            f"- load average (1/5/15 min) before: "
            f"{' / '.join(f'{x:.2f}' for x in m['loadavg_before'])}, after: "
            f"{' / '.join(f'{x:.2f}' for x in m['loadavg_after'])}"]


def speedups(data: dict[str, Any]) -> list[str]:
    out = ["| case | Python | Cython | ratio |", "|---|---:|---:|---:|"]
    for c in data["cases"]:
        if c["bytes"]:
            py = f"{c['bytes'] / c['python_s'] / 1e6:.0f} MB/s"
            cy = f"{c['bytes'] / c['cython_s'] / 1e6:.0f} MB/s"
        else:
            py, cy = f"{c['python_s'] * 1e9:.0f} ns", f"{c['cython_s'] * 1e9:.0f} ns"
        out.append(f"| {c['case']} | {py} | {cy} | {c['ratio']}× |")
    return out


def ceiling(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| message | 1 writer | 20 writers |", "|---|---:|---:|"]
    for size in SIZES:
        one = pick(rows, size=size, writers=1)
        many = pick(rows, size=size, writers=20)
        def rate(r: dict[str, Any] | None) -> str:
            return f"{r['per_s']:,.0f} /s" if r else "–"

        out.append(f"| {kib(size)} | {rate(one)} | {rate(many)} |")
    return out


def receive(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| size | sessions | client | Empath msg/s | Empath accept p50 / p95 / p99 ms | "
           "Postfix msg/s | Postfix accept p50 / p95 / p99 ms | Empath / Postfix |",
           "|---|---:|---|---:|---|---:|---|---:|"]
    for size in SIZES:
        for sessions in SESSIONS:
            for client in ("loadgen", "smtp-source"):
                e = pick(rows, mta="empath", client=client, size=size, sessions=sessions)
                p = pick(rows, mta="postfix", client=client, size=size, sessions=sessions)
                if not e:
                    continue

                def lat(r: dict[str, Any] | None) -> str:
                    if not r or "p50_ms" not in r:
                        return "–"
                    return f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f} / {r['p99_ms']:.1f}"

                out.append(f"| {kib(size)} | {sessions} | {client} | {e['msg_per_s']:.0f} | "
                           f"{lat(e)} | {p['msg_per_s'] if p else 0:.0f} | {lat(p)} | "
                           f"{ratio(e['msg_per_s'], p['msg_per_s'] if p else 0)} |")
    return out


def e2e(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| size | sessions | client | Empath accepted / delivered msg/s | Empath 250→sink "
           "p50 / p95 / p99 ms | Empath dot→sink p50 / p99 | Postfix accepted / delivered "
           "msg/s | Postfix 250→sink p50 / p95 / p99 ms | Postfix dot→sink p50 / p99 | "
           "Empath / Postfix (delivered) |",
           "|---|---:|---|---:|---|---|---:|---|---|---:|"]
    for size in SIZES:
        for sessions in SESSIONS:
            for client in ("loadgen", "smtp-source"):
                e = pick(rows, mta="empath", client=client, size=size, sessions=sessions)
                p = pick(rows, mta="postfix", client=client, size=size, sessions=sessions)
                if not e:
                    continue

                def cells(r: dict[str, Any] | None) -> str:
                    if not r:
                        return "– | – | –"
                    rate = f"{r['msg_per_s']:.0f} / {r['delivered_per_s']:.0f}"
                    if not r["matched"]:
                        return f"{rate} | – | –"
                    d, t = r["delivery"], r["dot_to_sink"]
                    return (f"{rate} | {d['p50_ms']:.0f} / {d['p95_ms']:.0f} / "
                            f"{d['p99_ms']:.0f} | {t['p50_ms']:.0f} / {t['p99_ms']:.0f}")

                out.append(f"| {kib(size)} | {sessions} | {client} | {cells(e)} | {cells(p)} | "
                           f"{ratio(e['delivered_per_s'], p['delivered_per_s'] if p else 0)} |")
    return out


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Empath/Postfix per scenario from interleaved pairs: median pair ratio and its range."""
    out = ["| scenario | sessions | client | Empath msg/s | Postfix msg/s | Empath / Postfix, "
           "median pair (range) | accept p95 ms, Empath / Postfix |",
           "|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        p95 = r.get("p95_ms")
        lat = f"{p95['empath']:.1f} / {p95['postfix']:.1f}" if p95 else "–"
        out.append(f"| {r['kind']}, {kib(r['size'])} | {r['sessions']} | {r['client']} | "
                   f"{r['empath']:.0f} | {r['postfix']:.0f} | {r['median']:.2f}× "
                   f"({r['min']:.2f}–{r['max']:.2f}, {r['pairs']} pairs) | {lat} |")
    return out


def memory(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| deferred messages | RSS, all processes | PSS, all processes | USS, all processes "
           "| largest process (USS) |", "|---:|---:|---:|---:|---|"]
    for r in rows:
        big = max(r["processes"], key=lambda p: p["uss_mib"])
        out.append(f"| {r['deferred']:,} | {r['rss_mib']:.0f} MiB | {r.get('pss_mib', 0):.0f} "
                   f"MiB | {r['uss_mib']:.0f} MiB | {big['name']}: {big['uss_mib']:.0f} MiB |")
    return out


def main() -> int:
    pipe = load("pipeline.json")
    parts = ["Machine:", "", *machine(pipe["machine"]), "",
             f"Run: `benchmarks/run`{' --quick' if pipe.get('quick') else ''}, "
             f"{pipe['seconds']:.0f} s for the pipeline part.", ""]
    try:
        parts += ["### Hot paths (Cython / pure-Python twin, same run)", "",
                  *speedups(load("speedups.json")), ""]
    except OSError:
        pass
    if pipe.get("ratios"):
        parts += ["### Empath / Postfix in interleaved pairs (E P, P E, E P ...)", "",
                  *ratios(pipe["ratios"]), ""]
    sections = (("ceiling", "### Disk ceiling: create + write + fdatasync + rename + fsync(dir)",
                 ceiling),
                ("receive", "### Receive only (into the queue, deleter running)", receive),
                ("e2e", "### End to end (relay to a sink on loopback)", e2e),
                ("memory", "### Memory: Empath idle with a deferred queue", memory))
    for key, title, fn in sections:
        if pipe.get(key):
            parts += [title, "", *fn(pipe[key]), ""]
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
