"""The private Open vSwitch the tests use: L{contiv.sandbox}."""

from contiv.sandbox import Pod, PrivateOVS, available, run

__all__ = ["Pod", "PrivateOVS", "available", "run"]
