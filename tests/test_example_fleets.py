"""The example fleets in config/: each is accepted by `queuegate check` and says what its comments promise."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from queuegate.config import Config, load_config
from queuegate.demo import DEMO_CONFIG, simulated_upstreams

EXAMPLES = Path(__file__).resolve().parent.parent / "config"
# The secrets the examples read from the environment (what a user sets before `queuegate run`).
EXAMPLE_ENV = {
    name: f"{name.lower()}-example-secret"
    for name in (
        *("OPENAI_API_KEY", "GROQ_API_KEY", "TEAM_KEY", "HOUSEHOLD_KEY", "AUTOMATIONS_KEY"),
        *("ALICE_KEY", "BOB_KEY", "CI_AGENT_KEY", "NIGHTLY_KEY"),
    )
}


def example(name: str) -> Config:
    return load_config(EXAMPLES / name, environ=EXAMPLE_ENV)


def test_the_examples_are_the_four_fleets():
    assert sorted(p.name for p in EXAMPLES.glob("*.toml")) == [
        "cloud-with-limits.toml",
        "demo.toml",
        "keys-and-usage.toml",
        "single-gpu-swap.toml",
    ]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_queuegate_check_accepts_each_example(name):
    checked = subprocess.run(
        [sys.executable, "-m", "queuegate.cli", "check", "--config", str(EXAMPLES / name)],
        env={**os.environ, **EXAMPLE_ENV},
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("config ok: ")
    assert not any(secret in checked.stdout + checked.stderr for secret in EXAMPLE_ENV.values())


def test_the_package_ships_the_demo_file_itself():
    shipped = resources.files("queuegate").joinpath(DEMO_CONFIG).read_text(encoding="utf-8")
    assert shipped == (EXAMPLES / "demo.toml").read_text(encoding="utf-8")


def test_demo_fleet_simulates_the_external_upstreams_and_swaps_the_launched_models_on_one_gpu():
    raw = tomllib.loads((EXAMPLES / "demo.toml").read_text())
    assert simulated_upstreams(raw) == [("demo-chat", 0), ("demo-chat", 1), ("demo-embed", 0)]
    config = example("demo.toml")
    launched = {name: m for name, m in config.models.items() if m.launcher == "process"}
    assert sorted(launched) == ["demo-coder", "demo-writer"]
    assert {m.device for m in launched.values()} == {"demo-gpu"}
    room = config.devices["demo-gpu"].memory_gb
    assert all(m.memory_gb <= room for m in launched.values())  # each fits alone ...
    assert sum(m.memory_gb for m in launched.values()) > room  # ... never both: asking for the other swaps
    assert all(m.cmd[0] == "${PYTHON}" for m in launched.values())  # the daemon's own Python runs the simulator


def test_single_gpu_swap_never_needs_more_than_the_gpu_for_one_model_beside_the_preloaded_ones():
    config = example("single-gpu-swap.toml")
    models = config.models.values()
    assert {m.launcher for m in models} == {"docker"} and {m.device for m in models} == {"gpu0"}
    room = config.devices["gpu0"].memory_gb
    preloaded = sum(m.memory_gb for m in models if m.preload)
    assert preloaded <= room  # what loads at start-up fits together
    assert sum(m.memory_gb for m in models) > room  # the point of the example: they take turns
    for model in models:
        assert model.memory_gb <= room and model.create is not None
        assert model.container and len(model.upstreams) == 1
    ports = [m.upstreams[0] for m in models]
    assert len(set(ports)) == len(ports)  # each container serves on its own port (network_mode host)
    assert any(a.memory_gb + b.memory_gb <= room for a, b in itertools.combinations(models, 2))


def test_cloud_example_keeps_every_provider_under_its_limits_with_credentials_from_the_environment():
    config = example("cloud-with-limits.toml")
    for name, model in config.models.items():
        assert model.kind == "openai" and model.api_key_env in EXAMPLE_ENV, name
        assert model.rpm and model.tpm, name
        assert all(url.startswith("https://") for url in model.upstreams), name
    assert "llama-3.3-70b" in config.models  # a dotted name, quoted as TOML needs


def test_keys_example_gives_each_key_a_class_models_and_limits_and_no_inline_secret():
    config = example("keys-and-usage.toml")
    names = set(config.models) | {a for m in config.models.values() for a in m.aliases}
    assert {k.klass for k in config.keys.values()} == set(config.queue.classes)  # every class has a user
    for name, key in config.keys.items():
        assert key.key is None and key.key_env in EXAMPLE_ENV, name  # secrets never sit in a shared file
        assert set(key.models) <= names, name
    assert any(k.usage_admin for k in config.keys.values())
    assert config.usage.durable and config.server.listen.startswith("0.0.0.0")  # wide only because keys are required
