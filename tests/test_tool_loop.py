"""The execute loop end to end: the `openai` client → QueueGate → a simulated model that calls tools (a real HTTP
upstream, scripted by CALL lines: see queuegate.sim._tools) → QueueGate runs the calls against the simulator's
demo tool server (a real OpenAPI server on loopback; a fake for timing and faults: sleep, fail, garbage, big). The
real third-party tool server (mcpo in front of mcp-server-time) is in tests/test_tools_mcpo.py."""

from __future__ import annotations

import time
from functools import partial

import httpx
import msgspec
import openai
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
    assert len({c.id for c in chunks}) == 1 and len({c.model for c in chunks}) == 1  # one message
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert '"result":4' in text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert [name for name, _ in tools.calls] == ["calculate", "calculate"]
    assert llm.stats.requests == 3


def ask(gw, messages, **kwargs):
    return gw.client().chat.completions.create(model="m", messages=messages, **kwargs)


def stream(gw, messages, **kwargs) -> list:
    return list(gw.client().chat.completions.create(model="m", messages=messages, stream=True, **kwargs))


def reasoning(chunks) -> str:
    return "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)


def content(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def tool_messages(llm, request: int = -1) -> list[str]:
    return [m["content"] for m in llm.stats.received[request].body["messages"] if m.get("role") == "tool"]


async def test_calls_of_one_round_run_concurrently_and_progress_shows_as_reasoning(start_tools):
    gw, llm, tools = await start_tools()
    messages = script('CALL 1 sleep {"seconds": 0.6}', 'CALL 1 sleep {"seconds": 0.6}')
    started = time.monotonic()
    chunks = await in_thread(lambda: stream(gw, messages))
    assert time.monotonic() - started < 1.1  # two 0.6 s calls, side by side
    assert len(tools.calls) == 2 and len(tool_messages(llm)) == 2
    shown = reasoning(chunks)
    assert shown.count("→ sleep(seconds=0.6)") == 2 and shown.count("← sleep") == 2
    assert "The tools said:" in content(chunks)


async def test_a_failing_tool_or_garbage_becomes_a_tool_message_and_the_model_goes_on(start_tools):
    gw, llm, _ = await start_tools()
    answer = await in_thread(lambda: ask(gw, script("CALL 1 fail {}", "CALL 1 garbage {}")))
    assert answer.choices[0].finish_reason == "stop"
    failed, garbage = tool_messages(llm)
    assert failed.startswith("error: the tool answered 500") and "the tool failed" in failed
    assert garbage == "error: the tool answered something that is not valid JSON"


async def test_a_call_that_takes_too_long_is_cut_at_call_timeout(start_tools, caplog):
    caplog.set_level("INFO", logger="queuegate")
    gw, llm, tools = await start_tools({"call_timeout_s": 0.3})
    started = time.monotonic()
    answer = await in_thread(lambda: ask(gw, script('CALL 1 sleep {"seconds": 5}')))
    assert time.monotonic() - started < 2
    assert tool_messages(llm) == ["error: the tool did not answer within 0.3 s"]
    assert answer.choices[0].finish_reason == "stop"
    await wait_until(lambda: tools.active == 0 and tools.cancelled == 1)
    (call,) = [r.fields for r in caplog.records if r.getMessage() == "tool call"]
    assert call["tool"] == "sleep" and call["server"] == "demo" and call["outcome"] == "timeout"
    assert "seconds" not in str(call)  # no arguments at INFO


async def test_results_are_capped_with_a_note(start_tools):
    gw, llm, _ = await start_tools({"max_result_chars": 1000})
    await in_thread(lambda: ask(gw, script('CALL 1 big {"size": 50000}')))
    (result,) = tool_messages(llm)
    assert result.startswith('"' + "x" * 999)  # (cut before its end: the JSON text as it came)
    assert "[cut by QueueGate: the first 1000 characters" in result
    assert len(result) < 1200


@pytest.mark.parametrize(
    ("settings", "lines", "bound", "calls_run"),
    [
        ({"max_rounds": 2}, [f'CALL {r} calculate {{"expression": "{r}+{r}"}}' for r in range(1, 6)], "max_rounds", 2),
        ({"max_calls": 2}, ['CALL 1 calculate {"expression": "1"}'] * 3, "max_calls", 0),
        ({}, ['CALL 1 calculate {"expression": "1"}', 'CALL 2 calculate {"expression": "1"}'], "repeated_call", 1),
        (
            {"loop_timeout_s": 0.5},
            ['CALL 1 sleep {"seconds": 3}', 'CALL 2 calculate {"expression": "2"}'],
            "loop_timeout",
            1,
        ),
    ],
)
async def test_each_bound_ends_the_loop_with_one_last_round_without_tools(
    start_tools, caplog, settings, lines, bound, calls_run
):
    caplog.set_level("INFO", logger="queuegate")
    gw, llm, tools = await start_tools(settings)
    answer = await in_thread(lambda: ask(gw, script(*lines)))
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.tool_calls is None
    assert len(tools.calls) == calls_run
    last = llm.stats.received[-1].body
    assert "tools" not in last and "tool_choice" not in last  # the last round: no tools, answer with what you have
    assert answer.model_extra["queuegate"]["bound"] == bound
    await wait_until(lambda: bool(request_lines(caplog)))
    assert request_lines(caplog)[-1]["tool_bound"] == bound


async def test_a_round_that_calls_client_and_server_tools_hands_back_only_the_clients(start_tools):
    gw, llm, tools = await start_tools()
    lookup = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    messages = script('CALL 1 lookup {"q": "x"}', 'CALL 1 calculate {"expression": "1+2"}')
    answer = await in_thread(lambda: ask(gw, messages, tools=[lookup]))
    assert answer.choices[0].finish_reason == "tool_calls"
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "lookup" and call.function.arguments == '{"q": "x"}'
    assert tools.calls == []  # the server's tool waits for the next turn: its result could not reach the model now
    sent = llm.stats.received[0].body["tools"]
    assert sent[0]["function"]["name"] == "lookup" and len(sent) > 1  # the client's first, then the server's
    chunks = await in_thread(lambda: stream(gw, messages, tools=[lookup]))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert [[d.function.name for d in ds] for ds in deltas] == [["lookup"]]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


async def test_usage_counts_every_round(start_tools):
    gw, llm, _ = await start_tools()
    messages = script('CALL 1 calculate {"expression": "1"}', 'CALL 2 calculate {"expression": "2"}')
    answer = await in_thread(lambda: ask(gw, messages))
    chunks = await in_thread(lambda: stream(gw, messages, stream_options={"include_usage": True}))
    assert llm.stats.requests == 6
    for usage in (answer.usage, chunks[-1].usage):
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert usage.prompt_tokens > 3 * len(messages[0]["content"].split()) - 1  # three rounds' prompts
    await wait_until(lambda: gw.daemon.usage is None or True)


async def test_suppress_sends_no_tools_upstream_and_drops_tool_calls(start_tools):
    gw, llm, tools = await start_tools(model={"tools": "suppress"})
    f = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for form in ("structured", "hermes"):
        messages = script(f"TOOLFORM {form}", "UNOFFERED", 'CALL 1 f {"a": 1}')
        answer = await in_thread(lambda m=messages: ask(gw, m, tools=[f], tool_choice="auto"))
        assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.tool_calls is None
        assert "<tool_call>" not in (answer.choices[0].message.content or "")
        chunks = await in_thread(lambda m=messages: stream(gw, m, tools=[f]))
        assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
        assert "<tool_call>" not in content(chunks)
    assert all("tools" not in r.body and "tool_choice" not in r.body for r in llm.stats.received)
    assert tools.calls == []


@pytest.mark.parametrize("form", ["structured", "mistral", "mistral11", "hermes"])
async def test_passthrough_hands_calls_back_structured_whatever_form_the_model_wrote(start_tools, form):
    gw, llm, tools = await start_tools(model={"tools": "passthrough"})
    f = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    messages = script(f"TOOLFORM {form}", 'CALL 1 f {"city": "Paris"}', 'CALL 1 g {"n": 2}')
    g = {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}}}
    answer = await in_thread(lambda: ask(gw, messages, tools=[f, g]))
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in message.tool_calls] == ["f", "g"]
    assert msgspec.json.decode(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert all(c.id and c.type == "function" for c in message.tool_calls)
    assert not message.content
    chunks = await in_thread(lambda: stream(gw, messages, tools=[f, g]))
    calls = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [d.function.name for d in calls] == ["f", "g"]
    assert msgspec.json.decode(calls[1].function.arguments) == {"n": 2}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert "TOOL_CALLS" not in content(chunks) and "<tool_call>" not in content(chunks)
    assert tools.calls == []
    assert [t["function"]["name"] for t in llm.stats.received[0].body["tools"]] == ["f", "g"]  # no server tools


async def test_the_passthrough_route_never_runs_tools(start_tools):
    gw, llm, tools = await start_tools()
    messages = script("TOOLFORM hermes", 'CALL 1 calculate {"expression": "1"}')
    calc = {"type": "function", "function": {"name": "calculate", "parameters": {"type": "object", "properties": {}}}}
    body = {"model": "m", "messages": messages, "tools": [calc]}
    raw = await in_thread(lambda: httpx.post(gw.api + "/chat/completions_passthrough", json=body, timeout=10))
    choice = raw.json()["choices"][0]
    assert (
        choice["finish_reason"] == "tool_calls"
        and choice["message"]["tool_calls"][0]["function"]["name"] == "calculate"
    )
    assert tools.calls == [] and llm.stats.requests == 1


async def test_text_that_only_looks_like_a_tool_call_is_left_alone(start_tools):
    gw, _, _ = await start_tools(model={"tools": "passthrough"})
    f = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    # A broken call stays text: the model's words are never lost.
    messages = script("TOOLFORM hermes", "UNOFFERED", "CALL 1 f {}")
    answer = await in_thread(lambda: ask(gw, messages, tools=[f]))
    assert answer.choices[0].finish_reason == "tool_calls"
    plain = [{"role": "user", "content": "hello"}]
    for result in (await in_thread(lambda: ask(gw, plain, tools=[f])),):
        assert result.choices[0].message.content == "Hello from the simulated model, streaming one token at a time."


async def test_a_client_that_leaves_during_a_tool_call_cancels_it_and_no_round_follows(start_tools, caplog):
    caplog.set_level("INFO", logger="queuegate")
    gw, llm, tools = await start_tools()
    body = {"model": "m", "stream": True, "messages": script('CALL 1 sleep {"seconds": 30}', "CALL 2 calculate {}")}
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("POST", gw.api + "/chat/completions", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if "→ sleep" in line:
                await wait_until(lambda: tools.active == 1, timeout=5)
                break  # the tool is running: leave
    await wait_until(lambda: tools.cancelled == 1 and tools.active == 0, timeout=5)
    await wait_until(lambda: bool(request_lines(caplog)))
    assert request_lines(caplog)[-1]["status"] == 499
    stats = gw.stats()
    assert stats.waiting == 0 and stats.in_service == 0 and len(gw.daemon._active) == 0
    await trio.sleep(0.3)
    assert llm.stats.requests == 1  # no further round


async def test_a_non_streamed_client_that_leaves_during_a_tool_call_cancels_it(start_tools):
    gw, llm, tools = await start_tools()
    body = {"model": "m", "messages": script('CALL 1 sleep {"seconds": 30}')}
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(client.post, gw.api + "/chat/completions", json=body))
                await wait_until(lambda: tools.active == 1, timeout=5)
                nursery.cancel_scope.cancel()
    await wait_until(lambda: tools.cancelled == 1 and tools.active == 0, timeout=5)
    await wait_until(lambda: len(gw.daemon._active) == 0)
    assert gw.stats().in_service == 0 and llm.stats.requests == 1


async def test_an_operator_cancel_during_a_tool_call_ends_the_stream_with_an_error_event(start_tools):
    gw, llm, tools = await start_tools()
    messages = script('CALL 1 sleep {"seconds": 30}')

    async def cancel_when_the_tool_runs():
        await wait_until(lambda: tools.active == 1, timeout=5)
        (entry,) = gw.daemon._active._requests.values()
        assert entry.record.tool_step == "round 1: sleep"
        assert gw.daemon.status().requests[0].step == "round 1: sleep"
        gw.daemon._active.cancel(entry.record.request_id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_when_the_tool_runs)
        with pytest.raises(openai.APIError, match="cancelled by the operator"):
            await in_thread(lambda: stream(gw, messages))
    await wait_until(lambda: tools.cancelled == 1 and len(gw.daemon._active) == 0, timeout=5)
    assert llm.stats.requests == 1


async def test_a_looping_request_keeps_its_place_when_new_requests_flood_in(start_sim, start_gateway):
    # One slot; the looping request's tool takes 0.5 s, during which five new requests queue up. Its next round
    # goes right after the one that took the free slot meanwhile, not behind the other four.
    llm, url = await start_sim(tokens_per_s=40)
    tool_sim, tool_url = await start_sim(tool_server=True, test_tools=True)
    gw = await start_gateway(
        {"m": {"upstreams": [url], "kind": "llamacpp", "max_concurrency": 1}},
        tools={"servers": {"demo": {"url": tool_url.removesuffix("/v1")}}},
    )
    order: list[str] = []

    def run(name: str, messages: list[dict]) -> None:
        ask(gw, messages, max_tokens=30)  # 0.75 s each: the slot is busy when the looper's tool is done
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, lambda: run("looper", script('CALL 1 sleep {"seconds": 0.5}')))
        await wait_until(lambda: tool_sim.tools.active == 1, timeout=5)
        for i in range(5):
            nursery.start_soon(in_thread, lambda i=i: run(f"new-{i}", [{"role": "user", "content": f"flood {i}"}]))
            await trio.sleep(0.02)
    received = [r.body["messages"][-1].get("role") for r in llm.stats.received]
    assert received.index("tool") == 2  # round 1, the request that took the free slot, then round 2
    assert order.index("looper") <= 1


