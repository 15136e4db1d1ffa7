"""The gateway end to end with the official `openai` client, against simulated upstreams.

The upstreams are `queuegate.sim` servers: real HTTP servers on loopback ports, used instead of llama-server where
the behaviour needs timing or faults on demand (hang, die mid-stream, garbage, 5xx). tests/test_llama_e2e.py runs
the same client paths against a real llama-server.
"""

from __future__ import annotations

import json
import time
from functools import partial

import httpx
import openai
import pytest
import trio

from queuegate.sim import SimConfig, Simulator
from tests.helpers import chat, in_thread, request_lines, wait_until


async def test_non_stream_chat_rewrites_model_merges_defaults_and_forwards_unknown_fields(start_sim, start_gateway):
    sim, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway(
        {
            "m": {
                "upstreams": [url],
                "kind": "llamacpp",
                "upstream_model": "big-model-q4",
                "aliases": ["coder"],
                "defaults": {"temperature": 0.2, "top_p": 0.9},
            }
        }
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "look"}, image]}]
    raw = await in_thread(
        lambda: gw.client().chat.completions.with_raw_response.create(
            model="coder",
            messages=messages,
            temperature=0.9,
            max_tokens=5,
            tools=tools,
            response_format={"type": "json_object"},
            extra_body={"cache_prompt": True},
        )
    )
    completion = raw.parse()
    assert raw.headers["x-request-id"].startswith("qg-")
    assert completion.model == "big-model-q4"
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    sent = sim.stats.received[-1].body
    assert sent["model"] == "big-model-q4"
    assert sent["temperature"] == 0.9 and sent["top_p"] == 0.9  # client wins, defaults fill the rest
    assert sent["tools"] == tools and sent["response_format"] == {"type": "json_object"}
    assert sent["messages"] == messages and sent["cache_prompt"] is True


async def test_stream_is_passed_through_as_it_is_generated(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=20)
    gw = await start_gateway({"m": {"upstreams": [url]}})

    def consume():
        started = time.monotonic()
        arrivals, text = [], []
        for chunk in chat(gw.client(), stream=True, max_tokens=10):
            arrivals.append(time.monotonic() - started)
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
        return arrivals, "".join(text)

    arrivals, text = await in_thread(consume)
    assert text
    # Ten tokens at 20 tok/s take ~0.5 s: the first chunk must arrive long before the last (no buffering).
    assert arrivals[-1] >= 0.4
    assert arrivals[0] < arrivals[-1] - 0.3


async def test_completions_embeddings_and_models(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0, embedding_dim=8)
    gw = await start_gateway(
        {"m": {"upstreams": [url], "aliases": ["planner"]}, "e": {"upstreams": [url], "kind": "vllm"}},
        server={"owned_by": "homelab"},
    )
    client = gw.client()
    completion = await in_thread(lambda: client.completions.create(model="m", prompt="once upon", max_tokens=3))
    assert completion.choices[0].text
    streamed = await in_thread(
        lambda: [
            c.choices[0].text
            for c in client.completions.create(model="m", prompt="x", max_tokens=3, stream=True)
            if c.choices
        ]
    )
    assert "".join(streamed)
    vectors = await in_thread(lambda: client.embeddings.create(model="e", input=["a", "b"]))
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 8
    models = await in_thread(lambda: list(client.models.list()))
    assert [m.id for m in models] == ["m", "e", "planner"]
    assert {m.owned_by for m in models} == {"homelab"}
    # One model, or an alias, by its id (client.models.retrieve); an unknown one is 404 in OpenAI's terms.
    one = await in_thread(lambda: client.models.retrieve("planner"))
    assert (one.id, one.owned_by, one.model_extra["alias_for"]) == ("planner", "homelab", "m")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await in_thread(lambda: client.models.retrieve("org/nope"))


