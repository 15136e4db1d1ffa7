"""A snapshot of `queuegate top`'s main screen, from a fixed status (the app's source is an interface; this fake one
serves a swap in progress, queues, requests and a drained upstream). The screen's text is compared line by line with
tests/snapshots/top_main.txt; after an intended change, regenerate it with QUEUEGATE_UPDATE_SNAPSHOTS=1.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import trio

from queuegate.admin.protocol import DaemonStatus, Request
from queuegate.tui.app import TopApp
from queuegate.tui.widgets import ModelsTable, QueuesTable, RequestsTable, UpstreamsTable

SNAPSHOT = Path(__file__).parent / "snapshots" / "top_main.txt"


def upstream(uid: str, state: str, in_flight: int, reason: str, drained: bool = False) -> dict:
    return {"id": uid, "state": state, "reason": reason, "in_flight": in_flight, "capacity": 2, "drained": drained}


def klass(name: str, waiting: int, oldest: float, in_service: int) -> dict:
    return {"name": name, "waiting": waiting, "oldest_wait_s": oldest, "in_service": in_service, "paused": False}


def fleet_model(name: str, state: str, reason: str, device: str | None, gb: float, progress: dict | None = None):
    return {
        "name": name,
        "state": state,
        "reason": reason,
        "managed": device is not None,
        "device": device,
        "memory_gb": gb,
        "in_state_s": 1.5,
        "idle_s": None,
        "load_s": 2.5,
        "progress": progress,
    }


LOADING = {"target": "writer", "phase": "waiting for health of writer", "elapsed_s": 1.5, "eta_s": 1.0}
STATUS = msgspec.convert(
    {
        "at": 1_800_000_000.0,
        "uptime_s": 3600.0,
        "listen": "http://127.0.0.1:8080/v1",
        "scheduler": {
            "waiting": 1203,
            "in_service": 3,
            "max_queue": 4096,
            "models": [
                {
                    "name": "chat",
                    "waiting": 1200,
                    "oldest_wait_s": 42.0,
                    "in_service": 3,
                    "flows": [],
                    "classes": [klass("user", 200, 12.0, 3), klass("agent", 1000, 42.0, 0), klass("batch", 0, 0, 0)],
                    "upstreams": [upstream("chat#0", "ready", 2, "ok"), upstream("chat#1", "ready", 1, "ok", True)],
                },
                {
                    "name": "writer",
                    "waiting": 3,
                    "oldest_wait_s": 1.5,
                    "in_service": 0,
                    "flows": [],
                    "classes": [klass("user", 3, 1.5, 0), klass("agent", 0, 0, 0), klass("batch", 0, 0, 0)],
                    "upstreams": [upstream("writer#0", "loading", 0, "starting: waiting for health")],
                },
            ],
        },
        "fleet": {
            "models": [
                fleet_model("chat", "ready", "external", None, 0),
                fleet_model("writer", "starting", "waiting for health", "gpu0", 20, LOADING),
            ],
            "devices": [
                {
                    "name": "gpu0",
                    "memory_gb": 24,
                    "used_gb": 20,
                    "exclusive": True,
                    "models": ["writer"],
                    "swap": {**LOADING, "elapsed_s": 3.0},
                }
            ],
            "loads": 7,
            "swaps": 3,
        },
        "requests": [
            {
                "id": "qg-aaaa",
                "model": "chat",
                "klass": "user",
                "flow": "key:alice",
                "upstream": "chat#0",
                "elapsed_s": 4.2,
                "chunks": 120,
                "step": "round 2: get_current_time",
            },
            {
                "id": "qg-bbbb",
                "model": "writer",
                "klass": "user",
                "flow": "session:s1",
                "upstream": None,
                "elapsed_s": 1.5,
                "chunks": 0,
            },
        ],
        "requests_total": 1206,
        "finished_total": 10,
        "tokens_total": 900,
    },
    DaemonStatus,
)


class FixedSource:
    """Serves STATUS once, then nothing changes."""

    async def updates(self) -> AsyncIterator[DaemonStatus]:
        yield STATUS
        await asyncio.Event().wait()

    async def command(self, request: Request) -> str:
        return "ok"


def screen_text(svg: str) -> str:
    """The characters on screen, row by row, from Textual's SVG export (colours and fonts left out)."""
    rows: dict[float, list[tuple[float, str]]] = {}
    for match in re.finditer(r'<text class="[^"]*" x="([\d.]+)" y="([\d.]+)"[^>]*>(.*?)</text>', svg):
        rows.setdefault(float(match.group(2)), []).append((float(match.group(1)), html.unescape(match.group(3))))
    lines = ("".join(text for _, text in sorted(row)).replace("\xa0", " ").rstrip() for _, row in sorted(rows.items()))
    return "\n".join(lines) + "\n"


async def test_main_screen_snapshot():
    async def render() -> str:
        app = TopApp(FixedSource())
        async with app.run_test(size=(150, 44)) as pilot:
            tables = [app.query_one(t) for t in (ModelsTable, QueuesTable, RequestsTable, UpstreamsTable)]
            for _ in range(200):  # status shown, tables filled, footer keys drawn (slow on a loaded machine)
                if app.connected and all(t.row_count for t in tables) and app.query("FooterKey"):
                    break
                await pilot.pause(0.02)
            await pilot.pause(0.1)  # one more refresh for the layout to settle
            return screen_text(app.export_screenshot())

    text = await trio.to_thread.run_sync(lambda: asyncio.run(render()))
    if os.environ.get("QUEUEGATE_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(text)
    assert SNAPSHOT.exists(), "no snapshot yet: run with QUEUEGATE_UPDATE_SNAPSHOTS=1 and review it"
    assert text.splitlines() == SNAPSHOT.read_text().splitlines()
