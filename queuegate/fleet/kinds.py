"""Capability profiles of the upstream kinds: where their health endpoint is and which OpenAI endpoints they serve.

A request for an endpoint the backend cannot serve is answered 501 by QueueGate without calling the upstream. Every
kind serves OpenAI's chat, completions and embeddings (TGI: no embeddings); recent llama-server and vLLM also serve
the Responses API (/v1/responses) and Anthropic's Messages API (/v1/messages), OpenAI-compatible clouds the
Responses API. A model's `endpoints` overrides its kind's.

The health path is where each kind says it is ready (see `health.probe_health` for what its answers mean). Some pass
before requests do (a generic server's /v1/models while it loads): the proxy then waits out the requests' own 503s,
bounded, so the first requests of a fresh server never fail.
"""

from __future__ import annotations

from dataclasses import dataclass

from queuegate.vocabulary import ENDPOINTS

ALL_ENDPOINTS = frozenset(ENDPOINTS)
OPENAI_ENDPOINTS = frozenset({"chat", "completions", "embeddings"})  # what every OpenAI-compatible server serves


@dataclass(frozen=True, slots=True)
class KindProfile:
    name: str
    health_path: str  # relative to the server root (the base URL without its trailing /v1); "" = no health check
    endpoints: frozenset[str]
    stream_usage: bool = False  # honours stream_options.include_usage (QueueGate asks for usage on every stream)


PROFILES: dict[str, KindProfile] = {
    p.name: p
    for p in (
        KindProfile("llamacpp", "/health", ALL_ENDPOINTS, stream_usage=True),
        KindProfile("vllm", "/health", ALL_ENDPOINTS, stream_usage=True),
        KindProfile("sglang", "/health", OPENAI_ENDPOINTS, stream_usage=True),
        KindProfile("ollama", "/api/version", OPENAI_ENDPOINTS),
        # Text Generation Inference serves chat and completions through its Messages API; no embeddings.
        KindProfile("tgi", "/health", frozenset({"chat", "completions"})),
        KindProfile("localai", "/readyz", OPENAI_ENDPOINTS),
        KindProfile("lmstudio", "/v1/models", OPENAI_ENDPOINTS),
        # OpenAI-compatible clouds: the Responses API too, not Anthropic's Messages API.
        KindProfile("openai", "/v1/models", OPENAI_ENDPOINTS | {"responses"}, stream_usage=True),
    )
}
