"""The fleet: models, their upstreams, backend kinds and upstream health."""

from queuegate.fleet.catalog import Catalog, ModelSpec, Upstream
from queuegate.fleet.health import HealthMonitor
from queuegate.fleet.kinds import PROFILES, KindProfile

__all__ = ["PROFILES", "Catalog", "HealthMonitor", "KindProfile", "ModelSpec", "Upstream"]
