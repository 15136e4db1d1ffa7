"""Client API keys through the real daemon and the `openai` client (the upstream is a simulated server)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import httpx
import openai
import pytest
import trio

from queuegate.admin.client import AdminClient
from queuegate.admin.command import render_status
from queuegate.config import admin_socket_path
from queuegate.scheduler._limits import duration
from tests.helpers import SECRETS, in_thread, request_lines, wait_until


async def keyed_gateway(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    models = {"chat": {"upstreams": [url], "aliases": ["assistant"]}, "coder": {"upstreams": [url]}}
    keys = {
        "alice": {"key_env": "ALICE_KEY"},
        "nightly": {"key_env": "BATCH_KEY", "class": "batch", "models": ["assistant"]},
    }
    return await start_gateway(models, keys=keys)


def ask(gw, api_key: str, model: str = "chat", **headers: str):
    client = gw.client(api_key=api_key, default_headers=headers or None)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)


async def test_a_key_is_required_and_checked(start_sim, start_gateway, key_env, caplog):
    caplog.set_level("INFO", logger="queuegate")
    gw = await keyed_gateway(start_sim, start_gateway)
    assert (await in_thread(lambda: ask(gw, SECRETS["ALICE_KEY"]))).choices
    for wrong in ("sk-not-a-key-at-all", "Bearer"):
        with pytest.raises(openai.AuthenticationError) as info:
            await in_thread(lambda wrong=wrong: ask(gw, wrong))
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    async with httpx.AsyncClient() as http:  # X-Api-Key works too; no key at all is 401
        chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        ok = await http.post(gw.api + "/chat/completions", json=chat, headers={"x-api-key": SECRETS["ALICE_KEY"]})
        missing = await http.post(gw.api + "/chat/completions", json=chat)
        assert (await http.get(gw.base_url + "/healthz")).status_code == 200  # health stays open for probes
    assert ok.status_code == 200
    assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
    assert [f["key"] for f in request_lines(caplog) if f["status"] == 200] == ["alice", "alice"]
    for secret in SECRETS.values():
        assert secret not in caplog.text


async def test_a_key_sees_and_uses_only_its_models_in_its_class(start_sim, start_gateway, key_env):
    gw = await keyed_gateway(start_sim, start_gateway)
    nightly = gw.client(api_key=SECRETS["BATCH_KEY"])
    listed = {m.id for m in await in_thread(lambda: list(nightly.models.list()))}
    assert listed == {"chat", "assistant"}
    with pytest.raises(openai.NotFoundError) as info:  # as OpenAI answers: no telling "exists" from "not yours"
        await in_thread(lambda: ask(gw, SECRETS["BATCH_KEY"], "coder"))
    assert info.value.body["message"] == (
        "The model 'coder' does not exist or you do not have access to it. Available models: chat, assistant"
    )
    answer = await in_thread(lambda: ask(gw, SECRETS["BATCH_KEY"], "assistant"))
    assert answer.choices
    alice = gw.client(api_key=SECRETS["ALICE_KEY"])
    assert {m.id for m in await in_thread(lambda: list(alice.models.list()))} == {"chat", "assistant", "coder"}
    # Asking for a model that does not exist tells a key only the names it may use.
    with pytest.raises(openai.NotFoundError) as unknown:
        await in_thread(lambda: ask(gw, SECRETS["BATCH_KEY"], "gpt-5"))
    assert unknown.value.body["message"].endswith("Available models: chat, assistant")


async def test_readiness_details_are_for_keys_and_probes_get_the_verdict(start_sim, start_gateway, key_env):
    gw = await keyed_gateway(start_sim, start_gateway)
    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        anonymous = await http.get("/readyz")
        wrong = await http.get("/readyz", headers={"authorization": "Bearer sk-wrong"})
        nightly = await http.get("/readyz", headers={"authorization": f"Bearer {SECRETS['BATCH_KEY']}"})
    assert anonymous.status_code == wrong.status_code == nightly.status_code == 200
    assert anonymous.json() == wrong.json() == {"ready": True, "models_ready": 2, "models": 2}
    assert nightly.json() == {"ready": True, "models": [{"name": "chat", "ready": True, "loaded": True}]}


async def test_the_key_sets_the_flow_and_can_only_lower_the_class(start_sim, start_gateway, key_env, caplog):
    caplog.set_level("INFO", logger="queuegate")
    gw = await keyed_gateway(start_sim, start_gateway)
    await in_thread(lambda: ask(gw, SECRETS["BATCH_KEY"]))  # a batch key on the user route: batch
    await in_thread(lambda: ask(gw, SECRETS["ALICE_KEY"], **{"x-priority": "agent"}))  # the header may lower
    logged = [
        (r.fields["key"], r.fields["class"], r.fields["flow"]) for r in caplog.records if r.getMessage() == "request"
    ]
    assert logged == [("nightly", "batch", "key:nightly"), ("alice", "agent", "key:alice")]


async def test_a_key_over_its_rpm_waits_instead_of_failing(start_sim, start_gateway, monkeypatch):
    """rpm = 6 and 12 requests at once: all 12 answered, six at once and six after the minute's window, no 429.
    (This test takes a real minute: the window is the rpm's.)"""
    monkeypatch.setenv("LIMITED_KEY", "sk-limited-0123456789")
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}}, keys={"bot": {"key_env": "LIMITED_KEY", "rpm": 6}})
    client = gw.client(api_key="sk-limited-0123456789", timeout=120)
    started = trio.current_time()
    answered: list[float] = []

    async def one(i: int) -> None:
        messages = [{"role": "user", "content": f"task {i}"}]
        await in_thread(lambda: client.chat.completions.create(model="m", messages=messages, max_tokens=1))
        answered.append(trio.current_time() - started)

    async with trio.open_nursery() as nursery:
        for i in range(12):
            nursery.start_soon(one, i)
        await wait_until(lambda: len(answered) >= 6, timeout=10)
        assert gw.stats().waiting == 6  # the rest wait in the queue, not in a 429
    answered.sort()
    assert len(answered) == 12
    assert answered[5] < 10 and answered[6] >= 59.5


