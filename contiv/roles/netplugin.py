"""
The netplugin role: applies this node's share of the store to the local OVS
bridge and serves DNS.

The OpenFlow datapath and the DNS server are not implemented yet; the role
starts, stops and reports that, and /readyz therefore stays 503.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger


class NetpluginService(Service):
    name = "netplugin"
    log = Logger()

    def __init__(self, node: str, store: Any):
        self.node = node
        self.store = store
        self.applied_generation = None

    def startService(self) -> None:
        super().startService()
        self.log.info("netplugin started for node {node}", node=self.node)

    def status(self) -> dict[str, Any]:
        return {
            "role": "netplugin",
            "node": self.node,
            "state": "no-datapath",
            "in_sync": False,
            "generation": self.applied_generation,
            "detail": "the OpenFlow datapath is not implemented yet",
        }
