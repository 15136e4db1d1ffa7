"""The upstream HTTP/1.1 connection (`proxy/_http11.py`) against a scripted server on a real loopback socket: every
answer framing an OpenAI-compatible server uses, split at every byte boundary, reuse of the connection, and what
must count as a broken answer.

The server is a fake on purpose (a raw socket writing scripted bytes): a real server cannot split its answer at a
chosen byte, nor send the malformed answers these tests need.
"""

from __future__ import annotations

import time
from functools import partial

import httpx
import pytest
import trio

from queuegate.proxy._forwarder import UpstreamConnections
from queuegate.proxy._http11 import ConnectionDropped, Http11Connection, Target
from tests.helpers import in_thread

CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    b'f\r\ndata: {"a":1}\n\n\r\n'
    b'F;ext=1\r\ndata: {"b":2}\n\n\r\n'
    b"e\r\ndata: [DONE]\n\n\r\n"
    b"0\r\nx-trailer: 1\r\n\r\n"
)
CHUNKED_BODY = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
HEADERS = [(b"host", b"upstream"), (b"content-length", b"8")]
SIZED = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'


class ScriptedServer:
    """Answers each request on a connection with the next script: a list of byte strings, written one by one with a
    pause between them (so the client reads them apart); a number in the list is a longer pause, `None` closes the
    connection there. `early`: it answers once it has the request's head, reading none of its body."""

    def __init__(self, scripts: list[list[bytes | float | None]], *, early: bool = False) -> None:
        self.scripts = scripts
        self.early = early
        self.requests: list[bytes] = []
        self.connections = 0

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        while self.scripts:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0 if self.early else int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(buffer) < length:
                buffer += await stream.receive_some(65536)
            self.requests.append(head + b"\r\n\r\n" + buffer[:length])
            buffer = buffer[length:]
            for piece in self.scripts.pop(0):
                if piece is None:
                    await stream.aclose()
                    return
                if isinstance(piece, float):
                    await trio.sleep(piece)
                    continue
                await stream.send_all(piece)
                await trio.sleep(0.005)


@pytest.fixture
async def serve(nursery):
    async def start(scripts: list[list[bytes | None]]) -> tuple[ScriptedServer, Http11Connection, Target]:
        server = ScriptedServer(scripts)
        (listener,) = await nursery.start(partial(trio.serve_tcp, server.serve, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        target = Target.of(f"http://127.0.0.1:{port}/v1/chat/completions")
        return server, Http11Connection(target.server, 30.0, None), target

    return start


async def exchange(connection: Http11Connection, target: Target) -> tuple[int, dict[bytes, bytes], list[bytes]]:
    status, headers = await connection.request(target, HEADERS, b'{"x": 1}', 5.0)
    reads = []
    while (data := await connection.receive_body()) is not None:
        reads.append(data)
    return status, dict(headers), reads


def splits(answer: bytes) -> list[list[bytes | None]]:
    """The answer cut in two at every byte."""
    return [[answer[:i], answer[i:]] for i in range(1, len(answer))]


async def test_a_chunked_stream_split_anywhere_reads_whole_and_keeps_its_connection(serve):
    scripts = splits(CHUNKED)
    server, connection, target = await serve(scripts)
    for _ in range(len(scripts)):
        status, headers, reads = await exchange(connection, target)
        assert status == 200 and headers[b"content-type"] == b"text/event-stream"
        assert b"".join(reads) == CHUNKED_BODY
        assert connection.finish_exchange() and not connection.expired()
    assert server.connections == 1  # every answer came on the same connection
    sent = b'POST /v1/chat/completions HTTP/1.1\r\nhost: upstream\r\ncontent-length: 8\r\n\r\n{"x": 1}'
    assert set(server.requests) == {sent}


async def test_events_already_received_come_back_in_one_read(serve):
    _, connection, target = await serve([[CHUNKED]])  # the whole answer in one write
    _, _, reads = await exchange(connection, target)
    assert reads == [CHUNKED_BODY]


async def test_a_sized_answer_split_anywhere_and_an_informational_answer_first(serve):
    scripts = [*splits(SIZED), [b"HTTP/1.1 100 Continue\r\n\r\n", SIZED]]
    _, connection, target = await serve(scripts)
    for _ in range(len(scripts)):
        status, _, reads = await exchange(connection, target)
        assert status == 200 and b"".join(reads) == b'{"ok":true}'
        assert connection.finish_exchange()


async def test_an_answer_ended_by_closing_is_whole_but_its_connection_is_not_reused(serve):
    _, connection, target = await serve([[b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n", b"{}", None]])
    status, _, reads = await exchange(connection, target)
    assert status == 200 and b"".join(reads) == b"{}"
    assert not connection.finish_exchange()


@pytest.mark.parametrize(
    "answer",
    [
        SIZED.replace(b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK\r\nconnection: close"),
        SIZED.replace(b"HTTP/1.1", b"HTTP/1.0"),
        SIZED + b"HTTP/1.1 200 OK\r\n",  # more than its answer
        SIZED.replace(b"content-length: 11", b"content-length: 11\r\ntransfer-encoding: chunked").replace(
            b'{"ok":true}', b'b\r\n{"ok":true}\r\n0\r\n\r\n'
        ),  # framed two ways: not to be trusted with the next answer
    ],
    ids=["connection-close", "http-1.0", "trailing-bytes", "length-and-chunked"],
)
async def test_answers_after_which_the_connection_is_not_reused(serve, answer):
    _, connection, target = await serve([[answer]])
    status, _, reads = await exchange(connection, target)
    assert status == 200 and b"".join(reads) == b'{"ok":true}'
    assert not connection.finish_exchange()


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel", None], "closed the connection"),
        ([SIZED[:-3], None], "closed the connection"),
        ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n"], "bad chunk size"),
        ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0x5\r\nhello\r\n"], "bad chunk size"),
        ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhello\r\n"], "does not end with CRLF"),
        ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"1" * 2000], "line too long"),
    ],
    ids=["eof-mid-chunk", "eof-mid-sized", "bad-size", "0x-size", "overlong-chunk", "endless-size-line"],
)
async def test_broken_bodies_are_a_dropped_connection(serve, answer, why):
    _, connection, target = await serve([answer])
    with pytest.raises(ConnectionDropped, match=why):
        await exchange(connection, target)
    assert not connection.finish_exchange()


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"HTCPCP/1.0 418 teapot\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nx-a: 1\nx-b: 2\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 000 zero\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\n" + b"x-big: " + b"y" * 70000, "headers too large"),
        (b"", "closed the connection"),
    ],
    ids=["not-http", "bad-code", "folded", "no-colon", "bare-lf", "status-0", "two-lengths", "endless-head", "nothing"],
)
async def test_broken_heads_are_a_dropped_connection(serve, answer, why):
    _, connection, target = await serve([[answer, None]])
    with pytest.raises(ConnectionDropped, match=why):
        await connection.request(target, HEADERS, b'{"x": 1}', 5.0)


