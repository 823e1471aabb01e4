"""Offer checks: a real aiortc offer, mutated; every refusal is a plain description."""

from __future__ import annotations

import re

import pytest
from aiortc import RTCPeerConnection

from gateway.worker.webrtc.peer import BadOffer, check_offer

# Nothing of an exception's text or repr may reach the browser.
PYTHON_TEXT = re.compile(r"Error\(|Exception|Traceback|<|\w+\(.*\)|\\x|invalid literal")


@pytest.fixture
async def offer() -> str:
    pc = RTCPeerConnection()
    pc.addTransceiver("audio")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


def _without(prefix: str):
    return lambda sdp: "".join(
        line for line in sdp.splitlines(keepends=True) if not line.startswith(prefix)
    )


def _replace(pattern: str, replacement: str):
    return lambda sdp: re.sub(pattern, replacement, sdp, flags=re.M)


# (id, mutation, words the refusal must contain)
CASES = [
    ("one-line", lambda sdp: sdp.replace("\r\n", " "), "not an SDP document"),
    ("bad-port", _replace(r"^m=audio \d+", "m=audio port"), "could not be parsed"),
    ("text-payload-type", _replace(r"^a=rtpmap:96 ", "a=rtpmap:x "), "could not be parsed"),
    ("bad-candidate", _replace(r"^a=candidate:.*$", "a=candidate:1"), "could not be parsed"),
    ("bad-ssrc", _replace(r"^a=ssrc:\d+", "a=ssrc:zz"), "could not be parsed"),
    ("no-audio", _without("m=audio"), "no audio section"),
    ("port-zero", _replace(r"^m=audio \d+", "m=audio 0"), "no audio section"),
    ("no-ice-ufrag", _without("a=ice-ufrag"), "ICE username fragment"),
    ("no-rtcp-mux", _without("a=rtcp-mux"), "rtcp-mux"),
    ("no-fingerprint", _without("a=fingerprint"), "DTLS fingerprint"),
    ("no-direction", _without("a=sendrecv"), "no direction"),
    ("candidate-port", _replace(r"^(a=candidate:\S+ \d+ udp \d+ \S+) \d+", r"\1 70000"), "1-65535"),
    ("same-mid-twice", lambda sdp: sdp + sdp[sdp.index("m=audio") :], "same a=mid"),
    ("only-g722", _replace(r"^a=rtpmap:(96|0|8) .*\r\n", ""), "none of the audio codecs"),
]


@pytest.mark.parametrize(("mutate", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_offers_are_described_plainly(offer, mutate, words):
    mutated = mutate(offer)
    assert mutated != offer
    with pytest.raises(BadOffer) as info:
        check_offer(mutated)
    message = str(info.value)
    assert words in message
    assert not PYTHON_TEXT.search(message), message


def test_the_real_offer_passes(offer):
    check_offer(offer)
