"""Server-sent-event cutting and usage reading in the stream relay (proxy/_relay.py): pure functions on bytes."""

from __future__ import annotations

import pytest

from queuegate.proxy._relay import looks_like_sse, split_complete_events, usage_from_events, without_usage_chunk

TOKEN = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
USAGE_ONLY = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}\n\n'
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("buffer", "complete", "rest"),
    [
        (b"", b"", b""),
        (b'data: {"cho', b"", b'data: {"cho'),  # nothing ends yet: hold it all
        (TOKEN, TOKEN, b""),
        (TOKEN + b"data: {", TOKEN, b"data: {"),
        (TOKEN + TOKEN + b"\n", TOKEN + TOKEN + b"\n", b""),  # a stray blank line goes out with them
        (b"data: a\r\n\r\ndata: b", b"data: a\r\n\r\n", b"data: b"),  # CRLF servers
        (b"data: a\r\n\r\ndata: b\n\ndata: c", b"data: a\r\n\r\ndata: b\n\n", b"data: c"),  # mixed: the last end
    ],
)
def test_split_complete_events_cuts_at_the_last_event_end(buffer, complete, rest):
    assert split_complete_events(buffer) == (complete, rest)


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (TOKEN, True),
        (b": keep-alive\n\n", True),
        (b"event: message\ndata: x\n\n", True),
        (b"\xef\xbb\xbf\r\n data: x\n\n", True),  # a byte-order mark and blank lines first
        (b'{"error": "not a stream"}', False),
        (b"<html>502 Bad Gateway</html>", False),
        (b"", False),
    ],
)
def test_looks_like_sse(block, expected):
    assert looks_like_sse(block) is expected


def test_usage_is_read_from_the_last_event_that_carries_one():
    earlier = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
    usage = usage_from_events(earlier + TOKEN + USAGE_ONLY + DONE)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 5, 8)
    assert usage_from_events(TOKEN + DONE) is None
    # Garbage that mentions "usage" and a null usage are skipped, not fatal.
    assert usage_from_events(earlier + b'data: {"usage": oops\n\n' + b'data: {"usage": null}\n\n').total_tokens == 2
    crlf = usage_from_events(USAGE_ONLY.replace(b"\n", b"\r\n"))
    assert crlf is not None and crlf.total_tokens == 8


def test_only_the_usage_only_event_is_dropped():
    assert without_usage_chunk(TOKEN + USAGE_ONLY + DONE) == TOKEN + DONE
    # A token event that also carries usage (some servers put it on the last token) stays: it has content.
    token_with_usage = b'data: {"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":1}}\n\n'
    assert without_usage_chunk(token_with_usage + DONE) == token_with_usage + DONE
    assert without_usage_chunk(b'data: {"usage": oops\n\n') == b'data: {"usage": oops\n\n'  # garbage passes as is
    assert without_usage_chunk(TOKEN + b"data: partial") == TOKEN + b"data: partial"
    assert without_usage_chunk(USAGE_ONLY.replace(b"\n", b"\r\n") + DONE) == DONE
