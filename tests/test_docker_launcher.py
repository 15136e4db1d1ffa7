"""The docker launcher against a real Docker Engine API: podman's Docker-compatible service, with real containers.

The containers run the simulated server (`python -m queuegate.sim`) from this checkout through read-only mounts and
host networking (no registry is reachable here). The daemon under test talks to podman only through the docker SDK.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
from pathlib import Path

import docker
import openai
import pytest
import tomli_w
import trio

from tests.helpers import (
    EXCLUSIVE,
    ask,
    assert_never_together,
    chat,
    fingerprint,
    in_thread,
    model_stats,
    sim_model,
    start_daemon,
    state,
    wait_until,
)
from tests.realparts import PODMAN_IMAGE, free_port, host_mounts, start_podman_service


@pytest.fixture(scope="module")
def podman_url(tmp_path_factory):
    service, url_or_reason = start_podman_service(Path(tmp_path_factory.mktemp("podman")))
    if service is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the docker launcher tests: {url_or_reason}")
        pytest.skip(url_or_reason)
    yield url_or_reason
    client = docker.DockerClient(base_url=url_or_reason)
    for container in client.containers.list(all=True, filters={"name": "qg-test-"}):
        container.remove(force=True)
    client.close()
    service.terminate()
    service.wait(10)


def sim_container(load_time: float = 0.3) -> dict:
    """How QueueGate should create the container: the simulator, run from the host's interpreter."""
    command = [sys.executable, "-m", "queuegate.sim", "--port", "${PORT}", "--model", "${MODEL}"]
    return {
        "image": PODMAN_IMAGE,
        "command": [*command, "--load-time", str(load_time), "--tokens-per-s", "200"],
        "environment": {"PYTHONDONTWRITEBYTECODE": "1"},
        "mounts": host_mounts(),
        "network_mode": "host",
    }


def docker_model(name: str, **settings) -> dict:
    return {
        "launcher": "docker",
        "kind": "llamacpp",
        "container": name,
        "upstreams": ["http://127.0.0.1:${PORT}/v1"],
        "device": "gpu",
        "memory_gb": 8,
        "stop_timeout_s": 5,
        **settings,
    }


def container_status(url: str, name: str) -> str:
    return container_attrs(url, name)["State"]["Status"]


async def test_docker_model_is_created_started_swapped_and_stopped(podman_url, start_gateway):
    name = f"qg-test-{secrets.token_hex(4)}"
    gw = await start_gateway(
        {"d": docker_model(name, create=sim_container()), "p": sim_model()},
        devices=EXCLUSIVE,
        fleet={"docker_url": podman_url},
    )
    assert fingerprint(await in_thread(lambda: ask(gw, "d"))) == "d"
    assert await in_thread(lambda: container_status(podman_url, name)) == "running"
    assert fingerprint(await in_thread(lambda: ask(gw, "p"))) == "p"  # the exclusive device swaps d out
    assert await in_thread(lambda: container_status(podman_url, name)) == "exited"
    assert fingerprint(await in_thread(lambda: ask(gw, "d"))) == "d"  # and the same container back in
    assert_never_together(gw, "d", "p")
    gw.daemon.fleet.evict("d")
    await wait_until(lambda: state(gw, "d") == "stopped", timeout=15)
    assert await in_thread(lambda: container_status(podman_url, name)) == "exited"


