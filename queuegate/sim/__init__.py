"""A simulated OpenAI-compatible LLM server: the demo fleet, the test upstream, the benchmark's fast upstream."""

from queuegate.sim._config import FAULTS, ReceivedRequest, SimConfig, SimStats
from queuegate.sim._server import Simulator

__all__ = ["FAULTS", "ReceivedRequest", "SimConfig", "SimStats", "Simulator"]
