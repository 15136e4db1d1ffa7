"""The Responses API (/v1/responses) and Anthropic's Messages API (/v1/messages), passed through: the real `openai`
and `anthropic` SDKs against the real llama-server (which serves both), and a fake upstream (a raw socket server on
loopback) for what a real one does not do on demand: streams cut before their end event."""

from __future__ import annotations

import contextlib
from functools import partial

import anthropic
import httpx
import openai
import pytest
import trio

from tests.helpers import SECRETS, in_thread, request_lines, wait_until

MESSAGES_STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"m1","type":"message","role":"assistant",'
    b'"content":[],"model":"m","stop_reason":null,"usage":{"input_tokens":7,"output_tokens":0}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text",'
    b'"text":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    b'"text":"Hello"}}\n\n'
)
MESSAGES_END = (
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":3}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


async def fake_upstream(nursery: trio.Nursery, answers: list[bytes]) -> str:
    """A server answering each request with the next event stream of `answers` (then closing: a stream without its
    end is cut). Its base URL."""
    pending = iter(answers)

    async def serve(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some(65536)
            if request.startswith(b"GET"):  # (health checks)
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
            else:
                head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                await stream.send_all(head + next(pending))
        await stream.aclose()

    [listener] = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listener.socket.getsockname()[1]}/v1"


async def test_a_messages_stream_cut_before_its_end_gets_an_error_event_in_its_own_shape(
    nursery, start_gateway, caplog
):
    caplog.set_level("INFO", logger="queuegate")
    url = await fake_upstream(nursery, [MESSAGES_STREAM + MESSAGES_END, MESSAGES_STREAM])
    gw = await start_gateway({"m": {"upstreams": [url], "kind": "llamacpp", "health_path": ""}})
    client = anthropic.Anthropic(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=20)
    ask = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}

    def whole() -> str:
        with client.messages.stream(**ask) as stream:
            return stream.get_final_text()

    assert await in_thread(whole) == "Hello"
    with pytest.raises(anthropic.APIStatusError, match="upstream m#0"):  # (an error event, as Anthropic's clients read)
        await in_thread(whole)
    lines = request_lines(caplog)
    assert (lines[0]["status"], lines[0]["prompt_tokens"], lines[0]["completion_tokens"]) == (200, 7, 3)
    assert lines[1]["status"] == 502 and lines[1]["endpoint"] == "messages"


async def test_a_kind_that_does_not_serve_an_api_gets_501_naming_what_it_serves(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"o": {"upstreams": [url], "kind": "ollama"}})
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.post(gw.api + "/responses", json={"model": "o", "input": "hi"})
        assert answer.status_code == 501
        message = answer.json()["error"]["message"]
        assert "does not serve /v1/responses; it serves /v1/chat/completions" in message
        answer = await http.post(gw.api + "/messages", json={"model": "o", "max_tokens": 4, "messages": []})
        assert answer.status_code == 501


@pytest.mark.llama
async def test_the_sdks_use_the_responses_and_messages_apis_of_the_real_llama_server(
    llama_parts, start_gateway, key_env, caplog
):
    caplog.set_level("INFO", logger="queuegate")
    binary, model = llama_parts
    cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", "${PORT}", "-c", "2048", "-t", "2", "--no-webui"]
    gw = await start_gateway(
        {"gemma": {"launcher": "process", "cmd": cmd, "kind": "llamacpp", "startup_timeout_s": 60}},
        keys={"dev": {"key_env": "QG_ALICE"}},
        queue={"notify": "always", "notify_min_ms": 0},  # (notices are for chat streams: never in these)
    )
    secret = SECRETS["QG_ALICE"]
    client = gw.client(api_key=secret, timeout=120)
    answer = await in_thread(lambda: client.responses.create(model="gemma", input="Say hi.", max_output_tokens=8))
    assert answer.output_text and answer.usage.output_tokens > 0

    def streamed() -> list[str]:
        events = client.responses.create(model="gemma", input="Say hi.", max_output_tokens=8, stream=True)
        return [event.type for event in events]

    kinds = await in_thread(streamed)
    assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds
    claude = anthropic.Anthropic(base_url=gw.base_url, api_key=secret, max_retries=0, timeout=120)  # (x-api-key)
    ask = {"model": "gemma", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hi."}]}
    message = await in_thread(lambda: claude.messages.create(**ask))
    assert message.content[0].text and message.usage.output_tokens > 0

    def streamed_message() -> str:
        with claude.messages.stream(**ask) as stream:
            return stream.get_final_text()

    assert await in_thread(streamed_message)
    await wait_until(lambda: len(request_lines(caplog)) >= 4)
    lines = request_lines(caplog)
    assert [line["endpoint"] for line in lines] == ["responses", "responses", "messages", "messages"]
    assert all(line["status"] == 200 and line["completion_tokens"] > 0 and line["key"] == "dev" for line in lines)
    assert all(not line.get("estimated") for line in lines), lines  # (the servers' own counts, not estimates)
    # Unknown fields pass through untouched; an error keeps OpenAI's status.
    with pytest.raises(openai.NotFoundError):
        await in_thread(lambda: client.responses.create(model="nope", input="hi"))
