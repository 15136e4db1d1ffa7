"""One line per device: what is on it, memory in use, and the swap in progress."""

from __future__ import annotations

from textual.widgets import Static

from queuegate.admin.protocol import DaemonStatus
from queuegate.tui.widgets.progress import progress_text


class DevicesPanel(Static):
    def show(self, status: DaemonStatus) -> None:
        lines = []
        for device in status.fleet.devices:
            room = "exclusive" if device.exclusive else f"{device.used_gb:g}/{device.memory_gb:g} GB"
            line = f"[b]{device.name}[/b] ({room}): {', '.join(device.models) or 'empty'}"
            if device.swap is not None:
                line += f"  → {device.swap.target}: {progress_text(device.swap)}"
            lines.append(line)
        self.update("\n".join(lines) or "no devices configured")