@pytest.mark.parametrize(
    ("body", "status", "exc", "needle"),
    [
        (b"{not json", 400, openai.BadRequestError, "not valid JSON"),
        (b"", 400, openai.BadRequestError, "the request body is empty"),
        (b'{"model": "m"}', 400, openai.BadRequestError, "messages"),
        (b'{"model": "nope", "messages": []}', 404, openai.NotFoundError, "Available models: m, e"),
        (
            b'{"model": "e", "messages": []}',
            501,
            openai.APIStatusError,
            "does not serve /v1/chat/completions; it serves /v1/embeddings",
        ),
    ],
)
async def test_client_errors_use_the_openai_envelope(start_sim, start_gateway, body, status, exc, needle):
    _, url = await start_sim()
    gw = await start_gateway({"m": {"upstreams": [url]}, "e": {"upstreams": [url], "endpoints": ["embeddings"]}})
    async with httpx.AsyncClient() as http:
        response = await http.post(gw.api + "/chat/completions", content=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and needle in error["message"]
    if body.startswith(b'{"model'):
        # The same error through the official client raises the exception class it uses for that status.
        with pytest.raises(exc) as info:
            await in_thread(lambda: gw.client().post("/chat/completions", body=json.loads(body), cast_to=object))
        assert info.value.status_code == status


async def test_oversized_body_is_413_and_daemon_keeps_serving(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}}, server={"max_body_mb": 0.01})
    big = "x" * 20_000
    with pytest.raises(openai.APIStatusError) as info:
        await in_thread(lambda: chat(gw.client(), max_tokens=1, extra_body={"pad": big}))
    assert info.value.status_code == 413
    assert (await in_thread(lambda: chat(gw.client(), max_tokens=1))).choices


@pytest.mark.parametrize(
    ("fault", "status", "exc"),
    [
        ("status_500", 502, openai.InternalServerError),
        ("garbage", 502, openai.InternalServerError),
        ("close_before_response", 502, openai.InternalServerError),
    ],
)
async def test_upstream_failures_map_to_502(start_sim, start_gateway, fault, status, exc):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}})
    for stream in (False, True):
        with pytest.raises(exc) as info:
            await in_thread(partial(chat, gw.client(), stream=stream, max_tokens=2, extra_body={"sim_fault": fault}))
        assert info.value.status_code == status
    assert (await in_thread(lambda: chat(gw.client(), max_tokens=2))).choices  # still serving


async def test_upstream_hang_is_504_after_first_byte_timeout(start_sim, start_gateway):
    sim, url = await start_sim()
    gw = await start_gateway({"m": {"upstreams": [url]}}, upstream={"first_byte_timeout_s": 0.3})
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        await in_thread(lambda: chat(gw.client(), extra_body={"sim_fault": "hang"}))
    assert info.value.status_code == 504 and 0.3 <= time.monotonic() - started < 2
    await wait_until(lambda: sim.stats.active == 0)  # the hung upstream request was closed
    assert gw.stats().in_service == 0


async def test_failure_after_first_byte_ends_stream_with_error_event(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=100)
    gw = await start_gateway({"m": {"upstreams": [url]}, "n": {"upstreams": [url]}}, upstream={"idle_timeout_s": 0.3})

    def consume(fault):
        got = []
        with pytest.raises(openai.APIError) as info:
            for chunk in chat(gw.client(), stream=True, max_tokens=20, extra_body={"sim_fault": fault}):
                got.append(chunk)
        return got, info.value

    got, error = await in_thread(lambda: consume("die_mid_stream"))
    assert got and "dropped the connection" in error.message
    got, error = await in_thread(lambda: consume("hang_after_first"))
    assert got and "stalled" in error.message
    assert gw.stats().in_service == 0


async def test_5xx_and_connect_failures_retry_on_another_upstream(start_sim, start_gateway, nursery):
    bad, bad_url = await start_sim(tokens_per_s=0)
    _, good_url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [bad_url, good_url], "max_concurrency": 1}})
    bad.set_fault("status_500")
    for i in range(3):
        assert (await in_thread(lambda i=i: chat(gw.client(), content=f"chat {i}", max_tokens=1))).choices
    assert bad.stats.requests >= 1  # it was tried, failed with 500, and the request went on to the other one

    # An upstream that dies (connection refused) is retried elsewhere and taken out at once.
    dying_scope = trio.CancelScope()

    async def run_dying(task_status=trio.TASK_STATUS_IGNORED):
        with dying_scope:
            await Simulator(SimConfig(tokens_per_s=0)).run(task_status=task_status)

    dying_url = await nursery.start(run_dying)
    gw2 = await start_gateway({"m": {"upstreams": [good_url, dying_url]}}, upstream={"health_interval_s": 30})
    assert [u.state for u in gw2.stats().models[0].upstreams] == ["ready", "ready"]
    dying_scope.cancel()
    await trio.sleep(0.05)
    # Three different chats (the same chat would stick to the upstream that served it first).
    answers = [await in_thread(lambda i=i: chat(gw2.client(), content=f"chat {i}", max_tokens=1)) for i in range(3)]
    assert all(a.choices for a in answers)
    assert gw2.stats().models[0].upstreams[1].state == "down"


