"""A swap or load shown as text: phase, a bar from elapsed and the learned ETA, and the times."""

from __future__ import annotations

from queuegate.statistics import SwapProgress

_WIDTH = 12


def progress_text(progress: SwapProgress) -> str:
    if progress.eta_s is None:
        return f"{progress.phase} {progress.elapsed_s:.1f} s"
    done = progress.elapsed_s / (progress.elapsed_s + progress.eta_s) if progress.elapsed_s + progress.eta_s else 1.0
    filled = round(done * _WIDTH)
    bar = "█" * filled + "░" * (_WIDTH - filled)
    return f"{bar} {progress.phase} {progress.elapsed_s:.1f} s, ~{progress.eta_s:.0f} s left"
