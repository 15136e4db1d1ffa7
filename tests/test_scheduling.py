"""Scheduling through the real daemon: classes, fairness, bounds, sticky chats, queue notices, cancellation.

Upstreams are simulated servers (real HTTP on loopback): the tests need slow, countable slots on demand.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
import trio

from tests.helpers import EXCLUSIVE, SECRETS, hang_the_only_slot, in_thread, sim_model, wait_until


def body(content: str, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def served_order(sim) -> list[str]:
    return [r.body["messages"][0]["content"] for r in sim.stats.received]


async def post_all(gw, nursery, requests: list[tuple[str, dict, dict]], results: dict) -> None:
    """Send each (path, body, headers) from its own task, one after another so arrival order is known."""

    async def send(path: str, payload: dict, headers: dict) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            results[payload["messages"][0]["content"]] = await http.post(gw.api + path, json=payload, headers=headers)

    def admitted() -> int:
        stats = gw.stats()
        return stats.waiting + stats.in_service

    for path, payload, headers in requests:
        before = admitted()
        nursery.start_soon(send, path, payload, headers)
        await wait_until(lambda before=before: admitted() == before + 1)


async def one_busy_slot(start_sim, start_gateway, nursery, *, tokens_per_s: float, holder_tokens: int, **queue):
    """A gateway with one upstream slot, already taken by a "holder" request of `holder_tokens` tokens (run in
    `nursery`, so the caller's nursery waits for it); `queue` sets the [queue] section."""
    sim, url = await start_sim(tokens_per_s=tokens_per_s)
    gw = await start_gateway({"m": {"upstreams": [url], "max_concurrency": 1}}, queue=queue)
    holder = body("holder", max_tokens=holder_tokens)
    nursery.start_soon(in_thread, lambda: gw.client().chat.completions.create(**holder))
    await wait_until(lambda: gw.stats().in_service == 1)
    return sim, gw


async def test_classes_go_in_priority_order_and_x_priority_only_lowers(start_sim, start_gateway):
    sim, url = await start_sim(tokens_per_s=10)
    gw = await start_gateway({"m": {"upstreams": [url], "max_concurrency": 1}})
    results: dict[str, httpx.Response] = {}
    async with trio.open_nursery() as nursery:
        await post_all(gw, nursery, [("/chat/completions", body("holder", max_tokens=10), {})], results)
        await post_all(
            gw,
            nursery,
            [
                ("/chat/completions", body("batch"), {"X-Priority": "batch"}),
                ("/agent/chat/completions", body("agent-asks-user"), {"X-Priority": "user"}),  # cannot raise
                ("/chat/completions", body("user"), {}),
            ],
            results,
        )
        classes = {c.name: c.waiting for c in gw.stats().models[0].classes}
        assert classes == {"user": 1, "agent": 1, "batch": 1}
    assert served_order(sim) == ["holder", "user", "agent-asks-user", "batch"]
    assert all(r.status_code == 200 for r in results.values())

    with pytest.raises(openai.BadRequestError) as bad:
        await in_thread(
            lambda: gw.client().chat.completions.create(model="m", messages=[], extra_headers={"X-Priority": "urgent"})
        )
    assert bad.value.body["param"] == "X-Priority" and "user, agent, batch" in bad.value.message


async def test_a_flooding_flow_delays_another_flow_by_at_most_one_slot(start_sim, start_gateway):
    sim, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url], "max_concurrency": 1}}, queue={"max_size": 100})
    results: dict[str, httpx.Response] = {}
    async with trio.open_nursery() as nursery:
        holder = await hang_the_only_slot(nursery, gw)
        flood = [("/chat/completions", body(f"flood-{i}"), {"X-Session-Id": "agent"}) for i in range(30)]
        await post_all(gw, nursery, flood, results)
        await post_all(gw, nursery, [("/chat/completions", body("alice"), {"X-Session-Id": "alice"})], results)
        flows = {f.flow: f.waiting for f in gw.stats().models[0].flows}
        assert flows == {"session:agent": 30, "session:alice": 1, "client:127.0.0.1": 0}
        holder.cancel()
    order = served_order(sim)
    assert order[:3] == ["holder", "flood-0", "alice"]  # one slot behind the flood's request in turn, not 30
    assert order[3:] == [f"flood-{i}" for i in range(1, 30)]  # FIFO inside the flow, nothing lost
    assert all(r.status_code == 200 for r in results.values())


