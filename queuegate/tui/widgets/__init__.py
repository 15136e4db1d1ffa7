"""The panels of `queuegate top`; each renders one part of a `DaemonStatus`."""

from queuegate.tui.widgets.devices import DevicesPanel
from queuegate.tui.widgets.tables import (
    BatchesTable,
    LimitsTable,
    ModelsTable,
    NodesTable,
    QueuesTable,
    RequestsTable,
    UpstreamsTable,
)
from queuegate.tui.widgets.throughput import ThroughputPanel

__all__ = [
    "BatchesTable",
    "DevicesPanel",
    "LimitsTable",
    "ModelsTable",
    "NodesTable",
    "QueuesTable",
    "RequestsTable",
    "ThroughputPanel",
    "UpstreamsTable",
]
