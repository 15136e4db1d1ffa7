"""The one model view (pure): what /v1/models, /readyz, `queuegate admin status` and `top` all show of a model."""

from __future__ import annotations

from queuegate.statistics import (
    FleetModelStatistics,
    FleetStatistics,
    ModelStatistics,
    SchedulerStatistics,
    UpstreamStatistics,
    model_views,
)


def scheduled(name: str, *upstreams: tuple[str, str, bool]) -> ModelStatistics:
    ups = [UpstreamStatistics(f"{name}#{i}", s, why, 0, 1, drained) for i, (s, why, drained) in enumerate(upstreams)]
    return ModelStatistics(name, 2, 1.5, 1, [], [], ups)


def planned(name: str, state: str, reason: str, managed: bool) -> FleetModelStatistics:
    return FleetModelStatistics(name, state, reason, managed, "gpu" if managed else None, 8.0, 1.0, None, None, None)


def test_launched_models_show_the_fleet_and_others_their_upstreams():
    scheduler = SchedulerStatistics(
        4,
        2,
        256,
        [
            scheduled("ext", ("down", "connect refused", False), ("loading", "Loading model", True)),
            scheduled("ok", ("ready", "ok", False)),
            scheduled("gpu", ("loading", "starting", False)),
            scheduled("broken", ("down", "failed", False)),
        ],
    )
    fleet = FleetStatistics(
        [
            planned("ext", "ready", "external", False),  # the planner knows nothing of an external model's health
            planned("ok", "ready", "external", False),
            planned("gpu", "stopped", "crashed, restart 1 of 2 in 2 s: exited with 9", True),
            planned("broken", "failed", "crashed 3 times in a row", True),
        ],
        [],
        0,
        0,
    )
    views = {v.name: v for v in model_views(scheduler, fleet)}
    assert (views["ext"].state, views["ext"].available, views["ext"].loaded) == ("loading", False, False)
    assert views["ext"].reason == "ext#0: down (connect refused); ext#1: loading (Loading model)"
    assert views["ext"].drained == ["ext#1"]
    assert (views["ok"].state, views["ok"].reason, views["ok"].available) == ("ready", "ok", True)
    assert (views["gpu"].state, views["gpu"].available, views["gpu"].device) == ("stopped", True, "gpu")
    assert views["gpu"].reason.startswith("crashed, restart 1 of 2")
    assert (views["broken"].state, views["broken"].available) == ("failed", False)
    assert (views["ok"].in_service, views["ok"].waiting, views["ok"].oldest_wait_s) == (1, 2, 1.5)