async def test_open_webuis_users_behind_one_key_take_turns(start_sim, start_gateway, key_env):
    """Open WebUI's request shape: every user of it comes from one address with one API key, and (forwarded user
    info headers, or its connection's headers with {{USER_ID}}) X-OpenWebUI-User-Id. One user's 24 chats do not make
    another user wait behind them."""
    sim, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway(
        {"m": {"upstreams": [url], "max_concurrency": 1}},
        keys={"webui": {"key_env": "QG_ALICE"}},
        queue={"max_size": 100},
    )
    auth = {"authorization": f"Bearer {SECRETS['QG_ALICE']}"}
    results: dict[str, httpx.Response] = {}
    async with trio.open_nursery() as nursery:
        holder = await hang_the_only_slot(nursery, gw, auth)
        heavy = {**auth, "X-OpenWebUI-User-Id": "11111111-aaaa", "X-OpenWebUI-Chat-Id": "chat"}
        chats = [
            ("/chat/completions", body(f"heavy-{i}"), {**heavy, "X-OpenWebUI-Chat-Id": f"c{i}"}) for i in range(24)
        ]
        await post_all(gw, nursery, chats, results)
        light = {**auth, "X-OpenWebUI-User-Id": "22222222-bbbb"}
        await post_all(gw, nursery, [("/chat/completions", body("light"), light)], results)
        flows = {f.flow: f.waiting for f in gw.stats().models[0].flows}
        assert flows["key:webui/user:11111111-aaaa"] == 24 and flows["key:webui/user:22222222-bbbb"] == 1
        holder.cancel()
    assert served_order(sim)[:3] == ["holder", "heavy-0", "light"]  # one slot behind, not 24
    assert all(r.status_code == 200 for r in results.values())


async def test_per_model_queue_bound_answers_429_with_retry_after(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=5)
    gw = await start_gateway({"m": {"upstreams": [url], "max_concurrency": 1, "max_queue": 1}})
    results: dict[str, httpx.Response] = {}
    async with trio.open_nursery() as nursery:
        await post_all(gw, nursery, [("/chat/completions", body("holder", max_tokens=5), {})], results)
        await wait_until(lambda: gw.stats().in_service == 1)
        await post_all(gw, nursery, [("/chat/completions", body("waits"), {})], results)
        with pytest.raises(openai.RateLimitError) as full:
            await in_thread(lambda: gw.client().chat.completions.create(**body("refused")))
        assert full.value.response.headers["retry-after"] == "1" and "queue is full" in full.value.message


async def test_sticky_chat_returns_to_its_upstream_and_does_not_stall_when_it_is_busy(start_sim, start_gateway):
    sims = [await start_sim(tokens_per_s=0) for _ in range(2)]
    gw = await start_gateway(
        {"m": {"upstreams": [url for _, url in sims], "max_concurrency": 1}}, affinity={"max_wait_ms": 300}
    )

    def where(content: str) -> int:
        return next(i for i, (sim, _) in enumerate(sims) if content in served_order(sim))

    client = gw.client()
    ways = [
        ({"X-Chat-Id": "c1"}, {}),
        ({"X-OpenWebUI-Chat-Id": "c2"}, {}),
        ({}, {"chat_id": "c3"}),
        ({}, {"metadata": {"chat_id": "c4"}}),
        ({}, {}),  # no id: the hash of the chat's first messages
    ]
    for n, (headers, extra) in enumerate(ways):
        for turn in range(4):
            content = f"way{n}-turn{turn}"
            messages = [{"role": "user", "content": f"way{n} start"}, {"role": "user", "content": content}]
            await in_thread(
                lambda messages=messages, headers=headers, extra=extra: client.chat.completions.create(
                    model="m", messages=messages, max_tokens=1, extra_headers=headers, extra_body=extra
                )
            )
        homes = {i for i, (sim, _) in enumerate(sims) for r in sim.stats.received if f"way{n}" in json.dumps(r.body)}
        assert len(homes) == 1, f"chat {n} moved between upstreams"

    # Busy sticky upstream: the request waits ~max_wait_ms, then takes the free one.
    home = next(i for i in range(2) if any("way0" in json.dumps(r.body) for r in sims[i][0].stats.received))
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as http:
        hog = trio.CancelScope()

        async def occupy() -> None:
            with hog:
                await http.post(
                    gw.api + "/chat/completions", json=body("hog", sim_fault="hang"), headers={"X-Chat-Id": "c1"}
                )

        nursery.start_soon(occupy)
        await wait_until(lambda: gw.stats().in_service == 1)
        started = time.monotonic()
        answer = await http.post(gw.api + "/chat/completions", json=body("moved"), headers={"X-Chat-Id": "c1"})
        assert answer.status_code == 200 and 0.25 <= time.monotonic() - started < 2
        assert "moved" in served_order(sims[1 - home][0])
        hog.cancel()


