"""Mid-call re-INVITEs from the phone: hold, resume, inactive, a moved RTP port, a new codec.

The phone is a pjsua2 process (:mod:`peers.pjsua_phone`) playing 700 Hz; the
browser is the aiortc client playing 1000 Hz. After the answer and after every
re-INVITE the tone is measured at both ends: the browser must hear 700 Hz and the
phone 1000 Hz whenever the negotiated direction lets audio through, and silence
where it does not.

Each re-INVITE makes pjsua in the gateway's worker replace the call's stream and
its conference port; the worker must connect the new port to the call's bridge
every time (pjsua may give the new port the number the previous one had).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from peers.pjsua_phone import Media, PjsuaPhone
from peers.webclient import ClientCall, WebClient

pytestmark = pytest.mark.timeout(150)

PHONE_HZ = 700
BROWSER_HZ = 1000
#: After a re-INVITE, wait this long before measuring: every measure covers the
#: last second, which must hold only audio from after the change.
SETTLE_S = 1.5
#: How long a tone may take to come (back) through.
TONE_TIMEOUT_S = 8.0
#: Full tones arrive at about 0.1-0.2 of full scale; silence at 0.
MIN_RMS = 0.03
SILENCE_RMS = 0.005


async def both_ways(call: ClientCall, phone: PjsuaPhone, step: str) -> None:
    """The browser hears the phone's tone and the phone hears the browser's."""
    await asyncio.sleep(SETTLE_S)
    heard_by_browser = await call.wait_for_tone(PHONE_HZ, TONE_TIMEOUT_S, min_rms=MIN_RMS)
    heard_by_phone = await phone.wait_for_tone(BROWSER_HZ, TONE_TIMEOUT_S, min_rms=MIN_RMS)
    print(f"after {step}: browser heard {heard_by_browser}, phone heard {heard_by_phone}")
    problems = []
    if abs(heard_by_browser.hz - PHONE_HZ) > 10 or heard_by_browser.rms <= MIN_RMS:
        problems.append(f"browser expected {PHONE_HZ} Hz, heard {heard_by_browser}")
    if abs(heard_by_phone.hz - BROWSER_HZ) > 10 or heard_by_phone.rms <= MIN_RMS:
        problems.append(f"phone expected {BROWSER_HZ} Hz, heard {heard_by_phone}")
    assert not problems, f"after {step}: " + "; ".join(problems)


async def browser_silent(call: ClientCall, timeout: float = TONE_TIMEOUT_S) -> float:
    """RMS of the browser's last second once it is silent (or at ``timeout``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        rms = call.measure(1.0).rms
        if rms < SILENCE_RMS or asyncio.get_running_loop().time() > deadline:
            return rms
        await asyncio.sleep(0.25)


@asynccontextmanager
async def bridged_call(
    gateway, tmp_path, call_id: str
) -> AsyncIterator[tuple[ClientCall, PjsuaPhone]]:
    """An answered call from the browser to a pjsua2 phone, tone checked both ways."""
    async with PjsuaPhone(tmp_path, tone_hz=PHONE_HZ) as phone, WebClient(gateway.url) as client:
        call = await client.establish(call_id, f"sipp{phone.port}", tone_hz=BROWSER_HZ)
        accepted = await client.wait_event(call, ("accepted", "hangup"), timeout=15)
        assert accepted["type"] == "accepted", accepted
        media = await phone.wait_confirmed()
        assert media.status == "ACTIVE", media.raw
        await both_ways(call, phone, "the answer")
        yield call, phone
        assert not [e for e in call.events if e["type"] == "hangup"], call.events
        reply = await client.hangup(call_id)
        assert (reply["type"], reply["by"]) == ("hangup", "local"), reply
        await phone.wait_disconnected()


def directions(media: Media) -> tuple[str, str]:
    """(the phone's SDP direction, the gateway's answer direction)."""
    return media.local_dir, media.remote_dir


async def test_hold_then_resume_from_the_phone(gateway, tmp_path):
    async with bridged_call(gateway, tmp_path, "hold") as (call, phone):
        held = await phone.hold()
        assert directions(held) == ("sendonly", "recvonly"), held.raw
        # On hold the phone still sends (music on hold); the gateway must not.
        await asyncio.sleep(SETTLE_S)
        heard_by_browser = await call.wait_for_tone(PHONE_HZ, TONE_TIMEOUT_S, min_rms=MIN_RMS)
        assert abs(heard_by_browser.hz - PHONE_HZ) <= 10, f"on hold: {heard_by_browser}"
        assert heard_by_browser.rms > MIN_RMS, f"on hold: {heard_by_browser}"
        heard_by_phone = await phone.wait_for_silence(TONE_TIMEOUT_S, SILENCE_RMS)
        assert heard_by_phone.rms < SILENCE_RMS, (
            f"on hold the gateway still sends: {heard_by_phone}"
        )

        resumed = await phone.resume()
        assert directions(resumed) == ("sendrecv", "sendrecv"), resumed.raw
        await both_ways(call, phone, "resume")


async def test_two_reinvites_moving_the_phones_rtp_port(gateway, tmp_path):
    """A PBX re-anchoring media: each re-INVITE offers a new RTP port."""
    async with bridged_call(gateway, tmp_path, "move") as (call, phone):
        before = (await phone.status())["call"]["rtp_port"]
        for n in (1, 2):
            moved = await phone.move_port()
            assert moved.local_port != before, f"re-INVITE {n} kept RTP port {before}: {moved.raw}"
            assert moved.rtp_port == moved.local_port, moved.raw
            assert directions(moved) == ("sendrecv", "sendrecv"), moved.raw
            await both_ways(call, phone, f"re-INVITE {n} moving RTP {before} -> {moved.local_port}")
            before = moved.local_port


async def test_codec_change_pcmu_to_pcma_and_back(gateway, tmp_path):
    """Each re-INVITE offers one codec only, so the gateway's answer must switch."""
    async with bridged_call(gateway, tmp_path, "codec") as (call, phone):
        assert (await phone.status())["call"]["codec"] == "PCMU"
        for codec in ("PCMA", "PCMU"):
            changed = await phone.set_codec(codec)
            assert changed.codec == codec, changed.raw
            assert changed.remote_codecs[:1] == [codec], changed.raw
            await both_ways(call, phone, f"the re-INVITE to {codec}")


async def test_inactive_then_resume(gateway, tmp_path):
    async with bridged_call(gateway, tmp_path, "inactive") as (call, phone):
        stopped = await phone.inactive()
        assert directions(stopped) == ("inactive", "inactive"), stopped.raw
        await asyncio.sleep(SETTLE_S)
        heard_by_phone = await phone.wait_for_silence(TONE_TIMEOUT_S, SILENCE_RMS)
        assert heard_by_phone.rms < SILENCE_RMS, (
            f"inactive, yet the gateway sends: {heard_by_phone}"
        )
        rms = await browser_silent(call)
        assert rms < SILENCE_RMS, f"inactive, yet the browser hears rms {rms}"

        resumed = await phone.resume()
        assert directions(resumed) == ("sendrecv", "sendrecv"), resumed.raw
        await both_ways(call, phone, "resume from inactive")
