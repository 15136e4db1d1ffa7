"""Shared test harness: real daemons on port 0, real simulated upstreams on loopback, the real `openai` client."""

from __future__ import annotations

import os
from typing import Any

import pytest

from queuegate.config import build_config
from queuegate.daemon import Daemon
from queuegate.sim import SimConfig, Simulator
from tests.helpers import SECRETS, Gateway
from tests.realparts import llama_server_binary, test_model_path


@pytest.fixture
def key_env(monkeypatch):
    """The API key secrets of `helpers.SECRETS`, in the environment."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def start_sim(nursery):
    """Start a simulated upstream (real HTTP server on a loopback port) in the test's nursery."""

    async def start(**settings: Any) -> tuple[Simulator, str]:
        sim = Simulator(SimConfig(**settings))
        url = await nursery.start(sim.run)
        return sim, url

    return start


@pytest.fixture
def start_gateway(nursery, tmp_path):
    """Start the real daemon on 127.0.0.1:0 with `models` (and optional config sections); its state (the admin
    socket) goes under the test's tmp_path."""

    gateways = 0

    async def start(models: dict[str, Any], **sections: Any) -> Gateway:
        nonlocal gateways
        gateways += 1
        sections.setdefault("server", {})
        sections["server"].setdefault("listen", "127.0.0.1:0")
        sections["server"].setdefault("state_dir", str(tmp_path / f"state-{gateways}"))
        sections.setdefault("upstream", {})
        sections["upstream"].setdefault("health_interval_s", 0.2)
        daemon = Daemon(build_config({"models": models, **sections}))
        started = await nursery.start(daemon.run)
        return Gateway(daemon, started.base_url)

    return start


@pytest.fixture
def llama_parts():
    """(binary, model) of the real llama-server and its small model; skipped without them, failed in CI."""
    binary, why_binary = llama_server_binary()
    model, why_model = test_model_path()
    if binary and model:
        return binary, model
    reason = "; ".join(why for path, why in ((binary, why_binary), (model, why_model)) if not path)
    if os.environ.get("CI"):
        pytest.fail(f"real llama-server parts missing in CI: {reason}")
    pytest.skip(f"real llama-server not available: {reason}")
