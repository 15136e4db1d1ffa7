"""The panels of `queuegate top`; each renders one part of a `DaemonStatus`."""

from queuegate.tui.widgets.devices import DevicesPanel
from queuegate.tui.widgets.tables import ModelsTable, QueuesTable, UpstreamsTable

__all__ = ["DevicesPanel", "ModelsTable", "QueuesTable", "UpstreamsTable"]
