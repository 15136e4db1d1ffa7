"""Requests-per-minute limits that make requests wait instead of failing. Pure: time is an argument.

Each limited key has a sliding 60 s window of the times its requests were granted a slot. A request whose key has
used its limit in the window waits (in the queue, cancellable, letting other flows go) until the oldest grant leaves
the window. Only when it would have to wait longer than the queue's max wait is it refused up front (429).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

WINDOW_S = 60.0


class RateWindows:
    def __init__(self, rpm: Mapping[str, int]) -> None:
        self._rpm = dict(rpm)
        self._grants: dict[str, collections.deque[float]] = {key: collections.deque() for key in rpm}

    def limited(self, key: str | None) -> bool:
        return key is not None and key in self._rpm

    def allowed_at(self, key: str, now: float) -> float:
        """When `key` may next be granted a slot (`now` or earlier: at once)."""
        grants = self._trimmed(key, now)
        if len(grants) < self._rpm[key]:
            return now
        return grants[len(grants) - self._rpm[key]] + WINDOW_S

    def slot_at(self, key: str, ahead: int, now: float) -> float:
        """About when a request with `ahead` requests of the same key before it could be granted."""
        grants = self._trimmed(key, now)
        limit = self._rpm[key]
        free_now = limit - len(grants)
        if ahead < free_now:
            return now
        j = ahead - free_now  # how many grants must leave the window first
        if j < len(grants):
            return grants[j] + WINDOW_S
        return now + WINDOW_S * (j // limit + 1)  # beyond the grants we know of: whole windows more

    def record(self, key: str, now: float) -> None:
        self._trimmed(key, now).append(now)

    def _trimmed(self, key: str, now: float) -> collections.deque[float]:
        grants = self._grants[key]
        while grants and grants[0] <= now - WINDOW_S:
            grants.popleft()
        return grants
