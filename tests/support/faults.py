"""
Support for the fault suite (tests/integration/test_faults.py): the two-process
deployment (twistd --role=netmaster and --role=netplugin as separate processes
talking through a real memcached), the datapath as a comparable set of flows,
and traffic that says which of its packets came back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter as FlowSet
from typing import Any, Optional

from tests.support.ovs_node import MARK, Node
from tests.support.processes import free_port, http_get, start_twistd, stop_process, wait_for

# -- the daemons -------------------------------------------------------------------


class Daemon:
    """One twistd contiv process with its own /healthz, /readyz and /metrics listener."""

    def __init__(self, name: str, workdir: str, args: list[str]):
        self.name = name
        self.workdir = workdir
        self.http_port = free_port()
        self.args = [*args, "--http", f"tcp:{self.http_port}:interface=127.0.0.1"]
        self.process: Optional[subprocess.Popen] = None
        self.log_path = ""
        self.logs: list[str] = []  # every run's log, for failure messages

    def start(self) -> "Daemon":
        assert not self.running(), f"{self.name} is already running"
        self.log_path = os.path.join(self.workdir, f"{self.name}-{len(self.logs)}.log")
        self.logs.append(self.log_path)
        self.process = start_twistd(self.args, self.workdir, self.log_path)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self, tail: int = 4000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-tail:]
        except OSError:
            return ""

    def full_logs(self) -> str:
        text = []
        for path in self.logs:
            with open(path, encoding="utf-8", errors="replace") as f:
                text.append(f.read())
        return "\n".join(text)

    def alive(self) -> None:
        """Raise, with the end of its log, if the process has exited."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise AssertionError(f"{self.name} is not running (exit {code}):\n{self.log()}")

    def get(self, path: str, timeout: float = 2.0) -> Optional[tuple[int, bytes]]:
        return http_get(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout)

    def readyz(self) -> Optional[tuple[int, dict]]:
        """(status code, body) of /readyz, None when nothing answers."""
        self.alive()
        answer = self.get("/readyz")
        if answer is None:
            return None
        return answer[0], json.loads(answer[1])

    def role(self) -> Optional[dict]:
        """This process's role status (its only role), None when nothing answers."""
        answer = self.readyz()
        if answer is None:
            return None
        (status,) = answer[1]["roles"].values()
        return status

    def ready(self, timeout: float = 30.0) -> dict:
        """Wait for /readyz 200; the role's status."""
        def check():
            answer = self.readyz()
            return answer is not None and answer[0] == 200 and answer[1]
        body = wait_for(check, timeout, f"{self.name}'s /readyz to answer 200")
        (status,) = body["roles"].values()
        return status

    def healthy(self) -> bool:
        answer = self.get("/healthz")
        return answer is not None and answer[0] == 200

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample in /metrics (0 when it is not there)."""
        answer = self.get("/metrics", timeout=5)
        assert answer is not None and answer[0] == 200, f"{self.name}: no /metrics"
        return sample(answer[1].decode(), name, **labels)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.process, sig, grace=20)


def sample(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition, 0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return 0.0


class Deployment(Node):
    """
    One node as operators run it: the pods and a private OVS (L{Node}, with its
    manifests), netmaster and netplugin as two twistd processes, and the store a
    real memcached between them.
    """

    def __init__(self, workdir: str, memcached: Any, *, prefix: str = "contiv/"):
        self.daemon = None
        self.servers = []
        try:
            super().__init__(workdir)
        except BaseException:
            # Half a node: whatever started (the OVS, servers) must not outlive the test.
            for server in self.servers:
                server.kill()
                server.wait(timeout=10)
            if getattr(self, "ovs", None) is not None:
                self.ovs.stop()
            raise
        self.memcached = memcached
        self.netmaster: Optional[Daemon] = None
        self.netplugin: Optional[Daemon] = None
        self.retired: list[Daemon] = []  # daemons of an earlier configuration
        self.configure(prefix)

    @property
    def store_url(self) -> str:
        return f"memcached://127.0.0.1:{self.memcached.port}"

    def configure(self, prefix: str, *, master_args: tuple = (),
                  plugin_args: tuple = ()) -> None:
        """Both daemons' command lines (started by L{start_roles})."""
        assert not any(d is not None and d.running() for d in (self.netmaster, self.netplugin)), \
            "stop_roles() first"
        self.prefix = prefix
        self.retired.extend(d for d in (self.netmaster, self.netplugin) if d is not None)
        common = ["--store", self.store_url, "--store-prefix", prefix]
        self.netmaster = Daemon(f"netmaster-{prefix.strip('/')}", self.workdir,
                                ["--role=netmaster", "--manifests", self.manifests, *common,
                                 *master_args])
        self.netplugin = Daemon(f"netplugin-{prefix.strip('/')}", self.workdir,
                                ["--role=netplugin", "--node=node-1", *common,
                                 "--openflow", f"unix:{self.ovs.mgmt_socket}",
                                 "--ovsdb", f"unix:{self.ovs.db_socket}", *plugin_args])

    def start_roles(self, timeout: float = 40.0) -> tuple[dict, dict]:
        """Start both; wait until both are ready and the plugin applied the master's generation."""
        self.netmaster.start()
        self.netplugin.start()
        return self.converged(timeout)

    def converged_now(self) -> Optional[tuple[dict, dict]]:
        """
        (netmaster's status, netplugin's status) when both are ready and the
        generation netplugin applied is the one netmaster published last, else None.
        """
        master, plugin = self.netmaster.readyz(), self.netplugin.readyz()
        if master is None or plugin is None or master[0] != 200 or plugin[0] != 200:
            return None
        master, plugin = master[1]["roles"]["netmaster"], plugin[1]["roles"]["netplugin"]
        return (master, plugin) if master["generation"] == plugin["generation"] else None

    def converged(self, timeout: float = 40.0, *,
                  newer_than: Optional[int] = None) -> tuple[dict, dict]:
        """L{converged_now}, waited for; on a generation after C{newer_than} if given."""
        def check():
            both = self.converged_now()
            return both if both and (newer_than is None
                                     or both[1]["generation"] > newer_than) else None
        what = "netmaster and netplugin to converge"
        if newer_than is not None:
            what += f" after generation {newer_than}"
        return wait_for(check, timeout, what, interval=0.1)

    def tracebacks(self) -> list[str]:
        """The daemons' logs (every run) that hold a traceback: there should be none."""
        found = []
        for daemon in (self.netmaster, *self.retired, self.netplugin):
            text = daemon.full_logs() if daemon is not None else ""
            if "Traceback" in text:
                start = max(0, text.index("Traceback") - 500)
                found.append(f"{daemon.name}:\n{text[start:start + 3000]}")
        return found

    def stop_roles(self) -> None:
        for daemon in (self.netplugin, self.netmaster):
            if daemon is not None:
                daemon.stop()

    def stop(self) -> None:
        self.stop_roles()
        super().stop()

    def flows(self) -> "FlowSet":
        return flow_set(self.ovs)

    def remove(self, file: str) -> None:
        os.unlink(os.path.join(self.manifests, file))