async def test_tokens_per_minute_and_upstream_limits_wait_and_refuse_only_beyond_the_max_wait(
    start_sim, start_gateway, monkeypatch
):
    """A key's tpm and a model's own rpm (a cloud API's limit) hold requests; one that would wait longer than the
    queue's max wait gets 429 with Retry-After at once. (Simulated upstream: the limits, not the model, are tested.)"""
    monkeypatch.setenv("TPM_KEY", "sk-tokens-0123456789")
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway(
        {"chat": {"upstreams": [url]}, "cloud": {"upstreams": [url], "rpm": 1}},
        keys={"bot": {"key_env": "TPM_KEY", "tpm": 100}},
        queue={"max_wait_s": 5},
    )
    client = gw.client(api_key="sk-tokens-0123456789", max_retries=0)

    def ask(model: str, max_tokens: int):
        messages = [{"role": "user", "content": "hi"}]
        return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)

    first = await in_thread(lambda: ask("chat", 90))  # about 91 tokens charged, then its real usage
    with pytest.raises(openai.RateLimitError) as info:
        await in_thread(lambda: ask("chat", 200))  # larger than the whole limit: it would wait for the window
    assert info.value.status_code == 429 and "key 'bot'" in info.value.message
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 60
    cloud = await in_thread(lambda: ask("cloud", 1))
    with pytest.raises(openai.RateLimitError) as info:
        await in_thread(lambda: ask("cloud", 1))  # the model's upstream allows one request a minute
    assert "model 'cloud'" in info.value.message
    assert gw.stats().waiting == 0
    limits = {lim.name: lim for lim in gw.stats().limits}
    assert limits["upstream:cloud#0"].requests_used == 1 and limits["upstream:cloud#0"].free_in_s > 50
    assert limits["key:bot"].tokens_used == first.usage.total_tokens + cloud.usage.total_tokens  # real usage
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(gw.base_url + "/metrics")).text
    assert 'queuegate_rate_limit{limit="key:bot",unit="tokens"} 100.0' in metrics
    assert 'queuegate_rate_limit_used{limit="upstream:cloud#0",unit="requests"} 1.0' in metrics
    async with AdminClient(admin_socket_path(gw.daemon.config)) as admin:  # what `queuegate admin status` prints
        text = render_status(await admin.status())
    assert "limit upstream:cloud#0: 1/1 rpm in the last minute; full for" in text
    assert f"limit key:bot: {limits['key:bot'].tokens_used}/100 tpm in the last minute" in text


async def test_a_request_held_by_a_limit_is_still_cancellable(start_sim, start_gateway, monkeypatch):
    """A client that gives up while its key's window holds it leaves the queue at once (nothing left behind)."""
    monkeypatch.setenv("ONE_KEY", "sk-one-a-minute-0123")
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}}, keys={"slow": {"key_env": "ONE_KEY", "rpm": 1}})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    headers = {"authorization": "Bearer sk-one-a-minute-0123"}
    async with httpx.AsyncClient(timeout=20) as http:
        assert (await http.post(gw.api + "/chat/completions", json=body, headers=headers)).status_code == 200
        async with trio.open_nursery() as nursery:
            # Held for the rest of the minute: once it waits in the queue, the client gives up.
            nursery.start_soon(functools.partial(http.post, gw.api + "/chat/completions", json=body, headers=headers))
            await wait_until(lambda: gw.stats().waiting == 1, timeout=3)
            nursery.cancel_scope.cancel()
    await wait_until(lambda: not gw.stats().waiting, timeout=3)


