"""What users live through at the edges: upstreams that are up but not ready, answers that break or end oddly,
answers in the wrong shape, clients that close at [DONE] or stop reading, operators who cancel.

Upstreams are `queuegate.sim` servers (real HTTP on loopback) because each case needs a fault on demand: a 503
"Loading model" behind a health path that passes early, a body dropped half-way, a stream that lingers after
[DONE] or ends without it. Clients are the official `openai` client, or a raw socket where the case is a client
that stops reading.
"""

from __future__ import annotations

import time
from functools import partial

import httpx
import openai
import pytest
import trio

from queuegate.admin.client import AdminClient
from queuegate.admin.protocol import Cancel
from queuegate.config import admin_socket_path
from queuegate.proxy._attempt import UpstreamNotReady
from queuegate.proxy._pipeline import _NotReadyWait
from queuegate.scheduler import ModelUnavailable
from tests.helpers import EXCLUSIVE, chat, in_thread, request_lines, sim_model, stuck_stream, wait_until


async def test_an_upstream_that_answers_503_while_loading_is_waited_out_not_a_502(start_sim, start_gateway, caplog):
    caplog.set_level("INFO", logger="queuegate")
    # Its health path passes at once, but every request gets llama-server's 503 "Loading model" for 4 s.
    sim, url = await start_sim(tokens_per_s=0, load_time_s=4, health_ok_while_loading=True)
    gw = await start_gateway({"m": {"upstreams": [url], "kind": "llamacpp"}})
    assert gw.stats().models[0].upstreams[0].state == "ready"
    healthy_at = sim.healthy_at
    assert time.monotonic() < healthy_at - 0.5  # the first request really arrives while it loads
    answer = await in_thread(lambda: chat(gw.client(), max_tokens=3))
    assert time.monotonic() >= healthy_at
    streamed = await in_thread(lambda: list(chat(gw.client(), max_tokens=3, stream=True)))
    assert answer.choices[0].message.content and "".join(c.choices[0].delta.content or "" for c in streamed)
    assert sim.stats.requests >= 3  # the first attempts got 503s
    await wait_until(lambda: len(request_lines(caplog)) == 2)  # (a stream's line is written after its last byte)
    lines = request_lines(caplog)
    assert [line["status"] for line in lines] == [200, 200] and lines[0]["retries"] >= 1
    assert time.monotonic() - healthy_at < 4  # and went out soon after it was ready (retries back off to 2 s)


async def test_503s_are_waited_out_only_up_to_the_bound(start_sim, start_gateway):
    sim, url = await start_sim(tokens_per_s=0)
    sim.set_fault("status_503")
    gw = await start_gateway({"m": {"upstreams": [url]}}, queue={"max_wait_s": 1.5})
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        await in_thread(lambda: chat(gw.client(), max_tokens=1))
    assert 1.0 < time.monotonic() - started < 4
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"]
    assert "not ready after" in info.value.message and "answered 503: Loading model" in info.value.message
    sim.set_fault(None)
    await wait_until(lambda: gw.stats().models[0].upstreams[0].state == "ready", timeout=5)
    assert (await in_thread(lambda: chat(gw.client(), max_tokens=1))).choices


async def test_a_launched_model_whose_health_passes_early_does_not_fail_its_first_requests(start_gateway):
    # kind "openai" probes /v1/models, which this server (like some real ones) answers while it still loads.
    model = sim_model(1.5, "--health-ok-while-loading", kind="openai")
    gw = await start_gateway({"a": model}, devices=EXCLUSIVE)
    answers = await in_thread(lambda: [chat(gw.client(), "a", max_tokens=2) for _ in range(2)])
    assert all(a.system_fingerprint == "a" for a in answers)


async def test_a_body_dropped_half_way_is_retried_elsewhere_and_the_chat_moves(start_sim, start_gateway, caplog):
    caplog.set_level("INFO", logger="queuegate")
    bad, bad_url = await start_sim(tokens_per_s=0, model="bad")
    _, good_url = await start_sim(tokens_per_s=0, model="good")
    gw = await start_gateway({"m": {"upstreams": [bad_url, good_url]}}, upstream={"health_interval_s": 30})

    def ask(chat_id: str):
        return chat(gw.client(), max_tokens=4, extra_headers={"X-Chat-Id": chat_id})

    # Find a chat that sticks to the upstream about to break.
    sticky = ""
    for i in range(20):
        sticky = f"c{i}"
        if (await in_thread(lambda chat_id=sticky: ask(chat_id))).system_fingerprint == "bad":
            break
    bad.set_fault("die_mid_stream")  # a non-streamed answer: half the body, then the connection drops
    answer = await in_thread(lambda: ask(sticky))
    assert answer.system_fingerprint == "good" and answer.choices[0].message.content  # retried, not a 502
    assert request_lines(caplog)[-1]["retries"] == 1
    bad.set_fault(None)
    answers = [await in_thread(lambda: ask(sticky)) for _ in range(3)]
    assert {a.system_fingerprint for a in answers} == {"good"}  # the chat stays where it was answered


