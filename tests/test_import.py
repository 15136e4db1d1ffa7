"""Coming from another tool: `queuegate import` on sample configs of llama-swap, the Docker swap proxy and RoleMesh
(written from their documentation, in tests/samples/), and `queuegate run` from the original proxy's environment
variables. The CLI is what is tested, so it runs as a real subprocess."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from queuegate.config import ConfigError, load_config
from queuegate.config.importers import ImportFailed, config_from_environment, import_file
from tests.helpers import chat, in_thread, start_daemon

SAMPLES = Path(__file__).parent / "samples"
# What the llama-swap sample reads from the environment (its ${env.*} macros).
SAMPLE_ENV = {"LLAMA_SWAP_KEY": "sk-from-the-environment", "OPENROUTER_API_KEY": "sk-or-test"}


async def queuegate(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """`queuegate ARGS` as a user runs it; its exit code and output."""
    return await trio.run_process(
        [sys.executable, "-m", "queuegate.cli", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **SAMPLE_ENV, **(env or {})},
        cwd=cwd,
    )


async def imported(sample: str, tmp_path: Path, *not_carried: str) -> Path:
    """Import a sample with the CLI; check that it names each setting in `not_carried` on stderr and in the file, and
    that `queuegate check` passes on what it wrote. The written file's path."""
    output = tmp_path / "queuegate.toml"
    done = await queuegate("import", str(SAMPLES / sample), "-o", str(output))
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert f"wrote {output}" in done.stdout.decode()
    text = output.read_text()
    for setting in not_carried:
        assert f"`{setting}` not carried over:" in stderr, setting
        assert f"`{setting}` not carried over:" in text, setting
    assert stderr.count("not carried over") == text.count("not carried over") == len(not_carried), stderr
    checked = await queuegate("check", "--config", str(output))
    assert checked.returncode == 0, checked.stderr.decode()
    assert checked.stdout.decode().startswith("config ok")
    return output


async def test_a_llama_swap_config_becomes_launched_models_on_devices_with_what_it_cannot_carry_named(
    tmp_path, monkeypatch
):
    output = await imported(
        "llama-swap.yaml",
        tmp_path,
        "startPort",
        "includeAliasesInList",
        "apiKeys[2]",  # too short for QueueGate
        "groups.big.exclusive",
        "models.qwen3-coder-30b.filters.stripParams",
        "models.gemma3-12b.name",
        "models.gemma3-12b.description",
        "models.vllm-mistral.cmdStop",
        "models.vllm-mistral.timeouts",
        "models.nomic-embed.unlisted",
    )
    for name, value in SAMPLE_ENV.items():
        monkeypatch.setenv(name, value)
    config = load_config(output)
    coder = config.models["qwen3-coder-30b"]
    # Macros filled in as llama-swap would (the model's own ctx over the top level's), comments and \ dropped,
    # ${PORT} left for QueueGate, ${env.HOME} read from the environment when the config loads.
    assert coder.cmd == [
        "/opt/llama.cpp/build/bin/llama-server", "--port", "${PORT}", "--ctx-size", "32768", "--flash-attn", "on",
        "--model", f"{os.environ['HOME']}/models/Qwen3-Coder-30B-A3B-Q4_K_M.gguf", "--jinja",
    ]  # fmt: skip
    assert (coder.launcher, coder.kind, coder.health_path, coder.upstreams) == ("process", "llamacpp", "/health", [])
    assert coder.aliases == ["coder", "gpt-4o-mini"] and coder.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert (coder.ttl_s, coder.startup_timeout_s, coder.stop_timeout_s) == (600, 300, 20)
    assert coder.defaults == {"temperature": 0.7, "top_p": 0.8}  # setParams, as defaults (and said so)
    gemma = config.models["gemma3-12b"]
    assert (gemma.upstream_model, gemma.max_concurrency, gemma.ttl_s) == ("gemma-3-12b-it", 2, 0)  # ttl 0: never
    mistral = config.models["vllm-mistral"]
    assert (mistral.kind, mistral.upstreams, mistral.health_path) == (
        "vllm",
        ["http://127.0.0.1:8000/v1"],
        "/v1/models",
    )
    assert mistral.ttl_s == 900  # globalTTL
    # The swapping group is one exclusive device; the group whose models run together puts them on none.
    assert {name: m.device for name, m in config.models.items() if m.device} == {
        "qwen3-coder-30b": "big", "gemma3-12b": "big", "vllm-mistral": "big"
    }  # fmt: skip
    assert config.devices["big"].exclusive
    embed = config.models["nomic-embed"]
    assert embed.preload and embed.health_path == ""  # hooks.on_startup.preload; checkEndpoint: none
    peer = config.models["deepseek/deepseek-v3.2"]
    assert peer.upstreams == ["https://openrouter.ai/api/v1"] and peer.api_key_env == "OPENROUTER_API_KEY"
    assert peer.aliases == ["openrouter/deepseek/deepseek-v3.2"]
    assert config.keys["key1"].key == "sk-homelab-0123456789" and config.keys["key2"].key_env == "LLAMA_SWAP_KEY"
    assert (config.server.log_level, config.queue.notify) == ("warning", "always")


