"""Messages the TUI's worker posts to the app (dataclasses, as Textual's own)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from queuegate.admin.protocol import DaemonStatus


@dataclass
class StatusUpdated(Message):
    status: DaemonStatus


@dataclass
class Disconnected(Message):
    reason: str
