"""The admin socket against a live daemon: every command, bad input, many subscribers, stale and live sockets.

The fleet is QueueGate-launched simulated servers (real child processes), as in test_fleet.py.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
import trio

from queuegate.admin._stream import LineStream
from queuegate.admin.client import AdminClient
from queuegate.admin.protocol import (
    PROTOCOL_VERSION,
    AdminError,
    AdminUnavailable,
    Cancel,
    Drain,
    Evict,
    Ok,
    Pause,
    Preload,
    Reload,
    Resume,
    Undrain,
)
from queuegate.admin.server import AdminSocketError
from queuegate.config import admin_socket_path, build_config, load_config
from queuegate.daemon import Daemon
from queuegate.errors import leaf_exceptions
from tests.helpers import EXCLUSIVE, ask, in_thread, sim_model, wait_until


async def fleet_gateway(start_gateway):
    gw = await start_gateway({"a": sim_model(), "b": sim_model()}, devices=EXCLUSIVE)
    return gw, admin_socket_path(gw.daemon.config)


def model_state(status, name: str) -> str:
    return next(m.state for m in status.fleet.models if m.name == name)


async def raw_connection(path) -> tuple[LineStream, dict]:
    """A bare connection speaking the protocol by hand (newline framing only); returns it and the greeting."""
    lines = LineStream(await trio.open_unix_socket(str(path)))
    return lines, await read_line(lines)


async def read_line(lines: LineStream) -> dict:
    with trio.fail_after(5):
        line = await lines.receive_line()
    assert line is not None
    return json.loads(line)


async def test_the_socket_is_private(start_gateway):
    _, path = await fleet_gateway(start_gateway)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(path.stat().st_mode)


async def test_status_preload_evict_and_a_subscription_that_sees_the_swap(start_gateway):
    gw, path = await fleet_gateway(start_gateway)
    async with AdminClient(path) as client, AdminClient(path) as watcher:
        status = await client.status()
        assert status.listen == gw.api
        assert {m.name: m.state for m in status.fleet.models} == {"a": "stopped", "b": "stopped"}
        assert [d.name for d in status.fleet.devices] == ["gpu"]
        seen: list[tuple[str, str]] = []
        updates = watcher.subscribe(interval_ms=200)
        first = await updates.__anext__()
        assert model_state(first, "a") == "stopped"
        reply = await client.request(Preload(model="a"))
        assert isinstance(reply, Ok) and reply.message == "preloading a"
        with trio.fail_after(10):
            async for update in updates:
                seen.append((model_state(update, "a"), model_state(update, "b")))
                if seen[-1][0] == "ready":
                    break
        assert ("starting", "stopped") in seen
        await client.request(Preload(model="b"))  # the device is exclusive: a goes, b comes
        with trio.fail_after(10):
            async for update in updates:
                swap = update.fleet.devices[0].swap
                if swap is not None:
                    assert swap.target == "b" and swap.phase
                if model_state(update, "b") == "ready":
                    break
        await client.request(Evict(model="b"))
        with trio.fail_after(10):
            async for update in updates:
                if model_state(update, "b") == "stopped":
                    break
        with pytest.raises(AdminError, match="no model 'nope'"):
            await client.request(Preload(model="nope"))


async def test_bad_messages_get_errors_and_break_nothing(start_gateway):
    gw, path = await fleet_gateway(start_gateway)
    stream, hello = await raw_connection(path)
    assert hello == {"op": "hello", "id": 0, "version": PROTOCOL_VERSION, "pid": os.getpid()}
    async with AdminClient(path) as bystander:
        for bad in [
            b"not json",
            b'{"op": "launch_missiles", "id": 7}',
            b'{"op": "preload", "id": 8}',
            b"[1, 2]",
            b'{"op": "subscribe", "interval_ms": 10}',
        ]:
            await stream.send(bad + b"\n")
            reply = await read_line(stream)
            assert reply["op"] == "error" and reply["message"]
        await stream.send(b"x" * (70 * 1024) + b"\n")  # over the line limit
        assert "at most" in (await read_line(stream))["message"]
        await stream.send(b'{"op": "status", "id": 9}\n')  # the same connection still works
        reply = await read_line(stream)
        assert reply["op"] == "snapshot" and reply["id"] == 9
        assert (await bystander.status()).listen == gw.api  # and so does everyone else's
    await stream.stream.aclose()
    assert (await in_thread(lambda: ask(gw, "a"))).choices


async def test_many_subscribers_at_once(start_gateway):
    gw, path = await fleet_gateway(start_gateway)
    received = [0] * 20

    async def watch(i: int) -> None:
        async with AdminClient(path) as client:
            async for _ in client.subscribe(interval_ms=200):
                received[i] += 1

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(watch, i)
        answer = await in_thread(lambda: ask(gw, "a"))  # a load, a request: changes to publish
        assert answer.choices
        await trio.sleep(1.2)
        nursery.cancel_scope.cancel()
    assert all(n >= 2 for n in received), received  # the first snapshot and at least one update each


def queue_now(daemon: Daemon) -> tuple[int, int]:
    """(in service, waiting) in the daemon's scheduler now."""
    stats = daemon.admission.statistics()
    return stats.in_service, stats.waiting


