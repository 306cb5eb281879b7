"""The shared store between netmaster and netplugin: memcached, or memory in one process."""