async def test_a_client_that_closes_at_done_got_a_complete_stream(start_sim, start_gateway, caplog):
    caplog.set_level("INFO", logger="queuegate")
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url], "kind": "llamacpp"}}, usage={"flush_ms": 50})
    for _ in range(5):  # the upstream ends its body 0.5 s after [DONE]; the SDK has closed by then
        chunks = await in_thread(
            lambda: list(chat(gw.client(), max_tokens=7, stream=True, extra_body={"sim_fault": "linger_after_done"}))
        )
        assert chunks
    await wait_until(lambda: len(request_lines(caplog)) == 5)
    for line in request_lines(caplog):
        assert line["status"] == 200 and line["error"] is None
        assert line["completion_tokens"] == 7 and line.get("tokens_estimated") is None  # the upstream's own count


async def test_a_stream_that_ends_without_done_or_finish_reason_is_an_error(start_sim, start_gateway, caplog):
    caplog.set_level("INFO", logger="queuegate")
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}})

    def consume(fault: str) -> list:
        return list(chat(gw.client(), max_tokens=8, stream=True, extra_body={"sim_fault": fault}))

    with pytest.raises(openai.APIError) as info:
        await in_thread(lambda: consume("no_done"))
    assert "ended the stream before it was complete" in info.value.message
    complete = await in_thread(lambda: consume("finish_without_done"))  # a finish reason: whole, [DONE] added
    assert complete[-1].choices[0].finish_reason == "length"
    await wait_until(lambda: len(request_lines(caplog)) == 2)
    cut, whole = request_lines(caplog)
    assert cut["status"] == 502 and "ended the stream" in cut["error"]
    assert whole["status"] == 200 and whole["error"] is None


async def test_the_client_gets_the_shape_it_asked_for(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}})
    client = gw.client()
    plain = await in_thread(lambda: chat(client, max_tokens=5))
    text = plain.choices[0].message.content

    # A streamed request answered with one JSON body: the client still gets a stream, usage if it asked.
    chunks = await in_thread(
        lambda: list(
            chat(
                client,
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"sim_fault": "whole_answer"},
            )
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

    # A plain request answered with an event stream: the client gets one answer, with its usage.
    folded = await in_thread(lambda: chat(client, max_tokens=5, extra_body={"sim_fault": "stream_answer"}))
    assert folded.object == "chat.completion" and folded.choices[0].message.content == text
    assert folded.choices[0].finish_reason == "length" and folded.usage.completion_tokens == 5
    completion = await in_thread(
        lambda: client.completions.create(
            model="m", prompt="hi", max_tokens=4, extra_body={"sim_fault": "stream_answer"}
        )
    )
    assert completion.choices[0].text and completion.usage.completion_tokens == 4


async def test_a_client_that_stops_reading_is_cut_off_and_frees_the_slot(start_sim, start_gateway, caplog):
    caplog.set_level("INFO", logger="queuegate")
    sim, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url], "max_concurrency": 1}}, server={"write_timeout_s": 1})
    stuck = await stuck_stream(gw.base_url)
    # Buffers fill within moments; one second later the connection is closed and the upstream with it.
    await wait_until(lambda: sim.stats.disconnects == 1, timeout=15)
    await wait_until(lambda: gw.stats().in_service == 0, timeout=1)  # (the same cleanup, just after the close)
    assert (await in_thread(lambda: chat(gw.client(), max_tokens=2))).choices  # the one slot serves others again
    line = next(line for line in request_lines(caplog) if line["rid"] == "stuck")
    assert line["status"] == 499
    assert any("read nothing for 1 s" in str(getattr(r, "fields", {}).get("why")) for r in caplog.records)
    assert gw.daemon.http.stalled == 1
    await stuck.aclose()


async def test_an_operator_cancel_wins_over_a_client_that_reads_nothing(start_sim, start_gateway):
    sim, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url], "max_concurrency": 1}}, server={"write_timeout_s": 600})
    stuck = await stuck_stream(gw.base_url)
    await trio.sleep(1.0)  # its writes are blocked by now
    assert gw.stats().in_service == 1
    async with AdminClient(admin_socket_path(gw.daemon.config)) as admin:
        assert (await admin.request(Cancel(request_id="stuck"))).message == "cancelled stuck"
    await wait_until(lambda: sim.stats.disconnects == 1, timeout=5)
    assert gw.stats().in_service == 0
    await stuck.aclose()


async def test_one_dropped_body_does_not_fail_the_requests_waiting_for_that_upstream(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=20)
    gw = await start_gateway({"m": {"upstreams": [url], "max_concurrency": 1}}, upstream={"health_interval_s": 30})
    results: dict[str, object] = {}

    async def ask(name: str, **extra) -> None:
        try:
            results[name] = await in_thread(lambda: chat(gw.client(), max_tokens=6, **extra))
        except openai.APIStatusError as exc:
            results[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(ask, "dropped", extra_body={"sim_fault": "die_mid_stream"}))
        await wait_until(lambda: gw.stats().in_service == 1)
        for name in ("next", "last"):
            nursery.start_soon(ask, name)
        await wait_until(lambda: gw.stats().waiting == 2)
    assert isinstance(results["dropped"], openai.APIStatusError) and results["dropped"].status_code == 502
    assert results["next"].choices and results["last"].choices  # held until a check said the upstream is fine


