"""OpenFlow 1.3 over Twisted: the connection to the OVS bridge, messages from os-ken."""