async def test_the_pool_closes_idle_connections_a_stopped_server_closed_on_anyone_s_next_request(serve):
    # (a swapped-out model's server closes its connections: they must not sit in CLOSE-WAIT until it is back)
    _, _, target = await serve([[SIZED, None]])
    _, _, other_target = await serve([[SIZED]])
    pool = UpstreamConnections(keepalive_expiry_s=0.1, max_idle_per_upstream=4)
    connection, _ = await pool.checkout(target.server)
    await exchange(connection, target)
    await pool.checkin(target.server, connection)
    assert not connection.closed
    await trio.sleep(0.2)
    await pool.checkout(other_target.server)  # a request for another server
    assert connection.closed


async def test_an_idle_connection_the_server_closed_is_expired(serve):
    _, connection, target = await serve([[SIZED, None]])
    await exchange(connection, target)
    assert connection.finish_exchange()
    await trio.sleep(0.05)  # the server closes it while it is idle
    assert connection.expired()


# -- through the gateway ------------------------------------------------------------------------------------------


@pytest.fixture
async def gateway_before(nursery, start_gateway):
    """A gateway whose model `m` is served by a scripted server (no health checks: every request it gets is one
    the gateway forwards)."""

    async def start(scripts: list[list[bytes | float | None]], **options) -> tuple[ScriptedServer, str]:
        server = ScriptedServer(scripts, **options)
        (listener,) = await nursery.start(partial(trio.serve_tcp, server.serve, 0, host="127.0.0.1"))
        url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}/v1"
        gw = await start_gateway({"m": {"upstreams": [url], "health_path": ""}}, server={"max_body_mb": 64})
        return server, gw.base_url

    return start


def post(base_url: str, body: bytes, **kwargs) -> httpx.Response:
    return httpx.post(base_url + "/v1/chat/completions", content=body, timeout=10, **kwargs)


CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


async def test_an_upstream_answering_204_gets_the_client_an_error_not_a_hang(gateway_before):
    _, base_url = await gateway_before([[b"HTTP/1.1 204 No Content\r\n\r\n"]])
    answer = await in_thread(lambda: post(base_url, CHAT))
    assert answer.status_code == 502 and "answered 204" in answer.json()["error"]["message"]


async def test_the_last_event_is_not_held_back_for_the_end_of_the_upstreams_framing(gateway_before):
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}\n\n'
    done = b"data: [DONE]\n\n"
    chunk = b"%x\r\n%b\r\n"
    script = [head, chunk % (len(event), event), chunk % (len(done), done), 2.0, b"0\r\n\r\n"]
    _, base_url = await gateway_before([script])
    stream = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'

    def read_until_done() -> float:
        started = time.monotonic()
        with httpx.stream("POST", base_url + "/v1/chat/completions", content=stream, timeout=10) as answer:
            for line in answer.iter_lines():
                if line == "data: [DONE]":
                    return time.monotonic() - started
        raise AssertionError("no [DONE]")

    assert await in_thread(read_until_done) < 1.0  # the upstream's last chunk comes 2 s after it


async def test_an_upstream_refusing_a_large_body_before_reading_it_is_passed_on(gateway_before):
    refusal = b'{"error": {"message": "too large", "type": "invalid_request_error"}}'
    answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%b"
    _, base_url = await gateway_before([[answer % (len(refusal), refusal), None]], early=True)
    large = CHAT.replace(b'"hi"', b'"' + b"x" * (32 * 2**20) + b'"')
    reply = await in_thread(lambda: post(base_url, large))
    assert reply.status_code == 413 and reply.json()["error"]["message"] == "too large"
