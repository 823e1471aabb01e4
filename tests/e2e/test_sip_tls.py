"""SIP over TLS with certificate checks, and SDES-SRTP, between the gateway and a phone.

Everything is made here on loopback: a test CA, the phone's certificate for
127.0.0.1, the gateway's client certificate, and the bad ones (a certificate
from a CA the gateway does not trust, one for another name). The phone is the
pjsua2 peer (:mod:`peers.pjsua_phone`) listening on TLS, as a PBX's TLS port;
the browser is the aiortc client. One gateway serves every test::

    [sip]
    transport = "tls"
    tls_ca = "<test CA>"        # tls_verify = true by default
    tls_cert = "<gateway cert>" # shown to the phone, which asks for one
    tls_key = "<gateway key>"
    srtp = "mandatory"

It dials ``sipp<port>`` as ``sip:phone@127.0.0.1:<port>;transport=tls``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers.certs import Issued, TestCa
from peers.gateway import Gateway, free_port, make_config, start_gateway, stop_gateway
from peers.kamailio import Kamailio
from peers.pjsua_phone import PhoneTls, PjsuaPhone
from peers.rawsip import SDP, request, status_of
from peers.webclient import WebClient
from test_register import PBX_RULE, USERS, caller, registered

pytestmark = pytest.mark.timeout(90)

PHONE_HZ = 700
BROWSER_HZ = 1000
MIN_RMS = 0.03


class Pki:
    """The certificates of the tests."""

    def __init__(self, tmp: Path) -> None:
        self.ca = TestCa.create(tmp, "sipgw test CA")
        self.phone = self.ca.issue(tmp, "phone", ip="127.0.0.1")
        self.gateway = self.ca.issue(tmp, "gateway", ip="127.0.0.1")
        #: Valid and from the trusted CA, but for another name than 127.0.0.1.
        self.wrong_name = self.ca.issue(tmp, "pbx", dns="pbx.example.org")
        #: Right name, but from a CA the gateway was not given.
        self.rogue_ca = TestCa.create(tmp, "rogue CA")
        self.rogue = self.rogue_ca.issue(tmp, "rogue phone", ip="127.0.0.1")

    def sip(self, **extra: object) -> dict[str, object]:
        """The gateway's ``[sip]`` for TLS: this CA, its own certificate (shown to a
        phone that asks, and on its TLS port), then ``extra``."""
        return {
            "transport": "tls",
            "tls_ca": str(self.ca.cert),
            "tls_cert": str(self.gateway.cert),
            "tls_key": str(self.gateway.key),
            **extra,
        }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("sip-tls")
    port = free_port()
    sip = pki.sip(srtp="mandatory")
    gw = start_gateway(tmp, make_config(port, workers=1, settings={"sip": sip}), http_port=port)
    try:
        gw.wait_ready(workers=1)
        yield gw
    finally:
        stop_gateway(gw)


def phone_tls(cert: Issued, client_ca: Path | None = None) -> PhoneTls:
    return PhoneTls(str(cert.cert), str(cert.key), str(client_ca) if client_ca else "")


async def test_a_call_over_tls_with_srtp_carries_audio_both_ways(tls_gateway, pki, tmp_path):
    # The phone also wants the gateway's client certificate (mutual TLS).
    tls = phone_tls(pki.phone, client_ca=pki.ca.cert)
    async with (
        PjsuaPhone(tmp_path, tone_hz=PHONE_HZ, tls=tls, srtp="mandatory") as phone,
        WebClient(tls_gateway.url) as client,
    ):
        call = await client.establish("tls", f"sipp{phone.tls_port}", tone_hz=BROWSER_HZ)
        accepted = await client.wait_event(call, ("accepted", "hangup"), timeout=15)
        assert accepted["type"] == "accepted", accepted
        incoming = await phone.wait_event("incoming")
        assert incoming["transport"] == "TLS", incoming
        offer = incoming["remote_sdp"]
        assert offer["proto"] == "RTP/SAVP" and offer["crypto"], offer
        media = await phone.wait_confirmed()
        assert media.status == "ACTIVE", media.raw
        assert media.srtp.startswith("Active"), media.raw
        assert media.raw["local_sdp"]["proto"] == "RTP/SAVP", media.raw

        heard_by_browser = await call.wait_for_tone(PHONE_HZ, 8.0, min_rms=MIN_RMS)
        heard_by_phone = await phone.wait_for_tone(BROWSER_HZ, 8.0, min_rms=MIN_RMS)
        assert abs(heard_by_browser.hz - PHONE_HZ) <= 10, heard_by_browser
        assert heard_by_browser.rms > MIN_RMS, heard_by_browser
        assert abs(heard_by_phone.hz - BROWSER_HZ) <= 10, heard_by_phone
        assert heard_by_phone.rms > MIN_RMS, heard_by_phone

        reply = await client.hangup("tls")
        assert (reply["type"], reply["by"]) == ("hangup", "local"), reply
        bye = await phone.wait_disconnected()
        assert bye["code"] == 200, bye


async def test_the_embedded_targets_stay_on_loopback_udp_without_srtp(tls_gateway):
    async with WebClient(tls_gateway.url) as client:
        call = await client.establish("tone", "tone")
        accepted = await client.wait_event(call, ("accepted", "hangup"), timeout=15)
        assert accepted["type"] == "accepted", accepted
        tone = await call.wait_for_tone(1000.0, 8.0, min_rms=MIN_RMS)
        assert abs(tone.hz - 1000.0) <= 10 and tone.rms > MIN_RMS, tone
        await client.hangup("tone")


async def failed_call(gateway: Gateway, phone: PjsuaPhone, call_id: str) -> dict[str, object]:
    """Call the phone's TLS port; the ``hangup`` the browser gets (no answer expected)."""
    async with WebClient(gateway.url) as client:
        call = await client.establish(call_id, f"sipp{phone.tls_port}", tone_hz=BROWSER_HZ)
        return await client.wait_event(call, ("accepted", "hangup"), timeout=15)