# -- the datapath as a comparable set ------------------------------------------------


_COOKIE = re.compile(r"cookie=(0x[0-9a-f]+),\s*")
_STATS = re.compile(r"\b(duration|n_packets|n_bytes|idle_age|hard_age)=[^,\s]+,\s*")
_CONJ_MATCH = re.compile(r"conj_id=(\d+)")
_CONJ_ACTION = re.compile(r"conjunction\((\d+),")


def contiv_flow_lines(ovs: Any) -> list[str]:
    """contiv's flows (by the mark in their cookie), without cookie or counters."""
    text = ovs.ofctl("dump-flows", "--no-stats", ovs.bridge).stdout
    lines = []
    for line in text.splitlines():
        cookie = _COOKIE.search(line)
        if cookie is None or int(cookie.group(1), 16) & 0xFFFFFFFF != MARK:
            continue
        lines.append(_STATS.sub("", _COOKIE.sub("", line)).strip())
    return lines


def normalise_conjunctions(lines: list[str]) -> list[str]:
    """
    Conjunction ids replaced by a name derived from what they conjoin: the
    ids are hashes of the rule, but a collision moves one by allocation
    order, and a flow set is the same whatever numbers its conjunctions got.
    """
    def blind(line: str) -> str:
        return _CONJ_ACTION.sub("conjunction(*,", _CONJ_MATCH.sub("conj_id=*", line))

    members: dict[str, list[str]] = {}
    for line in lines:
        for conj in {*_CONJ_MATCH.findall(line), *_CONJ_ACTION.findall(line)}:
            # Which clause of this conjunction the flow is, with every id blinded.
            clause = re.search(rf"conjunction\({conj},(\d+/\d+)\)", line)
            role = clause.group(1) if clause else "action"
            members.setdefault(conj, []).append(f"{role} {blind(line)}")
    names = {conj: "c" + hashlib.sha256("\n".join(sorted(flows)).encode()).hexdigest()[:12]
             for conj, flows in members.items()}

    def rename(line: str) -> str:
        line = _CONJ_MATCH.sub(lambda m: f"conj_id={names[m.group(1)]}", line)
        return _CONJ_ACTION.sub(lambda m: f"conjunction({names[m.group(1)]},", line)
    return [rename(line) for line in lines]


