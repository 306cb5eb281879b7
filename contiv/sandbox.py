"""
A private Open vSwitch with pods, for the tests, the benchmarks and the
embedded demo: ovsdb-server and a userspace ovs-vswitchd with their own
run/log/db directories, the switch in a network namespace of its own (two
userspace datapaths in one namespace clash on their shared ovs-netdev device),
and pods as network namespaces on veth ports. Blocking calls: this is set-up
code, never used by the daemon itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


def run(args: list[str], env: Optional[dict] = None, timeout: float = 30,
        check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result


@dataclass
class Pod:
    name: str
    netns: str
    ip: str
    mac: str
    port: str  # the OVS port name, on the switch side of the veth
    ofport: int = 0

    def exec(self, args: list[str], timeout: float = 30, check: bool = True):
        return run(["ip", "netns", "exec", self.netns, *args], timeout=timeout, check=check)

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *args], **kwargs)


@dataclass
class PrivateOVS:
    """Start with start(), always stop with stop() (also after a failed start)."""

    workdir: str
    bridge: str = "br0"
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    pods: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rundir = os.path.join(self.workdir, "run")
        self.logdir = os.path.join(self.workdir, "log")
        self.dbdir = os.path.join(self.workdir, "db")
        self.switch_netns = f"ovs-{self.tag}"
        self.db_socket = os.path.join(self.rundir, "db.sock")
        self._netns: list[str] = []

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env.update(OVS_RUNDIR=self.rundir, OVS_LOGDIR=self.logdir, OVS_DBDIR=self.dbdir,
                   OVS_SYSCONFDIR=self.workdir)
        return env

    @property
    def mgmt_socket(self) -> str:
        return os.path.join(self.rundir, f"{self.bridge}.mgmt")

    def vsctl(self, *args: str, timeout: float = 30) -> str:
        return run(["ovs-vsctl", f"--db=unix:{self.db_socket}", "--timeout=20", *args],
                   env=self.env, timeout=timeout).stdout.strip()

    def ofctl(self, *args: str, timeout: float = 60, check: bool = True):
        return run(["ovs-ofctl", "-O", "OpenFlow13", *args], env=self.env, timeout=timeout,
                   check=check)

    def appctl(self, *args: str, timeout: float = 30) -> str:
        target = os.path.join(self.rundir, f"ovs-vswitchd.{self._pid_of('ovs-vswitchd')}.ctl")
        return run(["ovs-appctl", "-t", target, *args], env=self.env,
                   timeout=timeout).stdout

    def _pid_of(self, daemon: str) -> Optional[int]:
        try:
            with open(os.path.join(self.rundir, f"{daemon}.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def start(self) -> "PrivateOVS":
        for path in (self.rundir, self.logdir, self.dbdir):
            os.makedirs(path, exist_ok=True)
        run(["ovsdb-tool", "create", os.path.join(self.dbdir, "conf.db"), SCHEMA])
        run(["ovsdb-server", os.path.join(self.dbdir, "conf.db"),
             f"--remote=punix:{self.db_socket}", "--pidfile", "--detach",
             f"--log-file={os.path.join(self.logdir, 'ovsdb-server.log')}"], env=self.env)
        run(["ovs-vsctl", f"--db=unix:{self.db_socket}", "--no-wait", "init"], env=self.env)
        self._add_netns(self.switch_netns)
        self.start_vswitchd()
        self.vsctl("add-br", self.bridge, "--", "set", "bridge", self.bridge,
                   "datapath_type=netdev", "fail-mode=secure", "protocols=OpenFlow13")
        self._wait(lambda: os.path.exists(self.mgmt_socket), 20, "the bridge's mgmt socket")
        return self

    def start_vswitchd(self) -> None:
        run(["ip", "netns", "exec", self.switch_netns, "ovs-vswitchd",
             f"unix:{self.db_socket}", "--disable-system", "--pidfile", "--detach",
             f"--log-file={os.path.join(self.logdir, 'ovs-vswitchd.log')}"], env=self.env)

    def stop_vswitchd(self) -> None:
        self._kill("ovs-vswitchd")

    def restart_vswitchd(self) -> None:
        """OVS restarted: every flow is gone, the bridge comes back from the database."""
        self.stop_vswitchd()
        if os.path.exists(self.mgmt_socket):
            os.unlink(self.mgmt_socket)
        self.start_vswitchd()
        self._wait(lambda: os.path.exists(self.mgmt_socket), 20, "the bridge's mgmt socket")

    def add_pod(self, name: str, ip: str, prefix_len: int = 24, *,
                netns: Optional[str] = None, namespace: str = "default") -> Pod:
        """A pod: a network namespace whose eth0 is a veth into the bridge."""
        netns = netns or f"p{self.tag}{name}"
        self._add_netns(netns)
        port = f"v{self.tag}{len(self.pods)}"
        run(["ip", "link", "add", port, "netns", self.switch_netns, "type", "veth", "peer",
             "name", "eth0", "netns", netns])
        run(["ip", "netns", "exec", self.switch_netns, "ip", "link", "set", port, "up"])
        # The userspace datapath reads frames off the veth as they are: with
        # checksum offload on, TCP and UDP would leave with checksums still to
        # be filled in, and conntrack would call them invalid.
        for args in (["ip", "addr", "add", f"{ip}/{prefix_len}", "dev", "eth0"],
                     ["ethtool", "-K", "eth0", "tx", "off"],
                     ["ip", "link", "set", "eth0", "up"], ["ip", "link", "set", "lo", "up"]):
            run(["ip", "netns", "exec", netns, *args])
        mac = run(["ip", "netns", "exec", netns, "cat", "/sys/class/net/eth0/address"]) \
            .stdout.strip()
        self.vsctl("add-port", self.bridge, port, "--", "set", "Interface", port,
                   f"external_ids:iface-id={namespace}/{name}", f"external_ids:ip={ip}")
        ofport = int(self.vsctl("get", "Interface", port, "ofport"))
        pod = Pod(name, netns, ip, mac, port, ofport)
        self.pods[name] = pod
        return pod

    def _add_netns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self._netns.append(name)

    def _kill(self, daemon: str) -> None:
        pid = self._pid_of(daemon)
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        self._kill("ovs-vswitchd")
        self._kill("ovsdb-server")
        for netns in reversed(self._netns):
            run(["ip", "netns", "del", netns], check=False)
        self._netns.clear()

    @staticmethod
    def _wait(predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    """
    Whether C{pid} still runs. A detached daemon's parent is init, and an init
    that reaps lazily (some container runtimes' take seconds) leaves it a
    zombie: exited, its sockets closed, so as good as gone.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            # The state follows the command name, which is in parentheses.
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def available() -> Optional[str]:
    """None when a private OVS can run here, else what is missing."""
    for tool in ("ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-ofctl", "ip", "ethtool",
                 "ping"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None
