"""The wire schema: parsing and serialization, no I/O."""

from __future__ import annotations

import json

import pytest

from gateway.front.signaling.messages import (
    Accepted,
    Call,
    Error,
    HangupEvent,
    Ping,
    ProtocolError,
    encode,
    parse,
)


def test_parse_call():
    message = parse(
        json.dumps({"type": "call", "id": "r1", "call": "c1", "to": "echo", "sdp": "v=0"})
    )
    assert message == Call(call="c1", to="echo", sdp="v=0", id="r1")


def test_parse_ping_without_id():
    assert parse('{"type":"ping"}') == Ping()


@pytest.mark.parametrize(
    ("raw", "words", "request_id"),
    [
        ("{", "not valid JSON", None),
        ("3", "JSON object", None),
        ('{"type": 3}', "'type'", None),
        ('{"type": "x", "id": "r9"}', "unknown message type 'x'", "r9"),
        ('{"type": "ping", "id": 5}', "'id'", None),
        ('{"type": "call", "id": "r2", "call": "c", "to": "1"}', "missing field 'sdp'", "r2"),
        (
            '{"type": "call", "call": "c", "to": [], "sdp": ""}',
            "'to' must be a string, not array",
            None,
        ),
        ('{"type": "hangup"}', "missing field 'call'", None),
        ('{"type": "hangup", "call": "' + "x" * 65 + '"}', "'call'", None),
        ("[" * 100000, "not valid JSON", None),
    ],
    ids=[
        "truncated",
        "scalar",
        "type-not-string",
        "unknown",
        "id-not-string",
        "missing-sdp",
        "to-array",
        "hangup-no-call",
        "long-call-id",
        "deep-nesting",
    ],
)
def test_parse_errors(raw, words, request_id):
    with pytest.raises(ProtocolError) as info:
        parse(raw)
    assert info.value.code == "bad_request"
    assert words in info.value.message
    assert info.value.id == request_id


def test_encode_leaves_out_none():
    assert json.loads(encode(Error("busy", "full"))) == {
        "type": "error",
        "code": "busy",
        "message": "full",
    }
    assert json.loads(encode(HangupEvent("c1", 486, "Busy Here", "remote"))) == {
        "type": "hangup",
        "call": "c1",
        "code": 486,
        "reason": "Busy Here",
        "by": "remote",
    }
    assert json.loads(encode(Accepted("c1", {"webrtc": "opus/48000", "sip": "PCMU/8000"})))[
        "codecs"
    ] == {
        "webrtc": "opus/48000",
        "sip": "PCMU/8000",
    }
