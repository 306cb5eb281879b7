"""
A DNS server process for tests and benchmarks: the real DnsServerService
under the real reactor, answering from a name table read from a JSON file
(a list of C{NameEntry.to_json()} values) or made up (C{--synthetic N}:
services C{svc-<i>.default.svc.<domain>}).

    python tests/support/dns_child.py --listen 127.0.0.1:5353 \\
        --upstream 127.0.0.1:5354 [--names FILE | --synthetic N] [--cache-size N]

Prints "ready <host> <port>" on stdout once both sockets listen; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.logger import globalLogBeginner, textFileLogObserver  # noqa: E402

from contiv.config import parse_host_port  # noqa: E402
from contiv.dns.answer import Answerer  # noqa: E402
from contiv.dns.forward import Forwarder  # noqa: E402
from contiv.dns.names import NameEntry, NameTable  # noqa: E402
from contiv.dns.server import DnsServerService  # noqa: E402


def synthetic(count: int) -> list[NameEntry]:
    return [NameEntry("svc", "default", f"svc-{i}",
                      (f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",))
            for i in range(count)]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", action="append", required=True)
    parser.add_argument("--names")
    parser.add_argument("--synthetic", type=int, default=0)
    parser.add_argument("--cache-size", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--log", action="store_true")
    args = parser.parse_args(argv)
    if args.log:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    entries = synthetic(args.synthetic)
    if args.names:
        with open(args.names, encoding="utf-8") as f:
            entries += [NameEntry.from_json(value) for value in json.load(f)]
    table = NameTable.of(entries, generation=1)
    forwarder = Forwarder([parse_host_port(u, default_port=53) for u in args.upstream],
                          reactor=reactor, timeout=args.timeout, cache_size=args.cache_size,
                          max_outstanding=4096)
    server = DnsServerService(args.listen, Answerer(table), forwarder, table.namespace_of,
                              reactor=reactor)

    async def start() -> None:
        try:
            await server.startService()
        except Exception as error:
            sys.stderr.write(f"cannot start: {error}\n")
            reactor.stop()
            return
        host, port = server.address
        sys.stdout.write(f"ready {host} {port}\n")
        sys.stdout.flush()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(start()))
    reactor.addSystemEventTrigger("before", "shutdown",
                                  lambda: server.stopService() if server.running else None)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
