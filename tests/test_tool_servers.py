"""Tool servers as configured and as they change: config errors that name the key, a tool name two servers offer,
`allow` and `rename`, a server that changed (a call answered 404), and reloading the `[tools]` bounds. The tool
servers here are the simulator's demo tool server (a real OpenAPI server on loopback)."""

from __future__ import annotations

import httpx
import pytest
import trio

from queuegate.config import ConfigError, ToolsConfig, ToolServerConfig, load_config, parse_config
from queuegate.daemon import Daemon
from queuegate.errors import leaf_exceptions
from queuegate.tools.servers import ToolServers
from tests.helpers import in_thread, wait_until


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[tools.servers.t]\nurl = "localhost:8000"', "at `tools.servers.t.url`: expected an http(s) base URL"),
        ('[tools.servers.t]\nurl = "http://h"\nprefix = "openapi"', "at `tools.servers.t.prefix`: expected"),
        ('[tools.servers.t]\nurl = "http://h"\nprefix = "/x/"', "at `tools.servers.t.prefix`: expected"),
        (
            '[tools.servers.t]\nurl = "http://h"\napi_key_env = "QG_NOT_SET_ANYWHERE"',
            "at `tools.servers.t.api_key_env`: environment variable QG_NOT_SET_ANYWHERE is not set",
        ),
        ('[tools.servers.t]\nurl = "http://h"\nrename = { a = "b c" }', "at `tools.servers.t.rename.a`: a tool name"),
        ('[tools]\nmode = "run"', "at `tools.mode`"),
        ("[tools]\nmax_rounds = 0", "at `tools.max_rounds`"),
        ('[models.m]\nupstreams = ["http://h/v1"]\ntools = "yes"', "at `models.m.tools`"),
        ('[tools.servers.t]\nprefix = ""', "at `tools.servers.t`: Object missing required field `url`"),
    ],
)
def test_tool_config_errors_name_the_key(toml, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(toml, source="q.toml")
    assert expected in str(info.value)


@pytest.fixture
def tool_servers(start_sim):
    async def start(count: int) -> list:
        sims = [await start_sim(tool_server=True, test_tools=True) for _ in range(count)]
        return [(sim, url.removesuffix("/v1")) for sim, url in sims]

    return start


async def test_a_tool_name_two_servers_offer_fails_the_start_naming_both(tool_servers, start_sim, start_gateway):
    (_, a), (_, b) = await tool_servers(2)
    _, llm_url = await start_sim(tokens_per_s=0)
    with pytest.raises(BaseExceptionGroup) as info:
        await start_gateway({"m": {"upstreams": [llm_url]}}, tools={"servers": {"one": {"url": a}, "two": {"url": b}}})
    (error,) = leaf_exceptions(info.value)
    message = str(error)
    assert (
        isinstance(error, ConfigError)
        and "offered by tool servers 'one' and 'two'" in message
        and "rename" in message
        and "allow" in message
    )


async def test_allow_and_rename_decide_what_the_model_sees(tool_servers, start_sim, start_gateway):
    (sim_a, a), (sim_b, b) = await tool_servers(2)
    llm, llm_url = await start_sim(tokens_per_s=0)
    gw = await start_gateway(
        {"m": {"upstreams": [llm_url]}},
        tools={
            "servers": {
                "one": {"url": a, "allow": ["calculate", "nonexistent"]},
                "two": {"url": b, "allow": ["calculate"], "rename": {"calculate": "calc2"}},
            }
        },
    )
    one, two = gw.daemon.status().tool_servers
    assert one.tools == ["calculate"] and two.tools == ["calc2"]
    assert any("nonexistent" in why for why in one.left_out)
    messages = [{"role": "user", "content": 'go\nCALL 1 calc2 {"expression": "2*3"}'}]
    answer = await in_thread(lambda: gw.client().chat.completions.create(model="m", messages=messages))
    assert '"result":6' in answer.choices[0].message.content
    assert sim_a.tools.calls == [] and sim_b.tools.calls == [
        ("calculate", {"expression": "2*3"})
    ]  # its own name upstream
    offered = [t["function"]["name"] for t in llm.stats.received[0].body["tools"]]
    assert sorted(offered) == ["calc2", "calculate"]


async def test_a_call_answered_404_reads_the_servers_document_again_at_once(tool_servers, start_sim, start_gateway):
    ((tool_sim, url),) = await tool_servers(1)
    _, llm_url = await start_sim(tokens_per_s=0)
    gw = await start_gateway({"m": {"upstreams": [llm_url]}}, tools={"servers": {"t": {"url": url}}})
    assert "calculate" in gw.daemon.status().tool_servers[0].tools
    # The server drops a tool: its route answers 404, and its document no longer lists it.
    del tool_sim._routes["POST", "/calculate"]
    tool_sim.tools._operations.pop("calculate")
    messages = [{"role": "user", "content": 'go\nCALL 1 calculate {"expression": "1"}'}]
    answer = await in_thread(lambda: gw.client().chat.completions.create(model="m", messages=messages))
    assert "error: the tool answered 404" in answer.choices[0].message.content
    await wait_until(lambda: "calculate" not in gw.daemon.status().tool_servers[0].tools, timeout=3)


async def test_reload_applies_the_tools_bounds_and_names_what_needs_a_restart(
    tool_servers, start_sim, nursery, tmp_path
):
    ((_, url),) = await tool_servers(1)
    _, llm_url = await start_sim(tokens_per_s=0)
    config_file = tmp_path / "queuegate.toml"

    def write(max_rounds: int, server_url: str) -> None:
        config_file.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\nstate_dir = "state"\n[models.m]\nupstreams = ["{llm_url}"]\n'
            f'[tools]\nmax_rounds = {max_rounds}\n[tools.servers.t]\nurl = "{server_url}"\n'
        )

    write(8, url)
    daemon = Daemon(load_config(config_file), config_file)
    started = await nursery.start(daemon.run)
    write(1, url + "/elsewhere")
    assert daemon.reload() == ("reloaded: applied tools.max_rounds; not applied, needs a restart: tools.servers.t.url")
    lines = [f'CALL {r} calculate {{"expression": "{r}"}}' for r in (1, 2, 3)]
    body = {"model": "m", "messages": [{"role": "user", "content": "\n".join(["go", *lines])}]}
    async with httpx.AsyncClient(timeout=10) as client:
        answer = (await client.post(started.base_url + "/v1/chat/completions", json=body)).json()
    assert answer["queuegate"]["bound"] == "max_rounds" and answer["queuegate"]["tool_calls"] == 1
    daemon.request_shutdown()
    await trio.sleep(0)


async def test_a_server_that_keeps_failing_is_retried_at_most_a_minute_apart_for_ever():
    config = ToolsConfig(servers={"t": ToolServerConfig(url="http://127.0.0.1:9")})
    servers = ToolServers(config, {})
    server = servers._servers["t"]
    for _ in range(2000):  # (every failed call and read counts: a dead server sees thousands)
        servers._mark_down(server, "connection refused")
    assert 0 < server.next_read - trio.current_time() <= 60
