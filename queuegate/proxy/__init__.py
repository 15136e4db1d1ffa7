"""One request's way from the route to an upstream and back. The modules, in the order the data flows:

- `_request.py`: the body parsed once (what QueueGate reads is checked; everything else passes through).
- `_routing.py`: who the request is for the scheduler: its class, its flow, its sticky chat.
- `_pipeline.py`: `Proxy.handle` resolves the model and queues the request; `Proxy.forward` is the retry loop.
- `_notices.py`: a streamed request that waits gets its event stream at once, with queue notices.
- `_attempt.py`: one attempt at one upstream, and the outcome table the retry loop decides by.
- `_forwarder.py`: the transport (httpcore), its pool and timeouts; transport errors become domain errors here.
- `_relay.py`: a stream relayed as it arrives, ended cleanly however it ends; `_convert.py`: answers in the other shape.
- `_record.py`: what the request did, logged once; `_active.py`: the requests in progress, for the operator.

The life of a request, and the hop that is not a call: the route (`api/app.py`) hands the body to `Proxy.handle`,
which enqueues a ticket with the scheduler (`scheduler.Admission`) and waits on it. Nothing the request calls loads a
model: the admission's listeners wake the fleet (`fleet.manager.Fleet.notify`), which plans, launches the model if
it must, and marks its upstream ready; the scheduler then grants the waiting ticket a slot. The attempt sends the
request on that slot; the reply goes back to the route as a whole body or a stream, and the slot is given back when
the answer is complete (or the client gone).
"""

from queuegate.proxy._active import ActiveRequest, ActiveRequests, RequestCancelled, RequestStatistics
from queuegate.proxy._forwarder import Forwarder, Timeouts, UpstreamConnections
from queuegate.proxy._notices import NoticePolicy, QueuedStream
from queuegate.proxy._pipeline import Proxy
from queuegate.proxy._record import CLIENT_CLOSED, RequestRecord, Usage, usage_row
from queuegate.proxy._relay import RelayStream
from queuegate.proxy._reply import Reply
from queuegate.proxy._request import echo
from queuegate.proxy._routing import chat_key, end_user, request_class, request_flow

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
    "end_user",
    "request_class",
    "request_flow",
    "usage_row",
]
