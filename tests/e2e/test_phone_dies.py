"""A phone that dies mid-call: no BYE ever comes, its RTP just stops.

The gateway must notice the silence on the SIP leg and end the call itself: the
browser gets a ``hangup`` whose ``outcome`` is ``media_timeout`` within
``calls.media_timeout`` + 5 s of the phone's death. A call whose audio flows is
never cut, however long it lasts.

Two stock phones die here, each SIGKILLed with its process group: the pjsua2
phone (:mod:`peers.pjsua_phone`) and sipp (``echo``).

Needs ``[calls] media_timeout`` and the ``outcome`` field of the ``hangup``
event: until the gateway has both, the gateway of this module does not start
(its configuration is refused) and these tests fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
from peers.gateway import Gateway, free_port, make_config, start_gateway, stop_gateway
from peers.pjsua_phone import PjsuaPhone
from peers.sipp import SippPhone
from peers.webclient import ClientCall, WebClient

pytestmark = pytest.mark.timeout(120)

MEDIA_TIMEOUT = 3.0
#: How late the hangup may come after the phone's death.
GRACE = 5.0

#: (the number to dial, the tone the browser hears, a coroutine function killing the phone)
Phone = tuple[str, float, Callable[[], Awaitable[None]]]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway of its own, with a short media timeout (one worker is plenty)."""
    http_port = free_port()
    config = make_config(http_port, workers=1) + f"\n[calls]\nmedia_timeout = {MEDIA_TIMEOUT}\n"
    gw = start_gateway(tmp_path_factory.mktemp("phone-dies"), config, http_port)
    try:
        gw.wait_ready(workers=1)
        yield gw
    finally:
        stop_gateway(gw)


@asynccontextmanager
async def pjsua_phone(tmp_path) -> AsyncIterator[Phone]:
    """The pjsua2 phone plays 700 Hz."""
    async with PjsuaPhone(tmp_path, tone_hz=700) as phone:
        yield f"sipp{phone.port}", 700.0, phone.kill


@asynccontextmanager
async def sipp_phone(tmp_path) -> AsyncIterator[Phone]:
    """sipp echoes the browser's own 1000 Hz back."""
    async with SippPhone("echo", tmp_path) as phone:

        async def kill() -> None:
            pid = phone.pid
            assert pid is not None, "sipp is not running"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # its own group: start_new_session

        yield f"sipp{phone.port}", 1000.0, kill


PHONES = {"pjsua": pjsua_phone, "sipp": sipp_phone}


async def hangup_of(client: WebClient, call: ClientCall, timeout: float) -> dict | None:
    try:
        return await client.wait_event(call, "hangup", timeout=timeout)
    except TimeoutError:
        return None


@pytest.mark.parametrize("kind", sorted(PHONES))
async def test_a_killed_phone_ends_the_call_with_media_timeout(gateway, tmp_path, kind):
    async with PHONES[kind](tmp_path) as (number, heard_hz, kill), WebClient(gateway.url) as client:
        call = await client.establish(f"dies-{kind}", number, tone_hz=1000)
        accepted = await client.wait_event(call, ("accepted", "hangup"), timeout=15)
        assert accepted["type"] == "accepted", accepted
        tone = await call.wait_for_tone(heard_hz, timeout=8)
        assert abs(tone.hz - heard_hz) <= 10 and tone.rms > 0.02, tone

        # A call with audio flowing outlives the media timeout.
        early = await hangup_of(client, call, MEDIA_TIMEOUT + 1.0)
        assert early is None, f"a call with audio was cut: {early}"

        await kill()
        killed = time.monotonic()
        hangup = await hangup_of(client, call, MEDIA_TIMEOUT + GRACE)
        elapsed = time.monotonic() - killed
        print(f"{kind} phone killed; {elapsed:.1f} s later: {hangup}")
        assert hangup is not None, (
            f"no hangup within {MEDIA_TIMEOUT + GRACE} s of the {kind} phone's death; "
            f"events: {call.events}"
        )
        assert hangup.get("outcome") == "media_timeout", hangup
        assert elapsed >= MEDIA_TIMEOUT - 1.0, f"hung up {elapsed:.1f} s after the death: {hangup}"
        assert len([e for e in call.events if e["type"] == "hangup"]) == 1, call.events

        deadline = time.monotonic() + 10
        while (health := await asyncio.to_thread(gateway.health))["calls_active"] != 0:
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.2)