def flow_set(ovs: Any) -> FlowSet:
    """
    contiv's flows as a multiset: two rules that enforce the same thing (in
    two policies, say) are two conjunctions whose flows print the same once
    their ids are normalised.
    """
    return FlowSet(normalise_conjunctions(contiv_flow_lines(ovs)))


def flow_diff(a: FlowSet, b: FlowSet, limit: int = 20) -> str:
    only_a, only_b = sorted((a - b).elements()), sorted((b - a).elements())
    return (f"{len(only_a)} flows only left (before), e.g.\n  " + "\n  ".join(only_a[:limit])
            + f"\n{len(only_b)} flows only right (after), e.g.\n  "
            + "\n  ".join(only_b[:limit]))


# -- traffic that says which packets came back ---------------------------------------

class SeqPinger:
    """
    A ping stream in the background that keeps each reply's sequence number,
    so a test can tell "never broke" from "came back" from "never passed".
    """

    def __init__(self, src: Any, dst_ip: str, interval: float = 0.02):
        self.dst_ip = dst_ip
        # -O: report each missing reply, so the output says what was sent too.
        self.process = src.popen(["ping", "-n", "-O", "-i", str(interval), "-W", "1", dst_ip],
                                 stdout=subprocess.PIPE, text=True)
        self.started = time.monotonic()
        self.sent = self.received = 0
        self.replies: list[int] = []

    def stop(self) -> "SeqPinger":
        """Stop (SIGINT: ping prints its summary) and parse what it printed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        out, _ = self.process.communicate(timeout=20)
        self.replies = [int(seq) for seq in re.findall(r"bytes from .*icmp_seq=(\d+)", out)]
        summary = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        if summary is None:
            raise RuntimeError(f"no ping summary in {out[-2000:]!r}")
        self.sent, self.received = int(summary.group(1)), int(summary.group(2))
        return self

    def lost(self) -> list[int]:
        """
        The sequence numbers sent and not answered, but the last: ping prints
        its summary at SIGINT without waiting, so that one may be in flight.
        """
        got = set(self.replies)
        return [seq for seq in range(1, self.sent) if seq not in got]


# A TCP connection that keeps talking: one message every interval, each echo
# checked; on SIGINT (or any failure) it prints what happened and exits.
TCP_STREAM = r"""
import signal, socket, sys, time
host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
stop = False
def interrupted(*_):
    global stop
    stop = True
signal.signal(signal.SIGINT, interrupted)
s = socket.create_connection((host, port), timeout=5)
s.settimeout(3)
print("connected", flush=True)
sent = echoed = 0
error = ""
while not stop:
    message = b"%08d" % sent
    try:
        s.sendall(message)
        sent += 1
        data = b""
        while len(data) < len(message):
            chunk = s.recv(len(message) - len(data))
            if not chunk:
                raise OSError("closed by the peer")
            data += chunk
        if data != message:
            raise OSError(f"echo {data!r} for {message!r}")
        echoed += 1
    except OSError as e:
        if stop:
            break
        error = f"{type(e).__name__}: {e}"
        break
    time.sleep(interval)
