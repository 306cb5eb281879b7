"""contiv: Kubernetes NetworkPolicy in Open vSwitch, and node-local DNS, as one Twisted daemon."""

__version__ = "0.1.0"
