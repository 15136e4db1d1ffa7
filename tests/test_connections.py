"""Client connections at the HTTP level, as an operator exposing QueueGate to a team meets them: connections that must
close, keep-alive connections that must stay usable, framing that must not be trusted.

The client is a raw socket driven by h11 (the HTTP/1.1 state machine), because these cases are about the bytes on one
connection, which the `openai` client and httpx hide.
"""

from __future__ import annotations

import json
import subprocess

import h11
import httpx
import pytest
import trio

from tests.helpers import wait_until


class RawClient:
    """One HTTP/1.1 connection; sends requests and reads whole responses, and tells when the server closed it."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, base_url: str) -> RawClient:
        host, port = base_url.removeprefix("http://").rsplit(":", 1)
        return cls(await trio.open_tcp_stream(host, int(port)))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(self, method: str, path: str, body: bytes = b"", headers: list | None = None) -> None:
        all_headers = [("host", "queuegate"), ("content-length", str(len(body))), *(headers or [])]
        data = self.conn.send(h11.Request(method=method, target=path, headers=all_headers))
        data += self.conn.send(h11.Data(data=body)) if body else b""
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def response(self, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
        """The next whole response: (status, headers, body)."""
        status, headers, body = 0, {}, b""
        with trio.fail_after(timeout):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                        self.conn.start_next_cycle()
                    return status, headers, body
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("closed before a response")

    async def closed_by_server(self, within: float) -> bool:
        """Whether the server closes the connection within `within` seconds (what else it sends is read and
        dropped)."""
        with trio.move_on_after(within):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
            return True
        return False

    async def read_until_closed(self, timeout: float) -> bytes:
        """Everything the server sends until it closes the connection (TooSlowError if it does not in time)."""
        received = b""
        with trio.fail_after(timeout):
            while chunk := await self.stream.receive_some(65536):
                received += chunk
        return received

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_connection_close_and_http_1_0_are_closed_after_the_response(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}})
    client = await RawClient.connect(gw.base_url)
    await client.request("GET", "/healthz", headers=[("connection", "close")])
    assert (await client.response())[0] == 200
    assert await client.closed_by_server(within=2)

    old = await RawClient.connect(gw.base_url)
    await old.send_raw(b"GET /healthz HTTP/1.0\r\n\r\n")
    reply = await old.read_until_closed(timeout=2)
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"status":"ok"}')  # and then closed


async def test_streams_are_well_framed_back_to_back_on_one_connection_and_for_http_1_0(start_sim, start_gateway):
    # The relay writes a stream's events as HTTP/1.1 chunks itself: h11 on the client side checks every chunk, and
    # the connection must carry the next request after the last one.
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}})
    body = json.dumps({"model": "m", "stream": True, "max_tokens": 30, "messages": [{"role": "user", "content": "x"}]})
    client = await RawClient.connect(gw.base_url)
    for _ in range(3):
        await client.request("POST", "/v1/chat/completions", body.encode(), [("content-type", "application/json")])
        status, headers, received = await client.response()
        assert status == 200 and "content-length" not in headers
        events = [e for e in received.decode().split("\n\n") if e]
        assert len(events) == 32 and events[-1] == "data: [DONE]"  # 30 tokens, the finish, [DONE]
    await client.aclose()

    old = await RawClient.connect(gw.base_url)
    request = f"POST /v1/chat/completions HTTP/1.0\r\ncontent-length: {len(body)}\r\n\r\n{body}"
    await old.send_raw(request.encode())
    reply = await old.read_until_closed(timeout=5)  # no chunks for HTTP/1.0: the body ends with the connection
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert rest.startswith(b"data: {") and rest.endswith(b"data: [DONE]\n\n")


async def test_idle_keep_alive_connections_are_closed_after_the_keep_alive_timeout(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}}, server={"keepalive_s": 0.5})
    clients = []
    for _ in range(200):
        client = await RawClient.connect(gw.base_url)
        await client.request("GET", "/healthz")
        assert (await client.response())[0] == 200
        clients.append(client)
    await wait_until(lambda: not gw.daemon.http.connections, timeout=5)
    for client in clients:
        assert await client.closed_by_server(within=0.1)
        await client.aclose()


async def test_a_keep_alive_connection_stays_usable_after_an_error_answered_to_a_large_body(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}}, keys={"alice": {"key": "sk-alice-secret"}})
    big = b'{"model": "m", "messages": [], "pad": "' + b"x" * 600_000 + b'"}'
    for headers, status in (
        ([("authorization", "Bearer wrong")], 401),
        ([("authorization", "Bearer sk-alice-secret"), ("x-priority", "bogus")], 400),
    ):
        client = await RawClient.connect(gw.base_url)
        for _ in range(3):  # the same connection, again and again
            async with trio.open_nursery() as nursery:  # the client sends while the server may already answer
                nursery.start_soon(client.request, "POST", "/v1/chat/completions", big, headers)
                assert (await client.response())[0] == status
            await client.request("GET", "/healthz")
            assert (await client.response())[0] == 200
        await client.aclose()


async def test_a_request_with_both_content_length_and_transfer_encoding_is_refused_and_the_connection_closed(
    start_sim, start_gateway
):
    sim, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}})
    client = await RawClient.connect(gw.base_url)
    hidden = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
    await client.send_raw(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n" + hidden
    )
    received = await client.read_until_closed(timeout=5)
    assert received.startswith(b"HTTP/1.1 400") and b"both Content-Length and Transfer-Encoding" in received
    assert received.count(b"HTTP/1.1") == 1  # the hidden request was never answered: the connection was closed
    assert sim.stats.requests == 0


async def test_http2_is_served_only_when_configured(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    off = await start_gateway({"m": {"upstreams": [url]}})
    on = await start_gateway({"m": {"upstreams": [url]}}, server={"http2": True})
    async with httpx.AsyncClient(http1=False, http2=True, base_url=on.base_url) as h2:  # prior knowledge
        served = await h2.get("/healthz")
    assert served.http_version == "HTTP/2" and served.json() == {"status": "ok"}
    async with httpx.AsyncClient(http1=False, http2=True, base_url=off.base_url) as h2:
        with pytest.raises(httpx.RemoteProtocolError):  # an HTTP/1.1 505 and a close: no HTTP/2 at all
            await h2.get("/healthz")


async def test_requests_the_http_layer_cannot_read_get_the_envelope_and_a_closed_connection(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}})
    for raw, status, message in (
        (b"GET /healthz HTTP/1.1\r\nhost: x\r\nnot a header\r\n\r\n", 400, "not valid HTTP/1.1"),
        (b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n", 431, "headers are too large"),
    ):
        client = await RawClient.connect(gw.base_url)
        await client.send_raw(raw)
        received = await client.read_until_closed(timeout=5)
        head, body = received.split(b"\r\n\r\n", 1)
        assert head.startswith(f"HTTP/1.1 {status}".encode())
        assert json.loads(body)["error"]["code"] == "bad_http" and message in json.loads(body)["error"]["message"]


async def test_slow_request_bodies_time_out_cleanly_and_the_backlog_is_configured(start_sim, start_gateway, caplog):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}}, server={"body_timeout_s": 0.5, "backlog": 1234})
    port = gw.base_url.rsplit(":", 1)[1]
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True)
    assert listening.stdout.split()[2] == "1234"  # a LISTEN socket's Send-Q is its backlog

    statuses = []

    async def slow_body() -> None:
        client = await RawClient.connect(gw.base_url)
        await client.send_raw(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\n\r\n{"
        )
        statuses.append((await client.response(timeout=10))[0])  # the rest of the body never comes
        await client.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(slow_body)
    assert statuses == [408] * 20
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]  # no traceback, no error


async def test_upgrades_cannot_hold_a_connection_open(start_sim, start_gateway):
    """With HTTP/2 off, an h2c upgrade is answered in HTTP/1.1, the HTTP/2 preface gets 505, and a websocket
    handshake hypercorn rejects by itself (no key) is closed: none of them may keep a connection open with no
    timeout (which a client without a key could repeat until the descriptors run out)."""
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}}, server={"keepalive_s": 30})
    cases = (
        (b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: upgrade, http2-settings\r\nupgrade: h2c\r\n"
         b"http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", b"HTTP/1.1 200", False),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"HTTP/1.1 505", True),
        (b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n", b"HTTP/1.1 4", True),
    )  # fmt: skip
    for raw, answer, closes in cases:
        client = await RawClient.connect(gw.base_url)
        await client.send_raw(raw)
        with trio.fail_after(5):
            received = await client.stream.receive_some(65536)
        assert received.startswith(answer), received
        assert await client.closed_by_server(within=1) is closes, raw
        await client.aclose()
    await wait_until(lambda: not gw.daemon.http.connections, timeout=3)
