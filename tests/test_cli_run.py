"""`queuegate run` as a user runs it: a real subprocess, real signals, the demo fleet, the official client."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import trio

from tests.conftest import in_thread, start_daemon


def children(pid: int) -> list[str]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return found.stdout.split()


async def test_demo_fleet_serves_the_openai_client_and_stops_on_sigint(nursery):
    daemon = await start_daemon(nursery, "--demo", "--listen", "127.0.0.1:0")
    client = daemon.client()
    models = {m.id for m in await in_thread(lambda: list(client.models.list()))}
    assert {"demo-chat", "chat", "planner", "demo-coder", "coder", "demo-writer", "writer", "embed"} <= models
    messages = [{"role": "user", "content": "hello"}]
    for model in ("coder", "writer"):  # the writer does not fit beside the coder: QueueGate swaps them
        answer = await in_thread(
            lambda model=model: client.chat.completions.create(model=model, messages=messages, max_tokens=4)
        )
        assert answer.choices[0].message.content
    fleet = children(daemon.process.pid)
    assert len(fleet) == 4  # two chat upstreams, the embedder, and the writer (the coder was swapped out)
    streamed = await in_thread(
        lambda: list(client.chat.completions.create(model="chat", messages=messages, max_tokens=4, stream=True))
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    vectors = await in_thread(lambda: client.embeddings.create(model="embed", input="hi"))
    assert len(vectors.data[0].embedding) == 16
    # A demo upstream that dies takes only itself down: the gateway goes on serving the others.
    embedder = next(pid for pid in fleet if b"demo-embed" in Path(f"/proc/{pid}/cmdline").read_bytes())
    os.kill(int(embedder), signal.SIGTERM)
    with trio.fail_after(10):
        while "demo upstream exited" not in daemon.stderr:
            await trio.sleep(0.05)
    assert (await in_thread(lambda: client.chat.completions.create(model="chat", messages=messages))).choices

    daemon.process.send_signal(signal.SIGINT)
    with trio.fail_after(10):
        await daemon.process.wait()
    assert daemon.process.returncode == 0, daemon.stderr
    for pid in fleet:  # the simulated fleet went down with the daemon
        assert not os.path.exists(f"/proc/{pid}"), f"demo child {pid} outlived the daemon"
    assert "status=200" in daemon.stderr and "rid=qg-" in daemon.stderr


async def test_sigterm_lets_in_flight_stream_finish_and_keeps_secrets_out_of_logs(start_sim, nursery, tmp_path):
    sim, url = await start_sim(tokens_per_s=20)
    config = tmp_path / "queuegate.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nshutdown_grace_s = 10\n'
        f'[models.m]\nupstreams = ["{url}"]\napi_key_env = "QG_TEST_BACKEND_KEY"\n'
    )
    secret = "sk-test-very-secret-4242"
    daemon = await start_daemon(nursery, "--config", str(config), env={"QG_TEST_BACKEND_KEY": secret})
    body = {"model": "m", "stream": True, "max_tokens": 30, "messages": [{"role": "user", "content": "hi"}]}
    events = []
    async with (
        httpx.AsyncClient(timeout=20) as http,
        http.stream("POST", daemon.url + "/v1/chat/completions", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                events.append(line)
                if len(events) == 1:
                    daemon.process.send_signal(signal.SIGTERM)
                    signalled = time.monotonic()
    assert events[-1] == "data: [DONE]" and len(events) >= 31  # the whole stream, after the signal
    assert time.monotonic() - signalled > 1.0
    with trio.fail_after(10):
        await daemon.process.wait()
    assert daemon.process.returncode == 0
    assert sim.stats.received[-1].headers["authorization"] == f"Bearer {secret}"
    assert secret not in daemon.stderr and secret not in daemon.stdout
    assert "status=200" in daemon.stderr


async def test_shutdown_grace_period_cuts_streams_that_run_too_long(start_sim, nursery, tmp_path):
    sim, url = await start_sim(tokens_per_s=5)
    config = tmp_path / "queuegate.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\nshutdown_grace_s = 0.5\n[models.m]\nupstreams = ["{url}"]\n')
    daemon = await start_daemon(nursery, "--config", str(config))
    body = {"model": "m", "stream": True, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=20) as http:
        async with http.stream("POST", daemon.url + "/v1/chat/completions", json=body) as response:
            async for _ in response.aiter_lines():
                daemon.process.send_signal(signal.SIGTERM)
                break
        started = time.monotonic()
        with trio.fail_after(10):
            await daemon.process.wait()
    assert time.monotonic() - started < 5
    with trio.fail_after(2):
        while sim.stats.active:
            await trio.sleep(0.02)  # the upstream stream was closed too, not left generating
