"""Admission and scheduling: who gets which upstream slot, and when."""

from queuegate.scheduler._admission import Admission, QueueTimeout
from queuegate.scheduler._core import (
    ModelStatistics,
    ModelUnavailable,
    NoUpstreamLeft,
    SchedulerCore,
    SchedulerStatistics,
    Ticket,
    UpstreamState,
    UpstreamStatistics,
)

__all__ = [
    "Admission",
    "ModelStatistics",
    "ModelUnavailable",
    "NoUpstreamLeft",
    "QueueTimeout",
    "SchedulerCore",
    "SchedulerStatistics",
    "Ticket",
    "UpstreamState",
    "UpstreamStatistics",
]
