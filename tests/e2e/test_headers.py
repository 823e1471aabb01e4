"""Extra INVITE headers: fixed ones from the dialplan rule, allowed ones from the browser.

A sipp trunk answers 486 and logs every INVITE. The INVITE must carry the rule's
P-Asserted-Identity and tag and the browser's ``X-`` header, and nothing the
browser was not allowed to add; CR, LF, NUL, quotes and 10 kB values in any
field the browser supplies get ``bad_request`` and no INVITE at all.
"""

from __future__ import annotations

import re

import pytest
from peers.gateway import free_port, make_config, start_gateway, stop_gateway
from peers.sipp import SippPhone
from peers.webclient import WebClient, offer_sdp

pytestmark = pytest.mark.timeout(120)

RULE = """
[[dialplan.rules]]
name = "trunk"
regex = "7[0-9]{{3}}"
target = "sip:{{number}}@127.0.0.1:{port}"
headers = {{ "P-Asserted-Identity" = "<sip:+15550100@gw.example>", "X-Trunk" = "east" }}
"""
PAI = "P-Asserted-Identity: <sip:+15550100@gw.example>"


@pytest.fixture
async def trunk_and_gateway(tmp_path):
    async with SippPhone("busy", tmp_path, calls=20) as trunk:
        port = free_port()
        settings = {
            "sip": {"allowed_headers": ["X-Ticket", "X-App-*"]},
            "calls": {"invite_after_ice": False},
        }
        text = make_config(port, settings=settings) + RULE.format(port=trunk.port)
        gw = start_gateway(tmp_path, text, http_port=port)
        try:
            gw.wait_ready()
            yield trunk, gw
        finally:
            stop_gateway(gw)


def invites(raw: str) -> list[str]:
    return re.findall(r"^INVITE sip:.*?(?=\r?\n\r?\n)", raw, re.M | re.S)


async def test_rule_and_allowed_browser_headers_reach_the_invite(trunk_and_gateway):
    trunk, gw = trunk_and_gateway
    sdp = await offer_sdp()
    async with WebClient(gw.url) as client:
        bad = [
            {"X-Ticket": "1\r\nVia: evil"},
            {"X-Ticket": "1\nX: y"},
            {"X-Ticket": "1\x00"},
            {"X-Ticket": "x" * 10240},
            {"X-Ticket": "caf\u00e9"},
            {"X-Tic ket": "1"},
            {"X-Ticket\r\nVia": "1"},
            {"Via": "SIP/2.0/UDP evil"},
            {"From": "<sip:boss@evil>"},
            {"P-Asserted-Identity": "<sip:+19005550100@evil>"},
            {"X-Other": "not on the allow-list"},
            {"X-Trunk": "west"},  # the rule sets it
            {f"X-App-{i}": "1" for i in range(9)},
            ["X-Ticket", "1"],
            {"X-Ticket": 5},
        ]
        for i, headers in enumerate(bad):
            reply = await client.request(
                {"type": "call", "call": f"b{i}", "to": "7001", "sdp": sdp, "headers": headers}
            )
            assert (reply["type"], reply["code"]) == ("error", "bad_request"), (headers, reply)
            assert "\r" not in reply["message"] and "\n" not in reply["message"]
        for i, to in enumerate(["7001\r\nX: y", '7001"', "7001\x00", "7" * 10240, "<7001>"]):
            reply = await client.request({"type": "call", "call": f"t{i}", "to": to, "sdp": sdp})
            assert (reply["type"], reply["code"]) == ("error", "bad_request"), (to, reply)
        for call_id in ["c\r\n1", 'c"1', "c\x001", "c" * 10240]:
            reply = await client.request(
                {"type": "call", "call": call_id, "to": "7001", "sdp": sdp}
            )
            assert (reply["type"], reply["code"]) == ("error", "bad_request"), (call_id, reply)
        assert (await trunk.report()).invites == 0

        headers = {"X-Ticket": "4711", "X-App-Session": "a1b2 c3"}
        reply = await client.request(
            {"type": "call", "call": "ok", "to": "7001", "sdp": sdp, "headers": headers}
        )
        assert reply["type"] == "answer", reply
        await client.wait_message(lambda m: m.get("call") == "ok" and m["type"] == "hangup")
    report = await trunk.wait_for(lambda r: r.invites == 1, timeout=10)
    [invite] = invites(report.raw)
    lines = invite.splitlines()
    assert PAI in lines and "X-Trunk: east" in lines, invite
    assert "X-Ticket: 4711" in lines and "X-App-Session: a1b2 c3" in lines, invite
    names = sorted({line.split(":", 1)[0] for line in lines[1:]})
    expected = {
        *("Via", "Max-Forwards", "From", "To", "Contact", "Call-ID", "CSeq", "Allow"),
        *("Supported", "User-Agent", "Content-Type", "Content-Length", "Session-Expires"),
        *("Min-SE", "P-Asserted-Identity", "X-Trunk", "X-Ticket", "X-App-Session"),
    }
    assert set(names) <= expected, set(names) - expected