async def test_streamed_user_request_that_waits_gets_notices_then_a_clean_answer(start_sim, start_gateway):
    async with trio.open_nursery() as nursery:
        _, gw = await one_busy_slot(
            start_sim, start_gateway, nursery, tokens_per_s=10, holder_tokens=15, notify_min_ms=100, keepalive_s=0.3
        )

        def stream_and_time():
            started, events = time.monotonic(), []
            for chunk in gw.client().chat.completions.create(**body("waiting", max_tokens=3), stream=True):
                delta = chunk.choices[0].delta if chunk.choices else None
                events.append((time.monotonic() - started, delta))
            return events

        events = await in_thread(stream_and_time)
    notices = [
        (t, d.model_extra["reasoning_content"]) for t, d in events if (d.model_extra or {}).get("reasoning_content")
    ]
    content = "".join(d.content or "" for _, d in events if d is not None)
    assert notices and notices[0][0] < 0.6  # the user sees the notice long before the answer
    assert "Queued for m: position 1" in notices[0][1]
    assert content and "Queued" not in content  # the answer itself is untouched
    assert events[-1][0] > 1.0  # it really waited for the holder (15 tokens at 10/s)


async def test_keepalives_while_queued_and_no_notices_for_agents(start_sim, start_gateway):
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as http:
        _, gw = await one_busy_slot(
            start_sim, start_gateway, nursery, tokens_per_s=10, holder_tokens=10, notify_min_ms=50, keepalive_s=0.2
        )
        user = await http.post(gw.api + "/chat/completions", json=body("u", stream=True))
        agent = await http.post(gw.api + "/agent/chat/completions", json=body("a", stream=True))
    assert user.text.count(": queued") >= 2 and "reasoning_content" in user.text and "[DONE]" in user.text
    assert ": queued" not in agent.text and "reasoning_content" not in agent.text and "[DONE]" in agent.text


async def test_queue_timeout_after_notices_ends_the_stream_with_an_error_the_client_raises(start_sim, start_gateway):
    async with trio.open_nursery() as nursery:
        _, gw = await one_busy_slot(
            start_sim, start_gateway, nursery, tokens_per_s=5, holder_tokens=10, notify_min_ms=50, max_wait_s=0.5
        )

        def consume():
            seen = []
            with pytest.raises(openai.APIError) as failed:
                for chunk in gw.client().chat.completions.create(**body("late"), stream=True):
                    seen.append(chunk)
            return seen, failed.value

        seen, error = await in_thread(consume)
    assert seen and "waited 0.5 s in the queue" in error.message
    assert gw.stats().waiting == 0


async def test_disconnect_while_notified_in_the_queue_withdraws_and_never_reaches_upstream(start_sim, start_gateway):
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as http:
        sim, gw = await one_busy_slot(
            start_sim, start_gateway, nursery, tokens_per_s=10, holder_tokens=10, notify_min_ms=50
        )
        async with http.stream("POST", gw.api + "/chat/completions", json=body("leaves", stream=True)) as response:
            async for line in response.aiter_lines():
                if "reasoning_content" in line:
                    break  # saw the notice: now hang up
        await wait_until(lambda: gw.stats().waiting == 0, timeout=1)
        await wait_until(lambda: gw.stats().in_service == 0, timeout=3)
    assert served_order(sim) == ["holder"]


