"""A stranger's worst over a real WebSocket, while a call carries audio on the same connection.

Hundreds of malformed or hostile frames, generated here: broken and lax JSON,
every field of every message with the wrong type, odd characters in ids and
numbers, oversized fields, binary frames, and real aiortc and Chromium offers
mutated line by line. Each must get a typed ``error`` (never ``internal``) whose text is
plain words, the connection stays open, the call keeps its 1000 Hz tone, and
the gateway logs no traceback.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from peers.census import assert_no_leaks, warm_baseline
from peers.gateway import Gateway, start_gateway, stop_gateway
from peers.webclient import ToneTrack, WebClient

from gateway.front.signaling.messages import ERROR_CODES

pytestmark = pytest.mark.timeout(120)

# Exception text, reprs and markup must never reach the browser.
PYTHON_TEXT = re.compile(
    r"Error\(|Exception|Traceback|<|>|\w+Error\b|object at|\\x[0-9a-fA-F]{2}|"
    r"\\u[0-9a-fA-F]{4}|invalid literal|KeyError|IndexError"
)

# A valid instance of every request, and the fields each one has.
BASES: dict[str, dict[str, Any]] = {
    "hello": {"type": "hello", "id": "h1", "token": "t"},
    "call": {"type": "call", "id": "c1", "call": "k1", "to": "12345", "sdp": "x"},
    "hangup": {"type": "hangup", "id": "g1", "call": "ghost"},
    "ping": {"type": "ping", "id": "p1"},
}
#: Fields whose ``null`` means "missing" and so is an error too.
REQUIRED = {"type", "call", "to", "sdp"}
WRONG_TYPES: list[Any] = [5, -1, 1.5, True, False, [], ["x"], {}, {"a": 1}]
ODD_STRINGS = [
    "a\r\nb",
    "a\x00b",
    "\x00",
    "é",
    "\u202e1",
    "😀",
    "a b",
    "<x>",
    "'",
    '"',
    "\\",
    "%00",
    "../x",
    "x" * 65,
    "9" * 10000,
    "\ud800",
    "\udfff",
    "",
]
BAD_NUMBERS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999999",
    "-1e999999",
    "9" * 21,
    "-" + "9" * 25,
    "7" * 5000,
    "1" * 4301,
]

Case = tuple[str, str | bytes]


def _with_raw(message: dict[str, Any], key: str, raw: str) -> str:
    """``message`` as JSON with ``key``'s value replaced by the raw JSON text ``raw``."""
    body = {**message, key: "\x01placeholder\x01"}
    return json.dumps(body).replace(json.dumps("\x01placeholder\x01"), raw, 1)


