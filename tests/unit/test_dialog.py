"""Dialog identity from raw SIP text, and the BYE/CANCEL the front builds from it."""

from __future__ import annotations

from gateway.front.orphans import Hop, bye, cancel, destination, invite_destination, next_hop
from gateway.outcomes import End, ending
from gateway.worker.sip.dialog import from_invite, split_values, with_response

INVITE = (
    "INVITE sip:600@192.0.2.10:5060 SIP/2.0\r\n"
    "v: SIP/2.0/UDP 127.0.0.1:5080;rport;branch=z9hG4bKabc\r\n"
    "Max-Forwards: 70\r\n"
    "f: <sip:sipgw@127.0.0.1:5080>;tag=ourtag\r\n"
    "t: <sip:600@192.0.2.10>\r\n"
    "i: call-1@127.0.0.1\r\n"
    "CSeq: 4711 INVITE\r\n"
    "Route: <sip:proxy.example;lr>\r\n"
    "Content-Length: 0\r\n\r\n"
)
OK = (
    "SIP/2.0 200 OK\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5080;rport=5080;branch=z9hG4bKabc\r\n"
    "Record-Route: <sip:edge.example;lr>,\r\n <sip:core.example;lr>\r\n"
    "From: <sip:sipgw@127.0.0.1:5080>;tag=ourtag\r\n"
    'To: "Desk" <sip:600@192.0.2.10>;tag=theirtag\r\n'
    "Call-ID: call-1@127.0.0.1\r\n"
    "CSeq: 4711 INVITE\r\n"
    "Contact: <sip:600@[2001:db8::5]:5062;transport=udp>\r\n"
    "Content-Length: 0\r\n\r\n"
)


def test_the_dialog_is_read_from_the_invite_and_its_answer():
    invite = from_invite(INVITE)
    assert invite is not None
    assert (invite.call_id, invite.cseq, invite.local) == (
        "call-1@127.0.0.1",
        4711,
        "<sip:sipgw@127.0.0.1:5080>;tag=ourtag",
    )
    assert invite.invite_routes == ("<sip:proxy.example;lr>",)
    dialog = with_response(invite, OK)
    assert dialog is not None and dialog.confirmed
    assert dialog.remote == '"Desk" <sip:600@192.0.2.10>;tag=theirtag'
    assert dialog.remote_target == "sip:600@[2001:db8::5]:5062;transport=udp"
    assert dialog.route_set == ("<sip:core.example;lr>", "<sip:edge.example;lr>")
    # A response without a To tag, or for another call, forms no dialog.
    assert with_response(invite, OK.replace(";tag=theirtag", "")) is None
    assert with_response(invite, OK.replace("Call-ID: call-1", "Call-ID: other")) is None
    assert with_response(invite, OK.replace("200 OK", "486 Busy Here")) is None
    assert from_invite("BYE sip:x SIP/2.0\r\n\r\n") is None


def test_values_split_outside_brackets_and_quotes():
    assert split_values('"a, b" <sip:x;p=1,2>, <sip:y>') == ['"a, b" <sip:x;p=1,2>', "<sip:y>"]


def test_bye_and_cancel_carry_the_dialog():
    invite = from_invite(INVITE)
    assert invite is not None
    dialog = with_response(invite, OK)
    assert dialog is not None
    text = bye(dialog, "127.0.0.1", 40000, "z9hG4bKnew", ending(End.WORKER_DIED)).decode()
    lines = text.split("\r\n")
    assert lines[0] == "BYE sip:600@[2001:db8::5]:5062;transport=udp SIP/2.0"
    assert "Route: <sip:core.example;lr>" in lines and "Call-ID: call-1@127.0.0.1" in lines
    assert 'To: "Desk" <sip:600@192.0.2.10>;tag=theirtag' in lines
    assert "CSeq: 4811 BYE" in lines
    assert destination(dialog) == Hop("core.example", 5060)
    early = with_response(invite, OK.replace("200 OK", "180 Ringing"))
    assert early is not None and not early.confirmed
    lines = cancel(early).decode().split("\r\n")
    assert lines[0] == "CANCEL sip:600@192.0.2.10:5060 SIP/2.0"
    assert "Via: SIP/2.0/UDP 127.0.0.1:5080;rport;branch=z9hG4bKabc" in lines
    assert "To: <sip:600@192.0.2.10>" in lines and "CSeq: 4711 CANCEL" in lines
    assert invite_destination(early) == Hop("proxy.example", 5060)


def test_next_hop():
    assert next_hop("sip:a@127.0.0.1:5070;transport=udp") == Hop("127.0.0.1", 5070)
    assert next_hop("sip:[::1]:5090") == Hop("::1", 5090)
    # Over TLS (sips:, or transport=tls in any case): 5061 unless a port is given.
    assert next_hop("sips:pbx.example") == Hop("pbx.example", 5061, tls=True)
    assert next_hop("sip:a@pbx.example;Transport=TLS;lr") == Hop("pbx.example", 5061, tls=True)
    assert next_hop("sip:10.0.0.1:5071;transport=tls") == Hop("10.0.0.1", 5071, tls=True)
    assert next_hop("sip:a@pbx.example;transport=tcp") == Hop("pbx.example", 5060)
