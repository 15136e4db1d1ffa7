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

from queuegate.admin.client import AdminClient
from queuegate.admin.protocol import Evict, Preload
from queuegate.config import NodeConfig, admin_socket_path, build_config
from queuegate.fleet.catalog import Catalog
from queuegate.nodes.agent import NodeAgent
from queuegate.statistics import FleetStatistics
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


async def start_node(
    nursery, name: str, gateway: str, models: list[str], folder: str | None = None, env: dict[str, str] | None = None
):
    folder = folder or tempfile.mkdtemp(prefix=f"queuegate-{name}-")
    config = Path(folder) / "node.toml"
    config.write_text(node_config(name, gateway, models))
    env = {"NODE_KEY": NODE_KEYS[name], **(env or {})}
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


async def node_state(gw, node: str, model: str) -> str | None:
    async with AdminClient(admin_socket_path(gw.daemon.config)) as admin:
        status = await admin.status()
    return next((m.state for n in status.nodes if n.name == node for m in n.models if m.model == model), None)


async def test_the_gateway_sends_a_model_where_it_is_loaded_and_its_operator_loads_and_stops_models_on_nodes(
    nursery, start_gateway, caplog, tmp_path
):
    caplog.set_level("INFO", logger="queuegate")
    gw = await start_gateway({}, node_keys={n: {"key": k} for n, k in NODE_KEYS.items()})
    # box1's host has a GPU tool (a stand-in script: this machine has no GPU).
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nvidia-smi").write_text("#!/bin/sh\necho '0, NVIDIA GeForce RTX 3090, 24576, 1024'\n")
    (tools / "nvidia-smi").chmod(0o755)
    await start_node(nursery, "box1", gw.base_url, ["shared"], env={"PATH": f"{tools}:{os.environ['PATH']}"})
    await start_node(nursery, "box2", gw.base_url, ["shared", "c"])
    await wait_until(lambda: len(gw.daemon.catalog.models.get("shared", None).upstreams or ()) == 2, timeout=15)
    assert await node_state(gw, "box1", "shared") == await node_state(gw, "box2", "shared") == "stopped"
    # The first chat loads it on one node; the next ones (one at a time) go there, not to load it on the other.
    assert (await chat(gw, "shared", "first")).status_code == 200
    [first] = {line["upstream"] for line in request_lines(caplog)}
    loaded_on, other = ("box1", "box2") if first == "shared@box1" else ("box2", "box1")
    with trio.fail_after(10):
        while await node_state(gw, loaded_on, "shared") != "ready":
            await trio.sleep(0.1)
    for i in range(5):
        assert (await chat(gw, "shared", f"chat {i}")).status_code == 200
    assert {line["upstream"] for line in request_lines(caplog)} == {first}
    assert await node_state(gw, other, "shared") == "stopped"  # (not loaded on the other node)
    # The operator preloads c (only box2 has it) at the gateway: box2 loads it, no request needed; then stops it.
    async with AdminClient(admin_socket_path(gw.daemon.config)) as admin:
        assert (await admin.request(Preload(model="c"))).message.startswith("asked node box2 to load c")
        with trio.fail_after(10):
            while await node_state(gw, "box2", "c") != "ready":
                await trio.sleep(0.1)
        assert (await admin.request(Evict(model="c"))).message.startswith("asked node box2 to stop c")
        with trio.fail_after(10):
            while await node_state(gw, "box2", "c") != "stopped":
                await trio.sleep(0.1)
        [node1] = [n for n in (await admin.status()).nodes if n.name == "box1"]
    assert node1.devices[0].name == "gpu" and node1.devices[0].memory_gb == 24
    assert [(g.name, g.total_gb) for g in node1.gpus] == [("NVIDIA GeForce RTX 3090", 25.77)]


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


class RecordingFleet:
    """Stands in for the node's fleet (a fake: the test is about the agent's handling of the gateway's answers)."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def statistics(self) -> FleetStatistics:
        return FleetStatistics([], [], 0, 0)

    def preload(self, model: str) -> None:
        if model != "m":
            raise KeyError(f"no model {model!r}")
        self.asked.append(("load", model))

    def evict(self, model: str) -> None:
        self.asked.append(("stop", model))


async def test_an_answer_that_is_not_a_gateways_never_stops_the_node(nursery):
    """The agent against a fake gateway (httpx's mock transport: answers a real one would not give)."""
    answers = iter(
        [
            *(b"[]", b'"ok"', b"5", b'{"heartbeat_s": null}', b"not json", b'{"heartbeat_s": 0.2, "load": "m"}'),
            b'{"heartbeat_s": 0.2, "load": ["nope", "m", 3], "stop": ["m"]}',
        ]
    )
    seen = []

    def gateway(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, content=next(answers, b'{"heartbeat_s": 0.2}'))

    config = NodeConfig(name="box1", gateway="http://gateway:8080", key_env="K", heartbeat_s=0.2)
    catalog = Catalog.from_config(build_config({"models": {"m": {"upstreams": ["http://127.0.0.1:9/v1"]}}}))
    fleet = RecordingFleet()
    async with httpx.AsyncClient(transport=httpx.MockTransport(gateway)) as client:
        agent = NodeAgent(config, catalog, fleet, "run-key", client, {"K": "node-secret"})
        stop = trio.Event()
        nursery.start_soon(agent.run, "http://127.0.0.1:1", stop)
        await wait_until(lambda: len(seen) >= 8, timeout=15)
        assert agent.registered
        stop.set()
        await wait_until(lambda: seen[-1] == "/v1/nodes/box1", timeout=5)  # it left
    # What it could do of what it was asked, it did (an unknown model, a number, a string for a list: not).
    assert fleet.asked == [("load", "m"), ("stop", "m")]
