"""Tool calls written as text (Mistral `[TOOL_CALLS]`, Hermes/Qwen `<tool_call>`) read as OpenAI tool calls, whole
and streamed with the deltas cut anywhere; lookalikes and malformed calls stay text, unchanged; nothing raises."""

from __future__ import annotations

import json
import re
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queuegate.tools.textcalls import MARKERS, TextToolCallFilter, TextToolCalls, parse_text_tool_calls

GENERATED_ID = re.compile(r"call_[0-9a-f]{24}")

V3 = (
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "units": "C"}}, '
    '{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}", "id": "abc123XYZ"}]'
)
V11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]abc123XYZ[ARGS]{"tz": "CET"}'
HERMES = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
)
WEATHER_AND_TIME = [("get_weather", {"city": "Paris"}, None), ("get_time", {"tz": "CET"}, "abc123XYZ")]


def summary(calls: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], str | None]]:
    """(name, decoded arguments, the model's id or None when generated), after checking each call's shape."""
    out = []
    for call in calls:
        assert call["type"] == "function"
        assert set(call) == {"id", "type", "function"}
        assert set(call["function"]) == {"name", "arguments"}
        assert isinstance(call["function"]["arguments"], str)
        arguments = json.loads(call["function"]["arguments"])
        assert isinstance(arguments, dict)
        model_id = None if GENERATED_ID.fullmatch(call["id"]) else call["id"]
        out.append((call["function"]["name"], arguments, model_id))
    return out


def stream(deltas: list[str]) -> tuple[str, TextToolCalls | None, TextToolCallFilter]:
    """Feed the deltas: (released text, finish(), the filter)."""
    gate = TextToolCallFilter()
    released = "".join(gate.feed(delta) for delta in deltas)
    return released, gate.finish(), gate


def cuts(content: str) -> list[list[str]]:
    """The content as deltas: whole, cut in two at every point, and one character at a time."""
    return [[content], *([content[:i], content[i:]] for i in range(len(content) + 1)), list(content)]


def test_mistral_v3_whole() -> None:
    found = parse_text_tool_calls(V3)
    assert found is not None
    assert found.text == ""
    assert summary(found.calls) == [
        ("get_weather", {"city": "Paris", "units": "C"}, None),
        ("get_time", {"tz": "CET"}, "abc123XYZ"),
    ]
    assert found.calls[0]["function"]["arguments"] == '{"city":"Paris","units":"C"}'
    assert found.calls[1] == {
        "id": "abc123XYZ",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"tz":"CET"}'},
    }


def test_mistral_v11_repeated_with_call_id() -> None:
    found = parse_text_tool_calls(V11)
    assert found is not None
    assert found.text == ""
    assert summary(found.calls) == WEATHER_AND_TIME
    assert found.calls[1]["id"] == "abc123XYZ"


def test_mistral_v11_single_and_nested_arguments() -> None:
    found = parse_text_tool_calls('[TOOL_CALLS]search[ARGS]{"q": "a]}[b", "filters": [{"x": 1}], "s": "\\"}"}')
    assert found is not None
    assert summary(found.calls) == [("search", {"q": "a]}[b", "filters": [{"x": 1}], "s": '"}'}, None)]


def test_hermes_several() -> None:
    found = parse_text_tool_calls(HERMES)
    assert found is not None
    assert found.text == ""
    assert summary(found.calls) == [("get_weather", {"city": "Paris"}, None), ("get_time", {"tz": "CET"}, None)]


def test_hermes_missing_closing_tag_at_the_end() -> None:
    found = parse_text_tool_calls('<tool_call>{"name": "f", "arguments": {"a": 1}}\n')
    assert found is not None
    assert summary(found.calls) == [("f", {"a": 1}, None)]
    both = parse_text_tool_calls('<tool_call>{"name": "f"}</tool_call> <tool_call>{"name": "g"}')
    assert both is not None
    assert summary(both.calls) == [("f", {}, None), ("g", {}, None)]


def test_text_before_the_marker_is_content() -> None:
    found = parse_text_tool_calls("Let me check the weather.\n\n" + V3)
    assert found is not None
    assert found.text == "Let me check the weather."
    assert len(found.calls) == 2