async def refused_start(admin_socket: Path) -> str:
    """Start a daemon whose admin socket is `admin_socket`; the reason it refuses to start."""
    daemon = Daemon(build_config({"server": {"listen": "127.0.0.1:0", "admin_socket": str(admin_socket)}}))
    reasons = []
    try:
        async with trio.open_nursery() as inner:
            await inner.start(daemon.run)
    except* AdminSocketError as group:
        reasons.append(str(leaf_exceptions(group)[0]))
    assert reasons, "the daemon started"
    return reasons[0]


async def test_a_stale_socket_is_replaced_and_a_live_one_refused(start_gateway, tmp_path, nursery):
    _, path = await fleet_gateway(start_gateway)
    assert "another QueueGate is running" in await refused_start(path)
    async with AdminClient(path) as client:
        assert client.daemon_pid == os.getpid()  # the first daemon still serves

    stale = tmp_path / "stale" / "admin.sock"
    stale.parent.mkdir(mode=0o700)
    leftover = trio.socket.socket(trio.socket.AF_UNIX)
    await leftover.bind(str(stale))  # bound, never listening, then closed: what a killed daemon leaves
    leftover.close()
    assert stale.exists()
    third = Daemon(build_config({"server": {"listen": "127.0.0.1:0", "admin_socket": str(stale)}}))
    await nursery.start(third.run)
    async with AdminClient(stale) as client:
        assert (await client.status()).scheduler.waiting == 0
    third.request_shutdown()

    not_a_socket = tmp_path / "precious.txt"
    not_a_socket.write_text("keep me")
    assert "is not a socket" in await refused_start(not_a_socket)
    assert not_a_socket.read_text() == "keep me"


