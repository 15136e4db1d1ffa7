"""`queuegate top` driven by Textual's Pilot against a live daemon with a real fleet (QueueGate-launched simulated
servers). The daemon runs in the test's trio loop; the app runs in a worker thread with its own asyncio loop, as it
would in its own process, and reaches the daemon only through the admin socket.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import openai
import trio
from textual.widgets import Label, Sparkline

from queuegate.admin.aio_client import AsyncioAdminClient
from queuegate.config import admin_socket_path, build_config
from queuegate.daemon import Daemon
from queuegate.tui.app import ConfirmScreen, HelpScreen, TopApp
from queuegate.tui.widgets import (
    BatchesTable,
    DevicesPanel,
    LimitsTable,
    ModelsTable,
    NodesTable,
    RequestsTable,
    UpstreamsTable,
)
from tests.helpers import EXCLUSIVE, HI, in_thread, sim_model, wait_until


async def until(pilot, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the screen"
        await pilot.pause(0.05)


def cell(app: TopApp, model: str, column: str) -> str:
    return str(app.query_one(ModelsTable).get_cell(model, column))


async def test_keys_preload_and_evict_and_the_row_shows_the_load(start_gateway):
    gw = await start_gateway({"a": sim_model(1.0), "b": sim_model(1.0)}, devices=EXCLUSIVE)
    path = admin_socket_path(gw.daemon.config)
    seen_progress: list[str] = []

    async def scenario() -> None:
        app = TopApp(AsyncioAdminClient(path, interval_ms=200))
        async with app.run_test(size=(150, 45)) as pilot:
            table = app.query_one(ModelsTable)
            await until(pilot, lambda: table.row_count == 2)
            assert table.selected_key == "a" and cell(app, "a", "STATE") == "stopped"
            assert cell(app, "a", "IDLE") == "-"  # (never loaded: not idle since the daemon started)
            assert str(app.query_one(UpstreamsTable).get_cell("a#0", "STATE")) == "stopped"  # (not "loading")
            await pilot.press("p")

            def loaded() -> bool:
                seen_progress.append(cell(app, "a", "LOAD / SWAP"))
                return cell(app, "a", "STATE") == "ready"

            await until(pilot, loaded)
            await pilot.press("down", "p")  # b: the exclusive device swaps a out
            await until(pilot, lambda: "→ b" in str(app.query_one(DevicesPanel).render()))
            await until(pilot, lambda: cell(app, "b", "STATE") == "ready")
            assert cell(app, "a", "STATE") == "stopped"
            await pilot.press("e")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")  # not confirmed: nothing happens
            assert cell(app, "b", "STATE") == "ready"
            await pilot.press("e", "y")
            await until(pilot, lambda: cell(app, "b", "STATE") == "stopped")
            upstreams = app.query_one(UpstreamsTable)
            app.set_focus(upstreams)  # d acts on the selected upstream: a#0
            await pilot.press("d")
            await until(pilot, lambda: str(upstreams.get_cell("a#0", "STATE")).endswith("(drained)"))
            await pilot.press("d")
            await until(pilot, lambda: not str(upstreams.get_cell("a#0", "STATE")).endswith("(drained)"))
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape", "q")

    await trio.to_thread.run_sync(lambda: asyncio.run(scenario()))
    assert any("waiting for health of a" in text for text in seen_progress), seen_progress


async def test_it_says_when_disconnected_and_reconnects_to_a_restarted_daemon(start_gateway, nursery):
    gw = await start_gateway({"a": sim_model()}, devices=EXCLUSIVE)
    path = admin_socket_path(gw.daemon.config)
    token = trio.lowlevel.current_trio_token()

    async def restart() -> None:
        gw.daemon.request_shutdown()
        await wait_until(lambda: not path.exists(), timeout=10)
        await trio.sleep(0.5)  # the app notices while nothing listens
        raw = {"server": {"listen": "127.0.0.1:0", "admin_socket": str(path)}, "devices": EXCLUSIVE}
        await nursery.start(Daemon(build_config({**raw, "models": {"a": sim_model()}})).run)

    async def scenario() -> None:
        app = TopApp(AsyncioAdminClient(path, interval_ms=200))
        async with app.run_test(size=(150, 45)) as pilot:
            banner = app.query_one("#banner")
            await until(pilot, lambda: app.connected)
            first_url = str(banner.render())
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: trio.from_thread.run(restart, trio_token=token))
            await until(pilot, lambda: app.connected and str(banner.render()) != first_url)  # the new daemon's URL
            assert app.disconnections >= 1
            assert "DISCONNECTED" not in str(banner.render())
            await pilot.press("q")

    await trio.to_thread.run_sync(lambda: asyncio.run(scenario()))


async def test_the_requests_panel_lists_requests_and_c_cancels_the_selected_one(start_sim, start_gateway, nursery):
    sim, url = await start_sim(tokens_per_s=20)
    gw = await start_gateway({"m": {"upstreams": [url], "max_concurrency": 1}})
    path = admin_socket_path(gw.daemon.config)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400}
    failures: list[Exception] = []

    def streamed() -> None:
        try:
            for _ in gw.client().chat.completions.create(**chat, stream=True, extra_headers={"x-request-id": "long"}):
                pass
        except openai.APIError as exc:
            failures.append(exc)

    nursery.start_soon(in_thread, streamed)

    async def scenario() -> None:
        app = TopApp(AsyncioAdminClient(path, interval_ms=200))
        async with app.run_test(size=(150, 45)) as pilot:
            requests = app.query_one(RequestsTable)
            await until(pilot, lambda: requests.row_count == 1 and int(str(requests.get_cell("long", "CHUNKS"))) > 0)
            assert str(requests.get_cell("long", "UPSTREAM")) == "m#0"
            assert "Requests: 1" in str(app.query_one("#requests-title").render())
            app.set_focus(requests)
            await pilot.press("c")
            await until(pilot, lambda: requests.row_count == 0)
            tokens = app.query_one("#tps", Sparkline)  # the cancelled stream's tokens count too
            await until(pilot, lambda: any(rate > 0 for rate in tokens.data or []))
            await pilot.press("q")

    await trio.to_thread.run_sync(lambda: asyncio.run(scenario()))
    await wait_until(lambda: bool(failures) and sim.stats.disconnects >= 1, timeout=5)


async def test_the_limits_panel_shows_only_when_limits_exist_and_what_the_minute_used(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    limited = await start_gateway({"cloud": {"upstreams": [url], "rpm": 5, "tpm": 1000}})
    unlimited = await start_gateway({"m": {"upstreams": [url]}})
    client = limited.client()
    await in_thread(lambda: client.chat.completions.create(model="cloud", messages=HI, max_tokens=3))

    async def scenario() -> None:
        app = TopApp(AsyncioAdminClient(admin_socket_path(limited.daemon.config), interval_ms=200))
        async with app.run_test(size=(150, 45)) as pilot:
            limits = app.query_one(LimitsTable)
            await until(pilot, lambda: limits.row_count == 1)
            assert limits.display
            assert str(limits.get_cell("upstream:cloud#0", "REQUESTS / MIN")) == "1/5"
            assert str(limits.get_cell("upstream:cloud#0", "TOKENS / MIN")).endswith("/1000")
            assert str(limits.get_cell("upstream:cloud#0", "ROOM IN")) == "now"
            await pilot.press("q")
        app = TopApp(AsyncioAdminClient(admin_socket_path(unlimited.daemon.config), interval_ms=200))
        async with app.run_test(size=(150, 45)) as pilot:
            await until(pilot, lambda: app.connected)
            assert not app.query_one(LimitsTable).display  # no limits configured: no empty panel
            await pilot.press("q")

    await trio.to_thread.run_sync(lambda: asyncio.run(scenario()))


async def test_the_nodes_panel_shows_each_registered_node_and_what_it_serves(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({}, node_keys={"box1": {"key": "node-secret-1"}})
    body = {"node": "box1", "models": [{"name": "m", "base_url": url, "kind": "llamacpp"}]}
    headers = {"authorization": "Bearer node-secret-1"}
    answer = await in_thread(lambda: httpx.post(gw.api + "/nodes/register", json=body, headers=headers))
    assert answer.status_code == 200

    async def scenario() -> None:
        app = TopApp(AsyncioAdminClient(admin_socket_path(gw.daemon.config), interval_ms=200))
        async with app.run_test(size=(150, 45)) as pilot:
            nodes = app.query_one(NodesTable)
            await until(pilot, lambda: nodes.row_count == 1)
            assert nodes.display and str(nodes.get_cell("box1", "STATE")) == "live"
            assert str(nodes.get_cell("box1", "MODELS")) == "m"
            assert str(app.query_one(UpstreamsTable).get_cell("m@box1", "UPSTREAM")) == "m@box1"
            await pilot.press("q")

    await trio.to_thread.run_sync(lambda: asyncio.run(scenario()))


async def test_the_batches_panel_shows_progress_and_b_pauses_and_resumes_and_x_cancels(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=20)  # (a line takes about 0.2 s)
    gw = await start_gateway({"m": {"upstreams": [url]}}, batches={"max_concurrency": 1})
    client = gw.client()
    lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "m", "messages": HI, "max_tokens": 4}} for i in range(50)]  # fmt: skip
    content = "\n".join(json.dumps(line) for line in lines).encode()
    upload = await in_thread(lambda: client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch"))
    batch = await in_thread(
        lambda: client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="1h")
    )

    async def scenario() -> None:
        app = TopApp(AsyncioAdminClient(admin_socket_path(gw.daemon.config), interval_ms=200))
        async with app.run_test(size=(150, 60)) as pilot:
            table = app.query_one(BatchesTable)
            await until(pilot, lambda: table.row_count == 1 and "/50" in str(table.get_cell(batch.id, "PROGRESS")))
            assert table.display and str(table.get_cell(batch.id, "STATUS")) == "in_progress"
            app.set_focus(table)
            await pilot.press("b")
            await until(pilot, lambda: str(table.get_cell(batch.id, "STATUS")) == "in_progress (paused)")
            paused_at = str(table.get_cell(batch.id, "PROGRESS"))
            await pilot.pause(0.8)  # (the line in flight when it paused may still finish)
            settled = str(table.get_cell(batch.id, "PROGRESS"))
            await pilot.pause(0.8)
            assert str(table.get_cell(batch.id, "PROGRESS")) == settled, (paused_at, settled)
            await pilot.press("b")
            await until(pilot, lambda: str(table.get_cell(batch.id, "PROGRESS")) != settled)
            await pilot.press("x")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await until(pilot, lambda: table.row_count == 0)  # (a finished batch leaves the panel)
            await pilot.press("q")

    await trio.to_thread.run_sync(lambda: asyncio.run(scenario()))
    finished = await in_thread(lambda: client.batches.retrieve(batch.id))
    assert finished.status == "cancelled" and 0 < finished.request_counts.completed < 50


async def test_evict_of_a_model_queuegate_does_not_start_asks_nothing_and_help_fits_its_text(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [url]}})

    async def scenario() -> None:
        app = TopApp(AsyncioAdminClient(admin_socket_path(gw.daemon.config), interval_ms=200))
        async with app.run_test(size=(150, 45)) as pilot:
            await until(pilot, lambda: app.query_one(ModelsTable).row_count == 1)
            await pilot.press("e")
            await pilot.pause(0.1)
            assert not isinstance(app.screen, ConfirmScreen)
            assert any("not started by QueueGate" in str(n.message) for n in app._notifications)
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            label = app.screen.query_one(Label)
            longest = max(len(line) for line in str(label.render()).splitlines())
            assert label.region.width >= longest, (label.region.width, longest)  # (no line cut)
            await pilot.press("escape", "q")

    await trio.to_thread.run_sync(lambda: asyncio.run(scenario()))


def test_the_tui_loads_only_the_admin_protocol_of_queuegate():
    """`queuegate top` is a client of the admin socket: importing it loads no daemon module (nor trio or httpx)."""
    code = "import sys, queuegate.tui.app; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    ours = {m for m in loaded if m.startswith("queuegate")}
    allowed = {"queuegate", "queuegate.admin", "queuegate.admin.protocol", "queuegate.statistics"}
    assert {m for m in ours if not m.startswith("queuegate.tui")} <= allowed, ours
    assert not loaded & {"trio", "httpx", "httpcore", "hypercorn", "quart"}
