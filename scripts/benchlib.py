"""Helpers shared by the benchmarks in this folder."""

from __future__ import annotations

import subprocess

# The lines each server the benchmarks start prints once it listens, followed by its URL.
READY_PREFIXES = ("QUEUEGATE_SIM_READY ", "QueueGate listening on ", "NOOP_READY ", "HOLD_READY ")


def start_server(argv: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start a server process and return it with its base URL (without /v1) once it says it is ready."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        for prefix in READY_PREFIXES:
            if line.startswith(prefix):
                return process, line[len(prefix) :].split()[0].removesuffix("/v1")
    raise RuntimeError(f"{argv} exited before it was ready")
