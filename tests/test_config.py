"""Config loading: defaults, interpolation, and errors that name the key and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from queuegate.config import ConfigError, load_config, parse_config
from queuegate.config.reload import plan_reload
from queuegate.config.template import render_template
from queuegate.fleet import Catalog
from queuegate.fleet.kinds import PROFILES
from queuegate.vocabulary import KINDS

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[models.m]
upstreams = ["http://127.0.0.1:8081/v1"]
"""


def test_defaults_are_safe():
    config = parse_config(MINIMAL)
    assert config.server.listen == "127.0.0.1:8080"  # loopback unless told otherwise
    assert config.queue.max_size == 256
    spec = Catalog.from_config(config).resolve("m")
    assert spec is not None and spec.upstream_model == "m" and spec.kind.name == "openai"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[models.m]\nupstreams = []", "at `models.m.upstreams`: expected at least one base URL"),
        (
            '[models.m]\nupstreams = ["x"]\nmax_concurrency = 0',
            "at `models.m.max_concurrency`: Expected `int` >= 1",
        ),
        ('[models.m]\nupstreams = ["x"]\nkind = "gpt"', "at `models.m.kind`: Invalid enum value 'gpt'"),
        (
            '[models.m]\nupstreams = ["x"]\nmax_concurency = 2',
            "at `models.m`: unknown key `max_concurency`; did you mean `max_concurrency`?",
        ),
        ('[sever]\nlisten = "127.0.0.1:0"', "unknown section [sever]; did you mean [server]?"),
        ("[queue]\nzzz = 1", "at `queue`: unknown key `zzz`; the keys of [queue] are max_size, max_wait_s"),
        (
            '[models.m]\nupstreams = ["ftp://h/v1"]',
            "at `models.m.upstreams[0]`: expected an http(s) base URL",
        ),
        ('[server]\nlisten = "8080"', "at `server.listen`: expected host:port"),
        ('[models.m]\nupstreams = ["http://h/v1"]\naliases = ["m"]', "'m' is already the name or alias"),
        (
            '[models.m]\nupstreams = ["http://h/v1"]\ndefaults = { model = "x" }',
            "at `models.m.defaults.model`",
        ),
        ("[models.m\n", "not valid TOML"),
        ('[models.m]\nlauncher = "process"', 'at `models.m.cmd`: launcher = "process" needs the command'),
        ('[models.m]\nlauncher = "docker"\nupstreams = ["http://h/v1"]', "at `models.m.container`: "),
        (
            '[models.m]\nupstreams = ["http://h/v1"]\ncontainer = "c"',
            'at `models.m.container`: not used with launcher = "external"',
        ),
        (
            '[models.m]\nupstreams = ["http://h/v1"]\ndevice = "gpu"',
            "at `models.m.device`: no device 'gpu' under [devices]",
        ),
        (
            "[devices.gpu]\nmemory_gb = 8\n"
            '[models.m]\nlauncher = "process"\ncmd = ["x"]\ndevice = "gpu"\nmemory_gb = 12',
            "at `models.m.memory_gb`: 12 GB can never fit on device 'gpu' (8 GB)",
        ),
        ("[devices.gpu]\nexclusive = true", "at `devices.gpu`: Object missing required field `memory_gb`"),
        ('[fleet]\nabandoned_load = "keep"', "at `fleet.abandoned_load`: Invalid enum value 'keep'"),
        ('[keys.a]\nkey = "sk-0123456789"\nkey_env = "X"', "at `keys.a`: set exactly one of `key`"),
        ('[keys.a]\nkey = "sk-0123456789"\nclass = "vip"', "at `keys.a.class`: expected one of the classes"),
        ('[keys.a]\nkey = "sk-0123456789"\nmodels = ["nope"]', "at `keys.a.models[0]`: no model or alias 'nope'"),
        ('[keys.a]\nkey = "short"', "at `keys.a`: the secret must be at least 8 characters"),
        (
            '[keys.a]\nkey = "sk-0123456789"\n[keys.b]\nkey = "sk-0123456789"',
            "at `keys.b`: the same secret as 'keys.a'",
        ),
        (
            '[models.llama-3.3-70b]\nupstreams = ["http://h/v1"]',  # TOML reads `llama-3` holding `3-70b`
            'at `models.llama-3`: a name with dots needs quotes in TOML: [models."llama-3.3-70b"]',
        ),
        ("[devices.gpu.0]\nmemory_gb = 8", 'a name with dots needs quotes in TOML: [devices."gpu.0"]'),
    ],
)
def test_errors_name_the_key(toml, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(toml, source="q.toml")
    assert str(info.value).startswith("q.toml: ")
    assert expected in str(info.value)


def test_env_interpolation_and_secrets_stay_out_of_errors_and_reprs():
    env = {"HOST": "10.0.0.5", "BACKEND_KEY": "sk-very-secret"}
    config = parse_config(
        '[models.m]\nupstreams = ["http://${HOST}:8081/v1"]\napi_key_env = "BACKEND_KEY"\nupstream_model = "a$$b"',
        environ=env,
    )
    spec = Catalog.from_config(config, environ=env).resolve("m")
    assert spec is not None
    assert spec.upstreams[0].base_url == "http://10.0.0.5:8081/v1"
    assert spec.upstream_model == "a$b"
    assert (b"authorization", b"Bearer sk-very-secret") in spec.upstreams[0].headers
    assert "sk-very-secret" not in repr(spec)

    with pytest.raises(ConfigError, match=r"at `models.m.upstreams\[0\]`: environment variable NOPE is not set"):
        parse_config('[models.m]\nupstreams = ["http://${NOPE}/v1"]', environ={})
    with pytest.raises(ConfigError, match=r"at `models\.m\.api_key_env`: environment variable BACKEND_KEY is not set"):
        parse_config('[models.m]\nupstreams = ["http://h/v1"]\napi_key_env = "BACKEND_KEY"', environ={})


def test_key_secrets_stay_out_of_reprs_and_errors():
    config = parse_config('[keys.a]\nkey = "sk-verysecret-1"\nmodels = []', source="q.toml")
    assert "sk-verysecret" not in repr(config.keys["a"]) and "sk-verysecret" not in repr(config)
    with pytest.raises(ConfigError) as info:
        parse_config('[keys.a]\nkey = "sk-verysecret-1"\n[keys.b]\nkey = "sk-verysecret-1"', source="q.toml")
    assert "sk-verysecret" not in str(info.value)


def test_kind_profiles_set_health_and_endpoints():
    config = parse_config(
        '[models.t]\nupstreams = ["http://h:80/v1"]\nkind = "tgi"\n'
        '[models.o]\nupstreams = ["http://h:11434/v1"]\nkind = "ollama"\n'
        '[models.x]\nupstreams = ["http://h/v1"]\nkind = "vllm"\nhealth_path = ""\nendpoints = ["embeddings"]\n'
    )
    catalog = Catalog.from_config(config)
    tgi, ollama, custom = (catalog.resolve(n) for n in "tox")
    assert tgi and ollama and custom
    assert "embeddings" not in tgi.endpoints and tgi.upstreams[0].health_url == "http://h:80/health"
    assert ollama.upstreams[0].health_url == "http://h:11434/api/version"
    assert custom.upstreams[0].health_url is None and custom.endpoints == {"embeddings"}


def test_launch_macros_are_the_launchers_and_env_references_stay_the_environments():
    config = parse_config(
        '[models.p]\nlauncher = "process"\nkind = "llamacpp"\n'
        'cmd = ["${PYTHON}", "srv", "--port", "${PORT}", "--alias", "${MODEL}", "--key", "${SECRET}"]\n'
        'env = { TAG = "${MODEL}" }\n'
        '[models.d]\nlauncher = "docker"\ncontainer = "box"\nport = 9000\nupstreams = ["http://127.0.0.1:${PORT}/v1"]\n',
        environ={"SECRET": "s3", "PORT": "1", "PYTHON": "no"},  # the environment's PORT is not a model's ${PORT}
    )
    catalog = Catalog.from_config(config, free_port=lambda: 8123)
    process, docker = catalog.models["p"], catalog.models["d"]
    assert process.launch is not None and docker.launch is not None
    assert process.launch.argv == (sys.executable, "srv", "--port", "8123", "--alias", "p", "--key", "s3")
    assert process.launch.env == {"TAG": "p"}
    assert process.upstreams[0].base_url == "http://127.0.0.1:8123/v1"  # the process launcher's default URL
    assert process.upstreams[0].health_url == "http://127.0.0.1:8123/health"
    assert docker.upstreams[0].base_url == "http://127.0.0.1:9000/v1"
    assert catalog.models["p"].launch.startup_timeout_s == 120.0


def test_starter_config_is_valid_and_is_the_shipped_example():
    text = render_template()
    config = parse_config(text)
    assert "qwen3-coder" in config.models
    assert (ROOT / "queuegate.toml.example").read_text() == text, "regenerate: queuegate init --stdout"


def test_cli_init_and_check(tmp_path):
    path = tmp_path / "queuegate.toml"
    run = [sys.executable, "-m", "queuegate.cli"]
    assert subprocess.run([*run, "init", str(path)], capture_output=True, check=False).returncode == 0
    again = subprocess.run([*run, "init", str(path)], capture_output=True, text=True, check=False)
    assert again.returncode == 1 and "exists" in again.stderr
    check = subprocess.run([*run, "check", "--config", str(path)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    assert "qwen3-coder (aliases: coder)" in check.stdout and "http://127.0.0.1:8081/health" in check.stdout
    assert load_config(path).models["qwen3-coder"].max_concurrency == 2

    path.write_text(MINIMAL + "max_concurrency = -1\n")
    bad = subprocess.run([*run, "check", "--config", str(path)], capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert "at `models.m.max_concurrency`" in bad.stderr and "Expected `int` >= 1" in bad.stderr


def test_kinds_endpoints_and_classes_come_from_one_list():
    assert set(PROFILES) == set(KINDS)  # every kind the config accepts has a profile, and only those
    assert Catalog.from_config(parse_config(MINIMAL)).models  # the default kind is one of them
    with pytest.raises(ConfigError) as kind:
        parse_config('[models.m]\nupstreams = ["http://h/v1"]\nkind = "foo"')
    assert str(kind.value).endswith(f"at `models.m.kind`: Invalid enum value 'foo'; expected one of {', '.join(KINDS)}")
    with pytest.raises(ConfigError, match=r"endpoints\[1\]`: Invalid enum value 'images'; expected one of chat, comp"):
        parse_config('[models.m]\nupstreams = ["http://h/v1"]\nendpoints = ["chat", "images"]')


RUNNING = """
[server]
log_level = "info"
[queue]
max_size = 10
[models.m]
upstreams = ["http://127.0.0.1:8081/v1"]
"""


@pytest.mark.parametrize(
    ("edit", "applied", "needs_restart"),
    [
        ((), [], []),
        ((("max_size = 10", "max_size = 20"),), ["queue.max_size"], []),
        ((('log_level = "info"', 'log_level = "debug"'),), ["server.log_level"], []),
        ((("max_size = 10", "max_size = 10\nmax_wait_s = 5"),), ["queue.max_wait_s"], []),  # a key newly set
        ((("[server]", '[server]\nlisten = "127.0.0.1:9000"'),), [], ["server.listen"]),
        # Models QueueGate does not launch change live: added, removed, renamed, their upstreams.
        (((":8081", ":8082"),), ["models.m.upstreams"], []),
        (((RUNNING, RUNNING + '[models.n]\nupstreams = ["http://h/v1"]\n'),), ["models.n"], []),
        (((RUNNING, RUNNING.replace("[models.m]", "[models.renamed]")),), ["models.m", "models.renamed"], []),
        # One QueueGate launches does not.
        (((RUNNING, RUNNING + '[models.l]\nlauncher = "process"\ncmd = ["x"]\n'),), [], ["models.l"]),
        (
            (("max_size = 10", "max_size = 20"), ("[server]", '[server]\nlisten = "127.0.0.1:9000"')),
            ["queue.max_size"],  # the live part applied, the rest reported
            ["server.listen"],
        ),
    ],
)
def test_reload_applies_live_keys_and_names_the_ones_that_need_a_restart(edit, applied, needs_restart):
    new_text = RUNNING
    for old, new in edit:
        assert old in new_text
        new_text = new_text.replace(old, new)
    running = parse_config(RUNNING)
    plan = plan_reload(running, parse_config(new_text))
    assert (plan.applied, plan.needs_restart) == (applied, needs_restart)
    # The live config takes the live changes and nothing else: the new external models, no new launched one.
    assert plan.live.server.listen == running.server.listen
    new_models = parse_config(new_text).models
    assert plan.live.models == {name: m for name, m in new_models.items() if m.launcher == "external"}
    if "queue.max_size" in applied:
        assert plan.live.queue.max_size == 20


def test_reload_summary_says_what_was_applied_and_what_waits_for_a_restart():
    running = parse_config(RUNNING)
    assert plan_reload(running, running).summary() == "reloaded: no changes"
    both = parse_config(
        RUNNING.replace("max_size = 10", "max_size = 20").replace("[server]", '[server]\nlisten = "127.0.0.1:9"')
    )
    assert plan_reload(running, both).summary() == (
        "reloaded: applied queue.max_size; not applied, needs a restart: server.listen"
    )


def test_nodes_named_in_nodes_are_polled_nodes_checked_and_reloaded_live():
    text = '[nodes]\nwait_s = 2\n[nodes.box3]\nurl = "http://10.0.0.5:8000/v1"\nmodels = ["a"]\nkey_env = "BOX3_KEY"\n'
    config = parse_config(text, environ={"BOX3_KEY": "secret"})
    assert config.nodes.wait_s == 2 and config.nodes.polled["box3"].models == ["a"]
    assert config.nodes.polled["box3"].kind == "openai" and config.nodes.polled["box3"].poll_s == 10
    with pytest.raises(ConfigError, match=r"nodes.box3.key_env`: environment variable BOX3_KEY is not set"):
        parse_config(text, environ={})
    with pytest.raises(ConfigError, match=r"nodes.box3.url`: expected an OpenAI-compatible base URL"):
        parse_config('[nodes.box3]\nurl = "10.0.0.5:8000"\n')
    for url in ("http://10.0.0.5:8000:/v1", "http://10.0.0.5:abc/v1", "http://user:pw@10.0.0.5/v1"):
        with pytest.raises(ConfigError, match=r"nodes.box3.url`"):
            parse_config(f'[nodes.box3]\nurl = "{url}"\n')
    with pytest.raises(ConfigError, match=r"at `nodes.box3`: unknown key `poll`; did you mean `poll_s`\?"):
        parse_config('[nodes.box3]\nurl = "http://10.0.0.5:8000/v1"\npoll = 3\n')
    # A reload applies them at once: added, changed, removed.
    running = parse_config("[nodes]\nwait_s = 2\n")
    plan = plan_reload(running, config)
    assert plan.applied == ["nodes.polled.box3"] and plan.live.nodes.polled == config.nodes.polled
    changed = parse_config(text.replace('["a"]', '["a", "b"]'), environ={"BOX3_KEY": "secret"})
    plan = plan_reload(config, changed)
    assert plan.applied == ["nodes.polled.box3.models"] and plan.live.nodes.polled["box3"].models == ["a", "b"]
    assert plan_reload(config, running).live.nodes.polled == {}
