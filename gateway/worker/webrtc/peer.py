"""The WebRTC leg: one aiortc peer connection that answers a browser's offer.

Audio only. Opus is preferred, PCMU and PCMA are accepted; any video the
browser offers is declined. With no ICE servers configured aiortc gathers host
candidates only, so answering never waits on STUN.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransport,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.exceptions import OperationError
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import MediaDescription, SessionDescription, candidate_from_sdp

from gateway.config import IceServer

from . import dtmf

logger = logging.getLogger(__name__)

#: Codecs accepted from the browser, most preferred first.
PREFERRED_CODECS = ("audio/opus", "audio/PCMU", "audio/PCMA")
#: Negotiated as well (after the audio codecs): the browser's in-band DTMF.
EVENT_CODECS = (dtmf.MIME_TYPE,)

#: How long closing a peer connection waits for its answer to be ready (gathering
#: ends after 5 s at worst, when a STUN server does not answer).
ANSWER_GRACE = 10.0


def open_peer_connections() -> int:
    """Peer connections made here and not closed yet: one per call, none once it ends."""
    return WebRtcLeg.unclosed


class BadOffer(ValueError):
    """The browser's SDP offer cannot be answered (unparsable, or no audio).

    Its text goes to the browser as is, so it is always one of the fixed, plain
    descriptions below and never quotes an exception from the SDP parser.
    """


def check_offer(sdp: str) -> None:
    """Raise :class:`BadOffer` unless ``sdp`` parses and has a usable audio section."""
    check_description(sdp, "offer")


def check_description(sdp: str, kind: str) -> None:
    """:func:`check_offer` for an ``offer`` or an ``answer`` (the browser's SDP)."""
    if "\r\n" not in sdp and "\n" not in sdp:
        raise BadOffer(f"{kind} is not an SDP document")
    try:
        description = SessionDescription.parse(sdp)
    except Exception:  # aiortc raises ValueError/IndexError/KeyError/... on junk
        raise BadOffer(
            f"{kind} SDP could not be parsed: a line is malformed or has a value out of range"
        ) from None
    audio = [m for m in description.media if m.kind == "audio" and m.port != 0]
    if not audio:
        raise BadOffer(f"{kind} has no audio section")
    mids = [m.rtp.muxId for m in description.media if m.rtp.muxId]
    if len(set(mids)) != len(mids):
        raise BadOffer(f"{kind} has two media sections with the same a=mid")
    for index, media in enumerate(description.media, 1):
        _check_section(index, media)
    if not audio[0].dtls or not audio[0].dtls.fingerprints:
        raise BadOffer(f"{kind} audio section has no DTLS fingerprint")
    if not any(
        c.mimeType.lower() in {p.lower() for p in PREFERRED_CODECS} for c in audio[0].rtp.codecs
    ):
        raise BadOffer(f"{kind} has none of the audio codecs opus, PCMU, PCMA")


def _check_section(index: int, media: MediaDescription) -> None:
    """What aiortc assumes of every media section but does not check itself."""
    if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
        raise BadOffer(f"offer media section {index} has no ICE username fragment or password")
    if media.kind in ("audio", "video") and not media.rtcp_mux:
        raise BadOffer(f"offer media section {index} does not use rtcp-mux")
    if any(not 0 < c.port < 65536 for c in media.ice_candidates):
        # aioice would send to it, and the datagram transport dies with OverflowError.
        raise BadOffer(f"offer media section {index} has an ICE candidate port outside 1-65535")
    if media.kind in ("audio", "video") and media.direction is None:
        # aiortc's createAnswer fails on it (it does not apply SDP's sendrecv default).
        raise BadOffer(
            f"offer media section {index} has no direction (a=sendrecv, a=sendonly, ...)"
        )


class WebRtcLeg:
    """Answers one browser offer and watches the connection it leads to.

    :meth:`connected` resolves once ICE and DTLS are both up, and fails if the
    connection fails or closes first. After that, a loss of the connection (ICE
    consent expired, DTLS closed by the browser, connection failed) is reported
    once through ``on_lost``; closing it ourselves reports nothing.
    """

    #: Legs made in this process whose peer connection is not closed yet (for the
    #: census): counted, not looked up, so that one dropped unclosed still counts.
    unclosed = 0

    def __init__(
        self,
        ice_servers: Sequence[IceServer],
        on_lost: Callable[[str], None],
        loopback_only: bool = False,
        on_digit: Callable[[str, int], None] | None = None,
    ) -> None:
        servers = [
            RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
            for s in ice_servers
        ]
        # An explicit empty list: aiortc would otherwise add a public STUN server.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        WebRtcLeg.unclosed += 1
        self._counted = True
        self._on_lost = on_lost
        self._loopback_only = loopback_only
        self._on_digit = on_digit
        self._digits: dtmf.DigitReceiver | None = None
        loop = asyncio.get_running_loop()
        self._remote_track: asyncio.Future[MediaStreamTrack] = loop.create_future()
        self._connected: asyncio.Future[None] = loop.create_future()
        self._closing = False
        self.codec = ""
        #: Clear while :meth:`answer` runs: :meth:`close` waits for it.
        self._idle = asyncio.Event()
        self._idle.set()
        #: Set once the offer is applied: trickled candidates wait for it.
        self._remote_set = asyncio.Event()
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and not self._remote_track.done():
            self._remote_track.set_result(track)

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        logger.debug("webrtc connection state %s", state)
        if self._closing:
            return
        if state == "connected" and not self._connected.done():
            self._connected.set_result(None)
        elif state in ("failed", "closed"):
            why = (
                "ICE/DTLS connection failed" if state == "failed" else "DTLS closed by the browser"
            )
            if not self._connected.done():
                self._connected.set_exception(ConnectionError(why))
                self._connected.exception()  # retrieved: the caller may have stopped waiting
            else:
                self._closing = True  # report the loss once
                self._on_lost(why)

    async def connected(self) -> None:
        """Wait until ICE and DTLS are connected; raises ``ConnectionError`` if they fail."""
        await asyncio.shield(self._connected)

    async def answer(self, offer_sdp: str, outgoing: MediaStreamTrack) -> str:
        """Apply the browser's offer, attach ``outgoing`` and return the answer SDP."""
        self._idle.clear()
        try:
            return await self._answer(offer_sdp, outgoing)
        finally:
            self._idle.set()

    async def _answer(self, offer_sdp: str, outgoing: MediaStreamTrack) -> str:
        check_offer(offer_sdp)
        if self._loopback_only:
            offer_sdp = loopback_candidates_only(offer_sdp)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        except OperationError:  # a media section with no codec aiortc supports
            raise BadOffer(
                "offer rejected: a media section has no codec the gateway supports"
            ) from None
        except Exception as exc:
            logger.debug("offer rejected by aiortc: %r", exc)
            raise BadOffer("offer rejected: the WebRTC stack cannot apply this SDP") from None
        self._remote_set.set()
        audio = None
        for transceiver in self.pc.getTransceivers():
            if transceiver.kind == "audio" and audio is None:
                audio = transceiver
            else:
                transceiver.direction = "inactive"
        if audio is None:  # pragma: no cover - check_offer guarantees one
            raise BadOffer("offer has no audio section")
        audio.setCodecPreferences(_preferences())
        self.pc.addTrack(outgoing)
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        local = self.pc.localDescription.sdp
        self.codec = negotiated_codec(local)
        self._listen_for_digits(audio.receiver, local)
        return str(local)

    def _listen_for_digits(self, receiver: RTCRtpReceiver, sdp: str) -> None:
        """Take the browser's RFC 4733 events off ``receiver`` if ``sdp`` negotiated them."""
        payload_types = dtmf.event_payload_types(sdp)
        if self._on_digit is not None and payload_types and self._digits is None:
            self._digits = dtmf.DigitReceiver(receiver, payload_types, self._on_digit)

    async def add_candidate(
        self, candidate: str | None, sdp_mid: str | None, sdp_mline_index: int | None
    ) -> None:
        """Feed one trickled remote ICE candidate (``None``: end of candidates) to aiortc.

        Raises :class:`BadOffer` if the candidate does not parse. Candidates that
        arrive while the offer is still being applied wait for it.
        """
        parsed = None
        if candidate:
            text = candidate.removeprefix("a=").removeprefix("candidate:")
            try:
                parsed = candidate_from_sdp(text)
            except Exception:  # aiortc raises ValueError/IndexError on junk
                raise BadOffer("candidate: not an ICE candidate attribute") from None
            if not 0 < parsed.port < 65536:
                raise BadOffer("candidate: port outside 1-65535")
            if self._loopback_only and not _is_loopback(parsed.ip):
                return  # as loopback_candidates_only does for the offer's own candidates
            parsed.sdpMid = sdp_mid
            parsed.sdpMLineIndex = sdp_mline_index if sdp_mid is None else None
            if sdp_mid is None and sdp_mline_index is None:
                parsed.sdpMLineIndex = 0
        await self._remote_set.wait()
        if self._closing:
            return
        await self.pc.addIceCandidate(parsed)

    async def offer(self, outgoing: MediaStreamTrack) -> str:
        """Make the offer of an incoming call: one audio section, Opus first."""
        transceiver = self.pc.addTransceiver(outgoing, direction="sendrecv")
        transceiver.setCodecPreferences(_preferences())
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, answer_sdp: str) -> None:
        """Apply the browser's answer to our offer (raises :class:`BadOffer` if unusable)."""
        check_description(answer_sdp, "answer")
        if self._loopback_only:
            answer_sdp = loopback_candidates_only(answer_sdp)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))
        except Exception as exc:
            logger.debug("answer rejected by aiortc: %r", exc)
            raise BadOffer("answer rejected: the WebRTC stack cannot apply this SDP") from None
        self._remote_set.set()
        self.codec = negotiated_codec(answer_sdp)
        for transceiver in self.pc.getTransceivers():
            if transceiver.kind == "audio":
                self._listen_for_digits(transceiver.receiver, answer_sdp)
                break

    async def remote_audio(self) -> MediaStreamTrack:
        """The browser's audio track (known once the offer is applied)."""
        return await self._remote_track

    async def close(self) -> None:
        """Close the peer connection, once :meth:`answer` is done with it.

        aioice adds each socket it gathers to the connection only once it is
        bound: closed while gathering, the connection would miss the sockets
        still being bound, and they stayed open for good (the census found one
        after the churn test: closing at each of the first 12 loop turns of an
        answer left a socket in 15 of 48 tries).
        """
        self._closing = True
        self._remote_set.set()  # wake trickled candidates waiting for the offer
        if not self._connected.done():
            self._connected.set_exception(ConnectionError("closed"))
            self._connected.exception()
        if not self._remote_track.done():
            self._remote_track.set_exception(MediaStreamError())
            self._remote_track.exception()  # mark retrieved
        try:
            await asyncio.wait_for(self._idle.wait(), ANSWER_GRACE)
        except TimeoutError:
            logger.warning("closing a peer connection still answering after %s s", ANSWER_GRACE)
        await close_peer_connection(self.pc)
        if self._counted:
            self._counted = False
            WebRtcLeg.unclosed -= 1


