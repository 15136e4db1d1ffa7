"""Helpers shared by the benchmarks in this folder."""

from __future__ import annotations

import subprocess
from typing import Any

import trio

# The lines each server the benchmarks start prints once it listens, followed by its URL.
APP_READY = "BENCH_APP_READY "
READY_PREFIXES = ("QUEUEGATE_SIM_READY ", "QueueGate listening on ", APP_READY)


def start_server(argv: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start a server process and return it with its base URL (without /v1) once it says it is ready."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        for prefix in READY_PREFIXES:
            if line.startswith(prefix):
                return process, line[len(prefix) :].split()[0].removesuffix("/v1")
    raise RuntimeError(f"{argv} exited before it was ready")


def serve_app(app: Any, *, backlog: int = 100) -> None:
    """Serve a baseline quart-trio app on a free loopback port; print its URL after APP_READY once it listens."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.backlog = backlog

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))
            print(APP_READY, binds[0], flush=True)

    trio.run(main)
