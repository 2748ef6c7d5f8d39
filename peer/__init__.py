"""Harness running a real NetBox with the diode NetBox plugin on loopback (see peer/netbox.py)."""
