"""
How fast a reflector takes in a watch stream, and what a cached pod costs.

A recorded stream of 100,000 pod watch events (60,000 ADDED, 30,000
MODIFIED, 10,000 DELETED; each pod about 1.5 KB of JSON) is built in memory
and fed in 64 KB pieces, as reads from a socket would deliver it, through the
real path: the watch body protocol (line splitting, pausing), the reflector
(decoding, checking, cache update) and the event stream, drained by a
consumer. The baseline, in the same run, is a bare C{json.loads} of every
line with no cache. Memory per cached pod is measured with tracemalloc.

    .venv/bin/python benchmarks/k8s_watch.py
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
import time
import tracemalloc

# The checkout, not an installed copy, is what we measure.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import task  # noqa: E402

from contiv.k8s.client import _WatchBody  # noqa: E402
from contiv.k8s.events import EventStream  # noqa: E402
from contiv.k8s.reflector import Reflector, Resource  # noqa: E402

EVENTS = 100_000
CHUNK = 64 * 1024
RUNS = 3
MEMORY_PODS = 20_000
POD = Resource("Pod", "/api/v1/pods", "v1")


def pod_template() -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "creationTimestamp": "2024-03-11T09:15:02Z", "generateName": "web-7d9c8b6f5d-",
            "labels": {"app": "web", "io.contiv.net-group": "frontend",
                       "pod-template-hash": "7d9c8b6f5d"},
            "name": "", "namespace": "shop",
            "ownerReferences": [{"apiVersion": "apps/v1", "blockOwnerDeletion": True,
                                 "controller": True, "kind": "ReplicaSet",
                                 "name": "web-7d9c8b6f5d",
                                 "uid": "0e6f2c8a-8e0d-4d7a-a9a8-9b8f7c1d2e3f"}],
            "resourceVersion": "", "uid": "",
        },
        "spec": {
            "containers": [{"image": "nginx:1.25", "imagePullPolicy": "IfNotPresent",
                            "name": "nginx",
                            "ports": [{"containerPort": 80, "name": "http", "protocol": "TCP"}],
                            "resources": {}, "terminationMessagePath": "/dev/termination-log",
                            "terminationMessagePolicy": "File"}],
            "dnsPolicy": "ClusterFirst", "enableServiceLinks": True, "nodeName": "",
            "restartPolicy": "Always", "schedulerName": "default-scheduler",
            "serviceAccountName": "default", "terminationGracePeriodSeconds": 30,
        },
        "status": {
            "conditions": [{"lastProbeTime": None, "lastTransitionTime": "2024-03-11T09:15:06Z",
                            "status": "True", "type": t}
                           for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
            "hostIP": "", "phase": "Running", "podIP": "", "podIPs": [{"ip": ""}],
            "qosClass": "BestEffort", "startTime": "2024-03-11T09:15:02Z",
        },
    }


def make_pod(template: dict, i: int, rv: int, generation: int = 0) -> dict:
    pod = copy.deepcopy(template)
    metadata = pod["metadata"]
    metadata["name"] = f"web-7d9c8b6f5d-{i:06d}"
    metadata["uid"] = f"{i:08x}-6b4e-4c1a-8f7e-{rv:012x}"
    metadata["resourceVersion"] = str(rv)
    if generation:
        metadata["labels"]["generation"] = str(generation)
    pod["spec"]["nodeName"] = f"node-{i % 50}"
    ip = f"10.{244 + i // 65536}.{(i // 256) % 256}.{i % 256}"
    pod["status"]["podIP"] = ip
    pod["status"]["podIPs"] = [{"ip": ip}]
    pod["status"]["hostIP"] = f"10.0.0.{i % 50}"
    return pod


def record_stream() -> tuple:
    template = pod_template()
    lines = []
    rv = 1000
    added = EVENTS * 6 // 10
    modified = EVENTS * 3 // 10
    for i in range(added):
        rv += 1
        lines.append(json.dumps({"type": "ADDED", "object": make_pod(template, i, rv)}))
    for n in range(modified):
        rv += 1
        lines.append(json.dumps({"type": "MODIFIED",
                                 "object": make_pod(template, n * 2 % added, rv, 1)}))
    for n in range(EVENTS - added - modified):
        rv += 1
        lines.append(json.dumps({"type": "DELETED", "object": make_pod(template, n * 6, rv)}))
    data = ("\n".join(lines) + "\n").encode()
    pod_size = len(json.dumps(make_pod(template, 1, 1)).encode())
    return data, pod_size


class NullTransport:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def baseline(data: bytes) -> int:
    count = 0
    for line in data.split(b"\n"):
        if line:
            json.loads(line)
            count += 1
    return count


def reflector_run(data: bytes) -> tuple:
    clock = task.Clock()
    stream = EventStream(maxsize=1024)
    reflector = Reflector(None, POD, stream, clock)
    received = [0]

    def consume(_: object) -> None:
        received[0] += 1
        stream.get().addCallback(consume)

    stream.get().addCallback(consume)
    body = _WatchBody(reflector.handle_line, clock, idle_timeout=120.0)
    body.makeConnection(NullTransport())
    for start in range(0, len(data), CHUNK):
        body.dataReceived(data[start:start + CHUNK])
    return received[0], len(reflector.cache)


def best_of(function, data: bytes) -> tuple:
    best = None
    result = None
    for _ in range(RUNS):
        gc.collect()
        started = time.perf_counter()
        result = function(data)
        elapsed = time.perf_counter() - started
        best = elapsed if best is None else min(best, elapsed)
    return best, result


def memory_per_pod(data: bytes) -> float:
    lines = data.split(b"\n")[:MEMORY_PODS]
    stream = EventStream(maxsize=1)
    reflector = Reflector(None, POD, stream, task.Clock())
    stream.get()  # a consumer that never comes back keeps one waiting getter
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for line in lines:
        waiting = reflector.handle_line(line)
        if waiting is not None:
            stream.get()
    while len(stream):
        stream.get()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(reflector.cache) == MEMORY_PODS
    return (after - before) / MEMORY_PODS


def main() -> None:
    started = time.perf_counter()
    data, pod_size = record_stream()
    base_time, base_count = best_of(baseline, data)
    ours_time, (emitted, cached) = best_of(reflector_run, data)
    assert base_count == EVENTS
    per_pod = memory_per_pod(data)
    rows = [
        ("json.loads per line (baseline)", f"{EVENTS:,}", f"{base_time:.2f}",
         f"{EVENTS / base_time:,.0f}", "1.00"),
        ("reflector: decode + cache + stream", f"{EVENTS:,}", f"{ours_time:.2f}",
         f"{EVENTS / ours_time:,.0f}", f"{base_time / ours_time:.2f}"),
    ]
    header = ("path", "events", "seconds", "events/s", "vs baseline")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"k8s watch benchmark: {EVENTS:,} pod events, {len(data) / 1e6:.1f} MB, "
          f"{pod_size:,} B per pod, {CHUNK // 1024} KB reads, best of {RUNS}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print()
    print(f"events emitted: {emitted:,}; pods cached at the end: {cached:,}")
    print(f"memory per cached pod: {per_pod:,.0f} B (tracemalloc, {MEMORY_PODS:,} pods; "
          f"{pod_size:,} B of JSON each, {per_pod / pod_size:.1f}x)")
    print(f"total run time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