def finished_log(phone: PjsuaPhone) -> str:
    """The pjsip log of a phone that has quit (pjsua writes it out only then)."""
    log = phone.log_path.read_text(errors="replace")
    assert "PJSUA destroyed" in log, f"the phone's log is not complete:\n{log[-2000:]}"
    return log


@pytest.mark.parametrize(
    "which",
    ["rogue", "wrong_name"],
    ids=["certificate-from-an-untrusted-ca", "certificate-for-another-name"],
)
async def test_a_phone_certificate_that_fails_verification_gets_no_invite(
    tls_gateway, pki, tmp_path, which
):
    cert = getattr(pki, which)
    async with PjsuaPhone(tmp_path, tls=phone_tls(cert), srtp="mandatory") as phone:
        hangup = await failed_call(tls_gateway, phone, which)
        assert hangup["type"] == "hangup", hangup
        assert (hangup["code"], hangup["by"], hangup["outcome"]) == (503, "gateway", "tls_failed")
        assert "certificate verification" in str(hangup["reason"]), hangup
    log = finished_log(phone)
    # The gateway did connect (and checked the certificate), then sent nothing.
    assert "got incoming TLS connection" in log, log[-3000:]
    assert "Request msg INVITE" not in log, log[-3000:]
    assert not [e for e in phone.events if e.get("event") in ("incoming", "state")], phone.events


async def test_mandatory_srtp_against_a_phone_without_srtp_fails_with_488(
    tls_gateway, pki, tmp_path
):
    async with PjsuaPhone(tmp_path, tls=phone_tls(pki.phone), srtp="off") as phone:
        hangup = await failed_call(tls_gateway, phone, "plain-rtp")
        assert hangup["type"] == "hangup", hangup
        assert (hangup["code"], hangup["by"], hangup["outcome"]) == (488, "remote", "remote_reject")
    # pjsua refuses an offer it cannot take before telling the application (no
    # "incoming" event): its log shows the offer that came over TLS, and the 488.
    log = finished_log(phone)
    assert re.search(r"RX \d+ bytes Request msg INVITE/.* from TLS 127\.0\.0\.1:", log), log
    assert re.search(r"m=audio \d+ RTP/SAVP ", log), log
    assert re.search(r"TX \d+ bytes Response msg 488/INVITE/", log), log


