"""Helpers for tests that start real processes: free ports, waits with deadlines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Optional

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(process: Optional[subprocess.Popen], sig: int = signal.SIGTERM,
                 grace: float = 10) -> None:
    """Send C{sig} to a child still running; SIGKILL it if it is not gone in C{grace} s."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 2.0) -> Optional[tuple[int, bytes]]:
    """(status, body), or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, socket.timeout):
        return None


def contiv_env() -> dict[str, str]:
    """Run twistd on this source tree: Twisted finds twisted/plugins/ on sys.path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_twistd(args: list[str], cwd: str, log_path: str) -> subprocess.Popen:
    log = open(log_path, "wb")
    try:
        return subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "contiv", *args],
                                cwd=cwd, env=contiv_env(), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def listening_sockets(pid: int) -> list[str]:
    """The TCP/UDP/unix listening sockets that process pid holds (from ss)."""
    output = subprocess.run(["ss", "-Hlpn"], capture_output=True, text=True,
                            timeout=10).stdout
    return [line for line in output.splitlines() if f"pid={pid}," in line]


class MemcachedServer:
    """A private memcached on 127.0.0.1 (TCP only), started and killed by a test."""

    def __init__(self, *, port: Optional[int] = None, memory_mb: Optional[int] = None,
                 no_evictions: bool = False) -> None:
        self.port = port or free_port()
        self.memory_mb = memory_mb
        self.no_evictions = no_evictions
        self.process: Optional[subprocess.Popen] = None

    def command(self) -> list[str]:
        args = ["memcached", "-l", "127.0.0.1", "-p", str(self.port), "-U", "0"]
        if os.geteuid() == 0:
            args += ["-u", "root"]  # memcached refuses to run as root otherwise
        if self.memory_mb is not None:
            args += ["-m", str(self.memory_mb)]
        if self.no_evictions:
            args.append("-M")
        return args

    def start(self, timeout: float = 10.0) -> None:
        assert self.process is None, "already running"
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(self._accepts, timeout, f"memcached to accept on port {self.port}")
        except BaseException:
            self.stop()
            raise

    def _accepts(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"memcached on port {self.port} exited with "
                                 f"{self.process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)