async def test_a_swap_proxy_config_becomes_docker_models_taking_turns_on_one_gpu(tmp_path):
    output = await imported(
        "swap-proxy.yml",
        tmp_path,
        "idle_timeout",
        "models.mistral-small.health_url",  # on another port than its backend
        "models.mistral-small.restart_policy",
    )
    config = load_config(output)
    coder = config.models["qwen3-coder"]
    assert (coder.launcher, coder.container, coder.upstreams) == (
        "docker",
        "vllm-qwen3-coder",
        ["http://127.0.0.1:8001/v1"],
    )
    assert (coder.health_path, coder.startup_timeout_s, coder.device) == ("/health", 600, "gpu")
    assert config.models["llama3.1-8b"].upstreams == ["http://127.0.0.1:8002/v1"]
    assert config.models["mistral-small"].health_path is None
    assert config.devices["gpu"].exclusive


async def test_rolemesh_roles_sharing_an_upstream_become_one_model_with_the_other_roles_as_aliases(tmp_path):
    output = await imported(
        "rolemesh-models.yaml",
        tmp_path,
        "default_model",
        "models.writer.openai_model_name",
        "models.reviewer",  # discovered: RoleMesh's own node protocol
    )
    config = load_config(output)
    assert sorted(config.models) == ["local-chat", "planner", "writer"]
    planner = config.models["planner"]
    assert (planner.aliases, planner.upstreams) == (["coder"], ["http://127.0.0.1:8011/v1"])
    assert planner.defaults == {"temperature": 0.2}
    local = config.models["local-chat"]
    assert (local.upstream_model, local.defaults, local.upstreams) == (
        "dolphin3:latest", {"temperature": 0.7}, ["http://127.0.0.1:11434/v1"]
    )  # fmt: skip
    assert config.server.listen == "127.0.0.1:8000"
    assert config.keys["client1"].key == "rolemesh-client-key-1"
    assert config.node_keys["node1"].key == "rolemesh-node-key-1"


async def test_the_format_is_told_from_the_content_or_named_and_a_file_of_none_is_refused(tmp_path):
    assert import_file(SAMPLES / "rolemesh-models.yaml")[0] == "rolemesh"
    assert import_file(SAMPLES / "swap-proxy.yml", "swap-proxy")[0] == "swap-proxy"
    other = tmp_path / "compose.yaml"
    other.write_text("services:\n  web:\n    image: nginx\n")
    with pytest.raises(ImportFailed, match="name it with --from"):
        import_file(other)
    done = await queuegate("import", str(other), "-o", str(tmp_path / "out.toml"))
    assert done.returncode == 2 and "cannot import" in done.stderr.decode()
    assert not (tmp_path / "out.toml").exists()
    # An existing file is not overwritten without --force.
    (tmp_path / "queuegate.toml").write_text("# mine\n")
    done = await queuegate("import", str(SAMPLES / "swap-proxy.yml"), cwd=tmp_path)
    assert done.returncode == 1 and "--force" in done.stderr.decode()
    assert (tmp_path / "queuegate.toml").read_text() == "# mine\n"


def test_llama_swap_macros_keep_literal_dollars_and_refuse_one_that_is_not_defined(tmp_path):
    source = tmp_path / "config.yaml"
    source.write_text(
        "macros:\n  price: '5$'\n"
        "models:\n  m:\n    cmd: server --port ${PORT} --name ${MODEL_ID} --note '${price} and $HOME'\n"
    )
    draft = import_file(source)[1]
    assert draft.raw()["models"]["m"]["cmd"] == [
        "server",
        "--port",
        "${PORT}",
        "--name",
        "m",
        "--note",
        "5$$ and $$HOME",
    ]
    config = load_config(_written(draft, tmp_path))
    assert config.models["m"].cmd[-1] == "5$ and $HOME"  # what the server gets, as llama-swap would pass it
    source.write_text("models:\n  m:\n    cmd: server --port ${PORT} ${nowhere}\n")
    with pytest.raises(ImportFailed, match=r"models.m.cmd`: no macro \$\{nowhere\}"):
        import_file(source)


async def test_an_imported_llama_swap_config_serves_and_swaps_its_models(nursery, tmp_path):
    server = f"{shlex.quote(sys.executable)} -m queuegate.sim --port ${{PORT}} --model ${{MODEL_ID}} --tokens-per-s 0"
    source = tmp_path / "config.yaml"
    source.write_text(f"models:\n  small:\n    cmd: {server}\n  large:\n    cmd: {server}\n    aliases: [big]\n")
    done = await queuegate("import", str(source), "-o", str(tmp_path / "queuegate.toml"))
    assert done.returncode == 0 and not done.stderr, done.stderr.decode()
    daemon = await start_daemon(nursery, "--config", str(tmp_path / "queuegate.toml"), "--listen", "127.0.0.1:0")
    client = daemon.client()
    for model in ("small", "big", "small"):  # one device, one model at a time, as llama-swap ran them
        assert (await in_thread(lambda model=model: chat(client, model))).choices[0].message.content
    assert daemon.stderr.count("model state model=small state=ready") == 2, daemon.stderr


