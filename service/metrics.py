"""Prometheus metrics for ``GET /metrics``: plain counters on the hot path, rendered only when scraped.

A request costs a few integer increments here (no label lookups, no locks). With several worker
processes each one writes its counts to ``QBO_METRICS_DIR`` about once a second and on shutdown, and
``/metrics`` sums every file, so a scrape sees the whole service whichever worker answers it.
Labels are low-cardinality by construction: statuses, outcomes and reasons, never realm ids.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    """The service's counters. ``snapshot``/``merge`` make them summable across worker processes."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # by HTTP status
        self.events: Counter[str] = Counter()  # accepted, duplicate, or the dead-letter reason
        self.signature_failures: Counter[str] = Counter()  # by reason
        self.errors: Counter[str] = Counter()  # redis_unavailable, timeout, internal
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.gauges_from: list[tuple[str, Any]] = []  # (counter name, object with an int attribute of that name)

    def observe(self, status: int, seconds: float) -> None:
        self.requests[str(status)] += 1
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def snapshot(self) -> dict[str, Any]:
        extra = {name: int(getattr(source, name, 0)) for name, source in self.gauges_from}
        return {
            "requests": dict(self.requests),
            "events": dict(self.events),
            "signature_failures": dict(self.signature_failures),
            "errors": dict(self.errors),
            "latency_buckets": list(self.latency_buckets),
            "latency_sum": self.latency_sum,
            "extra": extra,
        }


def merge(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"requests": Counter(), "events": Counter(), "signature_failures": Counter(),
                             "errors": Counter(), "extra": Counter(),
                             "latency_buckets": [0] * (len(LATENCY_BUCKETS) + 1), "latency_sum": 0.0}  # fmt: skip
    for snap in snapshots:
        for key in ("requests", "events", "signature_failures", "errors", "extra"):
            total[key].update(snap.get(key, {}))
        for i, count in enumerate(snap.get("latency_buckets", [])[: len(LATENCY_BUCKETS) + 1]):
            total["latency_buckets"][i] += int(count)
        total["latency_sum"] += float(snap.get("latency_sum", 0.0))
    return total


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: dict[str, Any]) -> None:
        self._snap = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snap
        yield _counter("qbo_webhook_requests", "Webhook requests by HTTP status.", "status", snap["requests"])
        yield _counter("qbo_webhook_events", "Events by outcome: accepted, duplicate, or dead-letter reason.",
                       "outcome", snap["events"])  # fmt: skip
        yield _counter("qbo_signature_failures", "Unauthenticated deliveries (401) by reason.", "reason",
                       snap["signature_failures"])  # fmt: skip
        yield _counter("qbo_webhook_errors", "Deliveries refused other than for authentication, by cause "
                       "(redis, timeout, internal: 503; body: 408/413).", "cause", snap["errors"])  # fmt: skip
        extra = snap["extra"]
        yield _plain("qbo_redis_errors", "Redis calls that failed or timed out.", snap["errors"].get("redis", 0))
        yield _plain("qbo_connection_decrypt_failures", "Verifier tokens no configured key decrypts.",
                     extra.get("decrypt_failures", 0))  # fmt: skip
        yield _plain("qbo_dead_letter_cap_reached", "Writes that found the dead-letter stream at its cap.",
                     extra.get("dead_letter_cap_reached", 0))  # fmt: skip
        buckets, cumulative = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), snap["latency_buckets"], strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        histogram = HistogramMetricFamily("qbo_webhook_request_duration_seconds",
                                          "Webhook request duration, body read to answer.")  # fmt: skip
        histogram.add_metric([], buckets, snap["latency_sum"])
        yield histogram


def render(snapshot: dict[str, Any]) -> bytes:
    from prometheus_client.exposition import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


class MetricsFiles:
    """Per-worker snapshot files in a shared directory (multi-worker serving)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.mine = self.dir / f"worker-{os.getpid()}.json"

    def write(self, metrics: Metrics) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        temporary = self.mine.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps(metrics.snapshot()))
        temporary.replace(self.mine)  # atomic: a reader never sees half a file

    def read_all(self, metrics: Metrics) -> dict[str, Any]:
        snapshots = [metrics.snapshot()]
        for path in self.dir.glob("worker-*.json"):
            if path == self.mine:
                continue
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                snapshots.append(orjson.loads(path.read_bytes()))
        return merge(snapshots)


def _counter(name: str, documentation: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(values.items()):
        family.add_metric([value], count)
    return family


def _plain(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