async def test_an_upstream_that_dies_in_a_later_round_ends_the_stream_with_an_error_event(start_tools, caplog):
    caplog.set_level("INFO", logger="queuegate")
    gw, llm, tools = await start_tools()

    async def break_the_model_while_the_tool_runs():
        await wait_until(lambda: tools.active == 1, timeout=5)
        llm.set_fault("die_mid_stream")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(break_the_model_while_the_tool_runs)
        with pytest.raises(openai.APIError):
            await in_thread(lambda: stream(gw, script('CALL 1 sleep {"seconds": 0.3}')))
    await wait_until(lambda: bool(request_lines(caplog)))
    line = request_lines(caplog)[-1]
    assert line["status"] == 502 and line["tool_rounds"] == 2
    assert gw.stats().in_service == 0  # (the line is written before the last event; the request ends after it)
    await wait_until(lambda: len(gw.daemon._active) == 0)


async def test_text_before_a_server_call_is_never_lost_even_when_it_looks_like_a_marker(start_tools):
    gw, _, _ = await start_tools()
    messages = script("SAY Let me check <", 'CALL 1 calculate {"expression": "2+2"}')
    chunks = await in_thread(lambda: stream(gw, messages))
    assert content(chunks).startswith("Let me check <The tools said:")
    answer = await in_thread(lambda: ask(gw, messages))
    assert answer.choices[0].message.content.startswith("Let me check <The tools said:")


