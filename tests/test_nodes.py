"""Nodes that register their upstreams at runtime (`POST /v1/nodes/register`, the plain shape without a node agent):
the real daemon on loopback, simulated model servers (real HTTP) as what the nodes serve, and httpx as the node."""

from __future__ import annotations

import contextlib
from functools import partial

import httpx
import pytest
import trio

from queuegate.admin.client import AdminClient
from queuegate.admin.command import render_status
from queuegate.admin.protocol import Evict, Preload
from queuegate.config import NodesConfig, admin_socket_path
from queuegate.errors import Forbidden
from queuegate.nodes.registry import RegisteredModel, Registration
from queuegate.statistics import (
    FleetStatistics,
    ModelStatistics,
    ModelView,
    NodeModelStatistics,
    NodeStatistics,
    SchedulerStatistics,
    UpstreamStatistics,
    model_views,
)
from tests.helpers import in_thread, wait_until
from tests.realparts import free_port

NODE_KEY = "node-secret-1"
OTHER_KEY = "node-secret-2"
NODE_KEYS = {"box1": {"key": NODE_KEY}, "box2": {"key": OTHER_KEY}}


async def register(gw, node: str, models: list[dict], key: str = NODE_KEY, **extra) -> httpx.Response:
    body = {"node": node, "models": models, **extra}
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(
            gw.api + "/nodes/register", json=body, headers={"authorization": f"Bearer {key}"} if key else {}
        )


def served(name: str, url: str, **extra) -> dict:
    return {"name": name, "base_url": url, "kind": "llamacpp", **extra}


async def chat(gw, model: str = "m", timeout: float = 10, say: str = "hi") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": say}], "max_tokens": 2}
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await client.post(gw.api + "/chat/completions", json=body)


async def models(gw) -> dict:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(gw.api + "/models")).json()


def ready(gw, model: str) -> bool:
    return gw.daemon.admission.serving(model)


async def test_a_registered_model_is_served_and_listed_and_a_heartbeat_changes_nothing(start_sim, start_gateway):
    llm, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({}, node_keys=NODE_KEYS)
    answer = await register(gw, "box1", [served("m", url, aliases=["tiny"], max_concurrency=2)])
    assert answer.status_code == 200, answer.text
    assert answer.json()["models"] == [{"name": "m", "upstream": "m@box1"}]
    assert answer.json()["heartbeat_s"] == 10.0  # a third of [nodes].stale_after_s
    await wait_until(lambda: ready(gw, "m"))
    completion = await in_thread(
        lambda: gw.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    )
    assert completion.choices[0].message.content and llm.stats.requests == 1
    listed = await models(gw)
    assert {m["id"] for m in listed["data"]} == {"m", "tiny"} and listed["unavailable"] == []
    # A heartbeat (the same registration again) keeps the upstream as it is.
    assert (await register(gw, "box1", [served("m", url, aliases=["tiny"], max_concurrency=2)])).status_code == 200
    [model] = gw.stats().models
    assert [u.id for u in model.upstreams] == ["m@box1"] and model.upstreams[0].state == "ready"
    async with AdminClient(admin_socket_path(gw.daemon.config)) as admin:
        status = await admin.status()
    [node] = status.nodes
    assert node.name == "box1" and not node.stale and [m.upstream for m in node.models] == ["m@box1"]
    shown = render_status(status)
    assert "node box1 at 127.0.0.1: live, last heartbeat " in shown and f" s ago; m ({url})" in shown
    # A changed base URL replaces the upstream: requests go to the new server.
    other, other_url = await start_sim(tokens_per_s=0)
    assert (await register(gw, "box1", [served("m", other_url, aliases=["tiny"])])).status_code == 200
    await wait_until(lambda: ready(gw, "m"))
    assert (await chat(gw, "m")).status_code == 200 and other.stats.requests == 1 and llm.stats.requests == 1
    # What it no longer lists goes.
    assert (await register(gw, "box1", [served("m2", other_url)])).status_code == 200
    assert (await chat(gw, "m")).status_code == 404
    await wait_until(lambda: ready(gw, "m2"))
    assert (await chat(gw, "m2")).status_code == 200 and other.stats.requests == 2


