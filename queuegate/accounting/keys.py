"""Client API keys: who is calling, in which class, and which models they may use; and node keys, which let a host
register the upstreams it serves (`NodeKeyRing`), never call the API.

With no `[keys]` configured the gateway is open (it listens on loopback by default). With keys, every API request
needs one, as `Authorization: Bearer <key>` or `X-Api-Key: <key>`: none or a wrong one is 401, a model the key may not
use is 403. Secrets are compared in constant time (every configured key is checked, digest against digest) and never
leave this module: requests, logs and statistics carry the key's name only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from queuegate.config import Config
from queuegate.errors import Forbidden, Unauthorized


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    klass: str
    models: frozenset[str] | None  # canonical model names; None = every model
    digest: bytes = field(repr=False)
    usage_admin: bool = False  # may read every key's usage

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


class KeyRing:
    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = keys

    @classmethod
    def from_config(cls, config: Config, canonical: Mapping[str, str], environ: Mapping[str, str] | None = None):
        """`canonical` maps every model name and alias to its model's name (a name it lacks, a model a reload
        removed, allows nothing)."""
        env = os.environ if environ is None else environ
        keys = []
        for name, kc in config.keys.items():
            secret = kc.key if kc.key is not None else env[kc.key_env or ""]
            models = frozenset(canonical[m] for m in kc.models if m in canonical) if kc.models else None
            keys.append(ApiKey(name, kc.klass, models, _digest(secret), kc.usage_admin))
        return cls(keys)

    def take_models(self, other: KeyRing) -> None:
        """Take `other`'s keys' models (a reload moved names between models), keeping this ring's own keys."""
        allowed = {key.name: key.models for key in other._keys}
        self._keys = [dataclasses.replace(key, models=allowed.get(key.name, key.models)) for key in self._keys]

    def with_key(self, name: str, secret: str, klass: str) -> KeyRing:
        """This ring and one more key (a node's key for its gateway), allowed every model."""
        return KeyRing([*self._keys, ApiKey(name, klass, None, _digest(secret))])

    @property
    def open(self) -> bool:
        """No keys configured: every request is let in, anonymous."""
        return not self._keys

    def named(self, name: str) -> ApiKey | None:
        """The key of this name (a batch runs its lines as the key that created it), if it still exists."""
        return next((key for key in self._keys if key.name == name), None)

    def authenticate(self, headers: Mapping[str, str]) -> ApiKey | None:
        """The caller's key (None when the gateway is open). Unauthorized when keys are configured and the request
        has none, or one that matches no key."""
        if self.open:
            return None
        presented = _presented_key(headers)
        if presented is None:
            raise Unauthorized(
                "this gateway needs an API key: send `Authorization: Bearer <key>` or `X-Api-Key: <key>`"
            )
        found = _matching(presented, self._keys)
        if found is None:
            raise Unauthorized("the API key is not valid")
        return found


@dataclass(frozen=True, slots=True)
class NodeKey:
    name: str
    digest: bytes = field(repr=False)


class NodeKeyRing:
    """The node keys (`[node_keys]`): with none, node registration is off."""

    def __init__(self, keys: list[NodeKey]) -> None:
        self._keys = keys

    @classmethod
    def from_config(cls, config: Config, environ: Mapping[str, str] | None = None) -> NodeKeyRing:
        env = os.environ if environ is None else environ
        return cls(
            [
                NodeKey(name, _digest(nk.key if nk.key is not None else env[nk.key_env or ""]))
                for name, nk in config.node_keys.items()
            ]
        )

    def authenticate(self, headers: Mapping[str, str]) -> str:
        """The name of the node key the request carries (as `Authorization: Bearer <key>`). Forbidden when no node
        key is configured; Unauthorized when it carries none, or one that matches none."""
        if not self._keys:
            raise Forbidden("node registration is off: this gateway has no [node_keys]")
        presented = _presented_key(headers)
        if presented is None:
            raise Unauthorized("node registration needs a node key: send `Authorization: Bearer <node key>`")
        found = _matching(presented, self._keys)
        if found is None:
            raise Unauthorized("the node key is not valid")
        return found.name


def _matching(presented: str, keys: Sequence[ApiKey] | Sequence[NodeKey]) -> Any:
    """The key whose secret was presented, or None. Every key is compared, digest against digest, with no early
    exit: the time taken does not depend on which key matched."""
    digest = _digest(presented)
    found = None
    for key in keys:
        if hmac.compare_digest(key.digest, digest):
            found = key
    return found


def _presented_key(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    api_key = headers.get("x-api-key", "").strip()
    return api_key or None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()