async def test_requests_for_several_choices_or_with_legacy_functions_take_the_plain_way(start_tools):
    gw, llm, tools = await start_tools()
    messages = script('CALL 1 calculate {"expression": "1"}')
    answer = await in_thread(lambda: ask(gw, messages, n=2))
    assert "tools" not in llm.stats.received[-1].body and tools.calls == []  # untouched: no server tools
    assert answer.choices[0].message.content
    legacy = [{"name": "f", "parameters": {"type": "object", "properties": {}}}]
    await in_thread(lambda: ask(gw, messages, functions=legacy))
    assert llm.stats.received[-1].body["functions"] == legacy and "tools" not in llm.stats.received[-1].body


async def test_an_operator_cancel_while_a_later_round_streams_ends_it_and_frees_the_slot(start_sim, start_gateway):
    llm, url = await start_sim(tokens_per_s=20)
    _, tool_url = await start_sim(tool_server=True)
    gw = await start_gateway(
        {"m": {"upstreams": [url], "kind": "llamacpp"}},
        tools={"servers": {"demo": {"url": tool_url.removesuffix("/v1")}}},
    )

    async def cancel_in_round_two():
        await wait_until(lambda: llm.stats.requests == 2 and llm.stats.active == 1, timeout=10)
        (entry,) = gw.daemon._active._requests.values()
        gw.daemon._active.cancel(entry.record.request_id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_in_round_two)
        with pytest.raises(openai.APIError, match="cancelled by the operator"):
            await in_thread(lambda: stream(gw, script('CALL 1 calculate {"expression": "1"}'), max_tokens=200))
    await wait_until(lambda: llm.stats.active == 0 and len(gw.daemon._active) == 0, timeout=5)
    assert gw.stats().in_service == 0 and llm.stats.disconnects == 1


