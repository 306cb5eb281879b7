"""
The daemon's Prometheus registry.

Modules define their metrics at import time with C{registry=REGISTRY}; the
HTTP listener serves this registry plus one made per running daemon for
values that belong to an instance (the roles' sync state).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

import contiv

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)


class RoleStatusCollector:
    """Reports each role's sync state and generation, read at scrape time."""

    def __init__(self, statuses: Callable[[], Mapping[str, Mapping]]):
        self._statuses = statuses

    def collect(self) -> Iterable:
        info = InfoMetricFamily("contiv_build", "contiv version")
        info.add_metric([], {"version": contiv.__version__})
        yield info
        in_sync = GaugeMetricFamily("contiv_role_in_sync",
                                    "1 when the role is in sync (what /readyz reports)",
                                    labels=["role"])
        generation = GaugeMetricFamily("contiv_role_generation",
                                       "the store generation the role has published or applied",
                                       labels=["role"])
        for role, status in self._statuses().items():
            in_sync.add_metric([role], 1.0 if status.get("in_sync") else 0.0)
            if status.get("generation") is not None:
                generation.add_metric([role], float(status["generation"]))
        yield in_sync
        yield generation


def instance_registry(statuses: Callable[[], Mapping[str, Mapping]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RoleStatusCollector(statuses))
    return registry
