"""Chat memory: the pure parts (what is cut, what is put in), the built-in store (a real SQLite file), and the
gateway end to end against a simulated model (a real HTTP upstream; what it received is what is checked)."""

from __future__ import annotations

import sys

import httpx
import pytest
import trio

from queuegate.config import ConfigError, admin_socket_path, parse_config
from queuegate.memory.context import RECALLED_HEADER, inject, query_text, truncate, turn_text
from queuegate.memory.store import MemoryStore
from tests.helpers import in_thread, wait_until


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str, **extra) -> dict:
    return {"role": "assistant", "content": text, **extra}


def test_truncate_keeps_system_messages_and_the_last_turns_never_a_tool_result_without_its_call():
    system = {"role": "system", "content": "be brief"}
    call = assistant(None, tool_calls=[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}])
    result = {"role": "tool", "tool_call_id": "c1", "content": "42"}
    history = [system, user("a"), assistant("b"), user("c"), call, result, assistant("d"), user("e")]
    assert truncate(history, 2) == [system, assistant("d"), user("e")]
    assert truncate(history, 3) == [system, call, result, assistant("d"), user("e")]  # the call comes with its result
    assert truncate(history, 100) == history
    assert truncate(history, 0) == [system]


def test_inject_puts_one_labelled_message_after_the_system_prompt_and_skips_what_is_still_there():
    system = {"role": "system", "content": "be brief"}
    messages = [system, user("what is my cat called?")]
    old = turn_text("my cat is called Pixel", "Nice name.", 1000)
    recent = turn_text("what is my cat called?", "", 1000)
    out = inject(messages, [old, recent], "system")
    assert out[0] == system and out[2] == messages[1]
    assert out[1]["role"] == "system" and out[1]["content"].startswith(RECALLED_HEADER)
    assert "Pixel" in out[1]["content"] and "what is my cat called" not in out[1]["content"]
    assert inject(messages, [], "user") == messages
    assert query_text([user("hi"), assistant("Hello there"), user("and then?")]) == "Hello there\nand then?"


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
    first = [{"role": "system", "content": "You are helpful."}, user("my cat is called Pixel")]
    assert (await post(gw, first, chat)).status_code == 200
    await wait_until(lambda: gw.daemon.memory.counts["remembered"] == 1)
    question = [*chat_history(6), user("What is my cat called?")]
    assert (await post(gw, question, chat)).status_code == 200
    sent = llm.stats.received[-1].body["messages"]
    assert len(sent) == 4  # system, recalled, the last assistant message and the question (of 16)
    assert sent[0]["content"] == "You are helpful." and sent[-1]["content"] == "What is my cat called?"
    assert sent[1]["role"] == "system" and "Pixel" in sent[1]["content"] and RECALLED_HEADER in sent[1]["content"]
    # Another chat, or another caller, recalls nothing of it.
    await post(gw, question, {"x-chat-id": "c2"})
    assert "Pixel" not in str(llm.stats.received[-1].body["messages"][1:-1])


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
    warnings = [r for r in caplog.records if r.getMessage().startswith("memory store failing")]
    assert len(warnings) == 1  # logged once per outage
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
    assert "Pixel" in llm.stats.received[-1].body["messages"][1]["content"]
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
    question = [*chat_history(3), user("What is my cat called?")]
    await post(gw, question, {"x-chat-id": "c1"})
    assert "Pixel" not in str(llm.stats.received[-1].body["messages"][1:-2])  # forgotten is forgotten


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
    assert "Pixel" in llm.stats.received[-1].body["messages"][1]["content"]
    tool_sim.tools.memory_delay_s = 2.0  # slower than timeout_ms: skipped, the turn goes on untouched
    started = trio.current_time()
    assert (await post(gw, question, {"x-chat-id": "t"})).status_code == 200
    assert trio.current_time() - started < 1.5 and llm.stats.received[-1].body["messages"] == question
    assert gw.daemon.memory.counts["recall_timeout"] == 1


def test_a_toolserver_memory_must_name_a_tool_server():
    with pytest.raises(ConfigError, match=r"at `memory\.server`: backend toolserver needs"):
        parse_config('[memory]\nenabled = true\nbackend = "toolserver"\nserver = "nope"', source="q.toml")
