"""The embedded targets under load: concurrent calls, hangups in every order, as many
calls as the workers carry, and a killed targets process."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from peers.gateway import Gateway, make_config, start_gateway, stop_gateway
from peers.webclient import ClientCall, WebClient

#: One frequency per concurrent call: audio crossing between calls would show.
FREQS = (500, 700, 900, 1100)
#: Every order in which four calls can be hung up.
ORDERS = list(itertools.permutations(range(4)))
#: Rounds in which the echo of every remaining call is measured after each hangup
#: (measuring all 24 would take minutes); the events are checked in every round.
MEASURED_ROUNDS = (0, 9, 23)


async def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.1)


async def close_call(call: ClientCall) -> None:
    call.tone.stop()
    if call.recorder is not None:
        call.recorder.cancel()
    await call.pc.close()


def hangups(call: ClientCall) -> list[dict[str, object]]:
    return [e for e in call.events if e["type"] == "hangup"]


async def establish_all(client: WebClient, ids: list[str], freqs: list[int]) -> list[ClientCall]:
    calls = await asyncio.gather(
        *(client.establish(i, "echo", tone_hz=hz) for i, hz in zip(ids, freqs, strict=True))
    )
    for call in calls:
        accepted = await client.wait_event(call, ("accepted", "hangup"))
        assert accepted["type"] == "accepted", accepted
    return list(calls)


@pytest.mark.timeout(150)
async def test_hanging_up_one_echo_call_never_ends_another(gateway):
    """Four echo calls hung up one at a time, in each of the 24 orders: every call
    ends by its own hangup (never by a BYE from the target), and the calls still up
    keep echoing their own tone."""
    await wait_for(lambda: gateway.health()["calls_active"] == 0, 10)
    failures: list[str] = []
    ended_early: set[str] = set()
    async with WebClient(gateway.url) as client:
        for n, order in enumerate(ORDERS):
            ids = [f"r{n}c{i}" for i in range(4)]
            calls = await establish_all(client, ids, list(FREQS))
            measured = n in MEASURED_ROUNDS
            if measured:
                for call, hz in zip(calls, FREQS, strict=True):
                    tone = await call.wait_for_tone(hz)
                    assert abs(tone.hz - hz) <= 10, (call.call_id, tone)
            for step, i in enumerate(order):
                reply = await client.hangup(ids[i])
                if (reply["type"], reply.get("by")) != ("hangup", "local") and ids[
                    i
                ] not in ended_early:
                    failures.append(f"round {n} {order}: hangup of {ids[i]} got {reply}")
                await asyncio.sleep(0.05)
                for j in order[step + 1 :]:
                    if hangups(calls[j]):
                        if ids[j] not in ended_early:
                            ended_early.add(ids[j])
                            failures.append(
                                f"round {n} {order}: {ids[j]} ended: {hangups(calls[j])}"
                            )
                    elif measured:
                        calls[j].chunks.clear()  # only audio heard after this hangup counts
                        tone = await calls[j].wait_for_tone(FREQS[j], timeout=5)
                        if abs(tone.hz - FREQS[j]) > 10 or tone.rms <= 0.02:
                            failures.append(f"round {n}: {ids[j]} lost its echo: {tone}")
            await asyncio.gather(*(close_call(c) for c in calls))
    await asyncio.sleep(1.0)  # a stray BYE from the target would end the last round's calls late
    for call in client.calls.values():
        ended = hangups(call)
        if [(e["code"], e["by"]) for e in ended] != [
            (200, "local")
        ] and call.call_id not in ended_early:
            failures.append(f"{call.call_id} ended {ended}")
    assert not failures, f"{len(failures)} failures in {len(ORDERS)} rounds: {failures}"
