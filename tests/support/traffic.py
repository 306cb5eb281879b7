"""
Real traffic between pod network namespaces: tiny TCP/UDP servers and
clients run with this interpreter inside the namespaces.
"""

from __future__ import annotations

import subprocess
import sys
import time

from tests.support.ovs import Pod

SERVER = r"""
import socket, sys, threading
proto, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in sys.argv[3] else socket.AF_INET
if proto == "tcp":
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[3], port)); s.listen(64)
    print("ready", flush=True)
    def echo(c):
        try:
            while True:
                data = c.recv(4096)
                if not data:
                    break
                c.sendall(data)
        except OSError:
            pass
        finally:
            c.close()
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
else:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((sys.argv[3], port))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(4096)
        s.sendto(data, peer)
"""

CLIENT = r"""
import socket, sys
proto, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if proto == "tcp":
        s = socket.create_connection((host, port), timeout=timeout)
        s.sendall(b"ping"); ok = s.recv(4) == b"ping"
    else:
        s = socket.socket(family, socket.SOCK_DGRAM); s.settimeout(timeout)
        s.sendto(b"ping", (host, port)); ok = s.recvfrom(16)[0] == b"ping"
except OSError:
    ok = False
sys.exit(0 if ok else 1)
"""


def serve(pod: Pod, proto: str, port: int) -> subprocess.Popen:
    process = pod.popen([sys.executable, "-c", SERVER, proto, str(port), pod.ip],
                        stdout=subprocess.PIPE)
    line = process.stdout.readline()
    if line.strip() != b"ready":
        process.kill()
        raise RuntimeError(f"{proto} server on {pod.name}:{port} did not start")
    return process


def connects(src: Pod, dst_ip: str, port: int, proto: str = "tcp",
             timeout: float = 1.0) -> bool:
    result = src.exec([sys.executable, "-c", CLIENT, proto, dst_ip, str(port), str(timeout)],
                      check=False, timeout=timeout + 20)
    return result.returncode == 0


def pings(src: Pod, dst_ip: str, count: int = 1, timeout: float = 1.0) -> bool:
    result = src.exec(["ping", "-c", str(count), "-W", str(timeout), "-i", "0.2", dst_ip],
                      check=False, timeout=count * timeout + 20)
    return result.returncode == 0


class Pinger:
    """A ping stream in the background: how many of its packets came back."""

    def __init__(self, src: Pod, dst_ip: str, interval: float = 0.02):
        self.process = src.popen(["ping", "-i", str(interval), "-W", "1", dst_ip],
                                 stdout=subprocess.PIPE, text=True)
        self.started = time.monotonic()

    def stop(self) -> tuple[int, int]:
        """(sent, received), after SIGINT makes ping print its summary."""
        self.process.send_signal(2)
        out, _ = self.process.communicate(timeout=20)
        for line in out.splitlines():
            if "packets transmitted" in line:
                sent = int(line.split()[0])
                received = int(line.split(",")[1].split()[0])
                return sent, received
        raise RuntimeError(f"no ping summary in {out!r}")
