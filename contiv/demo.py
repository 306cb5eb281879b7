"""
The embedded demo's datapath: a private userspace OVS bridge with the pods of
a manifests directory as network namespaces, each serving HTTP on its
container ports, so that a new user sees the example policies enforced on
real traffic without a cluster or a system OVS.

    python -m contiv.demo up STATE_DIR MANIFESTS_DIR NODE   # prints the daemon's options
    python -m contiv.demo down STATE_DIR
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import yaml

from contiv.sandbox import PrivateOVS, run

SERVER = r"""
import http.server, sys
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {name} port {port}\n".encode()
        self.send_response(200); self.send_header("content-length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((host, port), Hello).serve_forever()
"""


def local_pods(manifests: str, node: str) -> list[dict]:
    pods = []
    for file in sorted(os.listdir(manifests)):
        if not file.endswith((".yaml", ".yml", ".json")):
            continue
        with open(os.path.join(manifests, file)) as f:
            for document in yaml.safe_load_all(f):
                if not isinstance(document, dict):
                    continue
                items = document.get("items", []) if document.get("kind") == "List" \
                    else [document]
                for item in items:
                    if item.get("kind") == "Pod" and \
                            (item.get("spec") or {}).get("nodeName") == node and \
                            (item.get("status") or {}).get("podIP"):
                        pods.append(item)
    return pods


def up(state_dir: str, manifests: str, node: str) -> None:
    ovs = PrivateOVS(os.path.join(state_dir, "ovs"), tag="demo")
    record = {"switch_netns": ovs.switch_netns, "netns": [], "servers": []}
    try:
        ovs.start()
        for pod in local_pods(manifests, node):
            name = pod["metadata"]["name"]
            namespace = pod["metadata"].get("namespace", "default")
            address = pod["status"]["podIP"]
            created = ovs.add_pod(name, address, 16, netns=f"contiv-{name}"[:15],
                                  namespace=namespace)
            ports = sorted({p["containerPort"] for c in pod["spec"].get("containers", [])
                            for p in c.get("ports", []) if p.get("protocol", "TCP") == "TCP"})
            for port in ports:
                server = subprocess.Popen(
                    ["ip", "netns", "exec", created.netns, sys.executable, "-c", SERVER, name,
                     address, str(port)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True)
                record["servers"].append(server.pid)
    finally:
        record["netns"] = list(ovs._netns)
        with open(os.path.join(state_dir, "demo.json"), "w") as f:
            json.dump(record, f)
    print(f"--openflow=unix:{ovs.mgmt_socket} --ovsdb=unix:{ovs.db_socket} --node={node}")


def down(state_dir: str) -> None:
    try:
        with open(os.path.join(state_dir, "demo.json")) as f:
            record = json.load(f)
    except OSError:
        record = {"netns": [], "servers": []}
    for pid in record["servers"]:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    ovs = PrivateOVS(os.path.join(state_dir, "ovs"), tag="demo")
    ovs._netns = record["netns"] or [ovs.switch_netns]
    ovs.stop()
    run(["rm", "-rf", state_dir], check=False)


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "up":
        os.makedirs(argv[1], exist_ok=True)
        up(argv[1], argv[2], argv[3])
        return 0
    if len(argv) == 2 and argv[0] == "down":
        down(argv[1])
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
