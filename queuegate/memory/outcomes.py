"""What memory's operations came to: each outcome counted (for /metrics), and each operation's outage logged once,
when it starts and when it ends (a store that is down for an hour is two log lines, not one per chat turn)."""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("queuegate.memory")
# What an outage of an operation means for chats (the store's, unless named here).
_OUTAGE = {
    "embed_question": "memory embeddings failing; recalls rank by words alone meanwhile",
    "embed_turns": "memory embeddings failing; remembered turns wait for their vectors (found by their words)",
}
_STORE_OUTAGE = "memory store failing; chats go on without memory"


class Outcomes:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()  # outcome -> how many
        self._failing: set[str] = set()  # operations in an outage

    def count(self, outcome: str, count: int = 1) -> None:
        self.counts[outcome] += count

    def ok(self, operation: str, outcome: str, count: int = 1) -> None:
        self.counts[outcome] += count
        if operation in self._failing:
            self._failing.discard(operation)
            log.info("memory answering again", extra={"fields": {"operation": operation}})

    def failed(self, operation: str, outcome: str, exc: BaseException, count: int = 1) -> None:
        self.counts[outcome] += count
        if operation not in self._failing:
            self._failing.add(operation)
            fields = {"operation": operation, "error": str(exc) or type(exc).__name__}
            log.warning(_OUTAGE.get(operation, _STORE_OUTAGE), extra={"fields": fields})