async def test_an_existing_container_is_started_by_name_and_its_crash_is_seen_at_once(podman_url, start_gateway):
    name = f"qg-test-{secrets.token_hex(4)}"
    port = free_port()

    def create() -> None:  # as a user would have it: made once, by hand
        spec = sim_container()
        command = [a.replace("${PORT}", str(port)).replace("${MODEL}", "e") for a in spec.pop("command")]
        client = docker.DockerClient(base_url=podman_url)
        client.containers.create(name=name, command=command, volumes=spec.pop("mounts"), **spec)
        client.close()

    await in_thread(create)
    gw = await start_gateway(
        {"e": docker_model(name, port=port)},
        devices=EXCLUSIVE,
        fleet={"docker_url": podman_url, "restart_backoff_s": 0.1},
    )
    assert fingerprint(await in_thread(lambda: ask(gw, "e"))) == "e"

    def kill() -> None:
        client = docker.DockerClient(base_url=podman_url)
        client.containers.get(name).kill()
        client.close()

    await in_thread(kill)
    # Seen from docker's wait, not a health poll.
    await wait_until(lambda: model_stats(gw, "e").crashes == 1, timeout=10)
    await wait_until(lambda: state(gw, "e") == "ready", timeout=15)  # restarted by itself, nobody asking
    assert [event for event, _ in gw.daemon.fleet.launch_history("e")] == ["spawning", "exited", "spawning"]
    assert fingerprint(await in_thread(lambda: ask(gw, "e"))) == "e"


async def test_a_missing_container_without_a_create_spec_is_a_clear_error(podman_url, start_gateway):
    gw = await start_gateway(
        {"m": docker_model("qg-test-missing")},
        devices=EXCLUSIVE,
        fleet={"docker_url": podman_url, "restart_attempts": 0},
    )
    with pytest.raises(openai.APIStatusError) as info:
        await in_thread(lambda: ask(gw, "m"))
    assert info.value.status_code == 503
    assert "no container named 'qg-test-missing'" in info.value.body["message"]


async def test_an_unreachable_docker_daemon_is_a_clear_error_not_a_hang(start_gateway, tmp_path):
    gw = await start_gateway(
        {"m": docker_model("anything")},
        devices=EXCLUSIVE,
        fleet={"docker_url": f"unix://{tmp_path}/nothing.sock", "restart_attempts": 0, "docker_timeout_s": 5},
    )
    with trio.fail_after(10), pytest.raises(openai.APIStatusError) as info:
        await in_thread(lambda: ask(gw, "m"))
    assert info.value.status_code == 503
    assert "unreachable" in info.value.body["message"]


async def test_a_container_left_running_by_a_killed_daemon_is_adopted_at_the_next_start(podman_url, nursery, tmp_path):
    name = f"qg-test-{secrets.token_hex(4)}"
    config = tmp_path / "queuegate.toml"
    model = docker_model(name, port=free_port(), create=sim_container(), ttl_s=0)
    settings = {
        "server": {"listen": "127.0.0.1:0", "state_dir": str(tmp_path / "state")},
        "fleet": {"docker_url": podman_url},
        "devices": EXCLUSIVE,
        "models": {"d": model},
    }
    config.write_text(tomli_w.dumps(settings))
    first = await start_daemon(nursery, "--config", str(config))
    assert (await in_thread(lambda: chat(first.client(), "d", "hi"))).system_fingerprint == "d"
    started_at = await in_thread(lambda: container_attrs(podman_url, name)["State"]["StartedAt"])
    first.process.kill()  # SIGKILL: the daemon cannot stop its container
    await first.process.wait()
    assert await in_thread(lambda: container_status(podman_url, name)) == "running"

    second = await start_daemon(nursery, "--config", str(config))
    # Adopted and ready with no request asking for it, and no restart.
    await wait_until(
        lambda: "adopting a server left running" in second.stderr and "state=ready" in second.stderr,
        timeout=15,
        interval=0.05,
    )
    assert (await in_thread(lambda: chat(second.client(), "d", "hi"))).system_fingerprint == "d"
    assert await in_thread(lambda: container_attrs(podman_url, name)["State"]["StartedAt"]) == started_at
    second.process.send_signal(signal.SIGINT)  # a clean stop stops the adopted container like its own
    with trio.fail_after(20):
        await second.process.wait()
    assert await in_thread(lambda: container_status(podman_url, name)) == "exited"


def container_attrs(url: str, name: str) -> dict:
    client = docker.DockerClient(base_url=url)
    try:
        return client.containers.get(name).attrs
    finally:
        client.close()
