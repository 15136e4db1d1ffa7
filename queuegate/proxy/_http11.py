"""One HTTP/1.1 client connection to an upstream: h11 over a trio stream (TCP, or TLS for `https`), and no more.

Why not httpcore here: every streamed event crossed its connection, stream and iterator layers one body chunk at a
time, even when many events were already in the socket buffer, and a stream closed at its end event lost its
connection. Here one read hands back all the body it holds (`receive_body`: the events already there go out to the
client as one write), and a stream whose end of message has arrived keeps its connection for the next request.

Errors are two, so the forwarder can say what happened: `ConnectFailed` (nothing was sent) and `ConnectionDropped`
(the upstream closed the connection or broke HTTP mid-exchange).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

RECEIVE_SIZE = 64 * 1024


class ConnectFailed(Exception):
    """The upstream could not be connected to (refused, unknown host, timed out, TLS failed)."""


class ConnectionDropped(Exception):
    """The upstream closed the connection, or sent what is not HTTP/1.1, before the exchange was complete."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL's requests go: the server (scheme, host, port) and the path with its query."""

    tls: bool
    host: str
    port: int
    path: bytes

    @classmethod
    def of(cls, url: str) -> Target:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(tls, parts.hostname or "", parts.port or (443 if tls else 80), path.encode())

    @property
    def server(self) -> tuple[bool, str, int]:
        return self.tls, self.host, self.port


class Http11Connection:
    """A keep-alive connection to one server: it connects on its first request, serves one exchange at a time,
    and is `reusable` once an exchange ended cleanly on both sides."""

    def __init__(self, server: tuple[bool, str, int], keepalive_s: float, tls: ssl.SSLContext | None) -> None:
        self._server = server
        self._keepalive_s = keepalive_s
        self._tls = tls
        self._stream: trio.abc.Stream | None = None
        self._socket: trio.socket.SocketType | None = None
        self._h11 = h11.Connection(h11.CLIENT)
        self._body_done = False
        self._idle_since = trio.current_time()
        self.closed = False

    async def request(
        self, target: Target, headers: list[tuple[bytes, bytes]], body: bytes, connect_timeout_s: float
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Send a POST of `body` and wait for the response head: (status, headers with lowercase names)."""
        if self._stream is None:
            await self._connect(connect_timeout_s)
        assert self._stream is not None
        self._body_done = False
        request = h11.Request(method=b"POST", target=target.path, headers=headers)
        try:
            data = self._h11.send(request) + self._h11.send(h11.Data(data=body)) + self._h11.send(h11.EndOfMessage())
            await self._stream.send_all(data)
            while True:
                event = await self._next_event()
                if isinstance(event, h11.Response):
                    return event.status_code, list(event.headers)
                # (an InformationalResponse, such as 100 Continue, is skipped)
        except h11.ProtocolError as exc:
            raise ConnectionDropped(f"invalid HTTP from the upstream ({exc})") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionDropped(_why(exc)) from None

    async def receive_body(self) -> bytes | None:
        """All the body that has arrived (waiting only when none has), or None after its end."""
        if self._body_done:
            return None
        pieces: list[bytes] = []
        try:
            while True:
                event = self._h11.next_event()
                if event is h11.NEED_DATA:
                    if pieces:
                        break
                    assert self._stream is not None
                    self._h11.receive_data(await self._stream.receive_some(RECEIVE_SIZE))
                elif isinstance(event, h11.Data):
                    pieces.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    self._body_done = True
                    break
        except h11.ProtocolError as exc:
            raise ConnectionDropped(_dropped_message(exc)) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionDropped(_why(exc)) from None
        if not pieces:
            return None
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def read_to_end(self, within_s: float) -> None:
        """Read what is left of the body (dropped) for up to `within_s`: an answer complete at its last event, whose
        framing's end has not arrived yet. Anything that fails here only means the connection is not reused."""
        with trio.move_on_after(within_s):
            try:
                while await self.receive_body() is not None:
                    pass
            except ConnectionDropped:
                pass

    def finish_exchange(self) -> bool:
        """The exchange is over: ready the connection for the next one. False when it cannot be reused (the body
        was not read to its end, or either side asked to close); the caller then closes it."""
        if not self._body_done:
            try:  # its end may have arrived with the last events read
                while isinstance(event := self._h11.next_event(), h11.Data):
                    pass
            except h11.ProtocolError:
                return False
            self._body_done = isinstance(event, h11.EndOfMessage)
        if not self._body_done or self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
            return False
        self._h11.start_next_cycle()
        self._idle_since = trio.current_time()
        return True

    def expired(self) -> bool:
        """Idle past its keep-alive, or unusable: the server closed it (or sent something) while it was idle."""
        if self.closed or trio.current_time() - self._idle_since > self._keepalive_s:
            return True
        return self._socket is not None and self._socket.is_readable()

    async def aclose(self) -> None:
        self.closed = True
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await trio.aclose_forcefully(stream)

    async def _connect(self, timeout_s: float) -> None:
        tls, host, port = self._server
        try:
            with trio.fail_after(timeout_s):
                tcp = await trio.open_tcp_stream(host, port)
                stream: trio.abc.Stream = tcp
                if tls:
                    assert self._tls is not None
                    stream = trio.SSLStream(tcp, self._tls, server_hostname=host, https_compatible=True)
                    await stream.do_handshake()
        except trio.TooSlowError:
            raise ConnectFailed(f"no connection within {timeout_s:g} s") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise ConnectFailed(_why(exc)) from None
        self._stream, self._socket = stream, tcp.socket

    async def _next_event(self) -> h11.Event | type[h11.NEED_DATA]:
        assert self._stream is not None
        while (event := self._h11.next_event()) is h11.NEED_DATA:
            self._h11.receive_data(await self._stream.receive_some(RECEIVE_SIZE))
        return event


def _dropped_message(exc: h11.ProtocolError) -> str:
    text = str(exc)
    return "the upstream closed the connection" if "peer closed" in text else f"invalid HTTP from the upstream ({text})"


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__
