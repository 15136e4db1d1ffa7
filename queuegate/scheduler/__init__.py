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
    RateLimited,
    SchedulerCore,
    SchedulerStatistics,
    Ticket,
    UpstreamState,
    UpstreamStatistics,
)
from queuegate.scheduler._limits import RateLimit

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
    "RateLimit",
    "RateLimited",
    "SchedulerCore",
    "SchedulerStatistics",
    "Ticket",
    "UpstreamState",
    "UpstreamStatistics",
]
