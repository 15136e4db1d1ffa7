"""End to end in front of a real llama.cpp `llama-server` with a real small model (Gemma 3 270M, CPU).

`.ci/run` builds (or reuses the cached) llama-server and the model and exports their paths. Locally, without them,
these tests are skipped with the reason; under CI a missing part is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import sqlite3
import time

import httpx
import pytest
import trio

from tests.helpers import IDLE_PAST_EVERY_TIMER_S, assert_never_together, in_thread, wait_until
from tests.realparts import start_llama_server

pytestmark = pytest.mark.llama


@pytest.fixture
async def llama_gateway(llama_parts, nursery, start_gateway):
    binary, model = llama_parts
    url = await start_llama_server(nursery, binary=binary, model=model)
    gw = await start_gateway(
        {
            "gemma": {
                "upstreams": [url],
                "kind": "llamacpp",
                "aliases": ["tiny"],
                "defaults": {"temperature": 0},
            }
        }
    )
    return gw, url


async def test_chat_stream_and_non_stream_via_openai_client(llama_gateway):
    gw, _ = llama_gateway
    client = gw.client(timeout=60)
    messages = [{"role": "user", "content": "Say hello in one word."}]
    answer = await in_thread(lambda: client.chat.completions.create(model="tiny", messages=messages, max_tokens=8))
    assert answer.choices[0].message.content
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 8

    def stream():
        chunks = client.chat.completions.create(
            model="gemma",
            messages=messages,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        return list(chunks)

    chunks = await in_thread(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    # Without stream_options the client gets no usage chunk (QueueGate asks llama-server for it and keeps it).
    plain = await in_thread(
        lambda: list(client.chat.completions.create(model="gemma", messages=messages, max_tokens=6, stream=True))
    )
    assert plain and all(c.choices and c.usage is None for c in plain)

    completion = await in_thread(lambda: client.completions.create(model="gemma", prompt="The sky is", max_tokens=4))
    assert completion.choices[0].text

    # Usage accounting took llama-server's own counts, also of the stream whose usage chunk the client never saw.
    usage = gw.daemon.usage
    await usage.flush()
    with sqlite3.connect(usage.path) as db:
        rows = db.execute("SELECT prompt_tokens, completion_tokens, estimated FROM requests ORDER BY rowid").fetchall()
    known = [answer.usage, chunks[-1].usage, None, completion.usage]
    assert len(rows) == 4 and not any(estimated for _, _, estimated in rows)
    for (prompt, completed, _), reported in zip(rows, known, strict=True):
        if reported is None:
            assert prompt == answer.usage.prompt_tokens and 0 < completed <= 6
        else:
            assert (prompt, completed) == (reported.prompt_tokens, reported.completion_tokens)


async def test_client_disconnect_stops_llama_generation(llama_gateway):
    """A client that leaves mid-stream frees llama-server's slot at once, long before max_tokens."""
    gw, url = llama_gateway
    slots_url = url.removesuffix("/v1") + "/slots"
    body = {
        "model": "gemma",
        "stream": True,
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "Count."}],
    }
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", gw.api + "/chat/completions", json=body) as response:
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data:")
                if seen >= 3:
                    break
        closed_at = time.monotonic()

        async def slots_busy() -> bool:
            slots = (await http.get(slots_url)).json()
            return any(slot.get("is_processing") for slot in slots)

        with trio.fail_after(5):
            while await slots_busy():
                await trio.sleep(0.02)
        # Long before the 1,000 tokens asked for (about 14 s at 70 tokens/s); 3 s leaves room for a loaded machine.
        assert time.monotonic() - closed_at < 3.0
    await wait_until(lambda: gw.stats().in_service == 0)


async def test_embeddings_against_llama_embedding_server(llama_parts, nursery, start_gateway):
    binary, model = llama_parts
    url = await start_llama_server(
        nursery, binary=binary, model=model, extra_args=["--embeddings", "--pooling", "mean"]
    )
    gw = await start_gateway({"embed": {"upstreams": [url], "kind": "llamacpp"}})
    result = await in_thread(lambda: gw.client(timeout=60).embeddings.create(model="embed", input=["a cat", "a dog"]))
    assert len(result.data) == 2 and len(result.data[0].embedding) > 100


async def test_queuegate_swaps_two_real_llama_servers_on_an_exclusive_device(llama_parts, start_gateway):
    """Two models, each a real llama-server QueueGate launches itself (same GGUF, different settings), sharing an
    exclusive device: each answer comes from the server of the model asked for, and they never run together."""
    binary, gguf = llama_parts

    def server(context: int) -> dict:
        argv = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", "${PORT}", "--alias", "${MODEL}",
                "-c", str(context), "-t", "2", "--parallel", "1", "--no-webui"]  # fmt: skip
        return {"launcher": "process", "kind": "llamacpp", "cmd": argv, "device": "cpu", "memory_gb": 1}

    gw = await start_gateway(
        {"gemma-short": server(512), "gemma-long": server(1024)},
        devices={"cpu": {"memory_gb": 1, "exclusive": True}},
        fleet={"swap_after_ms": 1000},
    )
    client = gw.client(timeout=120)

    def ask(model: str) -> str:
        messages = [{"role": "user", "content": "Say hi."}]
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
        assert answer.choices[0].message.content is not None
        return answer.model  # llama-server reports its --alias: the server that really answered

    for model in ["gemma-short", "gemma-long", "gemma-short"]:
        assert await in_thread(lambda model=model: ask(model)) == model
    fleet = gw.daemon.fleet
    assert fleet.statistics().swaps == 2
    assert_never_together(gw, "gemma-short", "gemma-long")
    loaded = {m.name: m.load_s for m in fleet.statistics().models}
    assert all(s is not None and s < 30 for s in loaded.values())


async def test_a_launched_llama_server_outlives_an_idle_daemon_and_starts_on_the_generic_kind(
    llama_parts, start_gateway
):
    """A llama-server QueueGate launched stays up (same process, no relaunch) through an idle period longer than
    every timer in the stack, including trio's 10 s worker-thread retirement. It is configured with the generic
    kind, whose health path (/v1/models) and requests both answer 503 while the model loads: nothing fails."""
    binary, gguf = llama_parts
    argv = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", "${PORT}", "-c", "512", "-t", "2", "--no-webui"]
    gw = await start_gateway({"gemma": {"launcher": "process", "kind": "openai", "cmd": argv, "ttl_s": 600}})
    client = gw.client(timeout=120)

    def ask() -> str | None:
        messages = [{"role": "user", "content": "Say hi."}]
        return client.chat.completions.create(model="gemma", messages=messages, max_tokens=4).choices[0].message.content

    assert await in_thread(ask) is not None
    launcher = gw.daemon.launchers["gemma"]
    pid = launcher.process.pid
    await trio.sleep(IDLE_PAST_EVERY_TIMER_S)  # trio retired the thread that forked it: the server lives on
    assert launcher.process.returncode is None and os.path.exists(f"/proc/{pid}")
    assert await in_thread(ask) is not None
    assert [event for event, _ in gw.daemon.fleet.launch_history("gemma")] == ["spawning"]