async def test_health_monitor_takes_upstream_out_and_back(start_sim, start_gateway):
    sim, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url], "kind": "llamacpp"}})
    async with httpx.AsyncClient() as http:
        assert (await http.get(gw.base_url + "/readyz")).status_code == 200
        sim.set_fault(None, health_status=500)
        await wait_until(lambda: gw.stats().models[0].upstreams[0].state == "down")
        ready = await http.get(gw.base_url + "/readyz")
        assert ready.status_code == 503 and "health answered 500" in ready.json()["models"][0]["reason"]
        with pytest.raises(openai.InternalServerError) as info:
            await in_thread(lambda: chat(gw.client(), max_tokens=1))
        assert info.value.status_code == 503 and info.value.response.headers["retry-after"]
        sim.set_fault(None, health_status=503)  # llama-server's "Loading model"
        await wait_until(lambda: gw.stats().models[0].upstreams[0].state == "loading")
        sim.set_fault(None, health_status=None)
        await wait_until(lambda: gw.stats().models[0].upstreams[0].state == "ready", timeout=3)
        assert (await http.get(gw.base_url + "/readyz")).status_code == 200


async def test_requests_wait_for_a_loading_upstream(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0, load_time_s=0.8)
    gw = await start_gateway({"m": {"upstreams": [url], "kind": "llamacpp"}})
    assert gw.stats().models[0].upstreams[0].state == "loading"
    started = time.monotonic()
    answer = await in_thread(lambda: chat(gw.client(), max_tokens=1))
    assert answer.choices and time.monotonic() - started >= 0.3


async def test_bounded_queue_429_and_max_wait_503(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=5)
    gw = await start_gateway(
        {"m": {"upstreams": [url], "max_concurrency": 1}}, queue={"max_size": 1, "max_wait_s": 0.5}
    )

    async def times_out() -> None:
        with pytest.raises(openai.InternalServerError) as waited:
            await in_thread(lambda: chat(gw.client(), max_tokens=1))
        assert waited.value.status_code == 503 and "waited 0.5 s in the queue" in waited.value.message

    async with trio.open_nursery() as nursery:  # waits for the slot holder, so no request outlives the gateway
        nursery.start_soon(in_thread, lambda: chat(gw.client(), max_tokens=10))  # holds the slot ~2 s
        await wait_until(lambda: gw.stats().in_service == 1)
        nursery.start_soon(times_out)
        await wait_until(lambda: gw.stats().waiting == 1)
        with pytest.raises(openai.RateLimitError) as full:
            await in_thread(lambda: chat(gw.client(), max_tokens=1))
        assert full.value.response.headers["retry-after"] == "1"
        assert "queue is full" in full.value.message
        await wait_until(lambda: gw.stats().waiting == 0, timeout=2)  # the waiter timed out (503) and left


async def test_client_disconnect_closes_upstream_promptly(start_sim, start_gateway):
    """For streaming and non-streaming requests the upstream sees the close within 100 ms."""
    sim, url = await start_sim(tokens_per_s=10)
    gw = await start_gateway({"m": {"upstreams": [url]}})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    async with httpx.AsyncClient(timeout=10) as http:
        for stream in (True, False):
            before = sim.stats.disconnects
            with trio.move_on_after(0.5):
                async with http.stream("POST", gw.api + "/chat/completions", json={**body, "stream": stream}) as r:
                    async for _ in r.aiter_raw():
                        pass
            closed_at = time.monotonic()
            await wait_until(lambda: sim.stats.disconnects > before, timeout=1)  # noqa: B023
            assert sim.stats.disconnect_times[-1] - closed_at < 0.1
            await wait_until(lambda: gw.stats().in_service == 0, timeout=1)


