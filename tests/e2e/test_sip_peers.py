"""sip.trusted_peers: new requests from other addresses get no response; peers still work."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from aiortc import RTCSessionDescription
from e2e.test_hostile_sip import worker_sip_ports
from peers.gateway import Gateway, free_port, make_config, start_gateway, stop_gateway
from peers.rawsip import SDP, Stranger, request, status_of
from peers.webclient import WebClient

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def peers_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    port = free_port()
    config = make_config(
        port,
        workers=1,
        settings={
            "sip": {"trusted_peers": ["127.0.0.1/32"]},
            "webrtc": {"ice_addresses": ["127.0.0.1"]},
        },
    )
    gw = start_gateway(tmp_path_factory.mktemp("peers-gateway"), config, port)
    try:
        gw.wait_ready(workers=1)
        yield gw
    finally:
        stop_gateway(gw)


async def ask(host: str, port: int, method: str, body: str = "") -> list[int]:
    stranger = Stranger(host=host)
    try:
        target = f"sip:anyone@127.0.0.1:{port}"
        stranger.send(request(method, target, stranger.port, body=body), port)
        return [status_of(r) for r in await stranger.responses(quiet=0.8)]
    finally:
        stranger.close()


async def test_strangers_get_nothing_trusted_peer_is_answered(peers_gateway):
    (port,) = worker_sip_ports(peers_gateway)
    # The stranger's Via names 127.0.0.1 but rport sends replies to its real socket.
    for method, body in (("OPTIONS", ""), ("INVITE", SDP), ("MESSAGE", ""), ("REFER", "")):
        assert await ask("127.0.0.2", port, method, body) == [], method
    assert await ask("127.0.0.1", port, "OPTIONS") == [200]
    assert await ask("127.0.0.1", port, "MESSAGE") == [405]
    # Calls through the trusted embedded targets still connect and carry audio.
    async with WebClient(peers_gateway.url) as client:
        call = await client.call("trusted", "echo", tone_hz=700)
        answer = await client.wait_event(call, ("answer", "error", "hangup"))
        assert answer["type"] == "answer", answer
        # Say less: the answer offers only the configured ICE address.
        candidates = re.findall(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) ", answer["sdp"], re.M)
        assert candidates and set(candidates) == {"127.0.0.1"}, candidates
        await call.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        await client.wait_event(call, "accepted")
        tone = await call.wait_for_tone(700)
        assert abs(tone.hz - 700) <= 10 and tone.rms > 0.02, tone


async def test_untrusted_answer_403(tmp_path):
    port = free_port()
    settings = {"sip": {"trusted_peers": ["127.0.0.1"], "untrusted_answer": 403}}
    gw = start_gateway(tmp_path, make_config(port, workers=1, settings=settings), port)
    try:
        gw.wait_ready(workers=1)
        (sip_port,) = worker_sip_ports(gw)
        assert await ask("127.0.0.3", sip_port, "OPTIONS") == [403]
        assert await ask("127.0.0.3", sip_port, "INVITE", SDP) == [403]
        assert await ask("127.0.0.1", sip_port, "OPTIONS") == [200]
    finally:
        stop_gateway(gw)


async def test_by_default_only_the_configured_targets_are_answered(tmp_path):
    """No ``trusted_peers`` set: the targets' hosts (here all 127.0.0.1) are trusted,
    a stranger on 127.0.0.2 gets nothing; ``0.0.0.0/0`` lets everyone in again."""
    port = free_port()
    gw = start_gateway(tmp_path, make_config(port, workers=1), port)
    try:
        gw.wait_ready(workers=1)
        assert "SIP requests admitted from 127.0.0.1/32" in gw.log.read_text()
        (sip_port,) = worker_sip_ports(gw)
        for method, body in (("OPTIONS", ""), ("INVITE", SDP)):
            assert await ask("127.0.0.2", sip_port, method, body) == [], method
        assert await ask("127.0.0.1", sip_port, "OPTIONS") == [200]
    finally:
        stop_gateway(gw)
    port = free_port()
    anyone = {"sip": {"trusted_peers": ["0.0.0.0/0", "::/0"]}}
    gw = start_gateway(tmp_path, make_config(port, workers=1, settings=anyone), port)
    try:
        gw.wait_ready(workers=1)
        (sip_port,) = worker_sip_ports(gw)
        assert await ask("127.0.0.2", sip_port, "OPTIONS") == [200]
    finally:
        stop_gateway(gw)
