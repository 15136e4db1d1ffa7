"""HTTP API."""

from queuegate.api.app import InFlight, create_app

__all__ = ["InFlight", "create_app"]
