"""A stranger on the SIP port: raw UDP datagrams, well-formed or not, and what came back.

Everything is sent from and to 127.0.0.1. Messages are written here by hand
(in the spirit of RFC 4475's torture tests, not copied from it) so that a test
can throw at a SIP port what no well-behaved user agent would send.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from dataclasses import dataclass, field

SDP = (
    "v=0\r\no=stranger 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


def request(
    method: str,
    target: str,
    port: int,
    *,
    body: str = "",
    extra: str = "",
    content_length: str | None = None,
    call_id: str | None = None,
    to_tag: str = "",
    cseq_method: str | None = None,
) -> bytes:
    """A request from 127.0.0.1:``port`` (the stranger's own socket)."""
    branch = "z9hG4bK" + secrets.token_hex(8)
    length = str(len(body.encode())) if content_length is None else content_length
    lines = [
        f"{method} {target} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport",
        "Max-Forwards: 70",
        f"From: <sip:stranger@127.0.0.1:{port}>;tag={secrets.token_hex(4)}",
        f"To: <{target}>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {call_id or secrets.token_hex(12)}@127.0.0.1",
        f"CSeq: 1 {cseq_method or method}",
        f"Contact: <sip:stranger@127.0.0.1:{port}>",
    ]
    if body:
        lines.append("Content-Type: application/sdp")
    if extra:
        lines.extend(extra.strip("\r\n").split("\r\n"))
    if length != "omit":
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def corpus(port: int, target: str) -> list[tuple[str, bytes]]:
    """Hostile and odd datagrams for a SIP port, each with a name.

    ``port`` is the stranger's own port (it appears in Via and Contact);
    ``target`` the Request-URI aimed at.
    """
    r = request
    big = "x" * 8000
    cases: list[tuple[str, bytes]] = [
        # Delayed-offer INVITEs: legal, and each aborted a worker before the guard.
        ("invite-no-body", r("INVITE", target, port)),
        ("invite-no-content-length", r("INVITE", target, port, content_length="omit")),
        ("invite-empty-sdp-type", r("INVITE", target, port, extra="Content-Type: application/sdp")),
        ("invite-tel-uri", r("INVITE", "tel:+15551234567", port)),
        ("invite-sips-uri", r("INVITE", target.replace("sip:", "sips:", 1), port)),
        ("invite-100rel", r("INVITE", target, port, extra="Supported: 100rel\r\nRequire: 100rel")),
        ("invite-timer", r("INVITE", target, port, extra="Require: timer\r\nSession-Expires: 90")),
        ("invite-with-sdp", r("INVITE", target, port, body=SDP)),
        ("invite-garbage-sdp", r("INVITE", target, port, body="v=0\r\nm=audio x y z\r\n")),
        (
            "invite-multipart",
            r(
                "INVITE",
                target,
                port,
                body="--b\r\n\r\nhi\r\n--b--\r\n",
                extra="Content-Type: multipart/mixed;boundary=b",
            ),
        ),
        ("options", r("OPTIONS", target, port)),
        ("message", r("MESSAGE", target, port, body="hello")),
        ("subscribe", r("SUBSCRIBE", target, port, extra="Event: presence")),
        ("notify", r("NOTIFY", target, port, extra="Event: message-summary")),
        ("register", r("REGISTER", target, port)),
        ("publish", r("PUBLISH", target, port, extra="Event: presence")),
        ("info", r("INFO", target, port)),
        ("refer", r("REFER", target, port, extra=f"Refer-To: <{target}>")),
        ("unknown-method", r("FOO", target, port)),
        ("unknown-method-long", r("X" * 200, target, port)),
        ("bye-no-dialog", r("BYE", target, port, to_tag="nosuchtag")),
        ("cancel-no-transaction", r("CANCEL", target, port)),
        ("ack-no-transaction", r("ACK", target, port)),
        ("prack-no-dialog", r("PRACK", target, port, to_tag="x", extra="RAck: 1 1 INVITE")),
        ("update-no-dialog", r("UPDATE", target, port, to_tag="x")),
        # Stray responses to requests never sent.
        (
            "stray-200",
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKnope\r\n"
            b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:b@127.0.0.1>;tag=2\r\n"
            b"Call-ID: stray@127.0.0.1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "stray-180",
            b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKx\r\n"
            b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:b@127.0.0.1>\r\n"
            b"Call-ID: stray2@127.0.0.1\r\nCSeq: 7 INVITE\r\nContent-Length: 0\r\n\r\n",
        ),
        ("stray-487-no-via", b"SIP/2.0 487 Request Terminated\r\nContent-Length: 0\r\n\r\n"),
        # Malformed and torturous messages.
        ("empty", b""),
        ("crlf-keepalive", b"\r\n\r\n"),
        ("binary-garbage", bytes(range(256)) * 4),
        ("not-utf8", b"INVITE sip:\xff\xfe@127.0.0.1 SIP/2.0\r\n\r\n"),
        ("no-headers", f"INVITE {target} SIP/2.0\r\n\r\n".encode()),
        ("bad-version", r("INVITE", target, port).replace(b"SIP/2.0\r\n", b"SIP/7.0\r\n", 1)),
        ("missing-call-id", r("INVITE", target, port).replace(b"Call-ID:", b"X-Call-ID:", 1)),
        ("missing-cseq", r("INVITE", target, port).replace(b"CSeq:", b"X-CSeq:", 1)),
        ("missing-via", r("INVITE", target, port).replace(b"Via:", b"X-Via:", 1)),
        ("cseq-method-mismatch", r("INVITE", target, port, cseq_method="BYE")),
        ("cseq-huge", r("INVITE", target, port).replace(b"CSeq: 1 ", b"CSeq: 99999999999999 ")),
        ("cseq-negative", r("INVITE", target, port).replace(b"CSeq: 1 ", b"CSeq: -1 ")),
        ("content-length-negative", r("INVITE", target, port, content_length="-5")),
        ("content-length-too-big", r("INVITE", target, port, body=SDP, content_length="99999")),
        ("content-length-garbage", r("INVITE", target, port, content_length="ten")),
        (
            "max-forwards-zero",
            r("INVITE", target, port).replace(b"Max-Forwards: 70", b"Max-Forwards: 0"),
        ),
        ("long-header", r("INVITE", target, port, extra=f"X-Long: {big}")),
        (
            "many-vias",
            r("INVITE", target, port, extra="\r\n".join(["Via: SIP/2.0/UDP 127.0.0.1:9"] * 100)),
        ),
        ("folded-header", r("INVITE", target, port, extra="Subject: first\r\n  second line")),
        (
            "compact-headers",
            r("OPTIONS", target, port).replace(b"Call-ID:", b"i:").replace(b"Via:", b"v:"),
        ),
        ("escaped-uri", r("INVITE", "sip:%65%63%68%6f@127.0.0.1;%74ransport=udp", port)),
        ("uri-with-headers", r("INVITE", target + "?Subject=x&Call-ID=evil", port)),
        ("uri-unknown-scheme", r("INVITE", "xyz:whatever", port)),
        ("uri-no-host", r("INVITE", "sip:@", port)),
        ("request-line-spaces", r("INVITE", target, port).replace(b"INVITE ", b"INVITE    ", 1)),
        ("nul-bytes", r("INVITE", target, port, extra="X-Nul: a\x00b")),
        ("lf-only", r("OPTIONS", target, port).replace(b"\r\n", b"\n")),
        ("header-no-colon", r("INVITE", target, port, extra="NoColonHere")),
        ("to-tag-on-invite", r("INVITE", target, port, to_tag="forged", body=SDP)),
    ]
    return cases


@dataclass
class Stranger:
    """A UDP socket on ``host`` (127.0.0.1) that collects whatever comes back."""

    host: str = "127.0.0.1"
    sock: socket.socket = field(
        default_factory=lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    )

    def __post_init__(self) -> None:
        self.sock.bind((self.host, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def send(self, data: bytes, port: int) -> None:
        self.sock.sendto(data, ("127.0.0.1", port))

    async def responses(self, quiet: float = 0.3, limit: float = 5.0) -> list[bytes]:
        """What arrives until ``quiet`` seconds pass with nothing (or ``limit`` in all)."""
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        deadline = loop.time() + limit
        while loop.time() < deadline:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), quiet)
            except TimeoutError:
                break
            got.append(data)
        return got

    def close(self) -> None:
        self.sock.close()


def status_of(response: bytes) -> int:
    """The status code of a response datagram (0 if it is not one)."""
    first = response.split(b"\r\n", 1)[0].split(b" ")
    if len(first) >= 2 and first[0] == b"SIP/2.0" and first[1].isdigit():
        return int(first[1])
    return 0
