"""
contiv's DNS server against dnsmasq, with dnsperf, on 127.0.0.1.

Hits: contiv's DnsServerService (the real one, under the real reactor, in a
child process) answering from a name table of 10,000 services, and dnsmasq
answering the same 10,000 names from an --addn-hosts file; the same query
file (every name once, shuffled, A) for the same time.

Forwarding: an upstream dnsmasq knows 10,000 names nobody else does; the
queries go through contiv to it, and through a second dnsmasq to it. Without
caches first (contiv's forward cache off, the middle dnsmasq --cache-size=0),
then with both caches on.

dnsperf 2.10 reports average and maximum latency; a percentile needs -v (a
line per query), which would load dnsperf more than the servers.

    .venv/bin/python benchmarks/dns_server.py [--seconds 8] [--clients 4]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

# The checkout, not an installed copy, is what we measure.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.dns import ContivDns, Dnsmasq  # noqa: E402
from tests.support.dns_child import synthetic  # noqa: E402

NAMES = 10_000


@dataclass
class Run:
    label: str
    sent: int
    completed: int
    lost: int
    qps: float
    avg_ms: float
    max_ms: float
    rcodes: str


def dnsperf(label: str, port: int, query_file: str, seconds: int, clients: int) -> Run:
    args = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", query_file,
            "-l", str(seconds), "-c", str(clients), "-T", "2", "-q", "200", "-t", "3"]
    output = subprocess.run(args, capture_output=True, text=True,
                            timeout=seconds + 30).stdout

    def number(pattern: str, default: float = 0.0) -> float:
        found = re.search(pattern, output)
        return float(found.group(1)) if found else default

    latency = re.search(r"Average Latency \(s\):\s+([\d.]+) \(min [\d.]+, max ([\d.]+)\)", output)
    rcodes = re.search(r"Response codes:\s+(.*)", output)
    if not latency:
        raise SystemExit(f"cannot read dnsperf's output for {label}:\n{output}")
    return Run(label, int(number(r"Queries sent:\s+(\d+)")),
               int(number(r"Queries completed:\s+(\d+)")),
               int(number(r"Queries lost:\s+(\d+)")),
               number(r"Queries per second:\s+([\d.]+)"),
               float(latency.group(1)) * 1000, float(latency.group(2)) * 1000,
               rcodes.group(1).strip() if rcodes else "")


def table(rows: list[tuple[Run, Optional[Run]]]) -> str:
    lines = [f"{'':42} {'qps':>9} {'avg ms':>7} {'max ms':>7} {'sent':>9} {'lost':>6} "
             f"{'vs dnsmasq':>10}  rcodes"]
    for run, baseline in rows:
        ratio = f"{run.qps / baseline.qps:.2f}x" if baseline and baseline.qps else ""
        lines.append(f"{run.label:42} {run.qps:9.0f} {run.avg_ms:7.3f} {run.max_ms:7.2f} "
                     f"{run.sent:9d} {run.lost:6d} {ratio:>10}  {run.rcodes}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    for tool in ("dnsperf", "dnsmasq"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run scripts/bootstrap")

    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="contiv-dns-bench-") as directory:
        entries = synthetic(NAMES)
        hits = os.path.join(directory, "hits.txt")
        names = [f"{e.name}.default.svc.cluster.local" for e in entries]
        rng.shuffle(names)
        with open(hits, "w", encoding="utf-8") as f:
            f.writelines(f"{name} A\n" for name in names)
        hosts = "".join(f"{e.addresses[0]} {e.name}.default.svc.cluster.local\n"
                        for e in entries)
        misses = os.path.join(directory, "misses.txt")
        upstream_names = [f"host-{i}.upstream.test" for i in range(NAMES)]
        upstream_hosts = "".join(f"198.18.{i // 256}.{i % 256} {name}\n"
                                 for i, name in enumerate(upstream_names))
        rng.shuffle(upstream_names)
        with open(misses, "w", encoding="utf-8") as f:
            f.writelines(f"{name} A\n" for name in upstream_names)

        processes: list = []

        def started(process):
            processes.append(process)
            process.start()
            return process

        rows: list[tuple[Run, Optional[Run]]] = []
        try:
            # -- hits
            local = started(Dnsmasq(directory, hosts=hosts, local=("cluster.local",),
                                    log_queries=False))
            contiv = started(ContivDns(directory, [local.port], synthetic=NAMES))
            dnsmasq_hits = dnsperf("hits: dnsmasq (addn-hosts)", local.port, hits,
                                   args.seconds, args.clients)
            contiv_hits = dnsperf("hits: contiv (name table)", contiv.port, hits,
                                  args.seconds, args.clients)
            rows += [(dnsmasq_hits, None), (contiv_hits, dnsmasq_hits)]
            contiv.stop()
            local.stop()

            # -- forwarding
            upstream = started(Dnsmasq(directory, hosts=upstream_hosts,
                                       local=("upstream.test",), log_queries=False,
                                       local_ttl=300))
            server = f"127.0.0.1#{upstream.port}"
            for cache in (False, True):
                middle = started(Dnsmasq(directory, servers=(server,), log_queries=False,
                                         cache_size=10_000 if cache else 0))
                contiv = started(ContivDns(directory, [upstream.port],
                                           cache_size=10_000 if cache else 0))
                word = "cache on" if cache else "no cache"
                baseline = dnsperf(f"forward: dnsmasq -> dnsmasq ({word})", middle.port,
                                   misses, args.seconds, args.clients)
                run = dnsperf(f"forward: contiv -> dnsmasq ({word})", contiv.port, misses,
                              args.seconds, args.clients)
                rows += [(baseline, None), (run, baseline)]
                contiv.stop()
                middle.stop()
            upstream.stop()
        finally:
            for process in processes:
                process.stop()

    print(f"dnsperf -c {args.clients} -T 2 -q 200 -l {args.seconds}, {NAMES} names, "
          f"{os.cpu_count()} CPUs")
    print(table(rows))


if __name__ == "__main__":
    main()
