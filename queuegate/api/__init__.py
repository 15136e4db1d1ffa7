"""HTTP API."""

from queuegate.api.app import create_app

__all__ = ["create_app"]
