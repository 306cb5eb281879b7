"""The twistd plugin: C{twistd -n contiv --role=netmaster|netplugin|all}."""

from twisted.application.service import ServiceMaker

contiv = ServiceMaker(
    "contiv",
    "contiv.tap",
    "Kubernetes NetworkPolicy in Open vSwitch, and node-local DNS",
    "contiv",
)
