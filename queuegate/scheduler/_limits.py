"""Requests- and tokens-per-minute limits that make requests wait instead of failing. Pure: time is an argument.

A limit belongs to an API key (`[keys.x] rpm/tpm`) or to an upstream (`[models.x] rpm/tpm`, for cloud APIs with
their own limits). Each is a sliding 60 s window of charges: one per granted request for rpm, its tokens for tpm.
A request whose limit has no room waits in the queue (cancellable; other flows go first) until enough of the window's
charges have left it. Only when it would wait longer than the queue's max wait is it refused up front (429).

Tokens are charged when a request is granted, by estimate (prompt characters / 4 plus its `max_tokens`), and the
charge is corrected to the request's real usage when it ends. A request larger than the whole limit goes when the
window is empty, so nothing waits forever.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from queuegate.statistics import LimitStatistics

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class RateLimit:
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (prompt + completion) per minute

    def __bool__(self) -> bool:
        return self.rpm is not None or self.tpm is not None


@dataclass(slots=True, eq=False)
class Charge:
    """What one granted request costs a window; a token charge is corrected when its usage is known."""

    at: float
    amount: int
    window: _Window | None  # None once it has left the window

    def correct(self, amount: int) -> None:
        if self.window is not None:
            self.window.used += amount - self.amount
        self.amount = amount


class _Window:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0  # sum of the charges in the window
        self._charges: collections.deque[Charge] = collections.deque()

    def wait_until(self, cost: int, ahead: int, now: float) -> float:
        """When a request costing `cost` may be charged, behind `ahead` queued requests of this limit that are
        assumed to cost the same (0: it is next). Each goes as soon as enough of the oldest charges (the window's,
        then those of the requests ahead of it) have left; only as many charges are looked at as must leave."""
        self._trim(now)
        need = min(cost, self.limit)
        used, at = self.used, now
        older = iter(self._charges)
        ahead_charges: collections.deque[tuple[float, int]] = collections.deque()
        for _ in range(ahead + 1):
            while used + need > self.limit:  # (with nothing left to leave, used is 0: the loop ends)
                charge = next(older, None)
                left_at, amount = (charge.at, charge.amount) if charge is not None else ahead_charges.popleft()
                used -= amount
                at = max(at, left_at + WINDOW_S)
            ahead_charges.append((at, need))
            used += need
        return at

    def used_at(self, now: float) -> int:
        self._trim(now)
        return self.used

    def reset_s(self, now: float) -> float:
        """Until the window is empty again (its newest charge has left)."""
        self._trim(now)
        return max(0.0, self._charges[-1].at + WINDOW_S - now) if self._charges else 0.0

    def typical(self) -> int:
        """The average charge in the window (0 when empty)."""
        return self.used // len(self._charges) if self._charges else 0

    def charge(self, cost: int, now: float) -> Charge:
        self._trim(now)
        charge = Charge(now, cost, self)
        self._charges.append(charge)
        self.used += cost
        return charge

    def _trim(self, now: float) -> None:
        while self._charges and self._charges[0].at + WINDOW_S <= now:
            left = self._charges.popleft()
            self.used -= left.amount
            left.window = None


def duration(seconds: float) -> str:
    """A duration as OpenAI writes it in its reset headers: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s" if minutes else f"{rest:.3g}s"


class RateLimiter:
    """One key's or one upstream's windows (rpm, tpm or both)."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._requests = _Window(limit.rpm) if limit.rpm is not None else None
        self._tokens = _Window(limit.tpm) if limit.tpm is not None else None

    def wait_until(self, tokens: int, now: float, ahead: int = 0, *, request: bool = True) -> float:
        """When a request of about `tokens` tokens may go (`now`: at once); see `_Window.wait_until`. `request`:
        False for a request's later round (the tool loop), which counts its tokens but is not a new request."""
        at = now
        if self._requests is not None and request:
            at = max(at, self._requests.wait_until(1, ahead, now))
        if self._tokens is not None:
            at = max(at, self._tokens.wait_until(tokens, ahead, now))
        return at

    def statistics(self, name: str, now: float) -> LimitStatistics:
        requests, tokens = self._requests, self._tokens
        return LimitStatistics(
            name,
            self.limit.rpm,
            requests.used_at(now) if requests is not None else 0,
            self.limit.tpm,
            tokens.used_at(now) if tokens is not None else 0,
            round(self.wait_until(tokens.typical() if tokens is not None else 0, now) - now, 1),
        )

    def headers(self, now: float) -> dict[str, str]:
        """OpenAI's rate-limit headers for this limit now (x-ratelimit-limit-requests, -remaining-, -reset-, and the
        token ones), so a client can see why it waits."""
        found = {}
        for unit, window in (("requests", self._requests), ("tokens", self._tokens)):
            if window is not None:
                found[f"x-ratelimit-limit-{unit}"] = str(window.limit)
                found[f"x-ratelimit-remaining-{unit}"] = str(max(0, window.limit - window.used_at(now)))
                found[f"x-ratelimit-reset-{unit}"] = duration(window.reset_s(now))
        return found

    def charge(self, tokens: int, now: float, *, request: bool = True) -> Charge | None:
        """Count a granted request (`request`: as in `wait_until`); returns its token charge (to correct later),
        if tokens are limited."""
        if self._requests is not None and request:
            self._requests.charge(1, now)
        return self._tokens.charge(tokens, now) if self._tokens is not None else None
