"""The embedded ``echo`` and ``tone`` targets, called from an aiortc client over real SIP."""

from __future__ import annotations

import asyncio

import pytest
from peers.webclient import WebClient

pytestmark = pytest.mark.timeout(60)


async def test_echo_returns_the_callers_tone(gateway):
    async with WebClient(gateway.url) as client:
        call = await client.establish("c1", "echo", tone_hz=1000)
        accepted = await client.wait_event(call, ("accepted", "hangup"))
        assert accepted["type"] == "accepted"
        assert accepted["codecs"] == {"webrtc": "opus/48000", "sip": "PCMU/8000"}
        await asyncio.sleep(2.5)
        tone = call.measure(1.0)
        assert abs(tone.hz - 1000) <= 10, tone
        assert tone.rms > 0.02, tone
        reply = await client.hangup("c1")
        assert reply["type"] == "hangup"
        assert (reply["code"], reply["by"]) == (200, "local")


async def test_echo_follows_a_different_frequency(gateway):
    """The echo really carries the caller's audio: 600 Hz in, 600 Hz back."""
    async with WebClient(gateway.url) as client:
        call = await client.establish("c1", "echo", tone_hz=600)
        await client.wait_event(call, "accepted")
        await asyncio.sleep(2.5)
        tone = call.measure(1.0)
        assert abs(tone.hz - 600) <= 10, tone
        await client.hangup("c1")


async def test_tone_target_plays_1khz_to_a_silent_caller(gateway):
    async with WebClient(gateway.url) as client:
        call = await client.establish("c1", "tone", tone_hz=0)
        events = []
        for kind in ("ringing", "accepted"):
            events.append(await client.wait_event(call, kind))
        assert events[0]["code"] == 180
        await asyncio.sleep(2.5)
        tone = call.measure(1.0)
        assert abs(tone.hz - 1000) <= 10, tone
        assert tone.rms > 0.05, tone
        await client.hangup("c1")
