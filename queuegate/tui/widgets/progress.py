"""A swap or load shown as text: phase, a bar from elapsed and the learned ETA, and the times."""

from __future__ import annotations

from queuegate.statistics import SwapProgress

_WIDTH = 12


def bar(done: float) -> str:
    """A bar of _WIDTH cells, `done` (0 to 1) of them filled."""
    filled = round(done * _WIDTH)
    return "█" * filled + "░" * (_WIDTH - filled)


def progress_text(progress: SwapProgress) -> str:
    if progress.eta_s is None:
        return f"{progress.phase} {progress.elapsed_s:.1f} s"
    done = progress.elapsed_s / (progress.elapsed_s + progress.eta_s) if progress.elapsed_s + progress.eta_s else 1.0
    return f"{bar(done)} {progress.phase} {progress.elapsed_s:.1f} s, ~{progress.eta_s:.0f} s left"
