"""The private Open vSwitch the tests use: L{contiv.sandbox}."""

from contiv.sandbox import Pod, PrivateOVS, available, run  # noqa: F401