async def test_disconnect_while_queued_never_reaches_upstream(start_sim, start_gateway):
    sim, url = await start_sim(tokens_per_s=20)
    gw = await start_gateway({"m": {"upstreams": [url], "max_concurrency": 1}})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    holder_status = []

    async def hold_the_only_slot():
        async with httpx.AsyncClient(timeout=10) as http:
            holder_status.append((await http.post(gw.api + "/chat/completions", json=body)).status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold_the_only_slot)
        await wait_until(lambda: gw.stats().in_service == 1)
        async with httpx.AsyncClient(timeout=10) as http:
            with trio.move_on_after(0.2):
                await http.post(gw.api + "/chat/completions", json=body)  # queued, then abandoned
        await wait_until(lambda: gw.stats().waiting == 0, timeout=1)
    assert holder_status == [200]
    assert sim.stats.requests == 1


async def test_request_log_line(start_sim, start_gateway, caplog):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}})
    caplog.set_level("INFO", logger="queuegate")
    await in_thread(lambda: chat(gw.client(), max_tokens=3, extra_headers={"X-Request-Id": "trace-42"}))
    await in_thread(lambda: list(chat(gw.client(), max_tokens=3, stream=True, stream_options={"include_usage": True})))

    # A stream's line is written when the gateway closes it, which may be just after the client read the last byte.
    await wait_until(lambda: len(request_lines(caplog)) == 2)
    lines = request_lines(caplog)
    assert lines[0]["rid"] == "trace-42"
    for line in lines:
        assert line["model"] == "m" and line["upstream"] == "m#0" and line["status"] == 200
        assert line["completion_tokens"] == 3 and 0 <= line["queue_ms"] <= line["duration_ms"]
    assert [line["stream"] for line in lines] == [False, True]


async def test_reused_connection_closed_by_upstream_is_retried_on_a_fresh_one(start_gateway, nursery):
    """A fake upstream (raw sockets) that answers only the first request on each connection and drops any later one,
    as a server does when its keep-alive timeout fires while our request is on the wire. Not a failure of the
    upstream: the request goes out again on a fresh connection and the upstream stays in service."""
    answered, dropped = [], []
    completion = json.dumps(
        {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [], "usage": None}
    ).encode()

    async def one_answer_per_connection(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
        while len(rest) < int(lengths[0] if lengths else 0):
            rest += await stream.receive_some(65536)
        if head.startswith(b"POST"):
            answered.append(1)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(completion)
            + completion
        )
        if await stream.receive_some(65536):  # the next request on this kept-alive connection
            dropped.append(1)
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, one_answer_per_connection, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    gw = await start_gateway({"m": {"upstreams": [f"http://127.0.0.1:{port}/v1"]}}, upstream={"health_interval_s": 30})
    for _ in range(3):
        await in_thread(lambda: chat(gw.client(), max_tokens=1))
    assert len(answered) == 3 and len(dropped) == 2
    assert gw.stats().models[0].upstreams[0].state == "ready"


async def test_stream_usage_is_counted_and_hidden_from_clients_that_did_not_ask(start_sim, start_gateway, caplog):
    caplog.set_level("INFO", logger="queuegate")
    sim, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url], "kind": "llamacpp"}})
    client = gw.client()
    messages = [{"role": "user", "content": "hi"}]
    plain = await in_thread(
        lambda: list(client.chat.completions.create(model="m", messages=messages, max_tokens=5, stream=True))
    )
    assert sim.stats.received[-1].body["stream_options"] == {"include_usage": True}  # asked upstream...
    assert plain and all(c.choices and c.usage is None for c in plain)  # ...and kept from this client
    asked = await in_thread(
        lambda: list(
            client.chat.completions.create(
                model="m", messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True}
            )
        )
    )
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 5  # a client that asked gets it

    def counted() -> list[int]:  # a stream's line is written as the gateway closes it, just after the last byte
        return [r.fields["completion_tokens"] for r in caplog.records if r.getMessage() == "request"]

    await wait_until(lambda: len(counted()) == 2)
    assert counted() == [5, 5]  # both counted


