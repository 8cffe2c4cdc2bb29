"""Prometheus text exposition (format 0.0.4) for the server, without a client library: counters, gauges and
histograms keyed by label tuples, updated from the event loop and the batcher threads under one lock."""

from __future__ import annotations

import math
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative; cumulated when rendered
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += 1
        self.sum += value


class Metrics:
    """name -> {labels: value}. ``describe`` fixes each metric's type and help line once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[tuple, float | Histogram]] = defaultdict(dict)
        self._buckets: dict[str, tuple[float, ...]] = {}

    def describe(self, name: str, kind: str, help_text: str, buckets: tuple[float, ...] = ()) -> None:
        self._help[name] = (kind, help_text)
        if kind == "histogram":
            self._buckets[name] = buckets

    def inc(self, name: str, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            histogram = self._values[name].get(key)
            if histogram is None:
                histogram = self._values[name][key] = Histogram(self._buckets[name])
            histogram.observe(value)

    def value(self, name: str, **labels) -> float:
        with self._lock:
            return float(self._values[name].get(tuple(sorted(labels.items())), 0.0))

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_text) in self._help.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                for key, value in sorted(self._values[name].items()):
                    if isinstance(value, Histogram):
                        cumulative = 0
                        for bound, count in zip(value.buckets, value.counts):
                            cumulative += count
                            lines.append(f"{name}_bucket{_labels(key, le=_number(bound))} {cumulative}")
                        lines.append(f"{name}_bucket{_labels(key, le='+Inf')} {value.total}")
                        lines.append(f"{name}_sum{_labels(key)} {_number(value.sum)}")
                        lines.append(f"{name}_count{_labels(key)} {value.total}")
                    else:
                        lines.append(f"{name}{_labels(key)} {_number(value)}")
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _labels(key: tuple, **extra) -> str:
    pairs = [*key, *extra.items()]
    if not pairs:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped)) + "}"
