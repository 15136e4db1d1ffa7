"""Admission and scheduling: who gets which upstream slot, and when."""

from queuegate.scheduler._admission import Admission, QueueTimeout
from queuegate.scheduler._core import (
    ClassStatistics,
    Demand,
    FlowStatistics,
    ModelStatistics,
    ModelUnavailable,
    NoUpstreamLeft,
    Policy,
    QueuePosition,
    SchedulerCore,
    SchedulerStatistics,
    Ticket,
    UpstreamState,
    UpstreamStatistics,
)

__all__ = [
    "Admission",
    "ClassStatistics",
    "Demand",
    "FlowStatistics",
    "ModelStatistics",
    "ModelUnavailable",
    "NoUpstreamLeft",
    "Policy",
    "QueuePosition",
    "QueueTimeout",
    "SchedulerCore",
    "SchedulerStatistics",
    "Ticket",
    "UpstreamState",
    "UpstreamStatistics",
]
