"""Each HTTP request's lifetime, around every route: counted while it runs (a graceful shutdown waits for the
last), a nursery of its own, and cleanups that run however it ends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

CLEANUP_KEY = "queuegate.cleanup"  # the ASGI scope entry: what runs when the request ends (close upstream, slot)
TASKS_KEY = "queuegate.tasks"  # the request's own nursery: a streamed tool loop runs there, and ends with it

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class InFlight:
    """Counts HTTP requests being served, so a graceful shutdown knows when the last one has finished; `peak` is
    the highest count since `reset_peak` (the heap trimmer's sign that a burst came and went)."""

    def __init__(self) -> None:
        self.count = 0
        self.peak = 0
        self._idle = trio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        if self.count > self.peak:
            self.peak = self.count
        if self.count == 1:
            self._idle = trio.Event()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    def reset_peak(self) -> None:
        self.peak = self.count

    async def wait_idle(self) -> None:
        await self._idle.wait()


def with_request_lifetime(app: ASGIApp, in_flight: InFlight) -> ASGIApp:
    """Count each HTTP request while it runs, give it a nursery of its own (a streamed tool loop runs there, and
    is cancelled when the request ends, however it ends), and run its cleanups (close upstream, free slot) then.

    A streamed body is closed here, not by whoever sends it: a client that vanishes between the handler's return
    and the first byte would otherwise leak the upstream connection and the scheduler slot.
    """

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        cleanups: list[Callable[[], Awaitable[None]]] = []
        scope[CLEANUP_KEY] = cleanups

        async def send_the_end_whole(message: dict[str, Any]) -> None:
            # hypercorn finishes the exchange inside the last send (closing a `Connection: close` or HTTP/1.0
            # connection, or arming the keep-alive timeout) and tells the app `http.disconnect` on the way, which
            # makes quart-trio cancel the very task doing it. Shielded, the last send completes (it is bounded by
            # the connection's write timeout).
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        in_flight.enter()
        try:
            async with trio.open_nursery() as tasks:
                scope[TASKS_KEY] = tasks
                try:
                    await app(scope, receive, send_the_end_whole)
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            if cleanups:
                with trio.CancelScope(shield=True):
                    for cleanup in cleanups:
                        await cleanup()
            in_flight.leave()

    return asgi
