"""End the SIP legs a dead worker left behind: BYE once answered, CANCEL while ringing.

A worker keeps the front informed of each call's dialog
(:class:`~gateway.ipc.Dialog`: Call-ID, tags, remote target, route set,
CSeq, the INVITE's Via). When the worker dies, its pjsua2 stack is gone, so
the front sends the BYE or CANCEL itself over UDP from ``sip.bind``, and
retransmits it (RFC 3261 timer E: 0.5, 1, 2, 4 s) until a final response.
The request comes from another port than the dead worker's; SIP matches
in-dialog requests and CANCELs by Call-ID, tags and branch, not by port.

A next hop over TLS (``;transport=tls`` in its URI, or ``sips:``, as with
``sip.transport = "tls"``) gets the request on a TLS connection of its own,
opened with the workers' settings (``sip.tls_ca``, ``tls_verify``,
``tls_cert``): the worker's connection died with it. TLS is reliable, so the
request is sent once and its final response awaited (timer F, shortened).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import ssl
from dataclasses import dataclass

from gateway.config import SipConfig
from gateway.ipc import Dialog
from gateway.outcomes import Ending

logger = logging.getLogger(__name__)

#: Retransmission intervals, seconds (timer E doubling from T1 = 0.5 s).
RETRANSMITS = (0.5, 1.0, 2.0, 4.0)
#: How long a request sent over TLS waits for its final response, seconds.
TLS_ANSWER_WAIT = sum(RETRANSMITS)


@dataclass(frozen=True)
class Hop:
    host: str
    port: int
    tls: bool = False


def next_hop(uri: str) -> Hop:
    """Where a request to ``uri`` goes: the URI's host and port (5060, or 5061 over
    TLS, if none), over TLS for ``sips:`` or ``;transport=tls``."""
    scheme, _, rest = uri.partition(":") if ":" in uri else ("sip", "", uri)
    rest, _, params = rest.split("?", 1)[0].partition(";")
    tls = scheme.strip().lower() == "sips" or any(
        p.strip().lower() == "transport=tls" for p in params.split(";")
    )
    hostport = rest.rsplit("@", 1)[-1]
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port = hostport.partition(":")
    return Hop(host, int(port) if port.isdigit() else (5061 if tls else 5060), tls)


def client_context(sip: SipConfig) -> ssl.SSLContext | None:
    """The TLS client settings the workers use towards the PBX (None over UDP)."""
    if not sip.tls:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if sip.tls_verify:
        context.load_verify_locations(cafile=sip.tls_ca)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if sip.tls_cert:
        context.load_cert_chain(sip.tls_cert, sip.tls_key)
    return context


def _uri(value: str) -> str:
    return value[value.index("<") + 1 : value.index(">")] if "<" in value else value


def destination(dialog: Dialog) -> Hop:
    """The next hop of an in-dialog request (first loose route, else the remote target)."""
    if dialog.route_set:
        return next_hop(_uri(dialog.route_set[0]))
    return next_hop(dialog.remote_target)


def invite_destination(dialog: Dialog) -> Hop:
    """Where the INVITE went, which is where its CANCEL must go."""
    if dialog.invite_routes:
        return next_hop(_uri(dialog.invite_routes[0]))
    return next_hop(dialog.request_uri)


def bye(
    dialog: Dialog, host: str, port: int, branch: str, why: Ending, transport: str = "UDP"
) -> bytes:
    """A BYE in ``dialog`` from ``host:port``, saying why in a Reason header."""
    sent_by = f"[{host}]" if ":" in host else host
    lines = [
        f"BYE {dialog.remote_target} SIP/2.0",
        f"Via: SIP/2.0/{transport} {sent_by}:{port};rport;branch={branch}",
        "Max-Forwards: 70",
        *(f"Route: {route}" for route in dialog.route_set),
        f"From: {dialog.local}",
        f"To: {dialog.remote}",
        f"Call-ID: {dialog.call_id}",
        # Above any request the worker sent in the dialog (re-INVITEs are few).
        f"CSeq: {dialog.cseq + 100} BYE",
        f'Reason: SIP;cause={why.code};text="{why.reason}"',
        "User-Agent: sipgw",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def cancel(dialog: Dialog) -> bytes:
    """The CANCEL of the dialog's INVITE (same Request-URI, Via branch, From, To, CSeq)."""
    lines = [
        f"CANCEL {dialog.request_uri} SIP/2.0",
        f"Via: {dialog.invite_via}",
        "Max-Forwards: 70",
        *(f"Route: {route}" for route in dialog.invite_routes),
        f"From: {dialog.local}",
        f"To: {dialog.invite_to}",
        f"Call-ID: {dialog.call_id}",
        f"CSeq: {dialog.cseq} CANCEL",
        "User-Agent: sipgw",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ending_request(
    dialog: Dialog, why: Ending, host: str, port: int, transport: str
) -> tuple[bytes, str]:
    """The BYE (confirmed dialog, sent from ``host:port`` over ``transport``) or the
    CANCEL (early one) that ends ``dialog``, and its Via branch."""
    if dialog.confirmed:
        branch = "z9hG4bK-sipgw-" + secrets.token_hex(8)
        return bye(dialog, host, port, branch, why, transport), branch
    message = cancel(dialog)
    return message, _branch_of(message)


def _branch_of(message: bytes) -> str:
    for line in message.split(b"\r\n"):
        lower = line.lower()
        if lower.startswith((b"via:", b"v:")):
            for param in line.split(b";")[1:]:
                name, _, value = param.strip().partition(b"=")
                if name.lower() == b"branch":
                    return value.decode("ascii", "replace")
            return ""
    return ""


def _status_of(message: bytes) -> int:
    parts = message.split(b" ", 2)
    if len(parts) >= 2 and parts[0] == b"SIP/2.0" and parts[1].isdigit():
        return int(parts[1])
    return 0


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, finals: dict[str, asyncio.Future[int]]) -> None:
        self._finals = finals

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        status = _status_of(data)
        waiter = self._finals.get(_branch_of(data))
        if status >= 200 and waiter is not None and not waiter.done():
            waiter.set_result(status)


