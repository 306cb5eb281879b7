"""
The bridge's settings in OVSDB, through ovs-vsctl: fail-secure mode (flows
stay when the controller goes away) and the cookie round number kept in the
bridge's external_ids, so that a restarted netplugin installs a new round
beside the old one instead of flushing.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger

ROUND_KEY = "contiv-round"


class OvsdbError(Exception):
    """ovs-vsctl failed; the message carries its stderr."""


class BridgeSettings:
    log = Logger()

    def __init__(self, reactor: Any, bridge: Optional[str], db: Optional[str] = None,
                 vsctl: str = "ovs-vsctl", env: Optional[dict] = None):
        """
        C{bridge}: the bridge's name, or None: the bridge whose datapath id
        the OpenFlow connection reports (see L{identify}).
        """
        self.reactor = reactor
        self.bridge = bridge
        self.db = db
        self.vsctl = vsctl
        self.env = env

    async def _run(self, *args: str) -> str:
        argv = ([f"--db={self.db}"] if self.db else []) + ["--timeout=10", *args]
        out, err, code = await getProcessOutputAndValue(self.vsctl, argv, env=self.env,
                                                        reactor=self.reactor)
        if code != 0:
            raise OvsdbError(f"ovs-vsctl {' '.join(args)} failed ({code}): "
                             f"{err.decode(errors='replace').strip()}")
        return out.decode().strip()

    async def identify(self, datapath_id: Optional[int]) -> str:
        """
        The bridge's name: the configured one, or the one OVSDB lists with the
        datapath id the switch reported (an OpenFlow endpoint such as
        tcp:127.0.0.1:6653 does not name its bridge, as a management socket does).
        """
        if self.bridge is not None:
            return self.bridge
        if datapath_id is None:
            raise OvsdbError("the switch reported no datapath id: set openflow.bridge")
        wanted = f"{datapath_id:016x}"
        names = (await self._run("--bare", "--columns=name", "find", "Bridge",
                                 f'datapath_id="{wanted}"')).split()
        if len(names) != 1:
            raise OvsdbError(f"OVSDB has {len(names) or 'no'} bridges with datapath id "
                             f"{wanted}{': ' + ', '.join(names) if names else ''}: set "
                             "openflow.bridge")
        self.bridge = names[0]
        self.log.info("the OpenFlow connection is to bridge {bridge} (datapath {dpid})",
                      bridge=self.bridge, dpid=wanted)
        return self.bridge

    async def secure(self) -> None:
        """fail-mode=secure: if contiv is gone, OVS keeps enforcing the installed flows."""
        await self._run("set-fail-mode", self.bridge, "secure")

    async def next_round(self, seen: int = 0) -> int:
        """
        Take the next round number: one past both the one OVSDB holds and any
        round seen in the installed flows (OVSDB may have been recreated).
        """
        text = await self._run("--if-exists", "get", "bridge", self.bridge,
                               f"external_ids:{ROUND_KEY}")
        stored = int(text.strip('"')) if text.strip('"').isdigit() else 0
        taken = max(stored, seen) + 1
        await self._run("set", "bridge", self.bridge, f'external_ids:{ROUND_KEY}="{taken}"')
        return taken
