"""Forwarding to upstreams: retries before the first byte, real streaming, usage extraction."""

from queuegate.proxy._forwarder import Forwarder, Timeouts, UpstreamConnections
from queuegate.proxy._pipeline import Proxy, Reply
from queuegate.proxy._record import CLIENT_CLOSED, RequestRecord, Usage
from queuegate.proxy._relay import RelayStream

__all__ = [
    "CLIENT_CLOSED",
    "Forwarder",
    "Proxy",
    "RelayStream",
    "Reply",
    "RequestRecord",
    "Timeouts",
    "UpstreamConnections",
    "Usage",
]
