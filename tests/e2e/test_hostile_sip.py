"""A stranger on the workers' SIP ports: nothing it sends kills a process or a call."""

from __future__ import annotations

import asyncio
import re

import pytest
from peers.rawsip import SDP, Stranger, corpus, request, status_of
from peers.webclient import WebClient

pytestmark = pytest.mark.timeout(120)


def worker_sip_ports(gateway) -> list[int]:
    """The workers' SIP ports, from the gateway's start-up log line."""
    match = re.search(r"workers ready \(SIP ports ([0-9, ]+)\)", gateway.log.read_text())
    assert match, "no 'workers ready' line in the gateway log"
    return [int(p) for p in match.group(1).split(", ")]


def worker_of_call(gateway, call_id: str) -> int:
    match = re.findall(rf"\({re.escape(call_id)}\) to \S+ on worker (\d+)", gateway.log.read_text())
    assert match, f"call {call_id} not in the gateway log"
    return int(match[-1])


async def throw(port: int, cases: list[tuple[str, bytes]]) -> dict[str, list[int]]:
    """Send each case from its own socket; the status codes each one got back."""
    strangers = [Stranger() for _ in cases]
    try:
        for stranger, (_, data) in zip(strangers, cases, strict=True):
            stranger.send(data, port)
        replies = await asyncio.gather(*(s.responses(quiet=0.6) for s in strangers))
    finally:
        for stranger in strangers:
            stranger.close()
    return {
        name: [status_of(r) for r in got] for (name, _), got in zip(cases, replies, strict=True)
    }


async def test_hostile_sip_at_every_worker_port_kills_nothing(gateway):
    ports = worker_sip_ports(gateway)
    pids = gateway.pids()
    async with WebClient(gateway.url) as client:
        call = await client.establish("survivor", "echo", tone_hz=700)
        await client.wait_event(call, "accepted")
        for port in ports:
            target = f"sip:anyone@127.0.0.1:{port}"
            # Via carries ;rport, so replies go to each stranger's own socket.
            got = await throw(port, corpus(9, target))
            # Delayed offers (no SDP) and offers alike are refused before any media.
            for name in ("invite-no-body", "invite-no-content-length", "invite-tel-uri"):
                assert got[name] == [480], (port, name, got[name])
            assert got["invite-with-sdp"] == [480]
            assert got["options"] == [200]
            for name in ("message", "subscribe", "register", "unknown-method", "refer"):
                assert got[name] == [405], (port, name, got[name])
            assert got["bye-no-dialog"] == [481]
            for name in ("stray-200", "stray-180", "stray-487-no-via", "ack-no-transaction"):
                assert got[name] == [], (port, name, got[name])
            assert not any(code >= 600 or code == 500 for codes in got.values() for code in codes)
        # The embedded targets are SIP ports of the gateway too (they answer INVITEs).
        target_pids = gateway.pids("targets")
        for address in gateway.targets_addresses():
            port = int(address.rsplit(":", 1)[1])
            got = await throw(port, corpus(9, f"sip:nobody@{address}"))
            assert got["options"] == [200]
            assert got["unknown-method"] == [405]
            for name in ("stray-200", "stray-180", "stray-487-no-via"):
                assert got[name] == [], (port, name, got[name])
            # Delayed offers to an unknown target: refused (404) outside pjsua's callback.
            assert 404 in got["invite-no-body"], got["invite-no-body"]
        assert gateway.pids("targets") == target_pids
        # Every process lives, and the call that was up still carries its audio.
        assert gateway.pids() == pids
        assert gateway.health()["workers_ready"] == len(ports)
        tone = await call.wait_for_tone(700)
        assert abs(tone.hz - 700) <= 10 and tone.rms > 0.02, tone
        await client.hangup("survivor")
        after = await client.establish("after", "echo", tone_hz=900)
        await client.wait_event(after, "accepted")
        tone = await after.wait_for_tone(900)
        assert abs(tone.hz - 900) <= 10 and tone.rms > 0.02, tone
        await client.hangup("after")


async def test_a_flood_of_invites_leaves_the_call_on_that_worker_intact(gateway):
    """1000 INVITEs with SDP at 500/s at the worker carrying a call with a tone."""
    ports = worker_sip_ports(gateway)
    pids = gateway.pids()
    async with WebClient(gateway.url) as client:
        call = await client.establish("flooded", "echo", tone_hz=1100)
        await client.wait_event(call, "accepted")
        tone = await call.wait_for_tone(1100)
        assert abs(tone.hz - 1100) <= 10, tone
        port = ports[worker_of_call(gateway, "flooded")]
        stranger = Stranger()
        answers: list[int] = []

        async def collect() -> None:
            loop = asyncio.get_running_loop()
            while True:
                answers.append(status_of(await loop.sock_recv(stranger.sock, 65536)))

        collector = asyncio.create_task(collect())
        tones = []
        try:
            target = f"sip:flood@127.0.0.1:{port}"
            for i in range(1000):
                stranger.send(request("INVITE", target, stranger.port, body=SDP), port)
                if i % 10 == 9:
                    await asyncio.sleep(0.02)  # 10 every 20 ms: 500 a second
                if i % 250 == 249:
                    tones.append(call.measure(0.5))
            await asyncio.sleep(1.0)
            tones.append(call.measure(0.5))
        finally:
            collector.cancel()
            stranger.close()
        assert gateway.pids() == pids
        assert len(answers) >= 990 and set(answers) == {480}, (len(answers), set(answers))
        for measured in tones:  # the tone held throughout the flood
            assert abs(measured.hz - 1100) <= 10 and measured.rms > 0.02, tones
        await client.hangup("flooded")
