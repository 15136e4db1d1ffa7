"""The execute loop end to end against a REAL third-party OpenAPI tool server: the `openai` client → QueueGate → a
simulated model scripted by CALL lines (queuegate.sim._tools) → QueueGate calls mcpo in front of mcp-server-time
(tests/toolservers.py) and feeds the results back. The loop's timing and faults (sleep, disconnects, garbage...)
are in tests/test_tool_loop.py, with the simulator's demo tool server."""

from __future__ import annotations

import json
import logging
import socket
from datetime import datetime

import httpx
import msgspec
import pytest
import trio

from tests.helpers import IDLE_PAST_EVERY_TIMER_S, in_thread, running, wait_until
from tests.toolservers import mcpo_time_server, tool_server_pids

BERLIN = 'CALL 1 get_current_time {"timezone": "Europe/Berlin"}'
TOOL_KEY = "s3cret"
TOOL_KEY_ENV = "QG_TEST_TOOL_KEY"


def script(*lines: str, question: str = "what time is it?") -> list[dict]:
    return [{"role": "user", "content": "\n".join([question, *lines])}]


def offered(body: dict) -> set[str]:
    """The names of the tools a request to the model offered."""
    return {t["function"]["name"] for t in body.get("tools") or []}


def time_result(text: str) -> dict:
    """mcp-server-time's result for Europe/Berlin, out of the model's "The tools said: <result>" answer."""
    assert text.startswith("The tools said: "), text
    result = json.loads(text.removeprefix("The tools said: "))
    assert result["timezone"] == "Europe/Berlin"
    assert datetime.fromisoformat(result["datetime"]).utcoffset() is not None
    return result


