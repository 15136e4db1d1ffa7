"""Nodes: hosts that join the fleet at runtime. `registry.py` is the gateway's side (registration, heartbeats,
staleness)."""
