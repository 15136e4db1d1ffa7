"""HTTP: the routes (`app.py`: OpenAI's API, usage, health, metrics; they only translate between HTTP and the
daemon's components) and the server under them (`server.py`: the listening socket, client connections with write
deadlines, refusals below the app)."""

from queuegate.api.app import InFlight, Routes, create_app

__all__ = ["InFlight", "Routes", "create_app"]
