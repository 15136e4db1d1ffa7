"""`queuegate node` as a user runs it on GPU hosts: real subprocesses on loopback, each with its own state and its own
exclusive device, launching simulated model servers (real processes) on demand, registered with a real gateway
that has no model of its own."""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path

import httpx
import pytest
import trio

from queuegate.config import NodeConfig, build_config
from queuegate.fleet.catalog import Catalog
from queuegate.nodes.agent import NodeAgent
from tests.helpers import children, in_thread, pids_named, request_lines, running, start_daemon, wait_until

NODE_KEYS = {"box1": "node-secret-box1", "box2": "node-secret-box2"}
SIM = '["${PYTHON}", "-m", "queuegate.sim", "--port", "${PORT}", "--model", "${MODEL}", "--load-time", "0.3"]'


def node_config(name: str, gateway: str, models: list[str]) -> str:
    launched = "".join(
        f'[models.{m}]\nlauncher = "process"\ncmd = {SIM}\nkind = "llamacpp"\ndevice = "gpu"\nmemory_gb = 10\n'
        f"startup_timeout_s = 20\n"
        for m in models
    )
    return (
        f'[server]\nlisten = "127.0.0.1:0"\n[usage]\nenabled = false\n'
        f'[node]\nname = "{name}"\ngateway = "{gateway}"\nkey_env = "NODE_KEY"\nheartbeat_s = 0.5\n'
        f"[devices.gpu]\nmemory_gb = 24\nexclusive = true\n{launched}"
    )


async def start_node(nursery, name: str, gateway: str, models: list[str], folder: str | None = None):
    folder = folder or tempfile.mkdtemp(prefix=f"queuegate-{name}-")
    config = Path(folder) / "node.toml"
    config.write_text(node_config(name, gateway, models))
    env = {"NODE_KEY": NODE_KEYS[name]}
    return await start_daemon(nursery, "--config", str(config), command="node", env=env, cwd=folder)


async def chat(gw, model: str, say: str = "hi", timeout: float = 30) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": say}], "max_tokens": 2}
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await client.post(gw.api + "/chat/completions", json=body)


async def test_nodes_serve_their_models_through_the_gateway_and_come_back_after_a_kill(nursery, start_gateway, caplog):
    caplog.set_level("INFO", logger="queuegate")
    gw = await start_gateway({}, node_keys={n: {"key": k} for n, k in NODE_KEYS.items()}, nodes={"stale_after_s": 1.5})
    box1 = await start_node(nursery, "box1", gw.base_url, ["a", "b", "shared"])
    box2 = await start_node(nursery, "box2", gw.base_url, ["c", "shared"])
    names = {"a", "b", "c", "shared"}
    await wait_until(lambda: all(gw.daemon.catalog.resolve(m) for m in names), timeout=15)
    assert [u.id for u in gw.daemon.catalog.models["shared"].upstreams] == ["shared@box1", "shared@box2"]
    # Each node loads what is asked of it, on demand, and swaps on its own exclusive device.
    for model in ("a", "b", "c"):
        answer = await chat(gw, model)
        assert answer.status_code == 200, answer.text
    # A model both nodes serve is served by both.
    async with trio.open_nursery() as asking:
        for i in range(6):
            asking.start_soon(chat, gw, "shared", f"chat {i}")
    upstreams = {line["upstream"] for line in request_lines(caplog) if line["model"] == "shared"}
    assert upstreams == {"shared@box1", "shared@box2"}
    # A node's API takes the gateway's key, not just anybody.
    async with httpx.AsyncClient(timeout=10) as client:
        body = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
        assert (await client.post(box1.url + "/v1/chat/completions", json=body)).status_code == 401
    # kill -9 of box2: its model servers die with it, its models are unavailable once it is stale; box1 serves on.
    launched = children(box2.process.pid)
    assert launched
    os.kill(box2.process.pid, signal.SIGKILL)
    await wait_until(lambda: not any(running(pid) for pid in launched), timeout=15)
    await wait_until(lambda: not gw.daemon.admission.serving("c"), timeout=5)
    refused = await chat(gw, "c")
    assert refused.status_code == 503 and "box2" in refused.json()["error"]["message"]
    assert (await chat(gw, "shared", "after")).status_code == 200
    # Started again, it registers again and serves.
    box2 = await start_node(nursery, "box2", gw.base_url, ["c", "shared"], folder=box2.cwd)
    await wait_until(lambda: gw.daemon.admission.serving("c"), timeout=15)
    again = await chat(gw, "c")  # (at its new address: the gateway's connections to the old one are not reused)
    assert again.status_code == 200, again.text
    # A node that stops leaves at once (the gateway does not wait for it to turn stale).
    box1.process.send_signal(signal.SIGTERM)
    await wait_until(lambda: gw.daemon.catalog.resolve("a") is None, timeout=10)
    assert [u.id for u in gw.daemon.catalog.models["shared"].upstreams] == ["shared@box2"]
    models = (await in_thread(lambda: httpx.get(gw.api + "/models"))).json()
    assert {m["id"] for m in models["data"]} == {"c", "shared"}