def test_text_after_the_calls_is_kept_as_text() -> None:
    found = parse_text_tool_calls('Sure. <tool_call>{"name": "f"}</tool_call>\n</s>')
    assert found is not None
    assert found.text == "Sure.\n</s>"
    assert summary(found.calls) == [("f", {}, None)]
    spaces_after = parse_text_tool_calls(V11 + "  \n")
    assert spaces_after is not None
    assert spaces_after.text == ""


def test_arguments_forms() -> None:
    def arguments(call: str) -> str | None:
        found = parse_text_tool_calls(f"[TOOL_CALLS][{call}]")
        return None if found is None else found.calls[0]["function"]["arguments"]

    assert arguments('{"name": "f"}') == "{}"
    assert arguments('{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}') == '{"a":[1,2]}'
    assert arguments('{"name": "f", "parameters": {"a": true}}') == '{"a":true}'
    assert arguments('{"name": "f", "arguments": {"a": 1}, "parameters": {"b": 2}}') == '{"a":1}'
    assert arguments('{"name": "f", "arguments": {}}') == "{}"
    for wrong in ('"[1]"', '"not json"', '""', "[1]", "3", "null", '"null"'):
        assert arguments(f'{{"name": "f", "arguments": {wrong}}}') is None, wrong


def test_model_ids() -> None:
    found = parse_text_tool_calls('[TOOL_CALLS][{"name": "f", "id": "9xYz1"}, {"name": "g", "id": 7}, {"name": "h"}]')
    assert found is not None
    assert found.calls[0]["id"] == "9xYz1"
    assert GENERATED_ID.fullmatch(found.calls[1]["id"])  # not a string: a new one
    assert GENERATED_ID.fullmatch(found.calls[2]["id"])
    assert found.calls[1]["id"] != found.calls[2]["id"]
    hermes = parse_text_tool_calls('<tool_call>{"name": "f", "id": "call_own"}</tool_call>')
    assert hermes is not None
    assert hermes.calls[0]["id"] == "call_own"


MALFORMED = [
    "[TOOL_CALLS]",
    "[TOOL_CALLS][",
    "[TOOL_CALLS][]",
    '[TOOL_CALLS][{"name": "f"}',
    '[TOOL_CALLS][{"name": 1}]',
    '[TOOL_CALLS][{"name": ""}]',
    '[TOOL_CALLS][{"arguments": {}}]',
    '[TOOL_CALLS][{"name": "f"}, 3]',
    '[TOOL_CALLS]{"name": "f"}',
    "[TOOL_CALLS]f[ARGS]not json",
    "[TOOL_CALLS]f[ARGS][1]",
    '[TOOL_CALLS]f{"a": 1}',
    '[TOOL_CALLS]two words[ARGS]{"a": 1}',
    '[TOOL_CALLS]f[CALL_ID][ARGS]{"a": 1}',
    '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{',
    "<tool_call>",
    '<tool_call>{"name": "f"',
    "<tool_call>[1]</tool_call>",
    '<tool_call>{"name": "f"}<tool_call>{"name": "g"}</tool_call>',
    '<tool_call>{"name": "f"} and then some',
    '<tool_call>{"name": "f"}</tool_call><tool_call>{"oops": 1}</tool_call>',
    "<tool_call>I will call a tool now</tool_call>",
    'I think [TOOL_CALLS] are written like [{"name": ...}]',
]


@pytest.mark.parametrize("content", MALFORMED)
def test_malformed_stays_text(content: str) -> None:
    assert parse_text_tool_calls(content) is None
    for deltas in cuts(content):
        released, found, gate = stream(deltas)
        assert found is None
        assert released + gate.held() == content


@pytest.mark.parametrize("content", ["Hello, world.", "[TOOLS are fun]", "<tool>x</tool>", "a < b and c [d] e",
                                     "[TOOL_CALL]", "<tool_calls>", "<tool_call >", "[tool_calls]"])  # fmt: skip
def test_lookalikes_are_released(content: str) -> None:
    assert parse_text_tool_calls(content) is None
    for deltas in cuts(content):
        released, found, gate = stream(deltas)
        assert (released, found, gate.held(), gate.seen_marker) == (content, None, "", False)