def _preferences() -> list[Any]:
    """The audio codecs to negotiate with a browser, in order, then telephone-event."""
    dtmf.register_codec()
    capabilities = RTCRtpSender.getCapabilities("audio").codecs
    return [
        codec
        for name in (*PREFERRED_CODECS, *EVENT_CODECS)
        for codec in capabilities
        if codec.mimeType.lower() == name.lower()
    ]


async def close_peer_connection(pc: RTCPeerConnection) -> None:
    """Close ``pc`` and stop what aiortc's connecting task starts on it afterwards.

    aiortc connects in a task of its own, which a close does not stop. If it
    resumes after ``close()`` stopped the ICE transport (aioice notices the
    close only at its next 20 ms check turn), ICE reports completed and aioice
    starts consent checks that never end; if it resumes during ``close()``
    (DTLS finishing), it starts the RTP sender and receiver after they were
    stopped: RTCP tasks and a decoder thread for ever. The census found one
    such leak in about every other call hung up right after it was answered.
    So once ``close()`` returns, the sender and receiver are stopped again, and
    an ICE transport is stopped again whenever it leaves ``closed`` (each a
    no-op for what was stopped in order).
    """
    transceivers = pc.getTransceivers()
    await pc.close()
    for transceiver in transceivers:
        await transceiver.sender.stop()
        await transceiver.receiver.stop()
        ice = transceiver.receiver.transport.transport
        await _stop_reopened(ice)
        # close() dropped the transport's listeners: this one is for a later reopening.
        ice.on("statechange", functools.partial(_stop_reopened, ice))


