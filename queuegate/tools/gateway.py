"""Tools QueueGate answers itself for one request, offered beside the tool servers' in execute mode.

A tool server's tool is the same for every request; a gateway tool belongs to one request (chat memory's
`memory_query` searches that chat's memory, and no other). The loop runs its calls like a tool server's: concurrently,
bounded by the call timeout, the result handed to the model as a tool message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from queuegate.tools.servers import ToolResult

GATEWAY = "queuegate"  # what the log and the metrics name as the "server" of a gateway tool


@dataclass(frozen=True, slots=True)
class GatewayTool:
    definition: dict[str, Any]  # as offered to the model: {"type": "function", "function": {"name", ...}}
    run: Callable[[str, float], Awaitable[ToolResult]]  # (the call's JSON arguments, its timeout) -> its result

    @property
    def name(self) -> str:
        return str(self.definition["function"]["name"])
