"""The embedded targets under load: concurrent calls, hangups in every order, as many
calls as the workers carry, and a killed targets process."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from peers.census import assert_no_leaks, warm_baseline
from peers.gateway import Gateway, free_port, make_config, start_gateway, stop_gateway
from peers.webclient import ClientCall, WebClient

#: One frequency per concurrent call: audio crossing between calls would show.
FREQS = (500, 700, 900, 1100)
#: Every order in which four calls can be hung up.
ORDERS = list(itertools.permutations(range(4)))
#: Rounds in which the echo of every remaining call is measured after each hangup
#: (measuring all of them would take minutes); the events are checked in every round.
MEASURED_ROUNDS = (0, 24, 49)
#: Rounds run: every order at least twice.
ROUNDS = 50


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
    """Four echo calls hung up one at a time, 50 rounds through all 24 orders: every call
    ends by its own hangup (never by a BYE from the target), and the calls still up
    keep echoing their own tone."""
    await wait_for(lambda: gateway.health()["calls_active"] == 0, 10)
    # An earlier test's call hung up before any response keeps its pjsua slot until
    # the INVITE transaction times out (32 s): wait for the four slots a round needs.
    await wait_for(lambda: gateway.health()["call_slots_free"] >= 4, 40)
    failures: list[str] = []
    ended_early: set[str] = set()
    async with WebClient(gateway.url) as client:
        for n in range(ROUNDS):
            order = ORDERS[n % len(ORDERS)]
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
    assert not failures, f"{len(failures)} failures in {ROUNDS} rounds: {failures}"


@pytest.mark.timeout(100)
async def test_as_many_echo_calls_as_the_workers_carry(gateway):
    """2 workers x 4 calls: eight echo calls at once, each hearing its own tone back."""
    await wait_for(lambda: gateway.health()["calls_active"] == 0, 10)
    # A call an earlier test hung up before any response keeps its pjsua slot until
    # the INVITE transaction times out (32 s): wait for every slot.
    await wait_for(lambda: gateway.health()["call_slots_free"] == 8, 40)
    freqs = [400 + 100 * i for i in range(8)]
    async with WebClient(gateway.url) as client:
        calls = await establish_all(client, [f"e{hz}" for hz in freqs], freqs)
        tones = await asyncio.gather(
            *(c.wait_for_tone(hz) for c, hz in zip(calls, freqs, strict=True))
        )
        for call, hz, tone in zip(calls, freqs, tones, strict=True):
            assert abs(tone.hz - hz) <= 10 and tone.rms > 0.02, (call.call_id, tone)
        for call in calls:
            reply = await client.hangup(call.call_id)
            assert (reply["type"], reply["by"]) == ("hangup", "local"), reply
    assert gateway.health()["targets"] == 2


def readyz(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return response.status, dict(json.loads(response.read()))
    except urllib.error.HTTPError as error:
        return error.code, dict(json.loads(error.read()))


@pytest.fixture
def own_gateway(tmp_path) -> Iterator[Gateway]:
    """A gateway of this test's own: its targets get killed (the leak gate checks the rest)."""
    gw = start_gateway(tmp_path, make_config(http_port := free_port()), http_port)
    try:
        gw.wait_ready()
        before = warm_baseline(gw)
        yield gw
        assert_no_leaks(gw, before, what="killing the targets")
    finally:
        stop_gateway(gw)


@pytest.mark.timeout(90)
async def test_killed_targets_end_their_calls_and_restart_on_the_same_port(own_gateway):
    gw = own_gateway
    await wait_for(lambda: readyz(gw.url)[0] == 200, 30)
    before = gw.health()
    assert before["targets_ready"] == before["targets"] == 2, before
    pids_before, addresses = gw.pids("targets"), gw.targets_addresses()
    async with WebClient(gw.url) as client:
        call = await client.establish("doomed", "echo")
        await client.wait_event(call, "accepted")
        tone = await call.wait_for_tone(1000)
        assert abs(tone.hz - 1000) <= 10, tone
        for pid in pids_before:
            os.kill(pid, signal.SIGKILL)
        hangup = await client.wait_event(call, "hangup", timeout=5)
        assert (hangup["code"], hangup["by"]) == (500, "gateway"), hangup
        assert "target" in hangup["reason"], hangup
        status, body = await asyncio.to_thread(readyz, gw.url)
        assert status == 503, body
        assert "targets 0" in body["not_ready"] or "targets 1" in body["not_ready"], body
        await wait_for(lambda: readyz(gw.url)[0] == 200, 30)
        after = gw.health()
        assert after["targets_ready"] == 2, after
        pids_after = gw.pids("targets")
        assert not set(pids_after) & set(pids_before), (pids_before, pids_after)
        call2 = await client.establish("after", "echo", tone_hz=700)
        await client.wait_event(call2, "accepted", timeout=15)
        # Restarted on the ports they had: what {embedded} stood for is still valid.
        placed = re.findall(r"\(after\) to sip:echo@(\S+) on worker", gw.log.read_text())
        assert len(addresses) == 2 and placed and placed[-1] in addresses, (addresses, placed)
        tone = await call2.wait_for_tone(700)
        assert abs(tone.hz - 700) <= 10, tone
        await client.hangup("after")
