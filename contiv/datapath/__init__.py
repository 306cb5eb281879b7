"""The node's datapath: the policy pipeline as flows, and keeping OVS in step with it."""
