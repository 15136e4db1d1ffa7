"""`GET /metrics` after real traffic through the daemon (the upstream is a simulated server)."""

from __future__ import annotations

import sys

import httpx
import openai
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import HI, in_thread, wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def test_metrics_after_traffic(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=200)
    gw = await start_gateway({"m": {"upstreams": [url]}})
    client = gw.client()
    messages = [{"role": "user", "content": "hi"}]
    await in_thread(lambda: client.chat.completions.create(model="m", messages=messages, max_tokens=8))
    await in_thread(
        lambda: list(client.chat.completions.create(model="m", messages=messages, max_tokens=8, stream=True))
    )
    with pytest.raises(openai.NotFoundError):
        await in_thread(lambda: client.chat.completions.create(model="nope", messages=messages))
    async with httpx.AsyncClient() as http:
        response = await http.get(gw.base_url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    assert found["queuegate_requests_total", (("class", "user"), ("model", "m"), ("status", "200"))] == 2
    assert found["queuegate_requests_total", (("class", "user"), ("model", "-"), ("status", "404"))] == 1
    assert found["queuegate_queue_wait_seconds_count", (("class", "user"),)] == 2
    assert found["queuegate_time_to_first_token_seconds_count", (("model", "m"),)] == 2
    assert found["queuegate_tokens_per_second_count", (("model", "m"),)] == 1  # the streamed one
    assert found["queuegate_tokens_total", (("kind", "completion"), ("model", "m"))] >= 8  # the non-streamed usage
    overhead_count = found["queuegate_gateway_overhead_seconds_count", ()]
    assert overhead_count == 2
    assert 0 < found["queuegate_gateway_overhead_seconds_sum", ()] < 1.0
    assert found["queuegate_queue_length", (("class", "user"), ("model", "m"))] == 0
    assert found["queuegate_in_flight", (("model", "m"),)] == 0
    assert found["queuegate_http_requests_open", ()] == 1  # the scrape itself
    assert found["queuegate_upstream_up", (("upstream", "m#0"),)] == 1
    assert found["queuegate_model_state", (("model", "m"), ("state", "ready"))] == 1
    assert found["queuegate_swaps_total", ()] == 0


async def test_open_requests_count_each_http_request_the_gateway_holds(start_sim, start_gateway):
    """One request served, one waiting for its slot, and the scrape: 3 open; once both clients hang up, the
    scrape alone."""
    _, url = await start_sim(tokens_per_s=5)
    gw = await start_gateway({"m": {"upstreams": [url], "max_concurrency": 1}})

    def waiting() -> int:
        return sum(c.waiting for model in gw.daemon.admission.statistics().models for c in model.classes)

    async with httpx.AsyncClient(timeout=30) as http:

        async def scrape() -> float:
            return samples((await http.get(gw.base_url + "/metrics")).text)["queuegate_http_requests_open", ()]

        async def ask() -> None:
            await http.post(
                gw.base_url + "/v1/chat/completions", json={"model": "m", "messages": HI, "max_tokens": 200}
            )

        async with trio.open_nursery() as clients:
            clients.start_soon(ask)
            clients.start_soon(ask)
            await wait_until(lambda: waiting() == 1)
            assert await scrape() == 3
            clients.cancel_scope.cancel()
        with trio.fail_after(5):
            while await scrape() != 1:
                await trio.sleep(0.05)


async def test_metrics_time_model_loads_and_count_usage_rows(start_gateway):
    """A QueueGate-launched model (a simulated server in a real child process) loads on demand: its load is timed;
    the request's usage row shows up as written."""
    sim = [sys.executable, "-m", "queuegate.sim", "--port", "${PORT}", "--tokens-per-s", "0", "--load-time", "0.3"]
    gw = await start_gateway({"m": {"launcher": "process", "kind": "llamacpp", "cmd": sim}}, usage={"flush_ms": 50})
    client = gw.client()
    await in_thread(lambda: client.chat.completions.create(model="m", messages=HI, max_tokens=2))
    async with httpx.AsyncClient() as http:
        await wait_until(lambda: gw.daemon.usage.statistics().committed == 1)
        found = samples((await http.get(gw.base_url + "/metrics")).text)
    assert found["queuegate_model_load_duration_seconds_count", (("model", "m"),)] == 1
    assert 0.3 <= found["queuegate_model_load_duration_seconds_sum", (("model", "m"),)] < 10
    assert found["queuegate_model_loads_total", ()] == 1
    assert found["queuegate_usage_rows_written_total", ()] == 1
    assert found["queuegate_usage_rows_pending", ()] == 0
    assert found["queuegate_usage_write_errors_total", ()] == 0
