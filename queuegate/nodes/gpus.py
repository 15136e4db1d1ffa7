"""A node's GPUs' memory as measured on its host: `nvidia-smi` when installed, else `rocm-smi`, else none.

The node reports these beside its declared devices, so an operator sees what the cards really hold (a declared
`memory_gb` that is wrong, another program on the GPU). They are shown, not planned on: the planner keeps to the
declared memory, which it can keep its promises by.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Callable
from subprocess import CompletedProcess, TimeoutExpired

import trio

from queuegate.statistics import GpuMemory

log = logging.getLogger("queuegate.nodes")

NVIDIA_SMI = ("nvidia-smi", "--query-gpu=index,name,memory.total,memory.used", "--format=csv,noheader,nounits")
ROCM_SMI = ("rocm-smi", "--showmeminfo", "vram", "--showproductname", "--json")
MEASURE_TIMEOUT_S = 5.0
_MIB_GB = 2**20 / 1e9
_B_GB = 1 / 1e9


def parse_nvidia(text: str) -> list[GpuMemory]:
    """`nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader,nounits` (MiB).
    ValueError: not that."""
    gpus = []
    for line in filter(None, (line.strip() for line in text.splitlines())):
        index, *name, total, used = (field.strip() for field in line.split(","))
        gpus.append(
            GpuMemory(int(index), ",".join(name), round(float(total) * _MIB_GB, 2), round(float(used) * _MIB_GB, 2))
        )
    return gpus


def parse_rocm(text: str) -> list[GpuMemory]:
    """`rocm-smi --showmeminfo vram --showproductname --json` (bytes, one entry per card). ValueError: not that."""
    cards = json.loads(text)
    if not isinstance(cards, dict):
        raise ValueError("expected an object of cards")
    gpus = []
    for card, fields in cards.items():
        if not card.startswith("card"):
            continue  # (rocm-smi adds "system" entries)
        name = fields.get("Card Series") or fields.get("Card series") or fields.get("Card model") or card
        total, used = float(fields["VRAM Total Memory (B)"]), float(fields["VRAM Total Used Memory (B)"])
        gpus.append(GpuMemory(int(card[4:]), str(name), round(total * _B_GB, 2), round(used * _B_GB, 2)))
    return gpus


def _run(command: tuple[str, ...]) -> CompletedProcess[bytes]:
    return subprocess.run(command, capture_output=True, timeout=MEASURE_TIMEOUT_S, check=False)


class GpuMeter:
    """Measures on each call (a few times a minute: the tools take tens of milliseconds). A tool that fails (or
    takes longer than MEASURE_TIMEOUT_S) is logged once, then its GPUs are not reported until it works again."""

    def __init__(self) -> None:
        self._tools: list[tuple[tuple[str, ...], Callable[[str], list[GpuMemory]]]] = [
            (NVIDIA_SMI, parse_nvidia),
            (ROCM_SMI, parse_rocm),
        ]
        self._failing = False

    async def measure(self) -> list[GpuMemory]:
        for command, parse in self._tools:
            if shutil.which(command[0]) is None:
                continue
            try:
                # In a thread given up on a timeout: a GPU tool stuck in the kernel (after a GPU fault) cannot be
                # killed, and must not hold up whoever waits for the measure.
                with trio.fail_after(MEASURE_TIMEOUT_S + 1):
                    done = await trio.to_thread.run_sync(_run, command, abandon_on_cancel=True)
                if done.returncode != 0:
                    raise ValueError(f"exit status {done.returncode}: {done.stderr.decode(errors='replace')[:200]}")
                gpus = parse(done.stdout.decode(errors="replace"))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, trio.TooSlowError, TimeoutExpired) as exc:
                if not self._failing:
                    fields = {"tool": command[0], "error": str(exc) or type(exc).__name__}
                    log.warning("cannot measure GPU memory; not reporting it", extra={"fields": fields})
                self._failing = True
                return []
            self._failing = False
            return gpus
        return []