async def test_an_admin_socket_in_a_folder_others_may_enter_is_refused_and_the_folder_left_alone(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like the system's temp folder
    refused = await refused_start(shared / "qg.sock")
    assert "is open to other users (mode 1777)" in refused and "chmod 700" in refused
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777  # untouched
    assert not (shared / "qg.sock").exists()


async def test_clients_see_a_daemon_that_went_away(start_gateway):
    gw, path = await fleet_gateway(start_gateway)
    async with AdminClient(path) as client:
        await client.status()
        gw.daemon.request_shutdown()
        with trio.fail_after(10), pytest.raises(AdminUnavailable):
            while True:
                await client.status()
                await trio.sleep(0.05)
    with pytest.raises(AdminUnavailable, match="no QueueGate daemon"):
        async with AdminClient(path):
            pass


async def test_the_admin_cli(start_gateway):
    _, path = await fleet_gateway(start_gateway)
    cli = [sys.executable, "-m", "queuegate.cli", "admin"]

    async def admin(*args: str) -> trio.CompletedProcess:
        return await trio.run_process([*cli, *args, "--socket", str(path)], capture_stdout=True, capture_stderr=True,
                                      check=False)  # fmt: skip

    status = await admin("status", "--json")
    assert status.returncode == 0, status.stderr
    assert {m["name"] for m in msgspec.json.decode(status.stdout)["fleet"]["models"]} == {"a", "b"}
    human = await admin("status")
    assert b"MODEL" in human.stdout and b"device gpu (exclusive)" in human.stdout
    preload = await admin("preload", "a")
    assert preload.returncode == 0 and preload.stdout.strip() == b"preloading a"
    unknown = await admin("evict", "zzz")
    assert unknown.returncode == 1 and b"no model 'zzz'" in unknown.stderr
    gone = await trio.run_process([*cli, "status", "--socket", str(path) + ".missing"], capture_stderr=True,
                                  check=False)  # fmt: skip
    assert gone.returncode == 3 and b"no QueueGate daemon" in gone.stderr


def different_chat(chat: dict, i: int) -> dict:
    """Another conversation each time, so sticky chats do not pin them all to one upstream."""
    return {**chat, "messages": [{"role": "user", "content": f"chat {i}"}]}


async def test_drain_and_pause_through_the_socket(start_sim, start_gateway):
    first, first_url = await start_sim(tokens_per_s=0)
    second, second_url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [first_url, second_url]}})
    path = admin_socket_path(gw.daemon.config)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with AdminClient(path) as client:
        assert (await client.request(Drain(upstream="m#0"))).message == "drained m#0"
        for i in range(4):
            await in_thread(lambda i=i: gw.client().chat.completions.create(**different_chat(chat, i)))
        assert first.stats.requests == 0 and second.stats.requests == 4
        upstreams = (await client.status()).scheduler.models[0].upstreams
        assert [u.drained for u in upstreams] == [True, False]
        await client.request(Undrain(upstream="m#0"))
        for i in range(4, 8):  # new chats (the first four stick to m#1 now)
            await in_thread(lambda i=i: gw.client().chat.completions.create(**different_chat(chat, i)))
        assert first.stats.requests > 0

        await client.request(Pause(klass="agent"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_thread, lambda: gw.client().post("/agent/chat/completions", cast_to=dict, body=chat))
            await wait_until(lambda: gw.stats().waiting == 1, timeout=5)
            await in_thread(lambda: gw.client().chat.completions.create(**chat))  # users still go
            assert gw.stats().waiting == 1  # the agent's request is held
            classes = {c.name: c.paused for c in (await client.status()).scheduler.models[0].classes}
            assert classes == {"user": False, "agent": True, "batch": False}
            await client.request(Resume(klass="agent"))
        assert gw.stats().waiting == 0

        with pytest.raises(AdminError, match="no upstream 'nope#0'"):
            await client.request(Drain(upstream="nope#0"))
        with pytest.raises(AdminError, match="unknown class 'vip'"):
            await client.request(Pause(klass="vip"))


async def test_requests_are_listed_and_an_operator_can_cancel_them(start_sim, start_gateway, caplog):
    caplog.set_level("INFO", logger="queuegate")
    sim, url = await start_sim(tokens_per_s=20)
    gw = await start_gateway({"m": {"upstreams": [url], "max_concurrency": 1}})
    path = admin_socket_path(gw.daemon.config)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
    outcomes: dict[str, object] = {}

    def streamed() -> None:
        try:
            for _ in gw.client().chat.completions.create(**chat, stream=True, extra_headers={"x-request-id": "s1"}):
                pass
            outcomes["s1"] = "finished"
        except openai.APIError as exc:
            outcomes["s1"] = exc

    def queued() -> None:
        try:
            gw.client().chat.completions.create(**chat, extra_headers={"x-request-id": "q1"})
        except openai.APIStatusError as exc:
            outcomes["q1"] = exc

    async with AdminClient(path) as client, trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, streamed)
        await wait_until(lambda: gw.stats().in_service == 1, timeout=5)
        nursery.start_soon(in_thread, queued)
        await wait_until(lambda: gw.stats().waiting == 1, timeout=5)
        await trio.sleep(0.3)  # a few tokens of the stream
        status = await client.status()
        listed = {r.id: r for r in status.requests}
        assert status.requests_total == 2 and set(listed) == {"s1", "q1"}
        assert listed["s1"].upstream == "m#0" and listed["s1"].chunks > 0
        assert listed["q1"].upstream is None and listed["q1"].klass == "user"

        assert (await client.request(Cancel(request_id="q1"))).message == "cancelled q1"
        await wait_until(lambda: "q1" in outcomes, timeout=5)
        assert gw.stats().waiting == 0
        assert (await client.request(Cancel(request_id="s1"))).message == "cancelled s1"
    cancelled = outcomes["q1"]
    assert isinstance(cancelled, openai.APIStatusError) and cancelled.status_code == 503
    assert cancelled.body["code"] == "cancelled"
    assert isinstance(outcomes["s1"], openai.APIError)  # the stream was cut, not finished
    with trio.fail_after(5):
        while sim.stats.disconnects < 1:  # and the upstream was closed
            await trio.sleep(0.01)

    def logged() -> dict:
        return {r.fields["rid"]: r.fields for r in caplog.records if r.getMessage() == "request"}

    with trio.fail_after(5):
        while "s1" not in logged():  # the cut stream's line is written as its cleanup runs
            await trio.sleep(0.01)
    assert logged()["q1"]["error"] == logged()["s1"]["error"] == "cancelled by the operator"
    async with AdminClient(path) as client:
        status = await client.status()
        assert status.requests_total == 0
        assert status.finished_total == 2 and status.tokens_total > 0  # the stream's relayed tokens
        with pytest.raises(AdminError, match="no request 'q1' in progress"):
            await client.request(Cancel(request_id="q1"))


