"""One HTTP/1.1 client connection to an upstream over a trio stream (TCP, or TLS for `https`): the subset of the
protocol a POST to an OpenAI-compatible server needs, and no more.

Why not httpcore or h11 here: every streamed event crossed their layers one body chunk (one event object, one state
transition) at a time, even when many events were already in the socket buffer, and that was the largest cost of
relaying a stream. Here one read decodes all the body it holds (`receive_body`: the events already there go out to
the client as one write), and a stream read to its end keeps its connection for the next request.

The response is read strictly: a status line, header lines (no folding), a body framed by Content-Length, chunked
encoding, or the connection's end. Anything else is `ConnectionDropped` ("invalid HTTP"), like a connection the
upstream closed mid-answer; `ConnectFailed` means nothing was sent.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

RECEIVE_SIZE = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # a response's status line and headers
MAX_CHUNK_LINE = 1024  # a chunk-size line (with its extensions)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a header name
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # no header value may hold these (a tab may)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


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


class _Body:
    """How a response's body ends: after `length` bytes, at the last chunk (`chunked`), or at the connection's end
    (`length` None, not chunked)."""

    def __init__(self, length: int | None, chunked: bool) -> None:
        self.chunked = chunked
        self.left = length  # bytes of the body (or of the current chunk) still to come
        self.crlf_due = False  # a chunk's data ended: its CRLF comes next
        self.trailers = False  # the last chunk came: trailer lines, then an empty line
        self.done = length == 0 and not chunked

    @property
    def ends_at_close(self) -> bool:
        return self.left is None and not self.chunked


class Http11Connection:
    """A keep-alive connection to one server: it connects on its first request, serves one exchange at a time,
    and can be reused (`finish_exchange`) once an exchange ended cleanly on both sides."""

    def __init__(self, server: tuple[bool, str, int], keepalive_s: float, tls: ssl.SSLContext | None) -> None:
        self._server = server
        self._keepalive_s = keepalive_s
        self._tls = tls
        self._stream: trio.abc.Stream | None = None
        self._socket: trio.socket.SocketType | None = None
        self._buffer = bytearray()
        self._body = _Body(0, False)
        self._keep_alive = False  # the response allows the connection to be reused
        self._idle_since = trio.current_time()
        self.closed = False

    async def request(
        self, target: Target, headers: list[tuple[bytes, bytes]], body: bytes, connect_timeout_s: float
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Send a POST of `body` and wait for the response head: (status, headers with lowercase names)."""
        if self._stream is None:
            await self._connect(connect_timeout_s)
        assert self._stream is not None
        head = b"".join([b"POST ", target.path, b" HTTP/1.1\r\n", *(n + b": " + v + b"\r\n" for n, v in headers)])
        try:
            await self._stream.send_all(head + b"\r\n" + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # It may have answered (a 413, say) and closed before reading all of the request: read that answer.
            try:
                answer = await self._response_head()
            except ConnectionDropped:
                raise ConnectionDropped(_why(exc)) from None
            self._keep_alive = False  # (whatever its head says: the rest of the request was never sent)
            return answer
        return await self._response_head()

    async def receive_body(self) -> bytes | None:
        """All the body that has arrived (waiting only when none has), or None after its end."""
        body = self._body
        while not body.done:
            if self._buffer:
                data = self._decode()
                if data or body.done:
                    return data or None
            await self._fill(eof_ends_body=body.ends_at_close)
        return None

    async def read_to_end(self, within_s: float) -> None:
        """Read what is left of the body (dropped) for up to `within_s`: an answer complete at its last event, whose
        framing's end has not arrived yet. Anything that fails here only means the connection is not reused (and
        one that could not be reused anyway is not waited for)."""
        body = self._body
        if not self._keep_alive or body.ends_at_close:
            return
        with trio.move_on_after(within_s):
            try:
                while await self.receive_body() is not None:
                    pass
            except ConnectionDropped:
                pass

    def finish_exchange(self) -> bool:
        """The exchange is over: ready the connection for the next one. False when it cannot be reused (the body
        was not read to its end, the upstream asked to close, or sent more than its answer); the caller then
        closes it."""
        if not self._body.done and self._buffer:
            try:
                self._decode()  # its end may have arrived with the last events read
            except ConnectionDropped:
                return False
        if not (self._body.done and self._keep_alive) or self._buffer:
            return False
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

    async def _fill(self, *, eof_ends_body: bool = False) -> None:
        """Read more into the buffer. The connection's end is the body's end when the body has no other framing;
        anywhere else it is the upstream dropping the connection."""
        assert self._stream is not None
        try:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionDropped(_why(exc)) from None
        if not data:
            if eof_ends_body:
                self._body.done = True
                self._keep_alive = False
                return
            raise ConnectionDropped("the upstream closed the connection")
        self._buffer += data

    async def _response_head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The final response's head (an informational answer such as 100 Continue is skipped)."""
        while True:
            status, headers = await self._read_head()
            if status >= 200:
                return status, headers

    async def _read_head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Read and parse a response's status line and headers; set how its body ends."""
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise _invalid("response headers too large")
            await self._fill()
        lines = bytes(self._buffer[:end]).split(b"\r\n")
        del self._buffer[: end + 4]
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        code_ok = len(code) == 3 and code.isdigit() and code[:1] != b"0" and rest[3:4] in (b"", b" ")
        if version not in (b"HTTP/1.0", b"HTTP/1.1") or not code_ok:
            raise _invalid(f"bad status line {lines[0][:80]!r}")
        status = int(code)
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name) or _CONTROL.search(value):
                raise _invalid(f"bad header line {line[:80]!r}")
            headers.append((name.lower(), value.strip()))
        self._frame(version, status, headers)
        return status, headers

    def _frame(self, version: bytes, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """How the body of this response ends, and whether the connection may be reused after it."""
        connection = b",".join(v for n, v in headers if n == b"connection").lower()
        self._keep_alive = b"close" not in connection and (version == b"HTTP/1.1" or b"keep-alive" in connection)
        if status < 200 or status in (204, 304):
            self._body = _Body(0, False)
            return
        encodings = b",".join(v for n, v in headers if n == b"transfer-encoding").lower()
        lengths = {v for n, v in headers if n == b"content-length"}
        if encodings:
            chunked = encodings.rsplit(b",", 1)[-1].strip() == b"chunked"
            self._body = _Body(None, chunked)
            if lengths or version != b"HTTP/1.1" or not chunked:  # (framing to distrust: no reuse after it)
                self._keep_alive = False
            return
        if not lengths:
            self._body = _Body(None, False)
            return
        (length,) = lengths if len(lengths) == 1 else (b"",)
        if not length.isdigit():
            raise _invalid("bad Content-Length")
        self._body = _Body(int(length), False)

    def _decode(self) -> bytes:
        """Take the body bytes the buffer holds (unframing chunks), up to the body's end."""
        body, buffer = self._body, self._buffer
        if not body.chunked:
            take = len(buffer) if body.left is None else min(body.left, len(buffer))
            data = bytes(buffer[:take])
            del buffer[:take]
            if body.left is not None:
                body.left -= take
                body.done = body.left == 0
            return data
        pieces = []
        at = 0
        while not body.done:
            if body.left:  # inside a chunk's data
                take = min(body.left, len(buffer) - at)
                if not take:
                    break
                pieces.append(buffer[at : at + take])
                at += take
                body.left -= take
                body.crlf_due = body.left == 0
                continue
            if body.crlf_due:
                if len(buffer) - at < 2:
                    break
                if buffer[at : at + 2] != b"\r\n":
                    raise _invalid("a chunk does not end with CRLF")
                at += 2
                body.crlf_due = False
                continue
            end = buffer.find(b"\r\n", at)
            if end < 0:
                if len(buffer) - at > MAX_CHUNK_LINE:
                    raise _invalid("a chunk-size or trailer line too long")
                break
            line = bytes(buffer[at:end])
            at = end + 2
            if body.trailers:
                body.done = not line  # (trailer fields are dropped)
                continue
            size = line.split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size):
                raise _invalid(f"bad chunk size {size[:20]!r}")
            body.left = int(size, 16)
            body.trailers = body.left == 0
        data = b"".join(pieces)
        del buffer[:at]
        return data


def _invalid(why: str) -> ConnectionDropped:
    return ConnectionDropped(f"invalid HTTP from the upstream ({why})")


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__
