"""The wire schema: parsing and serialization, no I/O."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.front.signaling.messages import (
    Accepted,
    Call,
    Error,
    HangupEvent,
    Ping,
    ProtocolError,
    Transfer,
    TransferAccept,
    TransferEvent,
    TransferRequest,
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
        ("[" * 100000, "nested more than 32 levels", None),
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


# (id, raw frame, words the message must contain): JSON that json.loads would take.
STRICT_JSON_CASES = [
    ("duplicate-type", '{"type": "ping", "type": "call"}', "duplicate key 'type'"),
    ("duplicate-id", '{"type": "ping", "id": "a", "id": "b"}', "duplicate key 'id'"),
    ("duplicate-nested", '{"type": "ping", "x": [{"k": 1, "k": 2}]}', "duplicate key 'k'"),
    ("duplicate-odd-key", '{"type": "ping", "<\\u0000>": 1, "<\\u0000>": 2}', "not shown"),
    ("nan", '{"type": "ping", "x": NaN}', "NaN is not a number"),
    ("infinity", '{"type": "ping", "x": Infinity}', "Infinity is not a number"),
    ("minus-infinity", '{"type": "ping", "x": -Infinity}', "-Infinity is not a number"),
    ("float-overflow", '{"type": "ping", "x": 1e999999}', "too large"),
    ("float-overflow-negative", '{"type": "ping", "x": -1.5e400}', "too large"),
    ("long-int", '{"type": "ping", "x": ' + "1" * 21 + "}", "more than 20 digits"),
    ("long-negative-int", '{"type": "ping", "x": -' + "9" * 21 + "}", "more than 20 digits"),
    ("5000-digit-int", '{"type": "ping", "x": ' + "7" * 5000 + "}", "more than 20 digits"),
    ("long-int-in-array", '{"type": "ping", "x": [1, ' + "2" * 30 + "]}", "more than 20 digits"),
    ("lone-high-surrogate", '{"type": "ping", "x": "\\ud800"}', "unpaired surrogate"),
    ("lone-low-surrogate-key", '{"type": "ping", "\\udc00": 1}', "unpaired surrogate"),
    ("surrogate-in-array", '{"type": "ping", "x": ["\\udfff"]}', "unpaired surrogate"),
    ("surrogate-in-sdp", '{"type": "call", "call": "c", "to": "1", "sdp": "\\ud83d"}', "surrogate"),
    ("nested-33", '{"type": "ping", "x": ' + "[" * 32 + "]" * 32 + "}", "nested more than 32"),
    ("nested-objects", '{"type": "ping", "x": ' + '{"a":' * 40 + "1" + "}" * 40 + "}", "nested"),
    ("nested-100000", '{"type": "ping", "x": ' + "[" * 100000 + "]" * 100000 + "}", "nested"),
    ("unknown-type-shown-safely", '{"type": "<script>"}', "unknown message type (not shown"),
]


@pytest.mark.parametrize(
    ("raw", "words"),
    [case[1:] for case in STRICT_JSON_CASES],
    ids=[case[0] for case in STRICT_JSON_CASES],
)
def test_strict_json(raw, words):
    with pytest.raises(ProtocolError) as info:
        parse(raw)
    assert info.value.code == "bad_request"
    assert words in info.value.message
    assert "<" not in info.value.message


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "ping", "x": 1.5e308}',
        '{"type": "ping", "x": -' + "9" * 20 + "}",
        '{"type": "ping", "x": "\\ud83d\\ude00"}',
        '{"type": "ping", "x": ' + "[" * 31 + "]" * 31 + "}",
        '{"type": "ping", "a": {"k": 1}, "b": {"k": 1}}',
    ],
    ids=["large-finite-float", "20-digit-int", "surrogate-pair", "nested-32", "same-key-apart"],
)
def test_strict_json_still_accepts(raw):
    assert parse(raw) == Ping()


def test_encode_leaves_out_none():
    assert json.loads(encode(Error("busy", "full"))) == {
        "type": "error",
        "code": "busy",
        "message": "full",
    }
    assert json.loads(encode(HangupEvent("c1", 486, "Busy Here", "remote", "remote_reject"))) == {
        "type": "hangup",
        "call": "c1",
        "code": 486,
        "reason": "Busy Here",
        "by": "remote",
        "outcome": "remote_reject",
    }
    assert json.loads(encode(Accepted("c1", {"webrtc": "opus/48000", "sip": "PCMU/8000"})))[
        "codecs"
    ] == {
        "webrtc": "opus/48000",
        "sip": "PCMU/8000",
    }


def test_parse_transfer_blind_and_attended():
    assert parse('{"type":"transfer","call":"c1","to":"1003"}') == Transfer("c1", to="1003")
    assert parse('{"type":"transfer","id":"9","call":"c1","replaces":"c2"}') == Transfer(
        "c1", replaces="c2", id="9"
    )
    accept = parse('{"type":"transfer_accept","call":"c1","new_call":"c3","sdp":"v=0"}')
    assert accept == TransferAccept("c1", "c3", "v=0")


@pytest.mark.parametrize(
    "raw, words",
    [
        ('{"type":"transfer","call":"c1"}', "exactly one of 'to'"),
        ('{"type":"transfer","call":"c1","to":"1","replaces":"c2"}', "exactly one of 'to'"),
        ('{"type":"transfer","call":"c1","replaces":"c1"}', "another call"),
        ('{"type":"transfer","call":"c1","replaces":"a b"}', "another call"),
        ('{"type":"transfer","call":"c1","to":5}', "must be a string"),
        ('{"type":"transfer_accept","call":"c1","sdp":"v=0"}', "missing field 'new_call'"),
        ('{"type":"transfer_accept","call":"c1","new_call":"x\\n","sdp":"v"}', "new_call"),
    ],
)
def test_parse_transfer_errors(raw, words):
    with pytest.raises(ProtocolError) as info:
        parse(raw)
    assert info.value.code == "bad_request" and words in info.value.message


def test_transfer_events_encode():
    event = TransferEvent("c1", 200, "OK", True, "t1")
    assert json.loads(encode(event)) == {
        "type": "transfer",
        "call": "c1",
        "code": 200,
        "reason": "OK",
        "final": True,
        "id": "t1",
    }
    assert json.loads(encode(TransferRequest("c1", "1003"))) == {
        "type": "transfer_request",
        "call": "c1",
        "to": "1003",
    }


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_TYPES = st.sampled_from(
    [
        "call",
        "hangup",
        "dtmf",
        "hold",
        "register",
        "accept",
        "reject",
        "transfer",
        "transfer_accept",
        "hello",
        "ping",
        "nope",
    ]
)
_FIELDS = st.sampled_from(
    [
        "call",
        "to",
        "sdp",
        "id",
        "digits",
        "method",
        "user",
        "password",
        "code",
        "replaces",
        "new_call",
        "token",
        "display_name",
        "domain",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_any_text_parses_or_gives_a_protocol_error(text):
    try:
        parse(text)
    except ProtocolError as exc:
        assert exc.code in ("bad_request",), exc.code


@settings(max_examples=800, deadline=None)
@given(_TYPES, st.dictionaries(_FIELDS, _JSON, max_size=6))
def test_any_request_shaped_object_parses_or_gives_a_protocol_error(kind, fields):
    try:
        request = parse(json.dumps({**fields, "type": kind}))
    except ProtocolError as exc:
        assert exc.code == "bad_request" and "\n" not in exc.message, exc.message
        return
    assert type(request).__name__.lower().replace("_", "").startswith(kind.replace("_", "")[:4])


# --- candidate (trickle ICE) ----------------------------------------------------------

_GOOD = "candidate:842163049 1 udp 2122260223 127.0.0.1 54321 typ host generation 0"


def test_candidate_parses_the_browsers_ice_candidate_init() -> None:
    from gateway.front.signaling.messages import Candidate

    got = parse(
        json.dumps(
            {
                "type": "candidate",
                "call": "c1",
                "id": "7",
                "candidate": {"candidate": _GOOD, "sdpMid": "0", "sdpMLineIndex": 0},
            }
        )
    )
    assert got == Candidate("c1", _GOOD, "0", 0, "7")


@pytest.mark.parametrize("value", [None, {"candidate": "", "sdpMid": "0"}])
def test_candidate_end_of_candidates(value: object) -> None:
    got = parse(json.dumps({"type": "candidate", "call": "c1", "candidate": value}))
    assert got.candidate is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "value",
    [
        "candidate:1 1 udp 1 127.0.0.1 9 typ host",
        {"candidate": "junk"},
        {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ bogus"},
        {"candidate": _GOOD, "sdpMid": 0},
        {"candidate": _GOOD, "sdpMLineIndex": True},
        {"candidate": _GOOD, "sdpMLineIndex": 64},
        {"candidate": "candidate:" + "x" * 1100},
    ],
)
def test_bad_candidates_are_bad_requests(value: object) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse(json.dumps({"type": "candidate", "call": "c1", "id": "9", "candidate": value}))
    assert caught.value.code == "bad_request"
    assert caught.value.call == "c1"


def test_candidate_needs_the_field() -> None:
    with pytest.raises(ProtocolError, match="'candidate' is missing"):
        parse(json.dumps({"type": "candidate", "call": "c1"}))
