"""Forwarding to upstreams: retries before the first byte, real streaming, usage extraction."""

from queuegate.proxy._active import ActiveRequest, ActiveRequests, RequestCancelled, RequestStatistics
from queuegate.proxy._forwarder import Forwarder, Timeouts, UpstreamConnections
from queuegate.proxy._notices import QueuedStream
from queuegate.proxy._pipeline import NoticePolicy, Proxy, Reply
from queuegate.proxy._record import CLIENT_CLOSED, RequestRecord, Usage, usage_row
from queuegate.proxy._relay import RelayStream
from queuegate.proxy._request import echo
from queuegate.proxy._routing import chat_key, request_class, request_flow

__all__ = [
    "CLIENT_CLOSED",
    "ActiveRequest",
    "ActiveRequests",
    "Forwarder",
    "NoticePolicy",
    "Proxy",
    "QueuedStream",
    "RelayStream",
    "Reply",
    "RequestCancelled",
    "RequestRecord",
    "RequestStatistics",
    "Timeouts",
    "UpstreamConnections",
    "Usage",
    "chat_key",
    "echo",
    "request_class",
    "request_flow",
    "usage_row",
]