async def test_a_streamed_request_held_by_a_limit_is_told_why_and_about_how_long(start_sim, start_gateway, monkeypatch):
    monkeypatch.setenv("ONE_KEY", "sk-one-a-minute-0123")
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway(
        {"m": {"upstreams": [url]}},
        keys={"slow": {"key_env": "ONE_KEY", "rpm": 1}},
        queue={"notify_min_ms": 100},
    )
    client = gw.client(api_key="sk-one-a-minute-0123")
    messages = [{"role": "user", "content": "hi"}]
    await in_thread(lambda: client.chat.completions.create(model="m", messages=messages, max_tokens=1))

    def first_notice() -> str:
        with client.chat.completions.create(model="m", messages=messages, max_tokens=1, stream=True) as stream:
            for chunk in stream:  # the first event is the queue notice; then the client leaves
                return chunk.choices[0].delta.model_extra["reasoning_content"]
        raise AssertionError("no event")

    notice = await in_thread(first_notice)
    # About the rest of the minute (the notice comes 0.1 s after the first request was answered).
    assert re.fullmatch(
        r"⏳ Queued for m: position 1, about (59|60) s \(held by a requests- or tokens-per-minute limit\)\.\n", notice
    )
    await wait_until(lambda: not gw.stats().waiting, timeout=3)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_a_caller_without_a_key_cannot_make_the_gateway_hold_its_body(start_sim, start_gateway, key_env):
    gw = await keyed_gateway(start_sim, start_gateway)
    host, port = gw.base_url.removeprefix("http://").rsplit(":", 1)
    chunk = b"x" * 1_000_000
    before = rss_mb()
    streams = []
    with trio.fail_after(30):  # a gateway that stopped reading without closing would hang the sends
        for _ in range(10):  # each announces 15 MB and sends 8 MB of it, without a key
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: 15000000\r\n\r\n"
            )
            for _ in range(8):
                await stream.send_all(chunk)
            streams.append(stream)
    await trio.sleep(0.5)
    grown = rss_mb() - before
    assert grown < 40, f"the gateway grew by {grown:.0f} MB holding bodies of callers without a key"
    for stream in streams:
        await stream.aclose()


async def test_answers_to_a_key_with_limits_carry_openais_rate_limit_headers(start_sim, start_gateway, monkeypatch):
    monkeypatch.setenv("LIMITED_KEY", "sk-limited-0123456789")
    monkeypatch.setenv("FREE_KEY", "sk-free-0123456789")
    _, url = await start_sim(tokens_per_s=0)
    keys = {"bot": {"key_env": "LIMITED_KEY", "rpm": 5, "tpm": 1000}, "free": {"key_env": "FREE_KEY"}}
    gw = await start_gateway({"m": {"upstreams": [url]}}, keys=keys)
    client = gw.client(api_key="sk-limited-0123456789")
    messages = [{"role": "user", "content": "hi"}]
    first = await in_thread(
        lambda: client.chat.completions.with_raw_response.create(model="m", messages=messages, max_tokens=3)
    )
    second = await in_thread(
        lambda: client.chat.completions.with_raw_response.create(model="m", messages=messages, max_tokens=3)
    )
    assert first.headers["x-ratelimit-limit-requests"] == "5" and first.headers["x-ratelimit-remaining-requests"] == "4"
    assert second.headers["x-ratelimit-remaining-requests"] == "3"
    assert (
        second.headers["x-ratelimit-reset-requests"].endswith("s")
        and second.headers["x-ratelimit-limit-tokens"] == "1000"
    )
    assert 0 < int(second.headers["x-ratelimit-remaining-tokens"]) < 1000
    # A key without limits gets none (nothing to tell).
    free = gw.client(api_key="sk-free-0123456789")
    plain = await in_thread(lambda: free.chat.completions.with_raw_response.create(model="m", messages=messages))
    assert not [h for h in plain.headers if h.startswith("x-ratelimit")]


def test_reset_durations_are_written_as_openai_writes_them():
    assert [duration(s) for s in (0.02, 1.5, 59.6, 60, 361.2)] == ["20ms", "1.5s", "59.6s", "1m0s", "6m1s"]
