"""Smoke test of the real OpenAPI tool server the tool tests use: mcpo in front of mcp-server-time."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import httpx

from tests.helpers import running
from tests.toolservers import mcpo_time_server, tool_server_pids

TOOLS_KEY = "sk-tools-0123456789"


def command_names(pids: list[int]) -> list[str]:
    """The program each process runs: the script's name for a Python console script (mcpo, mcp-server-time)."""
    names = []
    for pid in pids:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        script = argv[1] if Path(argv[0].decode()).name.startswith("python") else argv[0]
        names.append(Path(script.decode()).name)
    return sorted(names)


async def test_mcpo_serves_the_time_tools_over_openapi():
    async with mcpo_time_server() as url:
        pids = tool_server_pids(url)
        assert command_names(pids) == ["mcp-server-time", "mcpo"]
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            spec = (await http.get("/openapi.json")).json()
            assert spec["openapi"].startswith("3.")
            assert {"/get_current_time", "/convert_time"} <= set(spec["paths"])
            assert "post" in spec["paths"]["/get_current_time"]

            answer = await http.post("/get_current_time", json={"timezone": "Europe/Berlin"})
            # 200 {"timezone": "Europe/Berlin", "datetime": "2026-11-30T09:08:13+01:00", "day_of_week": "Monday",
            #      "is_dst": false}: the tool's structured result, bare (no MCP content wrapper).
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["timezone"] == "Europe/Berlin"
            assert datetime.fromisoformat(body["datetime"]).utcoffset() in (timedelta(hours=1), timedelta(hours=2))

            bad = await http.post("/get_current_time", json={"timezone": "Mars/Olympus"})
            # The tool's error (an MCP isError result) comes back as a 500, wrapped twice: mcpo raises an
            # HTTPException for it inside its own catch-all, which wraps that again:
            # 500 {"detail": {"message": "Unexpected error", "error": "500: {'message': \"Error executing tool
            #      get_current_time: Invalid timezone: 'No time zone found with key Mars/Olympus'\"}"}}
            assert bad.status_code == 500, bad.text
            assert bad.json()["detail"]["message"] == "Unexpected error"
            assert "Mars/Olympus" in bad.json()["detail"]["error"]

            missing = await http.post("/get_current_time", json={})
            # FastAPI's own validation against the tool's input schema: 422 {"detail": [{"type": "missing", ...}]}
            assert missing.status_code == 422, missing.text
            assert missing.json()["detail"][0]["loc"] == ["body", "timezone"]
    assert [pid for pid in pids if running(pid)] == []


async def test_mcpo_refuses_calls_without_its_api_key():
    async with mcpo_time_server(api_key=TOOLS_KEY) as url:
        pids = tool_server_pids(url)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            berlin = {"timezone": "Europe/Berlin"}
            # Without --strict-auth the spec stays public; the tools need "Authorization: Bearer KEY".
            assert (await http.get("/openapi.json")).status_code == 200

            anonymous = await http.post("/get_current_time", json=berlin)
            assert anonymous.status_code in (401, 403), anonymous.text  # 401 "Missing or invalid Authorization..."
            wrong = await http.post("/get_current_time", json=berlin, headers={"Authorization": "Bearer sk-wrong"})
            assert wrong.status_code in (401, 403), wrong.text  # 403 "Invalid API key"

            bearer = {"Authorization": f"Bearer {TOOLS_KEY}"}
            allowed = await http.post("/get_current_time", json=berlin, headers=bearer)
            assert allowed.status_code == 200, allowed.text
            assert allowed.json()["timezone"] == "Europe/Berlin"
    assert [pid for pid in pids if running(pid)] == []