async def test_passthrough_route_is_scheduled_like_chat(start_sim, start_gateway):
    """The passthrough route waits its turn in the same queue (the one slot is busy) and reaches the upstream's
    chat endpoint with the tools left as they are."""
    results: dict[str, httpx.Response] = {}
    async with trio.open_nursery() as nursery:
        sim, gw = await one_busy_slot(start_sim, start_gateway, nursery, tokens_per_s=20, holder_tokens=10)
        await post_all(gw, nursery, [("/chat/completions_passthrough", body("tools", tools=[]), {})], results)
        assert gw.stats().waiting == 1  # queued behind the holder, not sent beside it
    answer = results["tools"]
    assert answer.status_code == 200 and answer.json()["object"] == "chat.completion"
    assert served_order(sim) == ["holder", "tools"]
    assert sim.stats.received[-1].path == "/v1/chat/completions" and sim.stats.received[-1].body["tools"] == []


async def test_notices_during_a_swap_tell_each_phase_and_a_learned_time_that_holds(start_gateway):
    """Two launched models (real simulator processes, 1.5 s to load) on one exclusive device: a user's streamed chat
    for the one not loaded is told the phases of its swap, with a first load's upper bound, then a learned time."""
    models = {"a": sim_model(1.5), "b": sim_model(1.5)}
    gw = await start_gateway(models, devices=EXCLUSIVE, queue={"notify_min_ms": 0}, fleet={"swap_after_ms": 0})
    client = gw.client(timeout=60)

    def streamed(model: str) -> tuple[list[tuple[float, str]], float, object]:
        started, notices, content_at = time.monotonic(), [], None
        with client.chat.completions.stream(model=model, messages=[{"role": "user", "content": "hi"}]) as stream:
            for event in stream:
                if event.type != "chunk" or not event.chunk.choices:
                    continue
                delta = event.chunk.choices[0].delta
                if (delta.model_extra or {}).get("reasoning_content"):
                    notices.append((time.monotonic() - started, delta.model_extra["reasoning_content"]))
                elif delta.content and content_at is None:
                    content_at = time.monotonic() - started
            final = stream.get_final_completion()
        return notices, content_at, final

    notices, _, final = await in_thread(lambda: streamed("a"))  # (a's first load: an upper bound)
    texts = [text for _, text in notices]
    assert any("up to" in text and "(its first load)" in text for text in texts), texts
    assert texts[-1] == "⏳ Your turn: a is on it.\n"
    assert final.id.startswith("chatcmpl-") and not final.id.startswith("chatcmpl-queued")
    assert final.choices[0].message.content  # (one completion: the notices' id is the answer's)
    # b swaps a out (its first load), then a comes back: its load time is learned now, and the notice says it.
    await in_thread(lambda: streamed("b"))
    notices, content_at, _ = await in_thread(lambda: streamed("a"))
    phases = [text for _, text in notices]
    learned = [(t, text) for t, text in notices if "about" in text and ("starting a" in text or "health of a" in text)]
    assert learned, phases
    told_at, text = learned[0]
    told = float(re.search(r"about (\d+) s", text).group(1))
    actual = content_at - told_at
    assert 0.4 * actual <= told <= 2.5 * actual + 1, (text, actual)  # (whole seconds, at least 1)
    assert any("draining b" in p or "stopping b" in p or "starting a" in p for p in phases), phases


async def test_notices_a_client_sends_back_as_thinking_do_not_reach_the_model(start_sim, start_gateway):
    sim, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}})
    history = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one",
         "reasoning_content": "⏳ Queued for m: position 1, about 3 s.\n⏳ Your turn: m is on it.\nI should say one."},
        {"role": "assistant", "content": "two", "reasoning_content": "⏳ Queued for m: position 2.\n"},
        {"role": "user", "content": "second"},
    ]  # fmt: skip
    await in_thread(lambda: gw.client().chat.completions.create(model="m", messages=history, max_tokens=2))
    sent = sim.stats.received[-1].body["messages"]
    assert sent[1]["reasoning_content"] == "I should say one." and "reasoning_content" not in sent[2]
    assert [m["content"] for m in sent] == ["first", "one", "two", "second"]
