"""Client API keys: who is calling, in which class, and which models they may use.

With no `[keys]` configured the gateway is open (it listens on loopback by default). With keys, every API request
needs one, as `Authorization: Bearer <key>` or `X-Api-Key: <key>`: none or a wrong one is 401, a model the key may not
use is 403. Secrets are compared in constant time (every configured key is checked, digest against digest) and never
leave this module: requests, logs and statistics carry the key's name only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from queuegate.config import Config
from queuegate.errors import Unauthorized


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
        """`canonical` maps every model name and alias to its model's name."""
        env = os.environ if environ is None else environ
        keys = []
        for name, kc in config.keys.items():
            secret = kc.key if kc.key is not None else env[kc.key_env or ""]
            models = frozenset(canonical[m] for m in kc.models) if kc.models else None
            keys.append(ApiKey(name, kc.klass, models, _digest(secret), kc.usage_admin))
        return cls(keys)

    @property
    def open(self) -> bool:
        """No keys configured: every request is let in, anonymous."""
        return not self._keys

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
        digest = _digest(presented)
        found = None
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(key.digest, digest):
                found = key
        if found is None:
            raise Unauthorized("the API key is not valid")
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
