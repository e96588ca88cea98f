"""What one scrape of ``/metrics`` reads: the children's per-process files, summed, plus the
numbers only the spool and the master's status file know.

- ``FoldedMultiProcess``: prometheus_client's ``MultiProcessCollector`` over the directory the
  master exported (dead processes' counters included, so nothing goes backwards), with the
  per-domain delivery series folded to the busiest domains (``domains.py``);
- ``SpoolCollector``: queue sizes by state read from the spool's directory listings at scrape
  time (no worker keeps them), the oldest waiting message's age, whether delivery is frozen,
  free space, live children by kind, and build information.

Runs in the admin process only, in a worker thread (the reads block).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

import empath
from empath._speedups import IMPLEMENTATION
from empath.master.daemon import StatusFile
from empath.observe import domains
from empath.observe.multiproc import DOMAIN_STATE
from empath.spool import Spool, pid_alive
from empath.spool.ids import id_time
from empath.spool.queue import STATUSES, state_counts

DOMAIN_FAMILY = "empath_delivery_domain_attempts"


class FoldedMultiProcess(Collector):
    """The multiprocess files, summed, with the per-domain family folded."""

    def __init__(self, path: str, top: int) -> None:
        self.path = path
        self.top = top
        self.inner = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        for metric in self.inner.collect():  # type: ignore[no-untyped-call]
            if metric.name == DOMAIN_FAMILY:
                yield self._fold(metric)
            else:
                yield metric

    def _fold(self, metric: Metric) -> Metric:
        counts: domains.Counts = {}
        sample_name = DOMAIN_FAMILY + "_total"
        for sample in metric.samples:
            if sample.name != sample_name:
                continue
            key = (sample.labels.get("domain", ""), sample.labels.get("result", ""))
            counts[key] = counts.get(key, 0.0) + sample.value
        with domains.locked_state(os.path.join(self.path, DOMAIN_STATE)) as box:
            series, box[0] = domains.fold(counts, box[0], self.top)
        out = Metric(metric.name, metric.documentation, metric.type)
        for (domain, result), value in sorted(series.items()):
            out.add_sample(sample_name, {"domain": domain, "result": result}, value)
        return out


class SpoolCollector(Collector):
    """Queue sizes and process counts, computed when scraped."""

    def __init__(self, spool: Spool, status_file: str | None) -> None:
        self.spool = spool
        self.status_file = status_file

    def collect(self) -> Iterable[Metric]:
        counts, oldest = state_counts(self.spool)
        queue = GaugeMetricFamily("empath_queue_messages",
                                  "Messages in the spool by state, counted at scrape time",
                                  labels=("state",))
        for status in STATUSES:
            queue.add_metric((status,), counts[status])
        yield queue
        yield GaugeMetricFamily(
            "empath_queue_oldest_age_seconds",
            "Age of the oldest message waiting for delivery (pending, active, deferred)",
            value=max(0.0, time.time() - id_time(oldest)) if oldest else 0.0)
        yield GaugeMetricFamily("empath_delivery_frozen", "1 while delivery is frozen",
                                value=1.0 if self.spool.is_frozen() else 0.0)
        try:
            free = float(self.spool.free_bytes())
        except OSError:
            free = 0.0
        yield GaugeMetricFamily("empath_spool_free_bytes",
                                "Free space on the spool's filesystem", value=free)
        master = StatusFile.read(self.status_file) if self.status_file else None
        procs = GaugeMetricFamily("empath_processes", "Live child processes by kind",
                                  labels=("kind",))
        alive: dict[str, int] = {"receiver": 0, "delivery": 0, "admin": 0}
        for child in (master or {}).get("children", []):
            if pid_alive(int(child.get("pid", 0))):
                kind = str(child.get("kind"))
                alive[kind] = alive.get(kind, 0) + 1
        for kind, n in alive.items():
            procs.add_metric((kind,), n)
        yield procs
        if master is not None:
            yield GaugeMetricFamily("empath_master_start_time_seconds",
                                    "When the master started (Unix time)",
                                    value=float(master.get("started_at", 0.0)))
        info = GaugeMetricFamily("empath_build_info", "Version and speedups in use",
                                 labels=("version", "speedups"))
        info.add_metric((empath.__version__, IMPLEMENTATION), 1.0)
        yield info


def build_registry(cfg: Any, spool: Spool, status_file: str | None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path and os.path.isdir(path):
        registry.register(FoldedMultiProcess(path, cfg.metrics.top_domains))
    registry.register(SpoolCollector(spool, status_file))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format (blocking: call from a thread)."""
    return generate_latest(registry)