FILE_HEAD = '[server]\nlisten = "127.0.0.1:0"\nstate_dir = "state"\n'  # (its admin socket: state/admin.sock)


async def start_from_file(nursery: trio.Nursery, config_file: Path) -> tuple[Daemon, Any]:
    """The daemon of a config file (which `reload` reads again), started."""
    daemon = Daemon(load_config(config_file), config_file)
    return daemon, await nursery.start(daemon.run)


async def test_reload_applies_live_keys_names_the_rest_and_keeps_the_old_config_when_invalid(
    start_sim, nursery, tmp_path
):
    _, url = await start_sim(tokens_per_s=10)
    config_file = tmp_path / "queuegate.toml"

    def write(max_size: object, header: str = "X-Chat-Id") -> None:
        config_file.write_text(
            FILE_HEAD + f"[queue]\nmax_size = {max_size}\n"
            f'[affinity]\nheader = "{header}"\n[models.m]\nupstreams = ["{url}"]\nmax_concurrency = 1\n'
        )

    write(256)
    daemon, started = await start_from_file(nursery, config_file)
    path = tmp_path / "state" / "admin.sock"
    async with AdminClient(path) as client:
        assert (await client.request(Reload())).message == "reloaded: no changes"
        write(1, header="X-Other")
        reply = await client.request(Reload())
        assert reply.message == "reloaded: applied queue.max_size; not applied, needs a restart: affinity.header"
        write('"lots"')
        with pytest.raises(AdminError, match=r"at `queue.max_size`: Expected `int`"):
            await client.request(Reload())

    # max_size 1 is in force: one in service, one waiting, the next is refused.
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    statuses: list[int] = []

    async def post() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            statuses.append((await http.post(started.base_url + "/v1/chat/completions", json=chat)).status_code)

    async with trio.open_nursery() as requests:
        for expected in ((1, 0), (1, 1)):
            requests.start_soon(post)
            await wait_until(lambda e=expected: queue_now(daemon) == e, timeout=5)
        await post()
        assert statuses == [429]
    assert sorted(statuses) == [200, 200, 429]
    daemon.request_shutdown()


async def test_reload_needs_a_config_file(start_gateway):
    gw = await start_gateway({"m": {"upstreams": ["http://127.0.0.1:9/v1"]}})
    async with AdminClient(admin_socket_path(gw.daemon.config)) as client:
        with pytest.raises(AdminError, match="started without a config file"):
            await client.request(Reload())


