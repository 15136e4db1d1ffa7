"""Serving the ASGI app: the listening socket, bound before anything else starts, and hypercorn on top of it.

The socket is bound first so that a busy address is one clear line before any model server or simulator is
started, not an exception group after them.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from queuegate.config import parse_listen

LISTEN_BACKLOG = 4096  # hypercorn's default of 100 overflows under bursts of new connections (the kernel caps it)


class ListenError(Exception):
    """The listen address cannot be used; the message says which one, why, and what to do."""


def bind_listener(listen: str) -> socket.socket:
    """A listening TCP socket on `listen` (host:port; port 0 picks a free one). Raises ListenError."""
    host, port = parse_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {listen}: unknown host {host!r} ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            why = "the address is already in use (another QueueGate or server?)"
        else:
            why = exc.strerror or str(exc)
        raise ListenError(
            f"cannot listen on {listen}: {why}; choose another address with --listen HOST:PORT "
            "or [server].listen in the config"
        ) from None
    return sock


async def serve_http(
    app: Any,
    listener: socket.socket,
    *,
    graceful_timeout_s: float,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on the bound `listener` until `shutdown_trigger` returns; reports the bound URLs."""
    config = HypercornConfig()
    config.graceful_timeout = graceful_timeout_s
    config.accesslog = None
    config.errorlog = logging.getLogger("queuegate.http")
    sockets = Sockets(secure_sockets=[], insecure_sockets=[listener], quic_sockets=[])
    await worker_serve(
        wrap_app(app, config.wsgi_max_body_size, None),
        config,
        sockets=sockets,
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )
