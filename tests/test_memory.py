"""Chat memory: the pure parts (what is cut, what is put in), the built-in store (a real SQLite file), and the
gateway end to end against a simulated model (a real HTTP upstream; what it received is what is checked)."""

from __future__ import annotations

import sys

import httpx
import pytest
import trio

from queuegate.config import ConfigError, admin_socket_path, parse_config
from queuegate.memory.context import HINT, RECALLED_HEADER, cut_at, inject, query_text, truncate, turn_text
from queuegate.memory.store import MemoryStore
from queuegate.proxy._tap import TappedStream
from tests.helpers import in_thread, wait_until


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str, **extra) -> dict:
    return {"role": "assistant", "content": text, **extra}


def test_the_cut_starts_at_a_user_message_so_roles_alternate_and_tool_results_keep_their_calls():
    system = {"role": "system", "content": "be brief"}
    call = assistant(None, tool_calls=[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}])
    result = {"role": "tool", "tool_call_id": "c1", "content": "42"}
    history = [system, user("a"), assistant("b"), user("c"), call, result, assistant("d"), user("e")]
    assert truncate(history, cut_at(history, 2)) == [system, user("e")]  # (keep_last 2 would start at an answer)
    assert truncate(history, cut_at(history, 4)) == [system, user("c"), call, result, assistant("d"), user("e")]
    assert truncate(history, cut_at(history, 100)) == history
    assert truncate(history, cut_at(history, 0)) == [system, user("e")]  # the latest question always stays
    assert cut_at([system], 4) == 0


def test_recalled_context_joins_the_system_prompt_or_the_first_user_message_and_skips_what_is_still_there():
    system = {"role": "system", "content": "be brief"}
    messages = [system, user("what is my cat called?")]
    old = turn_text("my cat is called Pixel", "Nice name.", 1000)
    recent = turn_text("what is my cat called?", "", 1000)
    out = inject(messages, [old, recent], "system")
    assert len(out) == 2 and out[1] == messages[1] and messages[0] == system  # (the caller's messages untouched)
    assert out[0]["content"].startswith("be brief\n\n" + RECALLED_HEADER)  # the prompt's start stays the same
    assert "Pixel" in out[0]["content"] and "what is my cat called" not in out[0]["content"]
    as_user = inject(messages, [old], "user")
    assert as_user[0] == system and as_user[1]["content"].startswith(RECALLED_HEADER)
    assert as_user[1]["content"].endswith("what is my cat called?")
    assert inject([user("q")], [old], "system")[0]["role"] == "system"  # no system prompt: one is made
    assert inject(messages, [], "user") == messages
    assert query_text([user("hi"), assistant("Hello there"), user("and then?")]) == "and then?\nHello there"


def test_the_store_ranks_isolates_forgets_expires_and_survives_a_reopen(tmp_path):
    path = tmp_path / "memory.sqlite3"
    store = MemoryStore(path)
    store.open()
    store.remember([("chat-a", turn_text("my cat is called Pixel", "ok", 1000))])
    store.remember(
        [
            ("chat-a", turn_text("the weather is nice", "ok", 1000)),
            ("chat-b", turn_text("my cat is called Tom", "ok", 1000)),
        ]
    )
    assert store.recall("chat-a", "What is my cat called?", 1)[0].startswith("User: my cat is called Pixel")
    assert all("Tom" not in s for s in store.recall("chat-a", "cat called Tom", 8))  # namespaces never mix
    assert store.recall("chat-a", "?!", 8) == []
    store.close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = MemoryStore(path, retention_days=1)
    again.open()
    assert len(again.recall("chat-a", "cat", 8)) == 1
    assert again.forget("chat-a") == 2 and again.recall("chat-a", "cat", 8) == []
    assert [ns for ns, _, _ in again.namespaces()] == ["chat-b"]
    assert again.expire() == 0  # (a day old: kept)
    again.close()


def test_a_long_chat_still_recalls_its_oldest_turn_and_common_words_rank_below_rare_ones(tmp_path):
    store = MemoryStore(tmp_path / "memory.sqlite3")
    store.open()
    filler = [
        ("long", turn_text(f"topic {i} is fine, tell me more about the cat food aisle", "ok", 1000)) for i in range(700)
    ]
    store.remember([("long", turn_text("my cat is called Pixel", "ok", 1000)), *filler])  # (past MATCHED_MAX)
    store.remember([("other", turn_text("cat Pixel", "ok", 1000))] * 3)
    assert store.recall("long", "the cat called Pixel?", 1)[0].startswith("User: my cat is called Pixel")
    store.close()


@pytest.fixture
def memory_gateway(start_sim, start_gateway, tmp_path):
    async def start(**memory):
        llm, url = await start_sim(tokens_per_s=0)
        gw = await start_gateway(
            {"m": {"upstreams": [url], "kind": "llamacpp"}},
            memory={"enabled": True, "keep_last": 2, **memory},
        )
        return gw, llm

    return start


def chat_history(turns: int) -> list[dict]:
    history = [{"role": "system", "content": "You are helpful."}, user("my cat is called Pixel"), assistant("Nice.")]
    for i in range(turns):
        history += [user(f"tell me about topic {i}"), assistant(f"Topic {i} is fine.")]
    return history


async def post(gw, messages, headers=None, **body) -> httpx.Response:
    payload = {"model": "m", "messages": messages, **body}
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(gw.api + "/chat/completions", json=payload, headers=headers or {})


async def test_a_fact_cut_from_a_long_chat_is_recalled_and_the_forwarded_prompt_stays_small(memory_gateway):
    gw, llm = await memory_gateway()
    chat = {"x-chat-id": "c1"}
    history = chat_history(6)
    for turn, at in enumerate(range(2, len(history), 2)):  # the chat as a client has it: each turn sent, answered
        assert (await post(gw, history[:at], chat)).status_code == 200
        await wait_until(lambda turn=turn: gw.daemon.memory.counts["remembered"] == turn + 1)
    question = [*history, user("What is my cat called?")]
    assert (await post(gw, question, chat)).status_code == 200
    sent = llm.stats.received[-1].body["messages"]
    assert [m["role"] for m in sent] == ["system", "user"]  # of 16 messages: the prompt and the question
    assert sent[0]["content"].startswith("You are helpful.\n\n" + RECALLED_HEADER) and "Pixel" in sent[0]["content"]
    assert sent[-1]["content"] == "What is my cat called?"
    # Another chat, or another caller, recalls nothing of it.
    await post(gw, [user("What is my cat called?")], {"x-chat-id": "c2"})
    assert "Pixel" not in str(llm.stats.received[-1].body["messages"])


async def test_a_streamed_answer_is_remembered_once_whole_and_a_cut_one_never(memory_gateway):
    gw, llm = await memory_gateway()
    llm.config.tokens_per_s = 20
    async with httpx.AsyncClient(timeout=10) as client:
        body = {"model": "m", "stream": True, "messages": [user("remember the number 417")]}
        async with client.stream("POST", gw.api + "/chat/completions", json=body, headers={"x-chat-id": "s"}) as r:
            async for _ in r.aiter_lines():
                break  # leave after the first line
    await wait_until(lambda: llm.stats.active == 0 and len(gw.daemon._active) == 0)
    await trio.sleep(0.2)
    assert gw.daemon.memory.counts["remembered"] == 0  # no half answer is remembered
    llm.config.tokens_per_s = 0
    async with httpx.AsyncClient(timeout=10) as client:
        body["messages"] = [user("remember the number 418")]
        async with client.stream("POST", gw.api + "/chat/completions", json=body, headers={"x-chat-id": "s"}) as r:
            assert "[DONE]" in (await r.aread()).decode()
    await wait_until(lambda: gw.daemon.memory.counts["remembered"] == 1)
    store = gw.daemon.memory.backend.store
    assert any("418" in text for text in store.recall(gw.daemon.memory.namespace(None, None, "id:s"), "number", 8))


async def test_a_broken_store_never_breaks_a_chat(memory_gateway, caplog):
    caplog.set_level("INFO", logger="queuegate")
    gw, llm = await memory_gateway()
    gw.daemon.memory.backend.store.close()  # every recall and remember fails from now on
    question = [*chat_history(6), user("What is my cat called?")]
    for _ in range(3):
        answer = await post(gw, question, {"x-chat-id": "c1"})
        assert answer.status_code == 200
    assert llm.stats.received[-1].body["messages"] == question  # untouched: no recall, so nothing cut either
    assert gw.daemon.memory.counts["recall_failed"] == 3
    warnings = [r.fields["operation"] for r in caplog.records if r.getMessage().startswith("memory store failing")]
    assert sorted(warnings) == ["recall", "remember"]  # each logged once per outage
    metrics = (await in_thread(lambda: httpx.get(gw.base_url + "/metrics"))).text
    assert 'queuegate_memory_operations_total{outcome="recall_failed"} 3.0' in metrics


async def test_memory_survives_a_restart_and_models_or_agents_can_be_left_out(start_sim, start_gateway, tmp_path):
    llm, url = await start_sim(tokens_per_s=0)
    state = str(tmp_path / "state")
    models = {"m": {"upstreams": [url]}, "plain": {"upstreams": [url], "memory": False}}
    gw = await start_gateway(models, memory={"enabled": True, "keep_last": 2}, server={"state_dir": state})
    await post(gw, [user("my cat is called Pixel")], {"x-chat-id": "r"})
    await wait_until(lambda: gw.daemon.memory.counts["remembered"] == 1)
    gw.daemon.request_shutdown()
    await wait_until(lambda: gw.daemon.memory.backend.store._db is None, timeout=10)
    again = await start_gateway(models, memory={"enabled": True, "keep_last": 2}, server={"state_dir": state})
    question = [*chat_history(3), user("What is my cat called?")]
    await post(again, question, {"x-chat-id": "r"})
    assert "Pixel" in llm.stats.received[-1].body["messages"][0]["content"]
    await post(again, question, {"x-chat-id": "r"}, model="plain")
    assert llm.stats.received[-1].body["messages"] == question  # memory = false: left alone
    async with httpx.AsyncClient(timeout=10) as client:
        body = {"model": "m", "messages": question}
        await client.post(
            again.api.removesuffix("/v1") + "/v1/agent/chat/completions", json=body, headers={"x-chat-id": "r"}
        )
    assert llm.stats.received[-1].body["messages"] == question  # agents: left alone unless for_agents


async def test_operators_list_show_and_forget_a_chat_from_the_command_line(memory_gateway):
    gw, llm = await memory_gateway()
    await post(gw, [user("my cat is called Pixel")], {"x-chat-id": "c1"})
    await wait_until(lambda: gw.daemon.memory.counts["remembered"] == 1)
    socket = str(admin_socket_path(gw.daemon.config))

    async def admin(*args: str) -> tuple[int, str]:
        done = await trio.run_process(
            [sys.executable, "-m", "queuegate.cli", "admin", *args, "--socket", socket],
            capture_stdout=True,
            check=False,
        )
        return done.returncode, done.stdout.decode()

    code, listed = await admin("memory", "list")
    namespace = listed.rsplit(" UTC  ", 1)[1].strip()
    assert code == 0 and "1 turns" in listed and namespace == "key=- session=- id:c1"
    code, shown = await admin("memory", "show", namespace)
    assert code == 0 and "User: my cat is called Pixel" in shown
    code, forgot = await admin("memory", "forget", namespace)
    assert code == 0 and "forgot 1 turns" in forgot
    assert (await admin("memory", "list"))[1].strip() == "no chat remembered"
    await post(gw, [user("What is my cat called?")], {"x-chat-id": "c1"})
    assert "Pixel" not in str(llm.stats.received[-1].body["messages"])  # forgotten is forgotten


async def test_a_tool_server_can_hold_the_memory_and_a_slow_or_missing_one_breaks_nothing(start_sim, start_gateway):
    # The memory tool server is the simulator's (a real OpenAPI server on loopback; its memory tools are a fake).
    llm, url = await start_sim(tokens_per_s=0)
    tool_sim, tool_url = await start_sim(tool_server=True, test_tools=True)
    gw = await start_gateway(
        {"m": {"upstreams": [url], "kind": "llamacpp", "tools": "passthrough"}},
        tools={"servers": {"mem": {"url": tool_url.removesuffix("/v1")}}},
        memory={"enabled": True, "backend": "toolserver", "server": "mem", "keep_last": 2, "timeout_ms": 300},
    )
    await post(gw, [user("my cat is called Pixel")], {"x-chat-id": "t"})
    await wait_until(lambda: gw.daemon.memory.counts["remembered"] == 1)
    ((namespace, snippets),) = tool_sim.tools.memory.items()
    assert namespace == "key=- session=- id:t" and "Pixel" in snippets[0]
    question = [*chat_history(3), user("What is my cat called?")]
    await post(gw, question, {"x-chat-id": "t"})
    assert "Pixel" in llm.stats.received[-1].body["messages"][0]["content"]
    tool_sim.tools.memory_delay_s = 2.0  # slower than timeout_ms: skipped, the turn goes on untouched
    started = trio.current_time()
    assert (await post(gw, question, {"x-chat-id": "t"})).status_code == 200
    assert trio.current_time() - started < 1.5 and llm.stats.received[-1].body["messages"] == question
    assert gw.daemon.memory.counts["recall_timeout"] == 1


def test_a_toolserver_memory_must_name_a_tool_server():
    with pytest.raises(ConfigError, match=r"at `memory\.server`: backend toolserver needs"):
        parse_config('[memory]\nenabled = true\nbackend = "toolserver"\nserver = "nope"', source="q.toml")


class _Blocks:
    """A stream body that yields given blocks (a fake: the shapes upstreams send that are hard to provoke)."""

    def __init__(self, *blocks: bytes) -> None:
        self._blocks = list(blocks)

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if not self._blocks:
            raise StopAsyncIteration
        return self._blocks.pop(0)

    def stop(self, error) -> None: ...

    async def aclose(self) -> None: ...


@pytest.mark.parametrize(
    ("blocks", "remembered"),
    [
        ((b'data: {"choices":[{"index":0,"delta":{"content":"whole"}}]}\n\n', b"data: [DONE]\n\n"), ["whole"]),
        ((b'data: {"choices":[{"index":0,"delta":{"content":"tail"}}]}\r\n\r\ndata: [DONE]',), ["tail"]),
        (
            (
                b'data: {"choices":[{"index":0,"delta":{"content":"half"}}]}\n\n',
                b'data: {"error": {"message": "x"}}\n\n',
                b"data: [DONE]\n\n",
            ),
            [],
        ),
        ((b'data: {"choices":[{"index":0,"delta":{"content":"cut"}}]}\n\n',), []),
        ((b"data: " + b"[" * 100_000 + b"\n\n", b"data: [DONE]\n\n"), []),
    ],
)
async def test_a_stream_is_remembered_only_when_it_ended_whole_and_nothing_breaks_it(blocks, remembered):
    got: list[str] = []
    tapped = TappedStream(_Blocks(*blocks), got.append)
    assert [block async for block in tapped] == list(blocks)  # the client gets everything, as it was
    await tapped.aclose()
    await tapped.aclose()
    assert got == remembered


async def test_a_memory_tool_server_never_offers_its_memory_to_a_model(start_sim, start_gateway):
    llm, url = await start_sim(tokens_per_s=0)
    _, tool_url = await start_sim(tool_server=True, test_tools=True)
    gw = await start_gateway(
        {"m": {"upstreams": [url], "kind": "llamacpp"}},
        tools={"servers": {"mem": {"url": tool_url.removesuffix("/v1")}}},
        memory={"enabled": True, "backend": "toolserver", "server": "mem"},
    )
    await post(gw, [user('CALL 1 memory_query {"namespace": "key=alice session=- id:x", "query": "cat"}')])
    offered = {t["function"]["name"]: t["function"] for t in llm.stats.received[0].body["tools"]}
    assert "calculate" in offered and "memory_upsert" not in offered
    # The one memory tool a model gets is QueueGate's, bound to its own chat: it names no namespace.
    assert "namespace" not in offered["memory_query"]["parameters"]["properties"]
    tool_round = llm.stats.received[1].body["messages"][-1]
    assert tool_round["role"] == "tool" and "key=alice" not in tool_round["content"]


async def test_in_execute_mode_the_model_can_search_its_own_chats_memory(start_sim, start_gateway, caplog):
    caplog.set_level("INFO", logger="queuegate")
    llm, url = await start_sim(tokens_per_s=0)
    tool_sim, tool_url = await start_sim(tool_server=True)
    gw = await start_gateway(
        {"m": {"upstreams": [url], "kind": "llamacpp"}},
        tools={"servers": {"demo": {"url": tool_url.removesuffix("/v1")}}},  # (tools run here: execute mode)
        memory={"enabled": True, "keep_last": 2},
    )
    for chat in ("c1", "c2"):
        assert await post(gw, [user(f"my cat is called {'Pixel' if chat == 'c1' else 'Tom'}")], {"x-chat-id": chat})
    await wait_until(lambda: gw.daemon.memory.counts["remembered"] == 2)
    ask = [*chat_history(3), user('look it up\nCALL 1 memory_query {"query": "cat name"}')]
    answer = await post(gw, ask, {"x-chat-id": "c1"})
    first, second = (r.body for r in list(llm.stats.received)[-2:])
    assert "memory_query" in {t["function"]["name"] for t in first["tools"]}  # offered beside the demo's tools
    assert HINT.format(tool="memory_query") in first["messages"][0]["content"]
    assert second["messages"][-1]["role"] == "tool" and "Pixel" in second["messages"][-1]["content"]
    assert "Tom" not in second["messages"][-1]["content"]  # its own chat's memory, no other
    assert "Pixel" in answer.json()["choices"][0]["message"]["content"]
    calls = [r.fields for r in caplog.records if r.getMessage() == "tool call"]
    assert calls[-1]["tool"] == "memory_query" and calls[-1]["server"] == "queuegate"
    assert tool_sim.tools.calls == []  # (the demo tool server was never asked)
    # Where tool calls go back to the client, the model is not offered it, nor told of it.
    async with httpx.AsyncClient(timeout=10) as client:
        body = {"model": "m", "messages": [*chat_history(3), user("what is my cat called?")]}
        await client.post(gw.api + "/chat/completions_passthrough", json=body, headers={"x-chat-id": "c1"})
    sent = llm.stats.received[-1].body
    assert "tools" not in sent and HINT.format(tool="memory_query") not in sent["messages"][0]["content"]


async def test_the_memory_tool_answers_bad_arguments_plainly_and_hint_false_offers_nothing(start_sim, start_gateway):
    llm, url = await start_sim(tokens_per_s=0)
    _, tool_url = await start_sim(tool_server=True)
    tools = {"servers": {"demo": {"url": tool_url.removesuffix("/v1")}}}
    models = {"m": {"upstreams": [url], "kind": "llamacpp"}}
    gw = await start_gateway(models, tools=tools, memory={"enabled": True, "keep_last": 2})
    await post(gw, [user("my cat is called Pixel")], {"x-chat-id": "c"})
    await wait_until(lambda: gw.daemon.memory.counts["remembered"] == 1)
    await post(gw, [user('go\nCALL 1 memory_query {"k": "many"}')], {"x-chat-id": "c"})
    assert llm.stats.received[-1].body["messages"][-1]["content"].startswith('error: expected {"query"')
    # A chat that remembers nothing yet is offered no memory tool (and no line about it).
    await post(gw, [user("hello")], {"x-chat-id": "fresh"})
    assert "memory_query" not in {t["function"]["name"] for t in llm.stats.received[-1].body["tools"]}
    quiet = await start_gateway(models, tools=tools, memory={"enabled": True, "keep_last": 2, "hint": False})
    await post(quiet, [user("my cat is called Pixel")], {"x-chat-id": "c"})
    await wait_until(lambda: quiet.daemon.memory.counts["remembered"] == 1)
    await post(quiet, [*chat_history(3), user("what is my cat called?")], {"x-chat-id": "c"})
    sent = llm.stats.received[-1].body
    assert "memory_query" not in {t["function"]["name"] for t in sent["tools"]}
    assert "Pixel" in sent["messages"][0]["content"] and HINT.format(tool="memory_query") not in str(sent)
