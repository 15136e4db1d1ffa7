"""Where the TUI's data comes from: the admin socket (`queuegate.admin.aio_client.AsyncioAdminClient`), behind a
small interface so tests can drive the app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from queuegate.admin.protocol import DaemonStatus, Request


class StatusSource(Protocol):
    """What the app needs from the daemon."""

    def updates(self) -> AsyncIterator[DaemonStatus]:
        """Snapshots as they come; raises AdminUnavailable when the daemon is not (or no longer) there."""
        ...

    async def command(self, request: Request) -> str:
        """Send one request (preload, evict, drain, ...); its reply's message, or AdminError with the reason."""
        ...
