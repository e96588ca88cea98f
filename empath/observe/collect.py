"""What one scrape of ``/metrics`` reads: the children's per-process files, summed, plus the
numbers only the spool and the master's status file know.

- ``FoldedMultiProcess``: prometheus_client's ``MultiProcessCollector`` over the directory the
  master exported (dead processes' counters included, so nothing goes backwards), with the
  per-domain delivery series (attempts, and the duration histogram after the same domains)
  folded to the busiest domains (``domains.py``);
- ``ProcessesCollector``: the standard ``process_*`` series (CPU, memory, file descriptors,
  start time) of the master and of every live child, labelled by ``kind`` and ``index``;
- ``SpoolCollector``: queue sizes by state read from the spool's directory listings at scrape
  time (no worker keeps them), the oldest waiting message's age, whether delivery is frozen,
  free space, live children by kind, build information, and when each listener's TLS
  certificate expires (read from its file, so a renewed file shows before a reload);

Runs in the admin process only, in a worker thread (the reads block).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

import empath
from empath._speedups import IMPLEMENTATION
from empath.config.typed import Config
from empath.master.daemon import StatusFile
from empath.observe import domains
from empath.observe.multiproc import DOMAIN_STATE
from empath.spool import Spool, pid_alive
from empath.spool.ids import id_time
from empath.spool.queue import STATUSES, state_counts

DOMAIN_FAMILY = "empath_delivery_domain_attempts"
DURATION_FAMILY = "empath_delivery_duration_seconds"
DURATION_STATE = DOMAIN_STATE + ".duration"  # multiproc.prepare empties it with the rest


class FoldedMultiProcess(Collector):
    """The multiprocess files, summed, with the per-domain family folded."""

    def __init__(self, path: str, top: int) -> None:
        self.path = path
        self.top = top
        self.inner = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        later = None
        names: list[str] = []
        for metric in self.inner.collect():  # type: ignore[no-untyped-call]
            if metric.name == DOMAIN_FAMILY:
                folded = self._fold(metric)
                names = sorted({s.labels["domain"] for s in folded.samples})
                yield folded
            elif metric.name == DURATION_FAMILY:
                later = metric  # folded after the domains are chosen
            else:
                yield metric
        if later is not None:
            yield self._follow(later, names)

    def _follow(self, metric: Metric, names: list[str]) -> Metric:
        """The duration histogram per domain, folded to the domains of the attempts."""
        counts: dict[tuple[str, str], float] = {}
        for sample in metric.samples:
            others = sorted((k, v) for k, v in sample.labels.items() if k != "domain")
            key = "\t".join([sample.name, *(f"{k}={v}" for k, v in others)])
            domain = sample.labels.get("domain", "")
            counts[(domain, key)] = counts.get((domain, key), 0.0) + sample.value
        with domains.locked_state(os.path.join(self.path, DURATION_STATE)) as box:
            series, box[0] = domains.follow(counts, names, box[0])
        out = Metric(metric.name, metric.documentation, metric.type)
        for (domain, key), value in sorted(series.items(), key=_bucket_order):
            name, *parts = key.split("\t")
            labels = dict(part.split("=", 1) for part in parts)
            labels["domain"] = domain
            out.add_sample(name, labels, value)
        return out

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

    def __init__(self, spool: Spool, status_file: str | None,
                 listeners: list[Any] | None = None) -> None:
        self.spool = spool
        self.status_file = status_file
        self.listeners = listeners or []

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
        yield certificate_expiry(self.listeners)


def certificate_expiry(listeners: list[Any]) -> Metric:
    """``empath_tls_certificate_expiry_seconds``: the notAfter (Unix time) of the first
    certificate in each listener's chain file; an unreadable file is left out (and logged by
    the receivers, which cannot load it either)."""
    from cryptography import x509

    family = GaugeMetricFamily(
        "empath_tls_certificate_expiry_seconds", "When the certificate of each TLS listener "
        "expires (Unix time), read from its file at scrape time", labels=("listener", "path"))
    seen: set[tuple[str, str]] = set()
    for listener in listeners:
        path = getattr(getattr(listener, "tls", None), "cert", None)
        key = (str(listener.address), str(path))
        if not path or key in seen:
            continue
        seen.add(key)
        try:
            with open(path, "rb") as fh:
                cert = x509.load_pem_x509_certificate(fh.read())
        except (OSError, ValueError):
            continue
        family.add_metric(key, cert.not_valid_after_utc.timestamp())
    return family


def _bucket_order(item: tuple[tuple[str, str], float]) -> tuple[str, str, float]:
    """Histogram samples in exposition order: by domain and labels, buckets by bound."""
    (domain, key), _ = item
    le = ""
    parts = key.split("\t")
    for part in parts[1:]:
        if part.startswith("le="):
            le = part[3:]
    others = "\t".join(p for p in parts if not p.startswith("le="))
    return (domain, others, float(le) if le else 0.0)


class ProcessesCollector(Collector):
    """``process_*`` of the master and each live child (prometheus_client's own collector,
    pointed at each pid in turn), with ``kind`` and ``index`` labels."""

    def __init__(self, status_file: str | None) -> None:
        self.status_file = status_file

    def collect(self) -> Iterable[Metric]:
        master = StatusFile.read(self.status_file) if self.status_file else None
        procs: list[tuple[int, str, str]] = []
        if master is not None:
            procs.append((int(master.get("pid", 0)), "master", "0"))
            for child in master.get("children", []):
                procs.append((int(child.get("pid", 0)), str(child.get("kind")),
                              str(child.get("index", 0))))
        else:
            procs.append((os.getpid(), "admin", "1"))
        families: dict[str, Metric] = {}
        for pid, kind, index in procs:
            if pid <= 0 or not pid_alive(pid):
                continue
            one = ProcessCollector(namespace="", pid=lambda pid=pid: pid,  # type: ignore[misc]
                                   registry=None)
            for metric in one.collect():
                family = families.get(metric.name)
                if family is None:
                    family = families[metric.name] = Metric(metric.name, metric.documentation,
                                                            metric.type)
                for sample in metric.samples:
                    family.add_sample(sample.name, {"kind": kind, "index": index},
                                      sample.value)
        yield from families.values()


def build_registry(cfg: Config, spool: Spool, status_file: str | None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path and os.path.isdir(path):
        registry.register(FoldedMultiProcess(path, cfg.metrics.top_domains))
    registry.register(SpoolCollector(spool, status_file, list(cfg.listeners)))
    registry.register(ProcessesCollector(status_file))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format (blocking: call from a thread)."""
    return generate_latest(registry)
