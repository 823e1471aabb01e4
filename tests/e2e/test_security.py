"""Who may use the WebSocket, against a real gateway with ``[auth]`` on.

A token matrix (only a valid token may call; the sipp phone sees no INVITE for
any other), the ``Origin`` allow-list and the per-address cap at the upgrade
(403, 429: no WebSocket exists), the per-connection message rate limit (the
connection and its call survive), the ``dial`` and ``max_calls`` claims,
``sipgw token``, and what the HTTP side no longer says (``Server``, pids).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from peers.gateway import ROOT, Gateway, free_port, make_config, start_gateway, stop_gateway
from peers.sipp import SippPhone
from peers.webclient import WebClient

pytestmark = pytest.mark.timeout(120)

SECRET = "e2e-secret-0123456789abcdef0123456789abcdef"
AUDIENCE = "sipgw-e2e"
MAX_TTL = 600
MESSAGES_PER_SECOND = 20
CONNECTIONS_PER_IP = 6
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def auth_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with tokens on, on loopback (as behind a reverse proxy), tight limits."""
    port = free_port()
    config = make_config(
        port,
        settings={
            "http": {
                "max_messages_per_second": MESSAGES_PER_SECOND,
                "max_connections_per_ip": CONNECTIONS_PER_IP,
            },
            "auth": {
                "enabled": True,
                "secret": SECRET,
                "audience": AUDIENCE,
                "max_ttl": MAX_TTL,
            },
        },
    )
    gw = start_gateway(tmp_path_factory.mktemp("auth-gateway"), config, port)
    try:
        gw.wait_ready()
        yield gw
    finally:
        stop_gateway(gw)


def own_origin(gateway: Gateway) -> str:
    return gateway.url  # http://127.0.0.1:PORT, what the page it serves sends


def token(**changes: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "alice", "aud": AUDIENCE, "iat": now, "exp": now + 300}
    claims.update(changes)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, SECRET, "HS256")