async def test_node_keys_names_and_networks_guard_registration(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    closed = await start_gateway({})
    refused = await register(closed, "box1", [served("m", url)])
    assert refused.status_code == 403 and "no [node_keys]" in refused.json()["error"]["message"]
    gw = await start_gateway(
        {"local": {"upstreams": [url], "kind": "llamacpp", "aliases": ["loc"]}}, node_keys=NODE_KEYS
    )
    assert (await register(gw, "box1", [served("m", url)], key="")).status_code == 401
    assert (await register(gw, "box1", [served("m", url)], key="wrong-key-123")).status_code == 401
    outside = await register(gw, "box1", [served("m", url), served("evil", "http://8.8.8.8:80/v1")])
    assert outside.status_code == 403
    assert "8.8.8.8" in outside.json()["error"]["message"] and "allow_networks" in outside.json()["error"]["message"]
    assert gw.daemon.catalog.resolve("m") is None  # all or nothing: the good model was not added either
    unspecified = await register(gw, "box1", [served("m", "http://0.0.0.0:9/v1")])
    assert unspecified.status_code == 403 and "names no host" in unspecified.json()["error"]["message"]
    for bad, why in [
        ({"node": "box 1", "models": []}, "node name"),
        ({"node": "box1", "models": [served("loc", url)]}, "alias of model 'local'"),
        ({"node": "box1", "models": [served("m", url, aliases=["local"])]}, "already the name or alias"),
        ({"node": "box1", "models": [served("m", url), served("m", url)]}, "listed twice"),
        ({"node": "box1", "models": [served("m", "ftp://127.0.0.1/v1")]}, "http(s) base URL"),
        ({"node": "box1", "models": [{"name": "m"}]}, "base_url"),
        ({"node": "box1", "models": [served("m", "http://127.0.0.1:99999/v1")]}, "not a base URL"),
        ({"node": "box1", "models": [served("m", "http://[::1/v1")]}, "not a base URL"),
        ({"node": "box1", "models": [served("m", "http://a..b/v1")]}, "cannot resolve"),
        ({"node": "box1", "models": [served("m", "http://u:p@127.0.0.1:9/v1")]}, "credentials"),
        ({"node": "box1", "models": [served("a", url, aliases=["b"]), served("b", url)]}, "already the name"),
        ({"node": "box1", "models": [served("local", url, upstream_model="other")]}, "asked for as 'local'"),
    ]:
        answer = await register(gw, bad["node"], bad["models"])
        assert answer.status_code == 400 and why in answer.json()["error"]["message"], answer.text
    assert gw.daemon.catalog.resolve("a") is None and gw.stats().models[0].name == "local"  # (nothing half-done)
    # Only a node on the gateway's host may point at the gateway's loopback.
    remote = Registration(node="far", models=[RegisteredModel(name="m", base_url=url)])
    with pytest.raises(Forbidden, match="only a node on this host"):
        await gw.daemon.nodes.register("box1", "10.0.0.9", remote)
    assert (await register(gw, "box1", [served("m", url)])).status_code == 200
    taken = await register(gw, "box1", [served("m", url)], key=OTHER_KEY)
    assert taken.status_code == 403 and "another node key" in taken.json()["error"]["message"]
    # Narrowed by a reload, the allowed networks take an upstream out at once.
    gw.daemon.nodes.set_config(NodesConfig(allow_networks=["10.0.0.0/8"]))
    assert gw.daemon.catalog.resolve("m") is None
    gw.daemon.nodes.set_config(NodesConfig())
    # A node adds its upstream to a configured model of the same name.
    assert (await register(gw, "box2", [served("local", url)], key=OTHER_KEY)).status_code == 200
    assert [u.id for u in gw.daemon.catalog.models["local"].upstreams] == ["local#0", "local@box2"]


async def test_a_stale_node_takes_its_models_out_and_its_heartbeat_brings_them_back(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({}, node_keys=NODE_KEYS, nodes={"stale_after_s": 1.0})
    assert (await register(gw, "box1", [served("m", url)])).status_code == 200
    await wait_until(lambda: ready(gw, "m"))
    assert (await chat(gw)).status_code == 200
    await wait_until(lambda: not ready(gw, "m"), timeout=3)  # no heartbeat for 1 s
    refused = await chat(gw)
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert "node box1: no heartbeat for" in refused.json()["error"]["message"]
    listed = await models(gw)
    assert listed["data"] == [] and listed["unavailable"][0]["id"] == "m"
    assert "node box1: no heartbeat" in listed["unavailable"][0]["reason"]
    metrics = (await in_thread(lambda: httpx.get(gw.base_url + "/metrics"))).text
    assert 'queuegate_node_up{node="box1"} 0.0' in metrics and "queuegate_node_heartbeat_age_seconds" in metrics
    assert (await register(gw, "box1", [served("m", url)])).status_code == 200  # back: checked, then served
    assert (await chat(gw)).status_code == 200


async def test_requests_wait_for_a_stale_node_up_to_wait_s_and_a_stream_too(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({}, node_keys=NODE_KEYS, nodes={"stale_after_s": 0.5, "wait_s": 1.5})
    for node, key in (("box1", NODE_KEY), ("box2", OTHER_KEY)):
        assert (await register(gw, node, [served(f"m-{node}", url)], key=key)).status_code == 200
    await wait_until(lambda: not ready(gw, "m-box1") and not ready(gw, "m-box2"), timeout=3)
    results = {}

    async def ask(model: str, stream: bool = False) -> None:
        started = trio.current_time()
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": stream}
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(gw.api + "/chat/completions", json=body)
        results[model, stream] = (answer, trio.current_time() - started)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "m-box1")
        nursery.start_soon(ask, "m-box1", True)
        nursery.start_soon(ask, "m-box2", False)
        await trio.sleep(0.5)
        assert (await register(gw, "box1", [served("m-box1", url)])).status_code == 200  # box1 comes back in time
    for stream in (False, True):
        answer, took = results["m-box1", stream]
        assert answer.status_code == 200 and 0.4 < took < 1.5
    assert "data: [DONE]" in results["m-box1", True][0].text
    answer, took = results["m-box2", False]  # box2 did not: its request fails once box2 was stale for wait_s
    assert answer.status_code == 503 and took < 2.5 and "node box2: no heartbeat" in answer.json()["error"]["message"]
    assert (await chat(gw, "m-box2")).status_code == 503  # (and from then on at once)


async def test_a_model_whose_live_node_is_failing_and_other_node_stale_fails_in_time(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    nobody = f"http://127.0.0.1:{free_port()}/v1"  # (nothing listens there)
    gw = await start_gateway({}, node_keys=NODE_KEYS, nodes={"stale_after_s": 0.5, "wait_s": 1.0})
    assert (await register(gw, "box1", [served("m", url)])).status_code == 200
    await wait_until(lambda: ready(gw, "m"))
    await trio.sleep(0.6)  # box1 turns stale...
    assert (await register(gw, "box2", [served("m", nobody)], key=OTHER_KEY)).status_code == 200  # ...box2 is live
    started = trio.current_time()
    with trio.fail_after(5):  # (never a request that spins, whatever the mix)
        answer = await chat(gw)
    assert answer.status_code in (502, 503) and trio.current_time() - started < 3


async def test_a_model_on_two_nodes_is_shared_and_one_leaving_does_not_cut_its_requests(start_sim, start_gateway):
    first, first_url = await start_sim(tokens_per_s=0)
    second, second_url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({}, node_keys=NODE_KEYS, nodes={"forget_after_s": 0.5})
    assert (await register(gw, "box1", [served("m", first_url, max_concurrency=1)])).status_code == 200
    assert (await register(gw, "box2", [served("m", second_url, max_concurrency=1)], key=OTHER_KEY)).status_code == 200
    await wait_until(lambda: all(u.state == "ready" for u in gw.stats().models[0].upstreams))
    first.config.tokens_per_s = second.config.tokens_per_s = 5  # (each answer takes a while: both are busy)
    async with trio.open_nursery() as nursery:
        for i in range(6):  # (six chats: the same one would stick to one node)
            nursery.start_soon(partial(chat, gw, say=f"chat {i}"))
    assert first.stats.requests >= 2 and second.stats.requests >= 2  # one slot each: both served
    # The node a stream is on leaves: the stream ends whole, and nothing new goes there.
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("POST", gw.api + "/chat/completions", json=body) as streaming,
    ):
        lines = streaming.aiter_lines()
        await lines.__anext__()
        leaving, key = ("box1", NODE_KEY) if first.stats.active else ("box2", OTHER_KEY)  # where the stream went
        deleted = await client.delete(gw.api + f"/nodes/{leaving}", headers={"authorization": f"Bearer {key}"})
        assert deleted.status_code == 200
        rest = [line async for line in lines]
    assert rest[-1] == "data: [DONE]" or "data: [DONE]" in rest
    [model] = gw.stats().models
    assert [u.id for u in model.upstreams] == [f"m@{'box2' if leaving == 'box1' else 'box1'}"]
    assert model.in_service == 0 and (await chat(gw)).status_code == 200


async def test_a_forgotten_node_takes_its_own_models_away_and_can_register_again(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({}, node_keys=NODE_KEYS, nodes={"stale_after_s": 0.3, "forget_after_s": 0.3})
    assert (await register(gw, "box1", [served("m", url)])).status_code == 200
    await wait_until(lambda: gw.daemon.catalog.resolve("m") is None, timeout=3)
    assert (await chat(gw)).status_code == 404 and gw.stats().models == []
    async with AdminClient(admin_socket_path(gw.daemon.config)) as admin:
        assert (await admin.status()).nodes == []
    # Forgotten, the name is free again (for any node key).
    assert (await register(gw, "box1", [served("m", url)], key=OTHER_KEY)).status_code == 200
    await wait_until(lambda: ready(gw, "m"))
    assert (await chat(gw)).status_code == 200


async def test_a_client_key_cannot_register_and_a_node_key_cannot_call_the_api(start_sim, start_gateway):
    secret = "client-key-123"
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway(
        {"local": {"upstreams": [url], "kind": "llamacpp"}}, keys={"alice": {"key": secret}}, node_keys=NODE_KEYS
    )
    assert (await register(gw, "box1", [served("m", url)], key=secret)).status_code == 401
    async with httpx.AsyncClient(timeout=10) as client:
        body = {"model": "local", "messages": [{"role": "user", "content": "hi"}]}
        answer = await client.post(
            gw.api + "/chat/completions", json=body, headers={"authorization": f"Bearer {NODE_KEY}"}
        )
    assert answer.status_code == 401


async def test_a_node_back_with_a_new_key_keeps_the_requests_that_waited_for_it(start_sim, start_gateway):
    llm, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({}, node_keys=NODE_KEYS, nodes={"stale_after_s": 0.5, "wait_s": 5})
    assert (await register(gw, "box1", [served("m", url, api_key="run-1-key")])).status_code == 200
    await wait_until(lambda: ready(gw, "m"))
    await wait_until(lambda: not ready(gw, "m"), timeout=3)  # stale: requests wait for it
    answers = []

    async def ask() -> None:
        answers.append(await chat(gw))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await wait_until(lambda: gw.stats().models[0].waiting == 1)
        # Restarted, it comes back with a key of its new run: the same upstream, changed.
        assert (await register(gw, "box1", [served("m", url, api_key="run-2-key")])).status_code == 200
    assert answers[0].status_code == 200
    assert llm.stats.received[-1].headers["authorization"] == "Bearer run-2-key"


async def test_a_node_reports_its_inventory_requests_go_where_the_model_is_loaded_and_loads_are_asked_of_it(
    start_sim, start_gateway
):
    first, first_url = await start_sim(tokens_per_s=0)
    second, second_url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({}, node_keys=NODE_KEYS)
    inventory = {
        "devices": [{"name": "gpu", "memory_gb": 24, "used_gb": 10, "models": ["m"]}],
        "gpus": [{"index": 0, "name": "NVIDIA GeForce RTX 3090", "total_gb": 25.77, "used_gb": 11.2}],
    }
    assert (await register(gw, "box1", [served("m", first_url, state="ready")], **inventory)).status_code == 200
    stopped = [served("m", second_url, state="stopped")]
    assert (await register(gw, "box2", stopped, key=OTHER_KEY)).status_code == 200
    await wait_until(lambda: all(u.state == "ready" for u in gw.stats().models[0].upstreams))
    # box2 would have to load m (maybe swap another model out for it): while box1 has room, box1 serves every chat.
    for i in range(6):
        assert (await chat(gw, say=f"chat {i}")).status_code == 200
    assert first.stats.requests == 6 and second.stats.requests == 0
    metrics = (await in_thread(lambda: httpx.get(gw.base_url + "/metrics"))).text
    assert 'queuegate_node_device_memory_bytes{device="gpu0",kind="measured_used",node="box1"} 1.12e+10' in metrics
    async with AdminClient(admin_socket_path(gw.daemon.config)) as admin:
        status = await admin.status()
        shown = render_status(status)
        assert f"m ready ({first_url})" in shown and f"m stopped ({second_url})" in shown
        assert "devices gpu 10/24 GB; GPU0 11.2/25.8 GB used" in shown
        # An operator's preload goes to the nodes: m is loaded on box1 already.
        answer = await admin.request(Preload(model="m"))
        assert answer.message == "m is loaded (or loading) on node box1 already"
        assert (await register(gw, "box1", [served("m", first_url, state="stopped")])).status_code == 200
        answer = await admin.request(Preload(model="m"))
        assert answer.message.startswith("asked node box") and answer.message.endswith(
            "to load m (at its next heartbeat)"
        )
        asked, key = ("box1", NODE_KEY) if "box1" in answer.message else ("box2", OTHER_KEY)
        url = first_url if asked == "box1" else second_url
        heartbeat = await register(gw, asked, [served("m", url, state="stopped")], key=key)
        assert heartbeat.json()["load"] == ["m"] and heartbeat.json()["stop"] == []
        again = await register(gw, asked, [served("m", url, state="ready")], key=key)
        assert again.json()["load"] == []  # asked once; the node's planner owns it from there
        answer = await admin.request(Evict(model="m"))
        assert answer.message == f"asked node {asked} to stop m (at its next heartbeat)"
        assert (await register(gw, asked, [served("m", url, state="ready")], key=key)).json()["stop"] == ["m"]
    # A registration whose inventory is not one is refused (entries that are merely not sane are left out: below).
    refused = await register(gw, "box1", [served("m", first_url)], gpus=[{"index": 0}])
    assert refused.status_code == 400, refused.text
    refused = await register(gw, "box1", [served("m", first_url, state="resting")])
    assert refused.status_code == 400 and "state" in refused.json()["error"]["message"]


async def test_nodes_named_in_the_config_are_polled_for_what_they_serve_and_go_stale_when_they_stop(
    start_sim, start_gateway
):
    first, first_url = await start_sim(tokens_per_s=0, model="m")
    second, second_url = await start_sim(tokens_per_s=0, model="n")
    # One polled node is another QueueGate (its /v1/models lists aliases too), the other a bare server.
    inner = await start_gateway(
        {
            "a": {"upstreams": [first_url], "aliases": ["tiny"]},
            "b": {"upstreams": [second_url]},
            "c": {"upstreams": [second_url]},
        }
    )
    nodes = {"box3": {"url": inner.api, "poll_s": 0.2, "models": ["a", "b"]}, "sim": {"url": first_url, "poll_s": 0.2}}
    gw = await start_gateway({}, nodes=nodes)
    await wait_until(lambda: all(ready(gw, m) for m in ("a", "b", "m")), timeout=10)
    assert gw.daemon.catalog.resolve("c") is None and gw.daemon.catalog.resolve("tiny") is None
    for model in ("a", "b", "m"):
        assert (await chat(gw, model)).status_code == 200
    assert first.stats.requests == 2 and second.stats.requests == 1
    async with AdminClient(admin_socket_path(gw.daemon.config)) as admin:
        polled = {n.name: [m.upstream for m in n.models] for n in (await admin.status()).nodes}
    assert polled == {"box3": ["a@box3", "b@box3"], "sim": ["m@sim"]}
    # The inner gateway stops: its polls fail, and after three the node is stale; the other serves on.
    inner.daemon.request_shutdown()
    await wait_until(lambda: any(n.stale for n in gw.daemon.nodes.statistics() if n.name == "box3"), timeout=15)
    refused = await chat(gw, "a")
    assert refused.status_code == 503 and "box3" in refused.json()["error"]["message"]
    assert (await chat(gw, "m")).status_code == 200


def test_a_models_view_takes_each_answering_upstream_in_the_state_its_node_reports():
    """model_views on built statistics: what /v1/models, /readyz, the status and `top` show of a node's model."""

    def view(*upstreams: tuple[str, str, str | None], stale: frozenset[str] = frozenset()) -> ModelView:
        scheduler = SchedulerStatistics(
            0,
            0,
            10,
            [
                ModelStatistics(
                    "m", 0, 0.0, 0, [], [], [UpstreamStatistics(u, h, "x", 0, 1, False) for u, h, _ in upstreams]
                )
            ],
        )
        nodes = [
            NodeStatistics(
                u.split("@")[1],
                "10.0.0.5",
                u.split("@")[1] in stale,
                1.0,
                30.0,
                [NodeModelStatistics("m", u, "http://x/v1", s)],
            )
            for u, _, s in upstreams
            if "@" in u
        ]
        [found] = model_views(scheduler, FleetStatistics([], [], 0, 0), nodes)
        return found

    # A configured upstream (no node) that answers, beside a node whose model failed: still served, and loaded.
    served = view(("m#0", "ready", None), ("m@box2", "ready", "failed"))
    assert (served.state, served.available, served.loaded) == ("ready", True, True)
    assert served.reason == "ok" and served.device == "node box2"  # (what other nodes say is no reason: it serves)
    # Stopped on every node: loadable on demand (listed, not loaded); failed on every node: unavailable.
    stopped = view(("m@box1", "ready", "stopped"), ("m@box2", "ready", "failed"))
    assert (stopped.state, stopped.available, stopped.loaded) == ("stopped", True, False)
    assert stopped.reason == "m@box1: stopped on its node; m@box2: failed on its node"
    failed = view(("m@box1", "ready", "failed"))
    assert (failed.state, failed.available) == ("failed", False)
    # A node reporting ready whose upstream does not answer does not hide that nothing serves.
    down = view(("m@box1", "down", "ready"), ("m@box2", "ready", "failed"))
    assert (down.state, down.available) == ("failed", False) and "m@box1: down (x)" in down.reason
    # A stale node's report counts for nothing.
    assert view(("m@box1", "loading", "ready"), stale=frozenset({"box1"})).state == "loading"


async def test_an_inventory_entry_that_is_not_sane_is_left_out_and_the_models_still_register(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({}, node_keys=NODE_KEYS)
    devices = [
        {"name": "cuda:0", "memory_gb": 24, "used_gb": 9, "models": ["m", "x" * 500]},
        {"name": "RTX 3090 (left)", "memory_gb": 24, "used_gb": 0},
        {"name": "too-big", "memory_gb": 1e12, "used_gb": 0},
        {"name": "y" * 200, "memory_gb": 1, "used_gb": 0},
    ]
    gpus = [{"index": i, "name": f"GPU {i}", "total_gb": 24, "used_gb": 1} for i in range(70)]
    answer = await register(gw, "box1", [served("m", url, state="ready", load_eta_s=-5)], devices=devices, gpus=gpus)
    assert answer.status_code == 200, answer.text
    [node] = gw.daemon.nodes.statistics()
    assert [(d.name, d.models) for d in node.devices] == [("cuda:0", ["m"]), ("RTX 3090 (left)", [])]
    assert len(node.gpus) == 64 and node.models[0].load_eta_s is None
    await wait_until(lambda: ready(gw, "m"))
    assert (await chat(gw)).status_code == 200


async def test_a_polled_node_that_answers_badly_is_logged_and_what_it_may_serve_is_taken(
    start_sim, start_gateway, caplog
):
    """A fake polled server (a raw socket server on loopback: answers no real server gives) and a real gateway."""
    answers = iter(
        [
            b"not json",
            b'{"data": [{"id": "' + b"x" * (2**20 + 10) + b'"}]}',  # over the 1 MiB a model list may be
            b'{"data": [{"id": "launched"}, {"id": "tiny"}, {"id": "/models/x.gguf"}, {"id": "free"}]}',
        ]
    )
    last = b'{"data": [{"id": "free"}]}'

    async def serve(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.receive_some(65536)
            body = next(answers, last)
            head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            await stream.send_all(head + body)
        await stream.aclose()

    _, url = await start_sim(tokens_per_s=0)
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        launched = {"launcher": "process", "cmd": ["${PYTHON}", "-m", "queuegate.sim", "--port", "${PORT}"]}
        gw = await start_gateway(
            {"launched": launched, "m": {"upstreams": [url], "aliases": ["tiny"]}},
            nodes={"box3": {"url": f"http://127.0.0.1:{port}/v1", "poll_s": 0.1}},
            node_keys=NODE_KEYS,
        )
        await wait_until(lambda: gw.daemon.catalog.resolve("free") is not None, timeout=10)
        assert [u.id for u in gw.daemon.catalog.models["free"].upstreams] == ["free@box3"]
        warnings = [r.fields for r in caplog.records if r.name == "queuegate.nodes" and r.levelname == "WARNING"]
        assert "1048576 bytes" in warnings[1]["error"] and "JSON" in warnings[0]["error"]
        assert warnings[2]["models"] == ["launched", "tiny", "/models/x.gguf"]
        # A registering node may not take the polled node's name.
        refused = await register(gw, "box3", [served("m2", url)])
        assert refused.status_code == 403 and "[nodes.box3]" in refused.json()["error"]["message"]
        nursery.cancel_scope.cancel()
