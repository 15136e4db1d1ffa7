"""Answers in the other shape (pure): a whole answer as events, events folded into one answer, odd input included."""

from __future__ import annotations

import math

import msgspec
import pytest

from queuegate.errors import GatewayError
from queuegate.proxy._convert import AnswerFromEvents, answer_as_events


def events(*docs) -> bytes:
    return b"".join(b"data: " + msgspec.json.encode(d) + b"\n\n" for d in docs) + b"data: [DONE]\n\n"


def test_stream_events_fold_into_one_chat_answer_with_tool_calls_and_usage():
    folded = AnswerFromEvents(chat=True)
    head = {"id": "c1", "created": 1, "model": "m"}
    folded.feed(
        events(
            {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]},
            {**head, "choices": [{"index": 0, "delta": {"content": "lo", "reasoning_content": "hm"}}]},
            {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [{"index": 0, "id": "t1", "function": {"name": "f", "arguments": '{"a"'}}]
                        },
                    }
                ],
            },
            {
                **head,
                "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}],
            },
            {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
            {**head, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
        )
    )
    answer = folded.answer()
    assert folded.done and answer["object"] == "chat.completion" and answer["id"] == "c1"
    message = answer["choices"][0]["message"]
    assert message["content"] == "Hello" and message["reasoning_content"] == "hm"
    assert message["tool_calls"] == [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert answer["choices"][0]["finish_reason"] == "tool_calls" and answer["usage"]["total_tokens"] == 7


def test_odd_events_do_not_break_the_fold():
    folded = AnswerFromEvents(chat=True)
    folded.feed(b": comment\n\nevent: x\n\n")
    folded.feed(
        events({"choices": [{"index": None, "delta": {"content": "a", "tool_calls": ["junk", {"index": "x"}]}}]})
    )
    assert folded.answer()["choices"][0]["message"]["content"] == "a"
    with pytest.raises(msgspec.DecodeError):
        folded.feed(b"data: {not json\n\n")


def test_a_whole_answer_becomes_events_the_client_can_read():
    answer = {
        "id": "c1",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi", "tool_calls": None}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    stream = answer_as_events(answer, chat=True, include_usage=True)
    folded = AnswerFromEvents(chat=True)
    folded.feed(stream)
    assert folded.done and folded.answer()["choices"][0]["message"]["content"] == "Hi"
    assert folded.answer()["usage"] == answer["usage"]
    assert b'"usage"' not in answer_as_events(answer, chat=True, include_usage=False)
    text = answer_as_events({"choices": [{"text": "ok"}]}, chat=False, include_usage=False)
    assert b'"text":"ok"' in text and text.endswith(b"data: [DONE]\n\n")


def test_an_upstream_cannot_make_the_fold_fail_or_grow_without_bound():
    folded = AnswerFromEvents(chat=True)
    calls = [
        {"index": -3, "function": {"name": "a"}},  # no such index: the next call
        {"index": 2_000_000, "function": {"arguments": "x"}},  # a gap: the next call, not two million
        {"index": 1, "function": {"arguments": 5, "name": None}},  # non-strings are not text
        "junk",
    ]
    folded.feed(events({"choices": [{"index": 0, "delta": {"tool_calls": calls}}]}))
    folded.feed(events({"choices": [{"index": 0, "delta": "x"}]}, {"choices": 5}, {"choices": [{"text": 7}]}))
    message = folded.answer()["choices"][0]["message"]
    assert [c["function"] for c in message["tool_calls"]] == [
        {"name": "a", "arguments": ""},
        {"name": "", "arguments": "x"},
    ]
    odd = {"choices": [{"message": {"content": "a", "tool_calls": ["junk", {"id": "t"}]}}, 3]}
    assert b'"tool_calls":[{"index":0,"id":"t"}]' in answer_as_events(odd, chat=True, include_usage=False)


def test_an_infinite_retry_after_is_not_sent_on():
    assert GatewayError("busy", retry_after_s=math.inf).headers() == {}
    assert GatewayError("busy", retry_after_s=0.2).headers() == {"Retry-After": "1"}