@pytest.mark.llama
async def test_a_chat_through_the_gateway_loads_the_real_llama_server_on_its_node(llama_parts, nursery, start_gateway):
    binary, model = llama_parts
    gw = await start_gateway({}, node_keys={"box1": {"key": NODE_KEYS["box1"]}})
    folder = tempfile.mkdtemp(prefix="queuegate-box1-")
    cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", "${PORT}", "-c", "2048", "-t", "2", "--no-webui"]
    config = Path(folder) / "node.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n[usage]\nenabled = false\n'
        f'[node]\nname = "box1"\ngateway = "{gw.base_url}"\nkey_env = "NODE_KEY"\nheartbeat_s = 1\n'
        f'[models.gemma]\nlauncher = "process"\ncmd = {json.dumps(cmd)}\nkind = "llamacpp"\nstartup_timeout_s = 60\n'
        f"defaults = {{ temperature = 0 }}\n"
    )
    node = await start_daemon(
        nursery, "--config", str(config), command="node", env={"NODE_KEY": NODE_KEYS["box1"]}, cwd=folder
    )
    await wait_until(lambda: gw.daemon.admission.serving("gemma"), timeout=15)
    assert not pids_named(children(node.process.pid), b"llama-server")  # not loaded before it is asked for
    client = gw.client(timeout=120)
    messages = [{"role": "user", "content": "Say hello in one word."}]
    answer = await in_thread(lambda: client.chat.completions.create(model="gemma", messages=messages, max_tokens=8))
    assert answer.choices[0].message.content and answer.usage is not None and answer.usage.completion_tokens > 0
    assert pids_named(children(node.process.pid), b"llama-server")  # loaded on the node, on demand


async def test_an_answer_that_is_not_a_gateways_never_stops_the_node(nursery):
    """The agent against a fake gateway (httpx's mock transport: answers a real one would not give)."""
    answers = iter([b"[]", b'"ok"', b"5", b'{"heartbeat_s": null}', b"not json", b'{"heartbeat_s": 0.2}'])
    seen = []

    def gateway(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, content=next(answers, b'{"heartbeat_s": 0.2}'))

    config = NodeConfig(name="box1", gateway="http://gateway:8080", key_env="K", heartbeat_s=0.2)
    catalog = Catalog.from_config(build_config({"models": {"m": {"upstreams": ["http://127.0.0.1:9/v1"]}}}))
    async with httpx.AsyncClient(transport=httpx.MockTransport(gateway)) as client:
        agent = NodeAgent(config, catalog, "run-key", client, {"K": "node-secret"})
        stop = trio.Event()
        nursery.start_soon(agent.run, "http://127.0.0.1:1", stop)
        await wait_until(lambda: agent.registered, timeout=15)
        stop.set()
        await wait_until(lambda: seen[-1] == "/v1/nodes/box1", timeout=5)  # it left
