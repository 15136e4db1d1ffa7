"""Who a request is, for the scheduler: its priority class, its flow (whose turn) and its chat (sticky upstream)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from queuegate.errors import BadRequest
from queuegate.proxy._request import echo

OPEN_WEBUI_CHAT_HEADER = "x-openwebui-chat-id"
OPEN_WEBUI_USER_HEADER = "x-openwebui-user-id"  # (sent with ENABLE_FORWARD_USER_INFO_HEADERS, or set per connection)
_USER_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_BODY_CHAT_FIELDS = ("chat_id", "conversation_id")


def request_class(route_class: str, priority: str | None, classes: Sequence[str], key_class: str | None = None) -> str:
    """The lower of the route's class and the API key's class, lowered further by an `X-Priority: <class>` header;
    neither a header nor a key can raise it."""
    base = route_class
    if key_class is not None and classes.index(key_class) > classes.index(base):
        base = key_class
    if priority is None or not priority.strip():
        return base
    wanted = priority.strip().lower()
    if wanted not in classes:
        raise BadRequest(f"X-Priority must be one of {', '.join(classes)}; got {echo(priority)!r}", param="X-Priority")
    return wanted if classes.index(wanted) > classes.index(base) else base


def end_user(headers: Mapping[str, str], user_header: str) -> str | None:
    """The end user behind a shared client: the configured header, else Open WebUI's; None if neither is a sane id."""
    for name in (user_header.lower(), OPEN_WEBUI_USER_HEADER):
        value = headers.get(name) if name else None
        if value and _USER_ID.match(value):
            return value
    return None


def request_flow(*, key_name: str | None, user: str | None, session: str | None, client: str) -> str:
    """Whose turn it is inside a class: the API key (and the end user under it: a shared client's users take
    turns), else the end user, else the session, else the client's address."""
    if key_name:
        return f"key:{key_name}/user:{user}" if user else f"key:{key_name}"
    if user:
        return f"user:{user}"
    if session:
        return f"session:{session}"
    return f"client:{client}"


def chat_key(headers: Mapping[str, str], chat_header: str, body: Mapping[str, Any]) -> str:
    """The sticky-chat key: configured header, Open WebUI's header, body fields, else a hash of the chat's start."""
    for name in (chat_header.lower(), OPEN_WEBUI_CHAT_HEADER):
        value = headers.get(name)
        if value:
            return f"id:{value}"
    for name in _BODY_CHAT_FIELDS:
        value = body.get(name)
        if isinstance(value, str | int) and value != "":
            return f"id:{value}"
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("chat_id"), str | int):
        return f"id:{metadata['chat_id']}"
    return "hash:" + _conversation_hash(body)


def _conversation_hash(body: Mapping[str, Any]) -> str:
    """Model + system prompt + first user message: the same chat keeps these as it grows."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(repr(body.get("model")).encode())
    messages = body.get("messages")
    if isinstance(messages, list):
        system = next((m for m in messages if isinstance(m, dict) and m.get("role") == "system"), None)
        first_user = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
        for message in (system, first_user):
            digest.update(b"\x00" + repr(message.get("content") if message else None).encode())
    else:
        digest.update(b"\x00" + repr(body.get("prompt")).encode())
    return digest.hexdigest()
