"""The simulated upstream's own contract: llama-server-like health, OpenAI shapes, pacing, faults, disconnects."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import pytest
import trio

from tests.helpers import wait_until

CHAT = {"model": "x", "messages": [{"role": "user", "content": "hi there"}]}


async def test_health_reports_loading_then_ok(start_sim):
    sim, url = await start_sim(load_time_s=0.3)
    root = url.removesuffix("/v1")
    async with httpx.AsyncClient() as http:
        loading = await http.get(root + "/health")
        assert loading.status_code == 503 and loading.json()["error"]["message"] == "Loading model"
        await trio.sleep(0.35)
        assert (await http.get(root + "/health")).json() == {"status": "ok"}
        sim.set_fault(None, health_status=500)
        assert (await http.get(root + "/health")).status_code == 500


async def test_stream_events_are_paced_and_complete(start_sim):
    _, url = await start_sim(tokens_per_s=50)
    body = {**CHAT, "stream": True, "max_tokens": 5, "stream_options": {"include_usage": True}}
    arrivals, events = [], []
    async with httpx.AsyncClient() as http, http.stream("POST", url + "/chat/completions", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream"
        started = time.monotonic()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                arrivals.append(time.monotonic() - started)
    assert events[-1] == "[DONE]"
    chunks = [httpx.Response(200, content=e).json() for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:6]] == [None] * 5 + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert 0.06 <= arrivals[4] - arrivals[0] < 0.3  # four gaps of ~20 ms


async def test_non_stream_and_embeddings_shapes(start_sim):
    sim, url = await start_sim(tokens_per_s=0, embedding_dim=4)
    async with httpx.AsyncClient() as http:
        chat = (await http.post(url + "/chat/completions", json={**CHAT, "max_tokens": 3})).json()
        assert chat["object"] == "chat.completion" and chat["model"] == "x"
        assert chat["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
        text = (await http.post(url + "/completions", json={"model": "x", "prompt": "a"})).json()
        assert text["object"] == "text_completion" and text["choices"][0]["finish_reason"] == "stop"
        vectors = (await http.post(url + "/embeddings", json={"model": "x", "input": ["a", "b"]})).json()
        assert [len(d["embedding"]) for d in vectors["data"]] == [4, 4]
        assert (await http.post(url + "/chat/completions", content=b"{")).status_code == 400
    assert sim.stats.requests == 3 and sim.stats.completed == 3  # the malformed one never reached the "model"


@pytest.mark.parametrize("stream", [False, True])
async def test_die_mid_stream_truncates_the_body(start_sim, stream):
    _, url = await start_sim(tokens_per_s=0)
    body = {**CHAT, "stream": stream, "max_tokens": 10, "sim_fault": "die_mid_stream"}
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(url + "/chat/completions", json=body)


async def test_close_before_response_and_status_faults(start_sim):
    sim, url = await start_sim(tokens_per_s=0)
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(url + "/chat/completions", json={**CHAT, "sim_fault": "close_before_response"})
        limited = await http.post(url + "/chat/completions", json={**CHAT, "sim_fault": "status_429"})
        assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
        assert (
            await http.post(url.removesuffix("/v1") + "/sim/fault", json={"fault": "status_500"})
        ).status_code == 200
        assert (await http.post(url + "/chat/completions", json=CHAT)).status_code == 500
        assert (await http.post(url.removesuffix("/v1") + "/sim/fault", json={"fault": "bogus"})).status_code == 400
    with pytest.raises(ValueError, match="unknown fault"):
        sim.set_fault("bogus")


async def test_client_disconnect_is_noticed_at_once(start_sim):
    sim, url = await start_sim(tokens_per_s=10)
    async with httpx.AsyncClient() as http:
        with trio.move_on_after(0.3):
            await http.post(url + "/chat/completions", json={**CHAT, "max_tokens": 50})
        closed_at = time.monotonic()
    await wait_until(lambda: sim.stats.disconnects == 1, timeout=1)
    assert sim.stats.disconnect_times[0] - closed_at < 0.1 and sim.stats.active == 0


async def test_cli_prints_ready_line_and_exits_on_sigterm():
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "queuegate.sim", "--port", "0", "--model", "cli-model"], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    with trio.fail_after(10):
        line = ""
        while not line.endswith("\n"):
            line += (await process.stdout.receive_some()).decode()
        assert line.startswith("QUEUEGATE_SIM_READY http://127.0.0.1:")
        url = line.split()[1]
        async with httpx.AsyncClient() as http:
            assert (await http.get(url + "/models")).json()["data"][0]["id"] == "cli-model"
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