print(f"sent={sent} echoed={echoed} error={error}", flush=True)
"""


class TcpStream:
    """One established TCP connection from a pod, exchanging echoes until stopped."""

    def __init__(self, src: Any, dst_ip: str, port: int, interval: float = 0.02):
        self.process = src.popen([sys.executable, "-c", TCP_STREAM, dst_ip, str(port),
                                  str(interval)], stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline().strip()
        if line != "connected":
            self.process.kill()
            self.process.wait(timeout=10)
            raise RuntimeError(f"the TCP stream to {dst_ip}:{port} did not connect: {line!r}")

    def stop(self) -> tuple[int, int, str]:
        """(messages sent, echoes received, the error that ended it or '')."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        out, _ = self.process.communicate(timeout=20)
        match = re.search(r"sent=(\d+) echoed=(\d+) error=(.*)", out)
        if match is None:
            raise RuntimeError(f"no TCP stream summary in {out!r}")
        return int(match.group(1)), int(match.group(2)), match.group(3).strip()


# -- DNS floods ---------------------------------------------------------------------

def _qname(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


# What a broken or hostile client sends a DNS server, round robin, as fast as
# one socket goes for the given seconds, and a valid query every fifth
# packet; prints how many of each kind went out (as JSON).
MALFORMED_FLOOD = r"""
import json, os, socket, struct, sys, time
host, port, seconds, qname = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), bytes.fromhex(sys.argv[4])
def header(ident, flags, qd=1, an=0, ns=0, ar=0):
    return struct.pack("!HHHHHH", ident & 0xFFFF, flags, qd, an, ns, ar)
noise = os.urandom(70000)
kinds = {
    # shorter than a DNS header
    "truncated": lambda i: noise[i % 997:i % 997 + 1 + i % 11],
    # random bytes, whatever they say
    "random": lambda i: noise[i % 4093:i % 4093 + 12 + i % 300],
    # a header promising records that are not there
    "short_records": lambda i: header(i, 0x0100, 1, 0, 0, 3) + qname + b"\0\1\0\1",
    # a question that runs off the end
    "cut_question": lambda i: header(i, 0x0100) + qname[:len(qname) // 2],
    # too large for any DNS message over UDP we take: 60 KB of noise after a query
    "oversized": lambda i: header(i, 0x0100, 1, 0, 0, 1) + qname + b"\0\1\0\1" + noise[:60000],
    "valid": lambda i: header(i, 0x0100) + qname + b"\0\1\0\1",
}
counts = dict.fromkeys(kinds, 0)
order = ["truncated", "random", "valid", "short_records", "cut_question", "valid", "oversized"]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
deadline = time.monotonic() + seconds
i = 0
while time.monotonic() < deadline:
    kind = order[i % len(order)]
    try:
        s.sendto(kinds[kind](i), (host, port))
        counts[kind] += 1
    except OSError:
        pass
    i += 1
print(json.dumps(counts), flush=True)
"""

# UDP/53 from a pod as fast as one socket goes, for the given seconds: every
# packet a query for a name the bridge answers.
PACKET_IN_FLOOD = r"""
import socket, struct, sys, time
target, seconds, qname = sys.argv[1], float(sys.argv[2]), bytes.fromhex(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
deadline = time.monotonic() + seconds
sent = 0
while time.monotonic() < deadline:
    try:
        s.sendto(struct.pack("!HHHHHH", sent & 0xFFFF, 0x0100, 1, 0, 0, 0) + qname +
                 b"\0\1\0\1", (target, 53))
        sent += 1
    except OSError:
        pass
print(sent, flush=True)
"""


def malformed_flood(port: int, seconds: float, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", MALFORMED_FLOOD, "127.0.0.1", str(port),
                             str(seconds), _qname(name).hex()],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)


def packet_in_flood(src: Any, target: str, seconds: float, name: str) -> subprocess.Popen:
    return src.popen([sys.executable, "-c", PACKET_IN_FLOOD, target, str(seconds),
                      _qname(name).hex()], stdout=subprocess.PIPE, text=True)


def meter_stats(ovs: Any, meter: int) -> tuple[int, int]:
    """(packets into the meter, packets its drop band dropped)."""
    out = ovs.ofctl("meter-stats", ovs.bridge, f"meter={meter}").stdout
    metered = re.search(r"packet_in_count:(\d+)", out)
    dropped = re.search(r"\d+: packet_count:(\d+)", out)
    assert metered and dropped, out
    return int(metered.group(1)), int(dropped.group(1))