async def test_without_verification_the_untrusted_certificate_is_taken_and_logged(
    tmp_path_factory, pki, tmp_path
):
    """The control of the two tests above: the same phone, tls_verify = false."""
    tmp = tmp_path_factory.mktemp("sip-tls-unverified")
    port = free_port()
    sip = {"transport": "tls", "tls_verify": False, "srtp": "mandatory"}
    gw = start_gateway(tmp, make_config(port, workers=1, settings={"sip": sip}), http_port=port)
    try:
        gw.wait_ready(workers=1)
        assert "sip.tls_verify = false: the PBX's certificate is not checked" in gw.log.read_text()
        async with (
            PjsuaPhone(tmp_path, tls=phone_tls(pki.rogue), srtp="mandatory") as phone,
            WebClient(gw.url) as client,
        ):
            call = await client.establish("unverified", f"sipp{phone.tls_port}")
            accepted = await client.wait_event(call, ("accepted", "hangup"), timeout=15)
            assert accepted["type"] == "accepted", accepted
            media = await phone.wait_confirmed()
            assert media.srtp.startswith("Active"), media.raw
            await client.hangup("unverified")
            await phone.wait_disconnected()
    finally:
        stop_gateway(gw)


async def test_registration_and_calls_both_ways_through_a_tls_registrar(pki, tmp_path):
    """The browser as extension 1001 of a PBX reached over TLS only (Kamailio's TLS
    socket): its REGISTER, its call to 1002 and 1002's call to it all travel over
    TLS between the gateway and the PBX; the phone 1002 is on the PBX's UDP side."""
    async with Kamailio(tmp_path, USERS, tls=pki.phone) as kam:
        port = free_port()
        settings: dict[str, dict[str, object]] = {
            # Kamailio reaches the registered contact on the worker's TLS port,
            # where the worker shows its certificate.
            "sip": pki.sip(),
            "registrar": {"uri": kam.registrar_tls, "domain": kam.realm},
        }
        text = make_config(port, workers=1, settings=settings) + PBX_RULE
        gw = await asyncio.to_thread(start_gateway, tmp_path, text, http_port=port)
        try:
            await asyncio.to_thread(gw.wait_ready, workers=1)
            async with WebClient(gw.url) as client, caller(tmp_path, kam) as phone:
                await registered(client)
                log = kam.log()
                assert log.replies("REGISTER", "1001") == [401, 200]
                assert {m.proto for m in log.received("REGISTER", "1001")} == {"tls"}, log
                contacts = await kam.contacts("1001")
                assert [";transport=tls" in c.uri.lower() for c in contacts] == [True], contacts

                # 1002 calls the browser: Kamailio brings the INVITE over TLS.
                await phone.call(f"sip:1001@{kam.realm}")
                incoming = await client.wait_message(lambda m: m["type"] == "incoming", 10)
                call = await client.accept(incoming, tone_hz=BROWSER_HZ)
                accepted = await client.wait_event(call, ("accepted", "hangup"), 10)
                assert accepted["type"] == "accepted", accepted
                await phone.wait_confirmed()
                await tones_both_ways(call, phone)
                invites = kam.log().forwarded("INVITE", "1001")
                assert invites and {m.proto for m in invites} == {"tls"}, invites
                await client.hangup(call.call_id)
                await phone.wait_disconnected()

                # The browser calls 1002: the INVITE leaves over TLS, with a digest.
                out = await client.establish("out", "1002", tone_hz=BROWSER_HZ)
                accepted = await client.wait_event(out, ("accepted", "hangup"), 15)
                assert accepted["type"] == "accepted", accepted
                await tones_both_ways(out, phone)
                log = kam.log()
                sent = [m for m in log.received("INVITE") if m.from_user == "1001"]
                assert sent and {m.proto for m in sent} == {"tls"}, sent
                assert log.replies("INVITE", "1001")[-2:] == [407, 200], log.describe()[-3000:]
                await client.hangup("out")
                await phone.wait_disconnected()
        finally:
            await asyncio.to_thread(stop_gateway, gw)


