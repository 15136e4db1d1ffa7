"""The execute loop end to end: the `openai` client → QueueGate → a simulated model that calls tools (a real HTTP
upstream, scripted by CALL lines: see queuegate.sim._tools) → QueueGate runs the calls against the simulator's
demo tool server (a real OpenAPI server on loopback; a fake for timing and faults: sleep, fail, garbage, big). The
real third-party tool server (mcpo in front of mcp-server-time) is in tests/test_tools_mcpo.py."""

from __future__ import annotations

import json

import pytest
import trio

from tests.helpers import in_thread, request_lines, wait_until


@pytest.fixture
def start_tools(start_sim, start_gateway):
    """A simulated model `m`, the demo tool server with its test tools, and a gateway running those tools."""

    async def start(tools: dict | None = None, model: dict | None = None, **sections):
        llm, url = await start_sim(tokens_per_s=0)
        tool_sim, tool_url = await start_sim(tool_server=True, test_tools=True)
        tool_base = tool_url.removesuffix("/v1")
        gw = await start_gateway(
            {"m": {"upstreams": [url], "kind": "llamacpp", **(model or {})}},
            tools={"servers": {"demo": {"url": tool_base}}, **(tools or {})},
            **sections,
        )
        return gw, llm, tool_sim.tools

    return start


def script(*lines: str, question: str = "please") -> list[dict]:
    return [{"role": "user", "content": "\n".join([question, *lines])}]


async def test_one_round_runs_the_tool_and_answers_with_its_result(start_tools, caplog):
    caplog.set_level("INFO", logger="queuegate")
    gw, llm, tools = await start_tools()
    messages = script('CALL 1 calculate {"expression": "6*7"}')
    answer = await in_thread(lambda: gw.client().chat.completions.create(model="m", messages=messages))
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.tool_calls is None
    assert '"result":42' in answer.choices[0].message.content
    assert tools.calls == [("calculate", {"expression": "6*7"})]
    assert llm.stats.requests == 2
    second = llm.stats.received[1].body
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "calculate"
    assert second["messages"][-1]["role"] == "tool" and "42" in second["messages"][-1]["content"]
    assert {t["function"]["name"] for t in second["tools"]} >= {"calculate", "get_current_time"}
    first_usage = answer.usage
    assert first_usage.total_tokens > 0
    line = request_lines(caplog)[-1]
    assert line["tool_rounds"] == 2 and line["tool_calls"] == 1 and line["status"] == 200


async def test_streamed_loop_is_one_message_with_one_finish_reason(start_tools):
    gw, llm, tools = await start_tools()
    messages = script('CALL 1 calculate {"expression": "1+1"}', 'CALL 2 calculate {"expression": "2+2"}')

    def run():
        stream = gw.client().chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        return list(stream)

    chunks = await in_thread(run)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert '"result":4' in text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert [name for name, _ in tools.calls] == ["calculate", "calculate"]
    assert llm.stats.requests == 3
