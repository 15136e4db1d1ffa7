"""Requests/s and tokens/s over the last two minutes, as sparklines, from the daemon's running totals."""

from __future__ import annotations

import collections

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Sparkline, Static

from queuegate.admin.protocol import DaemonStatus

_POINT_S = 1.0  # one point per second at most
_POINTS = 120


class ThroughputPanel(Horizontal):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._last: tuple[float, int, int] | None = None  # (time, finished, tokens) of the last point
        self._requests: collections.deque[float] = collections.deque(maxlen=_POINTS)
        self._tokens: collections.deque[float] = collections.deque(maxlen=_POINTS)

    def compose(self) -> ComposeResult:
        yield Static("requests/s", id="rps-label")
        yield Sparkline([], id="rps")
        yield Static("tokens/s", id="tps-label")
        yield Sparkline([], id="tps")

    def show(self, status: DaemonStatus) -> None:
        sample = (status.at, status.finished_total, status.tokens_total)
        if self._last is None or sample[1] < self._last[1]:  # first sample, or a restarted daemon
            self._last = sample
            self._requests.clear()
            self._tokens.clear()
            return
        elapsed = sample[0] - self._last[0]
        if elapsed < _POINT_S:
            return
        self._requests.append((sample[1] - self._last[1]) / elapsed)
        self._tokens.append((sample[2] - self._last[2]) / elapsed)
        self._last = sample
        self.query_one("#rps", Sparkline).data = list(self._requests)
        self.query_one("#tps", Sparkline).data = list(self._tokens)
        self.query_one("#rps-label", Static).update(f"requests/s {self._requests[-1]:6.1f}")
        self.query_one("#tps-label", Static).update(f"tokens/s {self._tokens[-1]:8.1f}")