async def _stop_reopened(ice: RTCIceTransport) -> None:
    if ice.state != "closed":  # connect() finished after close(): consent checks run
        await ice.stop()


def negotiated_codec(sdp: str) -> str:
    """The first audio codec of an answer, as ``name/clockrate`` (``opus/48000``)."""
    for media in SessionDescription.parse(sdp).media:
        if media.kind == "audio" and media.rtp.codecs:
            codec = media.rtp.codecs[0]
            return f"{codec.mimeType.split('/', 1)[1]}/{codec.clockRate}"
    return ""


def loopback_candidates_only(sdp: str) -> str:
    """Drop the offer's ICE candidates that are not on loopback.

    A gateway whose own candidates are loopback only (the embedded default, the
    tests) must not send connectivity checks to a browser's other addresses.
    """
    import ipaddress

    kept = []
    for line in sdp.splitlines(keepends=True):
        if line.startswith("a=candidate:"):
            parts = line.split()
            try:
                if len(parts) < 5 or not ipaddress.ip_address(parts[4]).is_loopback:
                    continue
            except ValueError:  # an mDNS .local name: not loopback
                continue
        kept.append(line)
    return "".join(kept)


def _is_loopback(address: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # an mDNS .local name
        return False


def set_consent_timeout(seconds: float) -> None:
    """Declare the browser's connection lost after about ``seconds`` without consent.

    aioice checks consent (RFC 7675) every ``CONSENT_INTERVAL`` seconds (with
    ±20 % jitter), gives each check one STUN timeout (``RETRY_RTO``) and closes
    the connection after ``CONSENT_FAILURES`` misses in a row. The three are
    process-wide; this sets the interval so that the misses add up to ``seconds``.
    """
    import aioice.ice
    import aioice.stun

    per_check = seconds / aioice.ice.CONSENT_FAILURES
    interval = max(0.5, per_check - aioice.stun.RETRY_RTO)
    aioice.ice.CONSENT_INTERVAL = interval  # type: ignore[assignment]


def restrict_host_addresses(addresses: Sequence[str]) -> None:
    """Offer only ``addresses`` as ICE host candidates in this process.

    aioice gathers on every interface and never on loopback; a gateway serving
    a browser on the same host (the embedded default, the tests) needs
    127.0.0.1, and an operator may want to pin one public interface.
    """
    import ipaddress

    import aioice.ice

    chosen = list(addresses)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [
            a
            for a in chosen
            if (use_ipv4 and ipaddress.ip_address(a).version == 4)
            or (use_ipv6 and ipaddress.ip_address(a).version == 6)
        ]

    aioice.ice.get_host_addresses = host_addresses