async def tones_both_ways(call, phone: PjsuaPhone) -> None:
    heard_by_browser = await call.wait_for_tone(PHONE_HZ, 8.0, min_rms=MIN_RMS)
    heard_by_phone = await phone.wait_for_tone(BROWSER_HZ, 8.0, min_rms=MIN_RMS)
    assert abs(heard_by_browser.hz - PHONE_HZ) <= 10, heard_by_browser
    assert abs(heard_by_phone.hz - BROWSER_HZ) <= 10, heard_by_phone


@pytest.mark.parametrize("kill", ["answered", "ringing"])
async def test_the_tls_phone_of_a_killed_worker_is_hung_up(pki, tmp_path, kill):
    """The worker's TLS connection dies with it: the front opens its own (checking
    the phone's certificate as the worker did) to send the BYE, or the CANCEL."""
    port = free_port()
    text = make_config(port, workers=1, settings={"sip": pki.sip()})
    gw = await asyncio.to_thread(start_gateway, tmp_path, text, http_port=port)
    answered = kill == "answered"
    try:
        await asyncio.to_thread(gw.wait_ready, workers=1)
        async with (
            PjsuaPhone(
                tmp_path,
                tone_hz=PHONE_HZ,
                tls=phone_tls(pki.phone, client_ca=pki.ca.cert),
                answer_delay_ms=0 if answered else 60_000,
            ) as phone,
            WebClient(gw.url) as client,
        ):
            call = await client.establish(kill, f"sipp{phone.tls_port}", tone_hz=BROWSER_HZ)
            await client.wait_event(call, "accepted" if answered else "ringing", timeout=15)
            if answered:
                await phone.wait_confirmed()
            await asyncio.sleep(0.3)  # the dialog reaches the front right after the response
            worker = gw.pids()[0]
            assert worker is not None
            os.kill(worker, signal.SIGKILL)
            hangup = await client.wait_event(call, "hangup", timeout=5)
            assert (hangup["code"], hangup["by"]) == (500, "gateway"), hangup
            gone = await phone.wait_disconnected(timeout=15)
            assert gone["code"] == (200 if answered else 487), gone
        method = "BYE" if answered else "CANCEL"
        assert re.search(
            rf"orphaned call \S+: sending {method} to 127.0.0.1:{phone.tls_port} over TLS",
            gw.log.read_text(),
        ), gw.log.read_text()[-3000:]
        received = re.findall(
            r"RX \d+ bytes Request msg (\w+)/cseq=\d+ \S+ from (\w+)",
            (phone.log_path.read_text(errors="replace")),
        )
        assert (method, "TLS") in received, received
    finally:
        await asyncio.to_thread(stop_gateway, gw)


async def ask_over_tls(source: str, port: int, method: str, body: str = "") -> list[int]:
    """Send one request from ``source`` over a TLS connection to 127.0.0.1:``port``;
    the status codes that come back on it within a second of quiet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, local_addr=(source, 0)
    )
    local_port = writer.get_extra_info("sockname")[1]
    message = request(method, f"sip:anyone@127.0.0.1:{port};transport=tls", local_port, body=body)
    writer.write(message.replace(b"SIP/2.0/UDP", b"SIP/2.0/TLS", 1))
    statuses = []
    try:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.0)
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length and int(length[1]):
                await reader.readexactly(int(length[1]))
            statuses.append(status_of(head))
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
    return statuses


async def test_strangers_on_the_tls_port_get_nothing(tls_gateway):
    """``sip.trusted_peers`` (by default the targets' hosts, all 127.0.0.1 here)
    holds on the workers' TLS port as on UDP."""
    match = re.search(r"TLS on port (\d+)", tls_gateway.log.read_text())
    assert match, "no worker TLS port in the gateway log"
    port = int(match[1])
    for method, body in (("OPTIONS", ""), ("INVITE", SDP)):
        assert await ask_over_tls("127.0.0.2", port, method, body) == [], method
    assert await ask_over_tls("127.0.0.1", port, "OPTIONS") == [200]