def unsigned_token() -> str:
    def part(data: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {"sub": "mallory", "aud": AUDIENCE, "iat": now, "exp": now + 300}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def mint_with_cli(gateway: Gateway, *args: str) -> str:
    """``sipgw token`` with the gateway's own configuration file."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "token", *args, "--config", str(config_of(gateway))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def config_of(gateway: Gateway) -> Path:
    return gateway.log.parent / "gateway.toml"


async def an_offer() -> str:
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


async def refused_at_once(
    gateway: Gateway, first: dict[str, Any], then: dict[str, Any]
) -> tuple[list[dict[str, Any]], int | None]:
    """Send ``first`` and, without waiting, ``then``; everything received until the close."""
    received: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{gateway.url}/ws", origin=own_origin(gateway))
        await ws.send_str(json.dumps(first))
        await ws.send_str(json.dumps(then))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            frame = await ws.receive(timeout=10)
            if frame.type != aiohttp.WSMsgType.TEXT:
                break
            received.append(json.loads(frame.data))
        return received, ws.close_code


def bad_tokens() -> list[tuple[str, str | None, str]]:
    now = int(time.time())
    other_rsa = rsa.generate_private_key(65537, 2048)
    return [
        ("expired", token(iat=now - 400, exp=now - 60), "expired"),
        ("too-long-lived", token(exp=now + MAX_TTL + 60), "longer than"),
        ("not-yet-valid", token(nbf=now + 120), "not valid yet"),
        (
            "bad-signature",
            jwt.encode(
                {"sub": "alice", "aud": AUDIENCE, "exp": now + 300},
                "not-the-gateway-secret-0123456789abcdef",
                "HS256",
            ),
            "signature",
        ),
        ("alg-none", unsigned_token(), "algorithm"),
        (
            "rs256-against-hs256",
            jwt.encode({"sub": "alice", "aud": AUDIENCE, "exp": now + 300}, other_rsa, "RS256"),
            "algorithm",
        ),
        ("wrong-aud", token(aud="another-gateway"), "aud"),
        ("missing-sub", token(sub=None), "sub"),
        ("missing-token", None, "hello with a token"),
    ]


async def test_only_a_valid_token_may_call(auth_gateway, tmp_path):
    gateway = auth_gateway
    offer = await an_offer()
    single_use = token(jti="e2e-once")
    async with SippPhone("echo", tmp_path) as phone:
        call = {"type": "call", "call": "c1", "to": f"sipp{phone.port}", "sdp": offer}
        cases = [
            (name, {"type": "hello", "id": "h1", "token": t}, w) for name, t, w in bad_tokens()
        ]
        for case in cases:
            if case[1]["token"] is None:
                del case[1]["token"]
        cases.append(("call-first", {**call, "id": "h1"}, "hello with a token"))
        cases.append(("ping-first", {"type": "ping", "id": "h1"}, "hello with a token"))
        cases.append(("not-json-first", "nonsense", "hello with a token"))  # type: ignore[arg-type]

        # A single-use token works once ...
        async with WebClient(gateway.url, origin=own_origin(gateway)) as first:
            welcome = await first.request({"type": "hello", "token": single_use})
            assert (welcome["type"], welcome["user"]) == ("welcome", "alice"), welcome
        # ... and never again.
        cases.append(("reused-jti", {"type": "hello", "id": "h1", "token": single_use}, "used"))

        for name, first_message, words in cases:
            if isinstance(first_message, str):
                async with aiohttp.ClientSession() as session:
                    ws = await session.ws_connect(f"{gateway.url}/ws", origin=own_origin(gateway))
                    await ws.send_str(first_message)
                    await ws.send_str(json.dumps(call))
                    received = []
                    while (frame := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
                        received.append(json.loads(frame.data))
                    code = ws.close_code
            else:
                received, code = await refused_at_once(gateway, first_message, call)
            assert len(received) == 1, (name, received)
            (error,) = received
            assert (error["type"], error["code"]) == ("error", "unauthorized"), (name, error)
            assert words in error["message"], (name, error)
            assert "Error" not in error["message"], (name, error)  # no exception text
            if not isinstance(first_message, str):
                assert error.get("id") == "h1", (name, error)
            assert code == aiohttp.WSCloseCode.POLICY_VIOLATION, (name, code)

        await asyncio.sleep(1.0)  # an INVITE, had one been sent, would have arrived
        assert (await phone.report()).invites == 0
        assert "sipgw_calls_started_total 0.0" in gateway.metrics()

        # The valid token (minted by `sipgw token`) calls the phone.
        valid = mint_with_cli(gateway, "--sub", "alice", "--ttl", "300")
        async with WebClient(gateway.url, origin=own_origin(gateway)) as client:
            welcome = await client.request({"type": "hello", "token": valid})
            assert welcome["type"] == "welcome" and welcome["user"] == "alice", welcome
            placed = await client.establish("c1", f"sipp{phone.port}")
            await client.wait_event(placed, "accepted")
            await client.hangup("c1")
        report = await phone.wait_for(lambda r: r.byes == 1, timeout=10)
        assert report.invites == 1
    refused = 'sipgw_websockets_refused_total{reason="unauthorized"}'
    assert f"{refused} {float(len(cases))}" in gateway.metrics()


def test_sipgw_token_mints_what_the_configuration_verifies(auth_gateway):
    minted = mint_with_cli(
        auth_gateway, "--sub", "bob", "--ttl", "120", "--dial", "echo", "--dial", "tone"
    )
    claims = jwt.decode(minted, SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert claims["sub"] == "bob"
    assert claims["dial"] == ["echo", "tone"]
    assert claims["exp"] - claims["iat"] == 120
    assert abs(claims["iat"] - time.time()) < 30
    assert jwt.get_unverified_header(minted)["alg"] == "HS256"
    once = jwt.decode(
        mint_with_cli(auth_gateway, "--sub", "bob", "--single-use", "--max-calls", "1"),
        SECRET,
        algorithms=["HS256"],
        audience=AUDIENCE,
    )
    assert once["jti"] and once["max_calls"] == 1
    too_long = subprocess.run(
        [
            *(sys.executable, "-m", "gateway", "token", "--sub", "x"),
            *("--ttl", str(MAX_TTL + 1), "--config", str(config_of(auth_gateway))),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
    )
    assert too_long.returncode == 2 and "auth.max_ttl" in too_long.stderr, too_long.stderr
    no_secret = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "--sub", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
    )
    assert no_secret.returncode == 2 and "auth.secret" in no_secret.stderr, no_secret.stderr


async def test_the_dial_and_max_calls_claims_narrow_what_a_token_may_do(auth_gateway, tmp_path):
    gateway = auth_gateway
    async with (
        SippPhone("echo", tmp_path) as phone,
        WebClient(gateway.url, origin=own_origin(gateway)) as client,
    ):
        welcome = await client.request(
            {"type": "hello", "token": token(sub="carol", dial=["echo"], max_calls=1)}
        )
        assert welcome["user"] == "carol"
        await client.call("c1", f"sipp{phone.port}")
        refused = await client.wait_message(lambda m: m.get("call") == "c1")
        assert (refused["type"], refused["code"]) == ("error", "forbidden"), refused
        assert "token" in refused["message"], refused
        await client.call("c2", "tone")  # a rule the token does not name
        refused = await client.wait_message(lambda m: m.get("call") == "c2")
        assert refused["code"] == "forbidden", refused
        call = await client.establish("c3", "echo")  # the rule it names
        await client.wait_event(call, "accepted")
        await client.call("c4", "echo")  # one call at a time
        busy = await client.wait_message(lambda m: m.get("call") == "c4")
        assert (busy["type"], busy["code"]) == ("error", "busy"), busy
        await client.hangup("c3")
        await asyncio.sleep(0.5)
        assert (await phone.report()).invites == 0
    metrics = gateway.metrics()
    assert 'sipgw_call_outcomes_total{outcome="token_dial"} 2.0' in metrics
    assert 'sipgw_call_outcomes_total{outcome="token_call_limit"} 1.0' in metrics


async def test_the_message_rate_limit_trips_and_the_connection_and_call_survive(auth_gateway):
    gateway = auth_gateway
    async with WebClient(gateway.url, origin=own_origin(gateway)) as client:
        await client.request({"type": "hello", "token": token(sub="dave")})
        call = await client.establish("c1", "echo", tone_hz=1000)
        await client.wait_event(call, "accepted")
        await asyncio.sleep(1.1)  # a fresh one-second window
        start = len(client.messages)
        for i in range(3 * MESSAGES_PER_SECOND):
            await client.send({"type": "ping", "id": f"p{i}"})
        await client.wait_message(
            lambda m: len(client.messages) - start >= 3 * MESSAGES_PER_SECOND, 10, start
        )
        burst = client.messages[start:]
        pongs = [m for m in burst if m["type"] == "pong"]
        limited = [m for m in burst if m.get("code") == "rate_limited"]
        assert len(pongs) <= MESSAGES_PER_SECOND, len(pongs)
        assert len(limited) >= MESSAGES_PER_SECOND, len(limited)
        assert len(pongs) + len(limited) == 3 * MESSAGES_PER_SECOND, burst
        assert all(m["type"] == "error" and "id" not in m for m in limited), limited[:3]
        await asyncio.sleep(1.1)
        assert (await client.request({"type": "ping"}))["type"] == "pong"
        tone = await call.wait_for_tone(1000)
        assert abs(tone.hz - 1000) <= 10, tone
        assert not [m for m in client.messages if m.get("call") == "c1" and m["type"] == "hangup"]
        await client.hangup("c1")
    assert "sipgw_messages_rate_limited_total" in gateway.metrics()


async def handshake(gateway: Gateway, origin: str | None) -> int:
    """The upgrade's status: 101 if a WebSocket opened (then closed at once), else the refusal."""
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(f"{gateway.url}/ws", origin=origin)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


async def test_origin_matrix_with_auth_on(auth_gateway):
    gateway = auth_gateway
    port = gateway.url.rsplit(":", 1)[1]
    assert await handshake(gateway, own_origin(gateway)) == 101
    assert await handshake(gateway, f"http://localhost:{port}") == 403  # Host says 127.0.0.1
    assert await handshake(gateway, "http://evil.example") == 403
    assert await handshake(gateway, "null") == 403
    assert await handshake(gateway, None) == 403  # not a browser: refused with auth on
    assert 'sipgw_websockets_refused_total{reason="origin"} 4.0' in gateway.metrics()


async def test_origin_matrix_with_auth_off(gateway):
    port = gateway.url.rsplit(":", 1)[1]
    assert await handshake(gateway, gateway.url) == 101
    assert await handshake(gateway, f"https://127.0.0.1:{port}") == 101  # behind TLS
    assert await handshake(gateway, f"http://127.0.0.1:{int(port) + 1}") == 403
    assert await handshake(gateway, "http://evil.example") == 403
    assert await handshake(gateway, None) == 101  # a program, not a browser: no Origin


async def test_connections_per_address_are_capped_and_unauthenticated_ones_time_out(
    auth_gateway,
):
    gateway = auth_gateway
    deadline = time.monotonic() + 10
    while "sipgw_websockets_active 0.0" not in gateway.metrics():
        assert time.monotonic() < deadline, "connections of earlier tests are still open"
        await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as session:
        sockets = [
            await session.ws_connect(f"{gateway.url}/ws", origin=own_origin(gateway))
            for _ in range(CONNECTIONS_PER_IP)
        ]
        started = time.monotonic()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{gateway.url}/ws", origin=own_origin(gateway))
        assert refused.value.status == 429
        await sockets.pop().close()
        await asyncio.sleep(0.2)
        sockets.append(await session.ws_connect(f"{gateway.url}/ws", origin=own_origin(gateway)))
        # None of them sent a hello: each is told so and closed after 10 s.
        for ws in sockets:
            frame = await ws.receive(timeout=15)
            assert frame.type == aiohttp.WSMsgType.TEXT, frame
            error = json.loads(frame.data)
            assert error["code"] == "unauthorized" and "within 10 s" in error["message"], error
            frame = await ws.receive(timeout=5)
            assert frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), frame
            assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
        assert 9.5 < time.monotonic() - started < 14
    assert 'sipgw_websockets_refused_total{reason="address_limit"} 1.0' in gateway.metrics()


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_http_side_names_no_library_version_and_no_pid(gateway):
    for path in ("/", "/healthz", "/readyz", "/metrics", "/debug/census", "/no-such-page", "/ws"):
        status, headers, _ = get(f"{gateway.url}{path}")
        assert headers.get("Server") == "sipgw", (path, status, headers)
    status, _, body = get(f"{gateway.url}/healthz")
    health = json.loads(body)
    assert status == 200
    assert set(health) == {
        "workers_ready",
        "workers",
        "calls_active",
        "call_slots_free",
        "targets_ready",
        "targets",
    }, health
    assert not any("pid" in key or "address" in key for key in health)
