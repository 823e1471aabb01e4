"""Bad input over a real WebSocket: an error naming the problem, nothing else disturbed."""

from __future__ import annotations

import asyncio
import json

import pytest
from peers.webclient import WebClient

pytestmark = pytest.mark.timeout(90)

NO_AUDIO_OFFER = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 127.0.0.1\r\na=rtpmap:96 VP8/90000\r\n"
)

# (id, raw frame, expected error code, words the message must contain)
CASES = [
    ("not-json", "{nope", "bad_request", "not valid JSON"),
    ("not-object", "[1, 2]", "bad_request", "JSON object"),
    ("no-type", json.dumps({"call": "x"}), "bad_request", "'type'"),
    ("unknown-type", json.dumps({"type": "teleport"}), "bad_request", "unknown message type"),
    (
        "call-missing-to",
        json.dumps({"type": "call", "call": "a", "sdp": "x"}),
        "bad_request",
        "'to'",
    ),
    (
        "call-wrong-type",
        json.dumps({"type": "call", "call": "a", "to": 5, "sdp": "x"}),
        "bad_request",
        "must be a string",
    ),
    (
        "call-bad-id",
        json.dumps({"type": "call", "call": "a b", "to": "echo", "sdp": "x"}),
        "bad_request",
        "'call'",
    ),
    (
        "crlf-in-number",
        json.dumps({"type": "call", "call": "a", "to": "echo\r\nX-Evil: 1", "sdp": "x"}),
        "bad_request",
        "not allowed",
    ),
    ("hangup-unknown", json.dumps({"type": "hangup", "call": "ghost"}), "not_found", "ghost"),
    (
        "offer-without-audio",
        json.dumps({"type": "call", "call": "v1", "to": "echo", "sdp": NO_AUDIO_OFFER}),
        "bad_request",
        "no audio",
    ),
    (
        "garbage-sdp",
        json.dumps({"type": "call", "call": "g1", "to": "echo", "sdp": "hello\r\nworld\r\n"}),
        "bad_request",
        "offer",
    ),
    ("oversized", json.dumps({"type": "ping", "pad": "x" * 70000}), "bad_request", "larger than"),
    (
        "unmatched-number",
        json.dumps({"type": "call", "call": "u1", "to": "12345", "sdp": "x"}),
        "forbidden",
        "12345",
    ),
    (
        "reject-rule",
        json.dumps({"type": "call", "call": "b1", "to": "blocked900", "sdp": "x"}),
        "forbidden",
        "Blocked by test policy",
    ),
]


async def test_bad_input_gets_errors_and_a_live_call_survives(gateway):
    async with WebClient(gateway.url) as client:
        # A call in progress on the same connection must survive all of it.
        call = await client.establish("live", "echo", tone_hz=1000)
        await client.wait_event(call, "accepted")
        for case_id, raw, code, words in CASES:
            start = len(client.messages)
            await client.send(raw)
            error = await client.wait_message(lambda m: m["type"] == "error", 10, start)
            assert error["code"] == code, (case_id, error)
            assert words in error["message"], (case_id, error)
            assert "Traceback" not in error["message"]
        # Binary frames are refused too.
        start = len(client.messages)
        assert client.ws is not None
        await client.ws.send_bytes(b"\x00\x01")
        error = await client.wait_message(lambda m: m["type"] == "error", 10, start)
        assert "binary" in error["message"]
        # Still connected, still answering, and the live call still carries audio.
        assert (await client.request({"type": "ping"}))["type"] == "pong"
        await asyncio.sleep(1.5)
        tone = call.measure(1.0)
        assert abs(tone.hz - 1000) <= 10, tone
        assert not [m for m in client.messages if m.get("call") == "live" and m["type"] == "hangup"]
        await client.hangup("live")


async def test_duplicate_call_id_is_refused(gateway):
    async with WebClient(gateway.url) as client:
        call = await client.establish("dup", "echo")
        await client.wait_event(call, "accepted")
        reply = await client.request({"type": "call", "call": "dup", "to": "echo", "sdp": "x"})
        assert reply["type"] == "error"
        assert reply["code"] == "wrong_state"
        assert "already used" in reply["message"]
        await client.hangup("dup")
        # A finished call's id stays used on this connection.
        reply = await client.request({"type": "call", "call": "dup", "to": "echo", "sdp": "x"})
        assert reply["code"] == "wrong_state"


async def test_hello_and_ping_echo_request_ids(gateway):
    async with WebClient(gateway.url) as client:
        welcome = await client.request({"type": "hello"})
        assert welcome["type"] == "welcome"
        assert welcome["version"] == 1
        assert welcome["ice_servers"] == []
        assert welcome["session"]
        pong = await client.request({"type": "ping"})
        assert pong["type"] == "pong"
        hangup = await client.request({"type": "hangup", "call": "nope"})
        assert (hangup["type"], hangup["code"], hangup["call"]) == ("error", "not_found", "nope")
