"""The daemon's roles: netmaster (cluster -> store) and netplugin (store -> OVS and DNS)."""
