"""Usage accounting: every finished request's tokens, per key, session, model and day, in SQLite."""

from queuegate.accounting._report import UsageQuery, sessions_status, usage_report
from queuegate.accounting._store import (
    UsageRow,
    UsageStore,
    UsageStoreError,
    UsageStoreStatistics,
)

__all__ = [
    "UsageQuery",
    "UsageRow",
    "UsageStore",
    "UsageStoreError",
    "UsageStoreStatistics",
    "sessions_status",
    "usage_report",
]
