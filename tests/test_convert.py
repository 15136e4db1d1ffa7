"""Answers in the other shape (pure): a whole answer as events, events folded into one answer, odd input included."""

from __future__ import annotations

import msgspec
import pytest

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
