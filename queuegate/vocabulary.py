"""The names every part of QueueGate shares, one list each: backend kinds, OpenAI endpoints, priority classes.

The config accepts these (and its errors list them), the kinds' profiles cover them, the proxy routes by them, the
scheduler orders by them; none keeps a copy of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

# The upstream servers QueueGate knows how to health-check and talk to (see fleet/kinds.py for each one's profile).
KINDS = ("vllm", "ollama", "llamacpp", "tgi", "sglang", "localai", "lmstudio", "openai")


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    upstream_path: str  # under the upstream's base URL (…/v1)
    required_field: str  # what a request cannot do without


ENDPOINTS = {
    e.name: e
    for e in (
        Endpoint("chat", "/chat/completions", "messages"),
        Endpoint("completions", "/completions", "prompt"),
        Endpoint("embeddings", "/embeddings", "input"),
        Endpoint("responses", "/responses", "input"),  # OpenAI's Responses API, passed through
        Endpoint("messages", "/messages", "messages"),  # Anthropic's Messages API, passed through
    )
}

# Priority classes, highest first: the default of [queue].classes.
CLASSES = ("user", "agent", "batch")
# The classes QueueGate's own routes give: /v1/chat/completions is "user", /v1/agent/chat/completions is "agent".
ROUTE_CLASSES = ("user", "agent")
