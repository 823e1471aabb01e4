"""The dialplan as the toll-fraud guard, end to end: over 300 destinations, one sipp trunk.

A gateway whose dialplan sends US/Canadian and UK numbers (normalised to E.164
by phonenumbers) and four-digit extensions to a sipp "trunk" that answers every
INVITE with 486, so that no call needs media. Every destination in the corpus
is dialled by a WebSocket client; exactly the allowed ones may reach sipp, with
exactly the expected Request-URIs, and every other one must be refused with an
``error`` before any SIP is sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from peers.gateway import free_port, make_config, start_gateway, stop_gateway
from peers.sipp import SippPhone
from peers.webclient import WebClient, offer_sdp

pytestmark = pytest.mark.timeout(180)

RULES = """
[[dialplan.rules]]
name = "us-ca"
e164 = "+1"
countries = ["US", "CA"]
types = ["fixed_line", "mobile", "toll_free"]
target = "sip:{{e164_digits}}@127.0.0.1:{port}"

[[dialplan.rules]]
name = "uk"
e164 = "+44"
types = ["fixed_line", "mobile"]
target = "sip:{{national}}@127.0.0.1:{port}"

[[dialplan.rules]]
name = "extensions"
regex = "1[0-9]{{3}}"
target = "sip:{{number}}@127.0.0.1:{port}"
"""

#: Dialled string -> the Request-URI user sipp must see.
ALLOWED = {
    "2025550123": "12025550123",
    "12025550124": "12025550124",
    "+12025550125": "12025550125",
    "1-202-555-0126": "12025550126",
    "+1.202.555.0127": "12025550127",
    "+15062345678": "15062345678",  # Canada
    "18002345678": "18002345678",  # toll free
    "+441212345678": "01212345678",
    "00441212345679": "01212345679",
    "+4401212345670": "01212345670",  # "+44 (0)121...": libphonenumber drops the 0
    "+447400123456": "07400123456",  # UK mobile
    "1001": "1001",
    "1999": "1999",
}

NANP_ISLANDS = [
    "242", "246", "264", "268", "284", "340", "345", "441", "473", "649", "658", "664",
    "670", "671", "684", "721", "758", "767", "784", "787", "809", "829", "849", "868",
    "869", "876", "939",
]  # fmt: skip
HIGH_RISK = ["53", "222", "232", "235", "239", "247", "252", "290", "674", "677", "678",
             "682", "683", "686", "688", "690", "691", "692"]  # fmt: skip
GLOBAL = ["+870301234567", "+881612345678", "+8816", "+8823421234", "+883510012345",
          "+979123456789", "+80812345678", "+88213", "+8817", "+88216"]  # fmt: skip


def refused_corpus() -> Iterator[str]:
    """Destinations that must never reach the trunk (at least 290 of them)."""
    # Premium rate and shared cost, in every form a person might dial.
    for number in ("19002345678", "+19002345678", "9002345678", "+449012345678",
                   "00449012345678", "+447012345678", "+19762345678", "9762345678"):  # fmt: skip
        yield number
    # NANP outside the US and Canada: looks domestic, billed international.
    for area in NANP_ISLANDS:
        yield f"1{area}5550123"
        yield f"+1{area}2345678"
        yield f"001{area}2345678"
    # Countries most used for revenue-share fraud, and satellite / global networks.
    for code in HIGH_RISK:
        yield f"+{code}12345678"
        yield f"00{code}12345678"
    yield from GLOBAL
    yield from (f"00{n[1:]}" for n in GLOBAL)
    # Other countries: no rule routes them.
    for code in ("33", "49", "61", "81", "86", "91", "234", "7", "380", "972", "52", "55", "27",
                 "20", "62", "63", "64", "90", "971", "998"):  # fmt: skip
        yield f"+{code}212345678"
    # Emergency and short codes, service codes, operator.
    yield from ["911", "112", "999", "000", "110", "119", "411", "611", "988", "0", "00", "01",
                "011", "*67", "#31#", "*72", "911911"]  # fmt: skip
    # URIs and SIP syntax where a number is expected.
    for base in ("+12025550123", "2025550123", "1001"):
        yield f"sip:{base}@127.0.0.1"
        yield f"sips:{base}@evil.example"
        yield f"tel:{base}"
        yield f"{base}@evil.example"
        yield f"{base};user=phone"
        yield f"{base},1"
        yield f"{base}%40evil"
        yield f"<sip:{base}@x>"
        yield f'"{base}"'
        yield f"{base}\r\nX-Evil: 1"
        yield f"{base}%0d%0aX-Evil:%201"
        yield f"{base}\x00"
        yield f"{base}\n"
        yield f" {base}"
        yield f"{base} "
    # Digits that are not ASCII: full-width, Arabic-Indic, Devanagari, and mixes.
    for number in ("12025550123", "441212345678", "1001"):
        for zero in (0xFF10, 0x0660, 0x06F0, 0x0966):
            yield "".join(chr(zero + int(d)) for d in number)
            yield "+" + "".join(chr(zero + int(d)) for d in number)
        yield number[:-1] + chr(0xFF10 + int(number[-1]))
    # Over-long numbers and digit padding.
    for length in (16, 18, 20, 30, 50, 64, 65, 200):
        yield "+1202" + "5" * length
        yield "1" * length
    # Punctuation and letter tricks around allowed numbers.
    yield from ("+1 202 555 0123", "+1(202)5550123", "+1/2025550123", "+1_2025550123",
                  "+1*2025550123", "+1#2025550123", "++12025550123", "+-12025550123",
                  "1-800-FLOWERS", "1800FLOWERS", "+1202555O123", "+l2025550123",
                  "+12025550123#", "2025550123*", "1001#", "10001", "100", "1o01", "1001.",
                  "+44(0)1212345678", "+44 121 234 5678", ".1001",
                  "-1001", "+", "+0", "+00", "0044", "+1", "", "    ", "\t1001")  # fmt: skip


@pytest.fixture
async def trunk_and_gateway(tmp_path):
    async with SippPhone("busy", tmp_path, calls=200) as trunk:
        port = free_port()
        settings = {
            "dialplan": {"default_region": "US"},
            "calls": {"invite_after_ice": False},
            "http": {"max_call_rate": 1000},
        }
        text = make_config(port, workers=1, settings=settings) + RULES.format(port=trunk.port)
        gw = start_gateway(tmp_path, text, http_port=port)
        try:
            gw.wait_ready(workers=1)
            yield trunk, gw
        finally:
            stop_gateway(gw)


async def test_exactly_the_allowed_destinations_reach_the_trunk(trunk_and_gateway):
    trunk, gw = trunk_and_gateway
    refused = list(dict.fromkeys(refused_corpus()))
    assert len(refused) + len(ALLOWED) >= 300, len(refused)
    assert not set(refused) & set(ALLOWED)
    sdp = await offer_sdp()
    async with WebClient(gw.url) as client:
        for i, number in enumerate(refused):
            reply = await client.request(
                {"type": "call", "call": f"r{i}", "to": number, "sdp": sdp}, timeout=5
            )
            assert reply["type"] == "error", (number, reply)
            assert reply["code"] in ("bad_request", "forbidden"), (number, reply)
        assert (await trunk.report()).invites == 0, "a refused number reached the trunk"
        for i, number in enumerate(ALLOWED):
            reply = await client.request(
                {"type": "call", "call": f"a{i}", "to": number, "sdp": sdp}, timeout=10
            )
            assert reply["type"] == "answer", (number, reply)
            hangup = await client.wait_message(
                lambda m, i=i: m["type"] in ("hangup", "error") and m.get("call") == f"a{i}",
                timeout=10,
            )
            assert (hangup["type"], hangup["code"]) == ("hangup", 486), (number, hangup)
    report = await trunk.wait_for(lambda r: r.invites >= len(ALLOWED), timeout=10)
    assert report.invites == len(ALLOWED), report
    uris = re.findall(r"^INVITE sip:([^@ ]+)@127\.0\.0\.1:\d+ SIP/2\.0", report.raw, re.M)
    assert sorted(set(uris)) == sorted(ALLOWED.values()), uris