def test_release_as_soon_as_clear() -> None:
    gate = TextToolCallFilter()
    assert gate.feed("Hi [TOO") == "Hi "
    assert gate.held() == "[TOO"
    assert gate.feed("LS are fun] <") == "[TOOLS are fun] "
    assert gate.feed("b") == "<b"
    assert gate.feed(" [") == " "
    assert gate.feed("TOOL_CALLS") == ""
    assert not gate.seen_marker
    assert gate.feed("]") == ""
    assert gate.seen_marker
    assert gate.feed('[{"name": "f"}]') == ""
    found = gate.finish()
    assert found is not None
    assert summary(found.calls) == [("f", {}, None)]
    assert found.text == ""


def test_unfinished_prefix_is_held_then_given_back() -> None:
    released, found, gate = stream(["Answer: 42 <tool"])
    assert (released, found, gate.held()) == ("Answer: 42 ", None, "<tool")


@pytest.mark.parametrize(
    ("content", "before", "after"),
    [
        (V3, "", ""),
        (V11, "", ""),
        (HERMES, "", ""),
        ("Checking.\n" + V11, "Checking.\n", ""),
        ('One moment <tool_call>{"name": "f", "arguments": "{}"}', "One moment ", ""),
        ('<tool_call>{"name": "f"}</tool_call>\n</s>', "", "</s>"),
    ],
)
def test_streamed_matches_whole(content: str, before: str, after: str) -> None:
    whole = parse_text_tool_calls(content)
    assert whole is not None
    for deltas in cuts(content):
        released, found, gate = stream(deltas)
        assert released == before
        assert gate.seen_marker
        assert found is not None
        assert found.text == after
        assert summary(found.calls) == summary(whole.calls)


def test_hostile_input_never_raises() -> None:
    deep = "[TOOL_CALLS]" + "[" * 100_000 + "]" * 100_000
    assert parse_text_tool_calls(deep) is None
    assert parse_text_tool_calls('<tool_call>{"name": "f\ud800"}</tool_call>') is None
    assert parse_text_tool_calls('[TOOL_CALLS]f[ARGS]{"a": 1e400}') is None
    _, found, gate = stream([deep[:7], deep[7:]])
    assert found is None
    assert gate.held() == deep


PIECES = st.sampled_from([*MARKERS, "</tool_call>", "[ARGS]", "[CALL_ID]", "[TOO", "<tool", "{", "}", "[", "]", '"',
                          "\\", ":", ",", " ", "\n", '"name"', '"arguments"', '"parameters"', '"id"', '"f"', "1",
                          '"{}"', "null", "</s>", '<tool_call>{"name": "f"}</tool_call>', "[TOOL_CALLS]f[ARGS]{}",
                          '[TOOL_CALLS][{"name": "f", "arguments": {"a": [1]}}]'])  # fmt: skip
TEXTS = st.lists(PIECES | st.text(max_size=6), max_size=25).map("".join)


def split(text: str, points: list[int]) -> list[str]:
    """`text` cut at the given points (taken modulo its length)."""
    at = sorted({p % (len(text) + 1) for p in points} | {0, len(text)})
    return [text[a:b] for a, b in pairwise(at)] or [text]


@settings(max_examples=400, deadline=None)
@given(TEXTS, st.lists(st.integers(min_value=0), max_size=12))
def test_any_text_any_cuts_never_raises_and_loses_nothing(text: str, points: list[int]) -> None:
    whole = parse_text_tool_calls(text)
    released, found, gate = stream(split(text, points))
    if found is None:
        assert released + gate.held() == text
    else:
        assert whole is not None
        assert released + gate.held() == text
        assert summary(found.calls) == summary(whole.calls)
        assert text.startswith(released)
        assert not any(marker in released for marker in MARKERS)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_characters="[<")), st.lists(st.integers(min_value=0), max_size=12))
def test_text_without_brackets_is_released_at_once(text: str, points: list[int]) -> None:
    gate = TextToolCallFilter()
    for delta in split(text, points):
        assert gate.feed(delta) == delta
    assert (gate.finish(), gate.held(), gate.seen_marker) == (None, "", False)
    assert parse_text_tool_calls(text) is None