def _written(draft, tmp_path: Path) -> Path:
    path = tmp_path / "queuegate.toml"
    path.write_text(draft.render("config.yaml"))
    return path


# -- the original proxy's environment variables --------------------------------------------------------------------


async def test_run_without_a_config_file_serves_the_original_environment_variables(nursery, start_sim):
    sim, url = await start_sim(tokens_per_s=0)
    env = {
        "LLM_UPSTREAMS": url.removesuffix("/v1"),  # a server's URL: /v1 is added
        "PROXY_MODELS": "qwen3, llama3",
        "PROXY_OWNED_BY": "homelab",
        "LLM_MAX_CONCURRENCY": "2",
        "STICKY_HEADER": "X-Session-Id",
        "AFFINITY_TTL_SEC": "120",
        "QUEUE_NOTIFY_USER": "0",
        "QUEUE_NOTIFY_MIN_MS": "500",
    }
    daemon = await start_daemon(nursery, "--listen", "127.0.0.1:0", env=env)
    client = daemon.client()
    listed = await in_thread(lambda: list(client.models.list()))
    assert {(m.id, m.owned_by) for m in listed} == {("qwen3", "homelab"), ("llama3", "homelab")}
    answer = await in_thread(lambda: chat(client, "llama3"))
    assert answer.choices[0].message.content and sim.stats.received[-1].body["model"] == "llama3"
    line = next(line for line in daemon.stderr.splitlines() if "config from environment variables" in line)
    assert line.endswith(
        "variables=LLM_UPSTREAMS,PROXY_MODELS,LLM_MAX_CONCURRENCY,PROXY_OWNED_BY,STICKY_HEADER,AFFINITY_TTL_SEC,"
        "QUEUE_NOTIFY_USER,QUEUE_NOTIFY_MIN_MS"
    )


async def test_a_bad_environment_variable_is_one_line_naming_it(tmp_path):
    base = {"LLM_UPSTREAMS": "http://127.0.0.1:9/v1", "PROXY_MODELS": "m"}
    done = await queuegate("run", env={**base, "LLM_MAX_CONCURRENCY": "many"}, cwd=tmp_path)
    assert done.returncode == 2
    assert (
        done.stderr.decode().strip() == "queuegate: config error: LLM_MAX_CONCURRENCY='many': expected a whole number"
    )
    checked = await queuegate("check", env=base, cwd=tmp_path)
    assert checked.returncode == 0 and "upstream http://127.0.0.1:9/v1" in checked.stdout.decode()


@pytest.mark.parametrize(
    ("variables", "error"),
    [
        (
            {"LLM_UPSTREAMS": "ftp://box:8080"},
            "LLM_UPSTREAMS: at `models.m.upstreams[0]`: expected an http(s) base URL",
        ),
        ({"LLM_UPSTREAMS": " , "}, "LLM_UPSTREAMS: expected comma-separated base URLs"),
        ({"PROXY_MODELS": ""}, "PROXY_MODELS is not set"),
        ({"PROXY_MODELS": "has space"}, "PROXY_MODELS: at `models.has space`: a model name may use"),
        ({"LLM_MAX_CONCURRENCY": "0"}, "LLM_MAX_CONCURRENCY: at `models.m.max_concurrency`: Expected `int` >= 1"),
        ({"AFFINITY_TTL_SEC": "-5"}, "AFFINITY_TTL_SEC: at `affinity.ttl_s`: Expected `float` > 0.0"),
        ({"QUEUE_NOTIFY_MIN_MS": "soon"}, "QUEUE_NOTIFY_MIN_MS='soon': expected a number"),
        ({"QUEUE_NOTIFY_USER": "maybe"}, "QUEUE_NOTIFY_USER='maybe': expected 1 or 0"),
    ],
)
def test_each_variable_is_checked_as_a_config_key_and_named_when_wrong(variables, error):
    env = {"LLM_UPSTREAMS": "http://127.0.0.1:9/v1", "PROXY_MODELS": "m", **variables}
    with pytest.raises(ConfigError) as raised:
        config_from_environment(env)
    assert str(raised.value).startswith(error)


def test_queue_notify_user_takes_the_original_flag_or_queuegates_own_values():
    env = {"LLM_UPSTREAMS": "http://127.0.0.1:9", "PROXY_MODELS": "m"}
    values = ("1", "no", "always")
    notify = {v: config_from_environment({**env, "QUEUE_NOTIFY_USER": v})[0].queue.notify for v in values}
    assert notify == {"1": "auto", "no": "never", "always": "always"}  # auto: notices for the user class
    assert config_from_environment({"PROXY_MODELS": "m"}) is None  # without LLM_UPSTREAMS: not this mode