def free_port() -> int:
    """A loopback port nothing listens on (for now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_stopped(pids: list[int]) -> None:
    assert pids and [pid for pid in pids if running(pid)] == []


@pytest.fixture
def start_loop(start_sim, start_gateway):
    """A simulated model `m` and a gateway with the tool server `time` at `tool_url` (and its extra settings)."""

    async def start(tool_url: str, **server):
        llm, url = await start_sim(tokens_per_s=0)
        gw = await start_gateway(
            {"m": {"upstreams": [url], "kind": "llamacpp"}},
            tools={"servers": {"time": {"url": tool_url, **server}}},
        )
        return gw, llm

    return start


async def test_loop_through_mcpo_non_streamed_and_streamed(start_loop):
    async with mcpo_time_server() as tool_url:
        pids = tool_server_pids(tool_url)
        gw, llm = await start_loop(tool_url)
        [server] = gw.daemon.status().tool_servers
        assert server.up and {"get_current_time", "convert_time"} <= set(server.tools)

        answer = await in_thread(lambda: gw.client().chat.completions.create(model="m", messages=script(BERLIN)))
        choice = answer.choices[0]
        assert choice.finish_reason == "stop" and choice.message.tool_calls is None
        time_result(choice.message.content)
        assert llm.stats.requests == 2
        first, second = (r.body for r in llm.stats.received)
        # The model sees mcpo's tools by their paths' names, not by operationIds (tool_get_current_time_post).
        assert {"get_current_time", "convert_time"} <= offered(first)
        assert not any(name.startswith("tool_") or name.endswith("_post") for name in offered(first))
        call = second["messages"][-2]["tool_calls"][0]
        assert call["function"]["name"] == "get_current_time"
        tool_message = second["messages"][-1]
        assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == call["id"]
        assert "Europe/Berlin" in tool_message["content"]

        def streamed():
            return list(gw.client().chat.completions.create(model="m", messages=script(BERLIN), stream=True))

        chunks = await in_thread(streamed)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["stop"]
        assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
        time_result("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        assert llm.stats.requests == 4
        assert llm.stats.received[-1].body["messages"][-1]["role"] == "tool"
    assert_stopped(pids)


async def test_a_tool_error_from_mcpo_goes_to_the_model(start_loop):
    async with mcpo_time_server() as tool_url:
        pids = tool_server_pids(tool_url)
        gw, llm = await start_loop(tool_url)
        messages = script('CALL 1 get_current_time {"timezone": "Mars/Olympus"}')
        answer = await in_thread(
            lambda: gw.client().chat.completions.with_raw_response.create(model="m", messages=messages)
        )
        assert answer.status_code == 200
        choice = answer.parse().choices[0]
        assert choice.finish_reason == "stop" and choice.message.tool_calls is None
        assert llm.stats.requests == 2
        tool_message = llm.stats.received[1].body["messages"][-1]
        assert tool_message["role"] == "tool"
        assert tool_message["content"].startswith("error: the tool answered 500"), tool_message["content"]
        assert "Mars/Olympus" in tool_message["content"]
        assert choice.message.content == "The tools said: " + tool_message["content"]
        assert gw.daemon.status().tool_servers[0].up  # a tool's error is not the server being down
    assert_stopped(pids)


async def test_mcpo_api_key_is_sent_and_never_shown(start_loop, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="queuegate")
    monkeypatch.setenv(TOOL_KEY_ENV, TOOL_KEY)
    async with mcpo_time_server(api_key=TOOL_KEY) as tool_url:
        pids = tool_server_pids(tool_url)
        gw, llm = await start_loop(tool_url, api_key_env=TOOL_KEY_ENV)
        answer = await in_thread(lambda: gw.client().chat.completions.create(model="m", messages=script(BERLIN)))
        time_result(answer.choices[0].message.content)  # mcpo answers 401/403 without the key
        assert "error" not in llm.stats.received[1].body["messages"][-1]["content"]
        status = msgspec.json.encode(gw.daemon.status())
        assert TOOL_KEY.encode() not in status
    assert caplog.records
    for record in caplog.records:
        shown = record.getMessage() + repr(record.__dict__)
        assert TOOL_KEY not in shown, f"the tool server's API key is in a log record: {shown}"
    assert_stopped(pids)


async def test_a_tool_server_down_at_start_is_picked_up_when_it_comes(start_sim, start_gateway, caplog):
    caplog.set_level(logging.INFO, logger="queuegate")
    port = free_port()
    llm, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway(
        {"m": {"upstreams": [url], "kind": "llamacpp"}},
        tools={"servers": {"time": {"url": f"http://127.0.0.1:{port}"}}},
    )
    [server] = gw.daemon.status().tool_servers
    assert not server.up and server.error and server.tools == []
    assert any(r.levelno == logging.WARNING and "tool server down" in r.getMessage() for r in caplog.records)
    async with httpx.AsyncClient(timeout=5) as http:
        await wait_until(lambda: gw.stats().models[0].upstreams[0].state == "ready")
        ready = await http.get(gw.base_url + "/readyz")
        assert ready.status_code == 200, ready.text
        [shown] = ready.json()["tool_servers"]
        assert shown["name"] == "time" and shown["up"] is False and shown["error"]

        # Down: the model is offered none of its tools and answers as usual.
        plain = await in_thread(lambda: gw.client().chat.completions.create(model="m", messages=script(BERLIN)))
        assert plain.choices[0].finish_reason == "stop" and plain.choices[0].message.tool_calls is None
        assert llm.stats.requests == 1
        assert "get_current_time" not in offered(llm.stats.received[0].body)

        # It comes: the simulator's demo tool server on the port the gateway was told (retried at 2 s, doubling).
        tool_sim, _ = await start_sim(tool_server=True, port=port)
        await wait_until(lambda: gw.daemon.status().tool_servers[0].up, timeout=10, interval=0.1)
        assert "get_current_time" in gw.daemon.status().tool_servers[0].tools
        assert (await http.get(gw.base_url + "/readyz")).json()["tool_servers"][0]["up"] is True

    answer = await in_thread(lambda: gw.client().chat.completions.create(model="m", messages=script(BERLIN)))
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.tool_calls is None
    time_result(answer.choices[0].message.content)
    assert tool_sim.tools.calls == [("get_current_time", {"timezone": "Europe/Berlin"})]
    assert llm.stats.requests == 3
    assert "get_current_time" in offered(llm.stats.received[1].body)


async def test_calls_through_mcpo_keep_working_across_idle_gaps(start_loop):
    # mcpo (uvicorn) closes an idle keep-alive connection after 5 s; QueueGate's pooled connection to it must not
    # turn the next call into an error (nor mark the server down).
    async with mcpo_time_server() as tool_url:
        gw, llm = await start_loop(tool_url)
        for _ in range(2):
            answer = await in_thread(lambda: gw.client().chat.completions.create(model="m", messages=script(BERLIN)))
            assert time_result(answer.choices[0].message.content)["timezone"] == "Europe/Berlin"
            await trio.sleep(IDLE_PAST_EVERY_TIMER_S)
        assert all(s.up for s in gw.daemon.status().tool_servers)
        (result,) = [m["content"] for m in llm.stats.received[-1].body["messages"] if m["role"] == "tool"]
        assert result.startswith("{")  # the time itself, not an error