class Orphans:
    """Sends the BYEs and CANCELs of a dead worker's calls from the front."""

    def __init__(self, bind: str, tls: ssl.SSLContext | None = None) -> None:
        self._bind = bind
        self._tls = tls
        self._transport: asyncio.DatagramTransport | None = None
        self._finals: dict[str, asyncio.Future[int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self._finals), local_addr=(self._bind, 0)
        )

    def end(self, dialog: Dialog, why: Ending) -> None:
        """Send BYE (confirmed dialog) or CANCEL (early one), retransmitting until answered."""
        if self._transport is None:
            return
        hop = destination(dialog) if dialog.confirmed else invite_destination(dialog)
        if hop.tls:
            task = asyncio.create_task(self._send_tls(dialog, why, hop))
        else:
            host, port = self._transport.get_extra_info("sockname")[:2]
            message, branch = ending_request(dialog, why, host, port, "UDP")
            task = asyncio.create_task(self._send(message, hop, branch, dialog.call_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, message: bytes, hop: Hop, branch: str, call_id: str) -> None:
        assert self._transport is not None
        method = message.split(b" ", 1)[0].decode()
        try:
            host = hop.host
            if not _is_ip(host):
                infos = await asyncio.get_running_loop().getaddrinfo(host, hop.port)
                host = str(infos[0][4][0])
        except OSError as exc:
            logger.warning("orphaned call %s: cannot resolve %s: %s", call_id, hop.host, exc)
            return
        final = asyncio.get_running_loop().create_future()
        self._finals[branch] = final
        logger.info("orphaned call %s: sending %s to %s:%s", call_id, method, host, hop.port)
        try:
            for wait in RETRANSMITS:
                self._transport.sendto(message, (host, hop.port))
                try:
                    status = await asyncio.wait_for(asyncio.shield(final), wait)
                except TimeoutError:
                    continue
                logger.info("orphaned call %s: %s answered %s", call_id, method, status)
                return
            # Some UAs (sipp) answer where the dialog began, not per Via: not an error.
            logger.info("orphaned call %s: %s got no final response here", call_id, method)
        finally:
            self._finals.pop(branch, None)

    async def _send_tls(self, dialog: Dialog, why: Ending, hop: Hop) -> None:
        """BYE or CANCEL on a new TLS connection to ``hop``; wait for its final response."""
        call_id = dialog.call_id
        if self._tls is None:
            logger.warning(
                "orphaned call %s: %s:%s is reached over TLS, but sip.transport is not tls",
                call_id, hop.host, hop.port,
            )  # fmt: skip
            return
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    hop.host, hop.port, ssl=self._tls, server_hostname=hop.host,
                    local_addr=(self._bind, 0),
                ),
                TLS_ANSWER_WAIT,
            )  # fmt: skip
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            logger.warning(
                "orphaned call %s: cannot reach %s:%s over TLS: %s",
                call_id, hop.host, hop.port, exc or type(exc).__name__,
            )  # fmt: skip
            return
        try:
            host, port = writer.get_extra_info("sockname")[:2]
            message, branch = ending_request(dialog, why, host, port, "TLS")
            method = message.split(b" ", 1)[0].decode()
            logger.info(
                "orphaned call %s: sending %s to %s:%s over TLS",
                call_id, method, hop.host, hop.port,
            )  # fmt: skip
            writer.write(message)
            await writer.drain()
            status = await asyncio.wait_for(_final_response(reader, branch), TLS_ANSWER_WAIT)
            logger.info("orphaned call %s: %s answered %s", call_id, method, status)
        except TimeoutError:
            logger.info("orphaned call %s: no final response over TLS", call_id)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            logger.info("orphaned call %s: the TLS connection ended: %r", call_id, exc)
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (OSError, TimeoutError):
                pass

    async def close(self) -> None:
        """Give the requests under way a moment, then stop."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        if self._transport is not None:
            self._transport.close()


async def _final_response(reader: asyncio.StreamReader, branch: str) -> int:
    """Read SIP messages off a stream (Content-Length framing) until a final
    response of the transaction ``branch``; its status."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        length = _content_length(head)
        if length:
            await reader.readexactly(length)
        status = _status_of(head.lstrip(b"\r\n"))
        if status >= 200 and _branch_of(head) == branch:
            return status


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() in (b"content-length", b"l"):
            value = value.strip()
            return int(value) if value.isdigit() else 0
    return 0


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
