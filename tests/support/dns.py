"""Real DNS processes for tests and benchmarks: a private dnsmasq, the contiv DNS child, dig."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

from twisted.names import dns

from tests.support.processes import REPO, free_port, stop_process, wait_for

DNS_CHILD = os.path.join(REPO, "tests", "support", "dns_child.py")


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP (DNS listens on both)."""
    for _ in range(50):
        port = free_port(host)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free for both UDP and TCP")


def udp_query(port: int, name: str, qtype: int = dns.A, host: str = "127.0.0.1",
              timeout: float = 0.5) -> Optional[dns.Message]:
    """One query over UDP; None when nothing answers in time."""
    message = dns.Message(id=4242, recDes=1)
    message.queries = [dns.Query(name, qtype)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(message.toStr(), (host, port))
            data = s.recv(65535)
        except OSError:
            return None
    reply = dns.Message()
    reply.fromStr(data)
    return reply


def end(process: Optional[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL after 10 s; its pipes closed."""
    if process is None:
        return
    stop_process(process)
    for pipe in (process.stdout, process.stderr):
        if pipe:
            pipe.close()


class Dnsmasq:
    """A private dnsmasq on 127.0.0.1, with its own hosts file and log, started and stopped."""

    def __init__(self, directory: str, *, port: Optional[int] = None,
                 addresses: dict[str, str] | None = None, hosts: str = "",
                 servers: tuple[str, ...] = (), local: tuple[str, ...] = (),
                 cache_size: int = 10_000, log_queries: bool = True,
                 local_ttl: int = 0) -> None:
        self.directory = directory
        self.port = port or free_udp_tcp_port()
        self.addresses = addresses or {}
        self.hosts_path = os.path.join(directory, f"hosts-{self.port}")
        self.log_path = os.path.join(directory, f"dnsmasq-{self.port}.log")
        with open(self.hosts_path, "w", encoding="utf-8") as f:
            f.write(hosts)
        self.servers = servers
        self.local = local  # domains answered here only: NXDOMAIN for unknown names
        self.cache_size = cache_size
        self.log_queries = log_queries
        self.local_ttl = local_ttl  # the TTL of names from the hosts file (dnsmasq: 0)
        self.process: Optional[subprocess.Popen] = None

    def command(self) -> list[str]:
        args = ["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--pid-file=",
                f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                f"--log-facility={self.log_path}", f"--addn-hosts={self.hosts_path}",
                f"--cache-size={self.cache_size}", "--dns-forward-max=1000",
                f"--local-ttl={self.local_ttl}",
                # Stay root: the private directory is not readable by dnsmasq's user.
                "--user=root", "--group=root"]
        if self.log_queries:
            args.append("--log-queries")
        args += [f"--address=/{domain}/{ip}" for domain, ip in self.addresses.items()]
        args += [f"--server={server}" for server in self.servers]
        args += [f"--local=/{domain}/" for domain in self.local]
        return args

    def start(self, timeout: float = 10.0, probe: str = "probe.invalid") -> None:
        assert self.process is None, "already running"
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: self._answers(probe), timeout,
                     f"dnsmasq to answer on port {self.port}")
        except BaseException:
            self.stop()
            raise

    def _answers(self, probe: str) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"dnsmasq exited with {self.process.returncode}: "
                                 f"{self.process.stderr.read().decode(errors='replace')}")
        return udp_query(self.port, probe, timeout=0.2) is not None

    def stop(self) -> None:
        process, self.process = self.process, None
        end(process)

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


class ContivDns:
    """The contiv DNS server (tests/support/dns_child.py) in a child process."""

    def __init__(self, directory: str, upstreams: list[int], *, names_file: str = "",
                 synthetic: int = 0, cache_size: int = 10_000, timeout: float = 2.0,
                 port: Optional[int] = None) -> None:
        self.port = port or free_udp_tcp_port()
        self.log_path = os.path.join(directory, f"contiv-dns-{self.port}.log")
        self.args = [sys.executable, DNS_CHILD, "--listen", f"127.0.0.1:{self.port}",
                     "--cache-size", str(cache_size), "--timeout", str(timeout), "--log"]
        self.args += [a for p in upstreams for a in ("--upstream", f"127.0.0.1:{p}")]
        if names_file:
            self.args += ["--names", names_file]
        if synthetic:
            self.args += ["--synthetic", str(synthetic)]
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=log, cwd=REPO)
        finally:
            log.close()
        try:
            wait_for(self._ready, timeout, f"contiv DNS to listen on {self.port}")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"contiv DNS exited with {self.process.returncode}:\n"
                                 f"{self.log()}")
        return udp_query(self.port, "ready.probe.invalid.cluster.local",
                         timeout=0.2) is not None

    def stop(self) -> None:
        process, self.process = self.process, None
        end(process)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@dataclass
class Dig:
    status: str
    flags: set[str]
    answers: list[tuple[str, str, str]] = field(default_factory=list)  # name, type, data
    output: str = ""


def dig(port: int, name: str, qtype: str = "A", *options: str, timeout: float = 3.0) -> Dig:
    """Run dig against 127.0.0.1:port; every dig ends within its own time limits."""
    args = ["dig", "@127.0.0.1", "-p", str(port), f"+time={int(timeout)}", "+tries=1",
            *options, name, qtype]
    output = subprocess.run(args, capture_output=True, text=True,
                            timeout=timeout * 3 + 5).stdout
    header = re.search(r"status: (\w+)", output)
    flags = re.search(r";; flags: ([^;]*);", output)
    answers = []
    section = re.search(r";; ANSWER SECTION:\n(.*?)(?:\n\n|\Z)", output, re.S)
    if section:
        for line in section.group(1).splitlines():
            parts = line.split()
            if len(parts) >= 5:
                answers.append((parts[0], parts[3], " ".join(parts[4:])))
    return Dig(header.group(1) if header else "NO-REPLY",
               set(flags.group(1).split()) if flags else set(), answers, output)