def front_cases() -> Iterator[Case]:
    """Frames the front process must refuse itself, each with an ``error``."""
    for kind, base in BASES.items():
        fields = list(base)
        for key in fields:
            values = WRONG_TYPES + ([None] if key in REQUIRED else [])
            for value in values:
                yield f"{kind}.{key}={json.dumps(value)}", json.dumps({**base, key: value})
            if key not in ("type", "token", "sdp"):
                for n, text in enumerate(ODD_STRINGS):
                    yield f"{kind}.{key}=odd{n}", json.dumps({**base, key: text})
            for number in BAD_NUMBERS:
                yield f"{kind}.{key}={number[:12]}", _with_raw(base, key, number)
            # Duplicate keys, with the same and with another value.
            text = json.dumps(base)[:-1]
            yield f"{kind}.{key}-twice", f"{text}, {json.dumps(key)}: {json.dumps(base[key])}}}"
            yield f"{kind}.{key}-twice-other", f'{text}, {json.dumps(key)}: "ping"}}'
        for number in BAD_NUMBERS:
            yield f"{kind}.extra={number[:12]}", _with_raw(base, "extra", number)
        # Truncated JSON.
        text = json.dumps(base)
        for cut in sorted({1, 2, 5, 9, len(text) // 2, len(text) - 2, len(text) - 1}):
            yield f"{kind}-cut{cut}", text[:cut]
    # Not JSON objects, or JSON with the laxities and junk of hand-written clients.
    for n, text in enumerate(
        [
            "",
            " ",
            "null",
            "true",
            "1",
            '"ping"',
            "[]",
            "{}",
            '{"type": null}',
            "}{",
            "{'type': 'ping'}",
            "{type: ping}",
            "\x00",
            '\ufeff{"type": "ping"}',
            '{"type": "ping"} x',
            '{"type": "ping"}{"type": "ping"}',
            '{"type": "ping",}',
            '{"type": "ping", "x": [1,]}',
            '{"type": "\\x41"}',
            '{"type": "pi\\u0000ng"}',
            '{"type": "ping", "x": 0x10}',
            '{"type": "ping", "x": 01}',
            '{"type": "ping", "x": .5}',
            '{"type": "ping", "x": +1}',
            '{"type": "ping", "x": "\\ud800"}',
            '{"type": "ping", "\\udc00": 1}',
            '{"type": "ping", "x": "a\tb"}',
            '{"type": "ping", "x": "a\nb"}',
        ]
    ):
        yield f"junk{n}", text
    # Deep nesting, in a field and at the top.
    for depth in (33, 100, 1000, 20000):
        yield f"nested-array-{depth}", _with_raw(BASES["ping"], "x", "[" * depth + "]" * depth)
        yield f"nested-object-{depth}", '{"a":' * depth + "1" + "}" * depth
        yield f"top-array-{depth}", "[" * depth + "]" * depth
    # Unknown types.
    unknown = ["teleport", "PING", "ping ", "hello\r\n", "<script>", "é", "x" * 1000, "register"]
    for n, kind in enumerate([*unknown, "__proto__", "constructor", "\x00", "\ud800", "", " "]):
        yield f"unknown{n}", json.dumps({"type": kind, "id": "u1"})
    # Oversized frames and fields (below the 4x hard limit that closes the socket).
    yield "frame-70k", json.dumps({"type": "ping", "pad": "x" * 70000})
    yield "frame-200k", json.dumps({"type": "ping", "pad": "é" * 100000}, ensure_ascii=False)
    yield "sdp-40k", json.dumps({**BASES["call"], "to": "echo", "sdp": "v=0\r\n" + "a" * 40000})
    yield "to-60k", json.dumps({**BASES["call"], "to": "1" * 60000})
    yield "id-60k", json.dumps({"type": "ping", "id": "i" * 60000})
    # Binary frames.
    for n, data in enumerate(
        [b"", b"\x00", b'{"type": "ping"}', bytes(range(256)) * 4, b"\xff" * 60000]
    ):
        yield f"binary{n}", data


def _lines(sdp: str) -> list[str]:
    return sdp.split("\r\n")[:-1]


def _sdp(lines: list[str]) -> str:
    return "".join(line + "\r\n" for line in lines)


def _splice(lines: list[str], i: int, *new: str) -> str:
    """The SDP of ``lines`` with line ``i`` replaced by ``new`` (dropped if none)."""
    return _sdp([*lines[:i], *new, *lines[i + 1 :]])


async def chromium_offer() -> str:
    """An audio offer made by headless Chromium (Debian's package, never downloaded)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path="/usr/bin/chromium",
            headless=True,
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"],
        )
        try:
            page = await browser.new_page()
            sdp = await page.evaluate(
                """async () => {
                    const pc = new RTCPeerConnection();
                    pc.addTransceiver("audio", {direction: "sendrecv"});
                    const offer = await pc.createOffer();
                    await pc.setLocalDescription(offer);
                    const sdp = pc.localDescription.sdp;
                    pc.close();
                    return sdp;
                }"""
            )
        finally:
            await browser.close()
    assert "m=audio" in sdp
    return str(sdp)


def offer_cases(offer: str) -> Iterator[tuple[str, str]]:
    """A real offer, mutated: each may be refused, or parse well enough to be answered."""
    lines = _lines(offer)
    for i, line in enumerate(lines):
        name = line.split(":", 1)[0].split(" ", 1)[0][:20]
        yield f"drop{i}:{name}", _splice(lines, i)
        yield f"double{i}:{name}", _splice(lines, i, line, line)
        yield f"garble{i}:{name}", _splice(lines, i, line[:2] + "\x00#<é>" + line[2:][::-1])
        yield f"cut{i}:{name}", _splice(lines, i, line[: max(2, len(line) // 2)])
    audio = next(i for i, line in enumerate(lines) if line.startswith("m=audio"))
    m_line = lines[audio].split(" ")

    def with_m(*parts: str) -> str:
        return _splice(lines, audio, " ".join(parts))

    for port in ("-1", "99999", "abc", "0", "65536", "1e3", "", "9" * 30):
        yield f"port={port[:8]}", with_m(m_line[0], port, *m_line[2:])
    yield "pt-text", with_m(*m_line[:3], "x", "y", "z")
    yield "pt-huge", with_m(*m_line[:3], "9" * 40)
    yield "pt-none", with_m(*m_line[:3])
    yield "proto-odd", with_m(*m_line[:2], "RTP/AVP", *m_line[3:])

    def replace(pattern: str, replacement: str) -> str:
        return re.sub(pattern, replacement, offer, flags=re.M)

    yield "no-m-audio", _sdp([line for line in lines if not line.startswith("m=audio")])
    yield "rtpmap-text-pt", replace(r"^a=rtpmap:\d+ ", "a=rtpmap:abc ")
    yield "rtpmap-text-rate", replace(r"^a=rtpmap:(\d+) (\w+)/\d+", r"a=rtpmap:\1 \2/abc")
    yield "rtpmap-empty", replace(r"^a=rtpmap:.*$", "a=rtpmap:")
    opus = next(i for i, line in enumerate(lines) if re.match(r"a=rtpmap:\d+ opus/", line))
    opus_pt = lines[opus].split(":", 1)[1].split(" ", 1)[0]  # 96 in aiortc, 111 in Chromium
    yield "fmtp-junk", _splice(lines, opus, lines[opus], f"a=fmtp:{opus_pt} ;;==;\x00")
    yield "fingerprint-bad-hex", replace(r"^(a=fingerprint:sha-256) .*$", r"\1 ZZ:ZZ")
    yield "fingerprint-md5", replace(r"^a=fingerprint:sha-256 ", "a=fingerprint:md5 ")
    yield "fingerprint-empty", replace(r"^a=fingerprint:.*$", "a=fingerprint:")
    yield "fingerprint-none", replace(r"^a=fingerprint:.*\r\n", "")
    yield "setup-junk", replace(r"^a=setup:.*$", "a=setup:sideways")
    yield "ufrag-empty", replace(r"^a=ice-ufrag:.*$", "a=ice-ufrag:")
    yield "candidate-junk", replace(r"^a=candidate:.*$", "a=candidate:x y z")
    yield "candidate-port", replace(r"^(a=candidate:\S+ \d+ udp \d+ \S+) \d+", r"\1 70000")
    yield "ssrc-junk", replace(r"^a=ssrc:\d+", "a=ssrc:-5")
    yield "mid-junk", replace(r"^a=mid:.*$", "a=mid:")
    yield "connection-junk", replace(r"^c=.*$", "c=IN IP9 ::::")
    yield "origin-junk", replace(r"^o=.*$", "o=-")
    yield "version-1", replace(r"^v=0", "v=1")
    yield "lf-only", offer.replace("\r\n", "\n")
    yield "cr-only", offer.replace("\r\n", "\r")
    yield "nul-inside", offer.replace("\r\n", "\r\n\x00", 3)
    yield "reversed", _sdp(lines[::-1])
    yield "huge-line", _sdp([*lines, "a=x-junk:" + "y" * 30000])
    yield "many-lines", _sdp(lines + ["a=x-junk:1"] * 3000)
    yield "unicode-lines", _sdp([*lines, "a=tool:é😀\u202e"])
    yield "only-version", "v=0\r\n"
    yield "m-video-only", replace(r"^m=audio ", "m=video ")
    yield "two-audio", _sdp(lines + lines[audio:])
    yield "two-audio-mids", _sdp(lines + [re.sub("^a=mid:.*", "a=mid:9", x) for x in lines[audio:]])
    yield "mid-missing", _sdp([x for x in lines if not x.startswith(("a=mid", "a=group"))])


@pytest.fixture
def own_gateway(tmp_path: Any) -> Iterator[Gateway]:
    """A gateway of the corpus's own: the mutated offers it answers place ~100 short calls,
    and calls hung up that fast leave pjsua call slots taken for a minute or more
    (PJ_ETOOMANY), which would fail the next tests' calls on the shared gateway."""
    gw = start_gateway(tmp_path)
    try:
        gw.wait_ready()
        before = warm_baseline(gw)
        yield gw
        assert_no_leaks(gw, before, what="the hostile corpus")
    finally:
        stop_gateway(gw)


async def test_hostile_corpus_leaves_call_and_connection_alone(own_gateway):
    gateway = own_gateway
    log_start = len(gateway.log.read_bytes())
    started = time.monotonic()
    counts: Counter[str] = Counter()
    async with WebClient(gateway.url) as client:
        call = await client.establish("live", "echo", tone_hz=1000)
        await client.wait_event(call, "accepted")
        assert client.ws is not None

        async def reply(case_id: str, start: int, call_id: str | None) -> dict[str, Any]:
            try:
                return await client.wait_message(
                    lambda m: (
                        m["type"] in ("error", "answer", "pong", "welcome")
                        and (call_id is None or m.get("call") == call_id)
                    ),
                    10,
                    start,
                )
            except TimeoutError:
                closed = client.ws is None or client.ws.closed
                raise AssertionError(f"{case_id}: no reply (socket closed: {closed})") from None

        def check_error(case_id: str, message: dict[str, Any]) -> None:
            assert message["type"] == "error", (case_id, message)
            assert message["code"] in ERROR_CODES, (case_id, message)
            assert message["code"] != "internal", (case_id, message)
            assert not PYTHON_TEXT.search(message["message"]), (case_id, message)
            counts[message["code"]] += 1

        for case_id, frame in front_cases():
            start = len(client.messages)
            if isinstance(frame, bytes):
                await client.ws.send_bytes(frame)
            else:
                await client.send(frame)
            check_error(case_id, await reply(case_id, start, None))
            counts["front"] += 1

        # Real offers, mutated: one from another aiortc peer (not the live call's) and
        # one from Chromium (taken as soon as created: trickle, no end-of-candidates).
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(ToneTrack(440))
        await pc.setLocalDescription(await pc.createOffer())
        offers = {"aiortc": str(pc.localDescription.sdp), "chromium": await chromium_offer()}
        await pc.close()
        mutated = [
            (f"{source}-{case_id}", sdp)
            for source, offer in offers.items()
            for case_id, sdp in offer_cases(offer)
        ]
        for n, (case_id, sdp) in enumerate(mutated):
            call_id = f"m{n}"
            start = len(client.messages)
            await client.send({"type": "call", "call": call_id, "to": "echo", "sdp": sdp})
            message = await reply(case_id, start, call_id)
            counts["offer"] += 1
            if message["type"] == "answer":  # it still parsed: a new call; end it
                counts["answered"] += 1
                await client.send({"type": "hangup", "call": call_id})
                await client.wait_message(
                    lambda m, c=call_id: m["type"] == "hangup" and m.get("call") == c, 10, start
                )
            else:
                check_error(case_id, message)

        # Still connected, still answering, and the live call still carries the tone.
        assert (await client.request({"type": "ping"}))["type"] == "pong"
        tone = await call.wait_for_tone(1000)
        assert abs(tone.hz - 1000) <= 10 and tone.rms > 0.02, tone
        assert not [m for m in client.messages if m.get("call") == "live" and m["type"] == "hangup"]
        await client.hangup("live")
    sent = counts["front"] + counts["offer"]
    print(f"\nhostile corpus: {sent} frames in {time.monotonic() - started:.1f} s; {dict(counts)}")
    assert sent >= 500
    assert counts["offer"] - counts["answered"] >= 20  # many mutations are refused, typed
    log = gateway.log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in log, log[-3000:]


async def test_invalid_utf8_text_frame_closes_only_its_own_connection(gateway):
    """RFC 6455 says invalid UTF-8 in a text frame fails the connection: 1007, nothing else."""
    async with WebClient(gateway.url) as client:
        call = await client.establish("utf8", "echo", tone_hz=1000)
        await client.wait_event(call, "accepted")
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{gateway.url}/ws") as ws:
                await ws.send_frame(b'{"type": "ping", "id": "\xff\xfe"}', aiohttp.WSMsgType.TEXT)
                frame = await ws.receive(timeout=10)
                assert frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), frame
                assert ws.close_code == aiohttp.WSCloseCode.INVALID_TEXT
        assert (await client.request({"type": "ping"}))["type"] == "pong"
        tone = await call.wait_for_tone(1000)
        assert abs(tone.hz - 1000) <= 10, tone
        await client.hangup("utf8")


async def test_browser_that_does_not_read_is_closed_and_logged_once(gateway):
    log_start = len(gateway.log.read_bytes())
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{gateway.url}/ws", autoping=False)
        await ws.send_str(json.dumps({"type": "hello"}))
        welcome = json.loads((await ws.receive(timeout=10)).data)
        session_id = welcome["session"]
        # Every frame gets an error of ~200 bytes that this client never reads, until the
        # gateway's socket buffer and its 256-message queue are full and it gives up.
        flood = json.dumps({"type": "flood", "id": "f" * 64})
        deadline = time.monotonic() + 30
        try:
            while not _gateway_gave_up(gateway, log_start, session_id):
                assert time.monotonic() < deadline, "the gateway never gave up on this browser"
                for _ in range(500):
                    await ws.send_str(flood)
        except ConnectionError:
            pass  # the gateway closed (or cut off) the connection first: fine
        # Read through what was sent before the close. The gateway closes with 1008, but it
        # closes the TCP connection with our flood unread, so the kernel may reset it (1006).
        # A peer that reads nothing leaves no room for the close frame: after a grace
        # the gateway cuts the connection, which the client sees as 1006.
        while (frame := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
            pass
        assert ws.close_code in (
            aiohttp.WSCloseCode.POLICY_VIOLATION,
            aiohttp.WSCloseCode.ABNORMAL_CLOSURE,
        ), frame
        await ws.close()
        assert _gateway_gave_up(gateway, log_start, session_id)
    warnings = [
        line
        for line in gateway.log.read_bytes()[log_start:].decode(errors="replace").splitlines()
        if session_id in line and "not reading" in line
    ]
    assert len(warnings) == 1, warnings


def _gateway_gave_up(gateway: Any, log_start: int, session_id: str) -> bool:
    text = gateway.log.read_bytes()[log_start:].decode(errors="replace")
    return f"session {session_id}: browser is not reading" in text
