"""HTTP: the routes (`relay.py`: the hot OpenAI routes as plain ASGI; `app.py`: the rest, in Quart; they only
translate between HTTP and the daemon's components), what every request goes through (`_lifetime.py`, `cors.py`)
and the server under them (`server.py`: the listening socket, client connections with write deadlines, refusals
below the app)."""

from queuegate.api._lifetime import InFlight
from queuegate.api._routes import Routes
from queuegate.api.app import create_app

__all__ = ["InFlight", "Routes", "create_app"]
