"""A node's measured GPU memory: the parsers on the tools' real output shapes, and the meter running a tool found
on PATH (a stand-in script: this machine has no GPU, so no real nvidia-smi or rocm-smi)."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from queuegate.nodes.gpus import GpuMeter, parse_nvidia, parse_rocm
from queuegate.statistics import GpuMemory

NVIDIA_OUTPUT = "0, NVIDIA GeForce RTX 3090, 24576, 1024\n1, NVIDIA RTX A6000, 49140, 0\n"
ROCM_OUTPUT = {
    "card0": {
        "VRAM Total Memory (B)": "25753026560",
        "VRAM Total Used Memory (B)": "13107200",
        "Card Series": "Navi 31",
    },
    "card1": {"VRAM Total Memory (B)": "17163091968", "VRAM Total Used Memory (B)": "8589934592"},
    "system": {"Driver version": "6.8.5"},
}


def test_nvidia_smi_csv_is_read_in_gigabytes():
    assert parse_nvidia(NVIDIA_OUTPUT) == [
        GpuMemory(0, "NVIDIA GeForce RTX 3090", 25.77, 1.07),
        GpuMemory(1, "NVIDIA RTX A6000", 51.53, 0.0),
    ]
    with pytest.raises(ValueError):
        parse_nvidia("No devices were found")


def test_rocm_smi_json_is_read_in_gigabytes_and_its_system_entry_skipped():
    assert parse_rocm(json.dumps(ROCM_OUTPUT)) == [
        GpuMemory(0, "Navi 31", 25.75, 0.01),
        GpuMemory(1, "card1", 17.16, 8.59),
    ]


def fake_tool(folder, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


async def test_the_meter_runs_the_tool_it_finds_and_a_failing_one_is_logged_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert await GpuMeter().measure() == []  # neither tool: nothing reported, nothing logged
    fake_tool(tmp_path, "rocm-smi", f"echo '{json.dumps(ROCM_OUTPUT)}'\n")
    assert [g.index for g in await GpuMeter().measure()] == [0, 1]
    fake_tool(tmp_path, "nvidia-smi", f"printf '{NVIDIA_OUTPUT}'\n")  # both: nvidia-smi's
    meter = GpuMeter()
    assert (await meter.measure())[0].name == "NVIDIA GeForce RTX 3090"
    fake_tool(tmp_path, "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9\n")
    with caplog.at_level(logging.WARNING, logger="queuegate.nodes"):
        assert await meter.measure() == [] and await meter.measure() == []
    assert [r.getMessage() for r in caplog.records].count("cannot measure GPU memory; not reporting it") == 1
    assert "exit status 9: NVIDIA-SMI has failed" in caplog.records[0].__dict__["fields"]["error"]
    os.remove(tmp_path / "nvidia-smi")
    assert len(await meter.measure()) == 2  # (rocm-smi now)