async def test_malformed_tools_are_a_400_naming_the_field_and_break_nothing(start_tools):
    gw, llm, _ = await start_tools()
    for route in ("/chat/completions", "/chat/completions_passthrough"):
        for tools, param in ((5, "tools"), ([{"type": "function"}], "tools[0]"), (["f"], "tools[0]")):
            body = {"model": "m", "stream": True, "messages": script(), "tools": tools}
            answer = await in_thread(lambda b=body, r=route: httpx.post(gw.api + r, json=b, timeout=10))
            assert answer.status_code == 400 and answer.json()["error"]["param"] == param
    assert llm.stats.requests == 0
    assert (await in_thread(lambda: ask(gw, script('CALL 1 calculate {"expression": "(3+4)/2"}')))).choices[0]


async def test_the_simulated_model_survives_a_bug_of_its_own(start_sim, monkeypatch):
    # (The demo's models are simulators: a bug hit by one odd request must not take a model down for good.)
    _, url = await start_sim(tokens_per_s=0)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=5) as client:
        with monkeypatch.context() as patched:
            patched.setattr("queuegate.sim._server.tool_answer", lambda _: 1 / 0)
            with pytest.raises(httpx.HTTPError):
                await client.post(url + "/chat/completions", json=body)
        assert (await client.post(url + "/chat/completions", json=body)).status_code == 200
