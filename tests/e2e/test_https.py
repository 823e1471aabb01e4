"""HTTPS and WSS served by the gateway itself, X-Forwarded-For from trusted proxies only,
and a bearer token on ``/metrics``.

The certificate is self-signed for 127.0.0.1, made here; the clients trust it
and nothing else, so a plain-HTTP or unverified connection would fail.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from peers.gateway import Gateway, free_port, make_config, start_gateway, stop_gateway
from peers.webclient import WebClient

pytestmark = pytest.mark.timeout(120)

METRICS_TOKEN = "metrics-0123456789abcdef"
PER_ADDRESS = 2


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("https")
    cert, key = self_signed(tmp)
    port = free_port()
    settings = {
        "http": {
            "tls_cert": str(cert),
            "tls_key": str(key),
            "trusted_proxies": ["127.0.0.1"],
            "max_connections_per_ip": PER_ADDRESS,
            "metrics_token": METRICS_TOKEN,
        }
    }
    gw = start_gateway(tmp, make_config(port, settings=settings), http_port=port)
    gw.url = f"https://127.0.0.1:{port}"
    gw.ssl_context = ssl.create_default_context(cafile=str(cert))
    try:
        gw.wait_ready()
        yield gw
    finally:
        stop_gateway(gw)


async def test_a_call_over_wss(tls_gateway):
    async with WebClient(tls_gateway.url, ssl_context=tls_gateway.ssl_context) as client:
        call = await client.establish("c1", "tone")
        accepted = await client.wait_event(call, ("accepted", "hangup"), timeout=15)
        assert accepted["type"] == "accepted", accepted
        tone = await call.wait_for_tone(1000.0)
        assert abs(tone.hz - 1000.0) <= 10, tone
        await client.hangup("c1")


def test_plain_http_and_untrusted_certificates_are_refused(tls_gateway):
    plain = tls_gateway.url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"{plain}/healthz", timeout=2).read()
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"{tls_gateway.url}/healthz", timeout=2)


def test_metrics_want_the_bearer_token(tls_gateway):
    url, context = f"{tls_gateway.url}/metrics", tls_gateway.ssl_context
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=2, context=context)
    assert refused.value.code == 401
    wrong = urllib.request.Request(url, headers={"Authorization": "Bearer nope"})
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(wrong, timeout=2, context=context)
    right = urllib.request.Request(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    with urllib.request.urlopen(right, timeout=2, context=context) as response:
        assert b"sipgw_calls_started_total" in response.read()


async def upgrade_status(gw: Gateway, session: aiohttp.ClientSession, forwarded: str) -> int:
    try:
        ws = await session.ws_connect(
            f"{gw.url}/ws", ssl=gw.ssl_context, headers={"X-Forwarded-For": forwarded}
        )
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    sockets.append(ws)
    return 101


sockets: list[aiohttp.ClientWebSocketResponse] = []


async def test_forwarded_for_from_a_trusted_proxy_is_the_address_that_counts(tls_gateway):
    """The test connects from 127.0.0.1, a trusted proxy here: each forwarded client
    gets its own per-address quota, and a forged entry left of the proxy's own
    does not buy a new one."""
    async with aiohttp.ClientSession() as session:
        try:
            a, b = "198.51.100.7", "198.51.100.8"
            assert [await upgrade_status(tls_gateway, session, a) for _ in range(2)] == [101, 101]
            assert await upgrade_status(tls_gateway, session, a) == 429
            assert await upgrade_status(tls_gateway, session, f"203.0.113.9, {a}") == 429
            assert await upgrade_status(tls_gateway, session, b) == 101
            assert await upgrade_status(tls_gateway, session, "not-an-address") == 101
        finally:
            for ws in sockets:
                await ws.close()
            sockets.clear()