async def test_reload_adds_and_removes_models_live_and_a_request_in_flight_on_a_removed_one_ends_whole(
    start_sim, nursery, tmp_path
):
    slow, slow_url = await start_sim(tokens_per_s=10)
    _, other_url = await start_sim(tokens_per_s=0)
    config_file = tmp_path / "queuegate.toml"
    head = FILE_HEAD
    config_file.write_text(head + f'[models.m]\nupstreams = ["{slow_url}"]\nkind = "llamacpp"\n')
    daemon, started = await start_from_file(nursery, config_file)
    api = started.base_url + "/v1"
    body = {"model": "m", "stream": True, "max_tokens": 15, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("POST", api + "/chat/completions", json=body) as streaming,
        AdminClient(tmp_path / "state" / "admin.sock") as admin,
    ):
        lines = streaming.aiter_lines()
        await lines.__anext__()
        config_file.write_text(head + f'[models.n]\nupstreams = ["{other_url}"]\nkind = "llamacpp"\naliases = ["m2"]\n')
        assert (await admin.request(Reload())).message == "reloaded: applied models.m, models.n"
        assert daemon.catalog.resolve("m") is None and daemon.catalog.resolve("m2") is not None
        new = await http.post(api + "/chat/completions", json={**body, "model": "m2", "stream": False})
        assert new.status_code == 200
        gone = await http.post(api + "/chat/completions", json={**body, "model": "m", "stream": False})
        assert gone.status_code == 404
        rest = [line async for line in lines]  # the stream on the removed model's upstream ends whole
    assert "data: [DONE]" in rest and slow.stats.disconnects == 0
    await wait_until(lambda: [m.name for m in daemon.admission.statistics().models] == ["n"])
    daemon.request_shutdown()


async def test_a_reload_that_changes_a_model_keeps_its_waiting_requests_and_moves_aliases_whole(
    start_sim, nursery, tmp_path
):
    _, url = await start_sim(tokens_per_s=10)
    config_file = tmp_path / "queuegate.toml"
    head = FILE_HEAD

    def write(a_aliases: str, b_aliases: str, a_concurrency: int = 1) -> None:
        config_file.write_text(
            head + f'[models.a]\nupstreams = ["{url}"]\nmax_concurrency = {a_concurrency}\naliases = [{a_aliases}]\n'
            f'[models.b]\nupstreams = ["{url}"]\naliases = [{b_aliases}]\n'
        )

    write('"fast"', '"slow"')
    daemon, started = await start_from_file(nursery, config_file)
    body = {"model": "a", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    statuses: list[int] = []

    async def post() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            statuses.append((await http.post(started.base_url + "/v1/chat/completions", json=body)).status_code)

    async with trio.open_nursery() as requests, AdminClient(tmp_path / "state" / "admin.sock") as admin:
        requests.start_soon(post)
        requests.start_soon(post)
        await wait_until(lambda: queue_now(daemon) == (1, 1), timeout=5)  # one in service, one waiting
        write('"slow"', '"fast"', a_concurrency=2)  # the aliases change hands, a's upstream changes too
        reply = await admin.request(Reload())
        assert reply.message == "reloaded: applied models.a.aliases, models.a.max_concurrency, models.b.aliases"
        await wait_until(lambda: queue_now(daemon) == (2, 0), timeout=5)  # the changed upstream took it at once
    assert statuses == [200, 200]  # the waiting request was not dropped by the change
    assert daemon.catalog.canonical("fast") == "b" and daemon.catalog.canonical("slow") == "a"
    daemon.request_shutdown()


async def test_a_reload_configures_a_model_a_node_registered_first_and_it_keeps_the_nodes_upstream(
    start_sim, nursery, tmp_path
):
    _, url = await start_sim(tokens_per_s=0)
    config_file = tmp_path / "queuegate.toml"
    head = FILE_HEAD + '[node_keys.box1]\nkey = "node-secret-1"\n'
    config_file.write_text(head)
    daemon, started = await start_from_file(nursery, config_file)
    async with httpx.AsyncClient(timeout=10) as http:
        registration = {"node": "box1", "models": [{"name": "x", "base_url": url, "kind": "llamacpp"}]}
        headers = {"authorization": "Bearer node-secret-1"}
        assert (await http.post(started.base_url + "/v1/nodes/register", json=registration, headers=headers)).is_success
        config_file.write_text(head + f'[models.x]\nupstreams = ["{url}"]\nkind = "llamacpp"\naliases = ["ex"]\n')
        async with AdminClient(tmp_path / "state" / "admin.sock") as admin:
            assert (await admin.request(Reload())).message == "reloaded: applied models.x"
        assert [u.id for u in daemon.catalog.models["x"].upstreams] == ["x#0", "x@box1"]
        body = {"model": "ex", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        await wait_until(lambda: daemon.admission.serving("x"))
        assert (await http.post(started.base_url + "/v1/chat/completions", json=body)).status_code == 200
    daemon.request_shutdown()