async def test_an_upstream_429_is_waited_out_before_the_client_sees_anything(start_sim, start_gateway):
    sim, url = await start_sim(tokens_per_s=0)  # simulated: a cloud API's own rate limit, Retry-After: 1
    gw = await start_gateway({"m": {"upstreams": [url]}})
    sim.set_fault("status_429")

    async def lift_the_limit() -> None:
        await trio.sleep(1.5)
        sim.set_fault(None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lift_the_limit)
        started = trio.current_time()
        answer = await in_thread(lambda: chat(gw.client(), content="patient", max_tokens=1))
    assert answer.choices and trio.current_time() - started >= 1.5
    assert sim.stats.requests == 3  # 429, 429 (each waited 1 s), then served

    sim.set_fault("status_429")  # a limit that does not lift: after three waits the client gets the 429
    with pytest.raises(openai.RateLimitError) as info:
        await in_thread(lambda: chat(gw.client(), content="gives up", max_tokens=1))
    assert info.value.response.headers["retry-after"] == "1"
    assert sim.stats.requests == 3 + 4


async def test_the_session_route_names_the_flow(start_sim, start_gateway, caplog):
    caplog.set_level("INFO", logger="queuegate")
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}})
    session_client = openai.OpenAI(base_url=gw.api + "/session/research-42", api_key="unused", max_retries=0)
    answer = await in_thread(lambda: chat(session_client, content="hi", max_tokens=1))
    assert answer.choices
    await in_thread(lambda: chat(gw.client(default_headers={"X-Session-Id": "sess-7"}), content="hi", max_tokens=1))
    async with httpx.AsyncClient() as http:
        bad = await http.post(gw.api + "/session/no spaces!/chat/completions", json={"model": "m"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "session_id"
    flows = [r.fields["flow"] for r in caplog.records if r.getMessage() == "request"]
    assert flows == ["session:research-42", "session:sess-7"]


async def test_streams_from_a_backend_without_usage_are_counted_approximately(start_sim, start_gateway, caplog):
    caplog.set_level("INFO", logger="queuegate")
    sim, url = await start_sim(tokens_per_s=0)  # as kind "tgi": QueueGate does not ask it for a usage chunk
    gw = await start_gateway({"m": {"upstreams": [url], "kind": "tgi"}})
    messages = [{"role": "user", "content": "x" * 40}]
    await in_thread(
        lambda: list(gw.client().chat.completions.create(model="m", messages=messages, max_tokens=5, stream=True))
    )
    assert "stream_options" not in sim.stats.received[-1].body

    await wait_until(lambda: len(request_lines(caplog)) == 1)
    line = request_lines(caplog)[0]
    assert (line["prompt_tokens"], line["completion_tokens"], line["tokens_estimated"]) == (10, 5, True)


async def test_cors_answers_preflights_and_marks_answers_for_configured_origins_only(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    page = "http://localhost:3000"
    gw = await start_gateway({"m": {"upstreams": [url]}}, server={"cors_origins": [page]})
    plain = await start_gateway({"m": {"upstreams": [url]}})
    preflight = {"origin": page, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}  # fmt: skip
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.options(gw.api + "/chat/completions", headers=preflight)
        assert answer.status_code == 204 and answer.headers["access-control-allow-origin"] == page
        assert "POST" in answer.headers["access-control-allow-methods"]
        assert answer.headers["access-control-allow-headers"] == "authorization, content-type"
        other = await http.options(gw.api + "/chat/completions", headers={**preflight, "origin": "http://evil"})
        assert other.status_code == 403 and "access-control-allow-origin" not in other.headers
        for stream in (False, True):
            answer = await http.post(gw.api + "/chat/completions", json={**chat, "stream": stream},
                                     headers={"origin": page})  # fmt: skip
            assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == page
            assert "x-request-id" in answer.headers["access-control-expose-headers"]
        missing = await http.post(
            gw.api + "/chat/completions", json={**chat, "model": "nope"}, headers={"origin": page}
        )
        assert missing.status_code == 404 and missing.headers["access-control-allow-origin"] == page
        # Off by default: no CORS headers, and a preflight is no route.
        answer = await http.post(plain.api + "/chat/completions", json=chat, headers={"origin": page})
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
        assert (await http.options(plain.api + "/chat/completions", headers=preflight)).status_code == 405
