"""Clients nobody here wrote, as users point them at QueueGate: pydantic-ai and langchain against the real daemon on
loopback, simulated model servers (real HTTP) behind it."""

from __future__ import annotations

import json

import trio
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic_ai import Agent
from pydantic_ai.messages import ThinkingPart
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from tests.helpers import hang_the_only_slot, in_thread, wait_until


async def test_pydantic_ai_keeps_a_queue_notice_as_thinking_and_the_next_turn_does_not_send_it_on(
    start_sim, start_gateway
):
    sim, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url], "max_concurrency": 1}}, queue={"notify_min_ms": 0})
    agent = Agent(OpenAIChatModel("m", provider=OpenAIProvider(base_url=gw.api, api_key="unused")))
    async with trio.open_nursery() as nursery:
        holder = await hang_the_only_slot(nursery, gw)

        async def first_turn() -> list:
            async with agent.run_stream("first question") as result:
                await result.get_output()
            return result.all_messages()

        turn = await nursery.start(_asyncio_in_thread, first_turn)
        await wait_until(lambda: gw.stats().waiting == 1)
        await trio.sleep(0.3)  # (its notice went out)
        holder.cancel()
        history = await turn.receive()
    thinking = [p.content for m in history for p in getattr(m, "parts", []) if isinstance(p, ThinkingPart)]
    assert thinking and "⏳ Queued for m" in thinking[0]  # pydantic-ai keeps the notice as the model's thinking
    answer = await in_thread(lambda: agent.run_sync("second question", message_history=history))
    assert answer.output
    sent = sim.stats.received[-1].body
    assert "second question" in json.dumps(sent) and "⏳" not in json.dumps(sent)  # (not sent on to the model)


async def _asyncio_in_thread(make, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run an asyncio coroutine (pydantic-ai's) in a thread of its own; its result comes through a channel."""
    import asyncio

    send, receive = trio.open_memory_channel(1)
    task_status.started(receive)
    await send.send(await in_thread(lambda: asyncio.run(make())))


async def test_langchain_chat_streams_and_embeds_through_queuegate(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0, embedding_dim=8)
    gw = await start_gateway({"m": {"upstreams": [url]}, "e": {"upstreams": [url], "kind": "vllm"}})
    chat = ChatOpenAI(model="m", base_url=gw.api, api_key="unused", max_retries=0)
    assert (await in_thread(lambda: chat.invoke("hi"))).content
    streamed = await in_thread(lambda: "".join(str(c.content) for c in chat.stream("hi")))
    assert streamed
    # Offline, langchain's embeddings must not count tokens with tiktoken (which downloads its encoding): README.
    embeddings = OpenAIEmbeddings(model="e", base_url=gw.api, api_key="unused", check_embedding_ctx_length=False)
    vectors = await in_thread(lambda: embeddings.embed_documents(["a", "b"]))
    assert len(vectors) == 2 and len(vectors[0]) == 8
