"""
contivctl, the operators' inspection tool: which policies select a pod, the
address groups, the flows that concern a pod, why a connection is allowed or
denied (the compiled rules and OVS's own trace, compared), and what the name
table answers. L{contiv.ctl.view} holds the pure parts; L{contiv.ctl.sources}
reads the store, L{contiv.ctl.ovs} the bridge; L{contiv.ctl.cli} is the command.
"""

from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script's entry point (C{contivctl = contiv.ctl:main})."""
    from contiv.ctl.cli import main as run

    return run(argv)