async def test_a_cancelled_request_leaves_its_keep_alive_connection_usable_for_large_answers(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=5, embedding_dim=40_000)
    gw = await start_gateway({"m": {"upstreams": [url], "kind": "llamacpp"}}, server={"write_timeout_s": 5})
    async with (
        httpx.AsyncClient(base_url=gw.api, limits=httpx.Limits(max_connections=1), timeout=20) as http,
        AdminClient(admin_socket_path(gw.daemon.config)) as admin,
    ):
        async with trio.open_nursery() as nursery:

            async def cancelled() -> None:
                body = {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
                response = await http.post("/chat/completions", json=body, headers={"x-request-id": "victim"})
                assert response.status_code == 503 and response.json()["error"]["code"] == "cancelled"

            nursery.start_soon(cancelled)
            await wait_until(lambda: gw.stats().in_service == 1)
            await admin.request(Cancel(request_id="victim"))
        await trio.sleep(1.5)  # longer than the write limit the cancel set for that request
        big = await http.post("/embeddings", json={"model": "m", "input": ["a", "b", "c", "d", "e"]})
        assert big.status_code == 200 and len(big.content) > 1_000_000  # same connection, several MB, whole
        assert len(big.json()["data"]) == 5


async def test_a_client_that_reads_a_large_answer_slowly_is_not_cut_off(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0, embedding_dim=40_000)
    gw = await start_gateway({"m": {"upstreams": [url], "kind": "llamacpp"}}, server={"write_timeout_s": 1})
    host, port = gw.base_url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 32 * 1024)  # small: the server's writes wait
    await sock.connect((host, int(port)))
    stream = trio.SocketStream(sock)
    body = b'{"model": "m", "input": ["a", "b", "c", "d"]}'
    await stream.send_all(
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received, started = 0, time.monotonic()
    with trio.fail_after(30):
        while chunk := await stream.receive_some(64 * 1024):
            received += len(chunk)
            if chunk.endswith(b"}]}") or chunk.endswith(b"}}"):
                break
            await trio.sleep(0.05)  # about 1 MB/s: slow, but always making progress
    assert time.monotonic() - started > 1.5  # the whole answer took longer than the write timeout
    assert received > 1_500_000 and gw.daemon.http.stalled == 0
    await stream.aclose()


async def test_503_waits_back_off_honour_retry_after_and_stop_at_the_bound(autojump_clock):
    wait = _NotReadyWait(bound_s=10)
    delays = [wait.next_delay(UpstreamNotReady(None, "loading")) for _ in range(5)]
    assert delays == [0.25, 0.5, 1.0, 2.0, 2.0]  # doubling, at most 2 s
    assert wait.next_delay(UpstreamNotReady(0.0, "busy")) == 0.25  # Retry-After: 0 is no reason to spin
    assert wait.next_delay(UpstreamNotReady(3.0, "busy")) == 3.0
    with pytest.raises(ModelUnavailable) as refused:
        wait.next_delay(UpstreamNotReady(30.0, "busy"))  # longer than the bound allows: the client is told
    assert refused.value.retry_after_s == 30.0 and "busy" in refused.value.message
    await trio.sleep(10)
    with pytest.raises(ModelUnavailable):
        wait.next_delay(UpstreamNotReady(None, "loading"))


async def test_non_streamed_answers_are_bounded_in_size_and_in_time(start_sim, start_gateway):
    sim, url = await start_sim(tokens_per_s=0, embedding_dim=40_000)
    gw = await start_gateway(
        {"m": {"upstreams": [url], "kind": "llamacpp"}}, upstream={"max_answer_mb": 1, "answer_timeout_s": 1}
    )
    client = gw.client()
    with pytest.raises(openai.APIStatusError) as big:  # about 2.5 MB of embeddings
        await in_thread(lambda: client.embeddings.create(model="m", input=["a", "b", "c", "d", "e"]))
    assert big.value.status_code == 502 and "answered more than 1 MB" in big.value.message
    assert (await in_thread(lambda: client.embeddings.create(model="m", input="a"))).data  # a smaller one is fine

    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as slow:  # a byte every 0.2 s: it would take a minute
        await in_thread(lambda: chat(client, max_tokens=20, extra_body={"sim_fault": "drip"}))
    assert slow.value.status_code == 504 and "took too long to answer in all" in slow.value.message
    assert time.monotonic() - started < 3
    await wait_until(lambda: sim.stats.active == 0 and gw.stats().in_service == 0)
    streamed = await in_thread(lambda: list(chat(client, max_tokens=3, stream=True)))  # streams are not bounded so
    assert streamed
