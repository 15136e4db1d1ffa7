"""Who a request is, for the scheduler (proxy/_routing.py): pure functions, checked case by case."""

from __future__ import annotations

import pytest

from queuegate.errors import BadRequest
from queuegate.proxy._routing import chat_key, end_user, request_class, request_flow
from queuegate.vocabulary import CLASSES


@pytest.mark.parametrize(
    ("route", "priority", "key_class", "expected"),
    [
        ("user", None, None, "user"),
        ("user", "  ", None, "user"),  # a blank header is no header
        ("user", "batch", None, "batch"),  # a header lowers
        ("user", " Agent ", None, "agent"),  # case and spaces do not matter
        ("agent", "user", None, "agent"),  # a header never raises
        ("user", None, "batch", "batch"),  # the key's class is a ceiling
        ("batch", None, "user", "batch"),  # a key never raises the route either
        ("user", "agent", "batch", "batch"),  # the lowest of route, key and header wins
        ("user", "batch", "agent", "batch"),
    ],
)
def test_request_class_is_the_lowest_of_route_key_and_header(route, priority, key_class, expected):
    assert request_class(route, priority, CLASSES, key_class) == expected


def test_an_unknown_priority_is_refused_naming_the_allowed_classes():
    with pytest.raises(BadRequest, match="X-Priority must be one of user, agent, batch; got 'urgent'") as refused:
        request_class("user", "urgent", CLASSES)
    assert refused.value.param == "X-Priority"


@pytest.mark.parametrize(
    ("key_name", "user", "session", "expected"),
    [
        ("alice", None, "s1", "key:alice"),  # a key is who pays, whatever the session
        ("alice", "u7", "s1", "key:alice/user:u7"),  # the users of a shared client's key take turns
        (None, "u7", "s1", "user:u7"),
        (None, None, "s1", "session:s1"),
        ("", None, "s1", "session:s1"),
        (None, None, None, "client:10.0.0.7"),
        (None, None, "", "client:10.0.0.7"),
    ],
)
def test_request_flow_is_key_then_user_then_session_then_client(key_name, user, session, expected):
    assert request_flow(key_name=key_name, user=user, session=session, client="10.0.0.7") == expected


def test_the_end_user_is_the_configured_header_else_open_webuis_if_a_sane_id():
    headers = {"x-openwebui-user-id": "7b2e01cc-fb38-4bde-9fc7-6c0ea69e2a74", "x-user-id": "bob@example.org"}
    assert end_user(headers, "X-User-Id") == "bob@example.org"
    assert end_user(headers, "") == "7b2e01cc-fb38-4bde-9fc7-6c0ea69e2a74"
    assert end_user({"x-openwebui-user-id": "a b\n"}, "") is None and end_user({}, "X-User-Id") is None


def chat(*messages: tuple[str, str], model: str = "m", **fields) -> dict:
    return {"model": model, "messages": [{"role": r, "content": c} for r, c in messages], **fields}


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ({"x-chat-id": "c1", "x-openwebui-chat-id": "w1"}, chat(("user", "hi"), chat_id="b1"), "id:c1"),
        ({"x-openwebui-chat-id": "w1"}, chat(("user", "hi"), chat_id="b1"), "id:w1"),
        ({}, chat(("user", "hi"), chat_id="b1"), "id:b1"),
        ({}, chat(("user", "hi"), conversation_id=42), "id:42"),
        ({}, chat(("user", "hi"), chat_id="", metadata={"chat_id": "m1"}), "id:m1"),
        ({"x-chat-id": ""}, chat(("user", "hi"), chat_id=["not", "an", "id"], metadata={"chat_id": 7}), "id:7"),
    ],
)
def test_chat_key_prefers_header_then_open_webui_then_body_fields(headers, body, expected):
    assert chat_key(headers, "X-Chat-Id", body) == expected


def test_a_chat_without_an_id_keeps_its_key_as_it_grows_and_differs_from_other_chats():
    start = chat(("system", "be brief"), ("user", "hi"))
    grown = chat(("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "more"))
    key = chat_key({}, "X-Chat-Id", start)
    assert key.startswith("hash:") and chat_key({}, "X-Chat-Id", grown) == key
    others = [
        chat(("system", "be brief"), ("user", "bye")),  # another first question
        chat(("system", "be long"), ("user", "hi")),  # another system prompt
        chat(("system", "be brief"), ("user", "hi"), model="other"),  # another model
        {"model": "m", "prompt": "hi"},  # a completion, keyed by its prompt
    ]
    assert len({chat_key({}, "X-Chat-Id", body) for body in others} | {key}) == len(others) + 1
    assert chat_key({}, "X-Chat-Id", {"model": "m", "messages": "garbage"}).startswith("hash:")  # never raises
