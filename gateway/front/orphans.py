"""End the SIP legs a dead worker left behind: BYE once answered, CANCEL while ringing.

A worker keeps the front informed of each call's dialog
(:class:`~gateway.ipc.Dialog`: Call-ID, tags, remote target, route set,
CSeq, the INVITE's Via). When the worker dies, its pjsua2 stack is gone, so
the front sends the BYE or CANCEL itself over UDP from ``sip.bind``, and
retransmits it (RFC 3261 timer E: 0.5, 1, 2, 4 s) until a final response.
The request comes from another port than the dead worker's; SIP matches
in-dialog requests and CANCELs by Call-ID, tags and branch, not by port.
Only a UDP next hop is supported, like the workers themselves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from dataclasses import dataclass

from gateway.ipc import Dialog
from gateway.outcomes import Ending

logger = logging.getLogger(__name__)

#: Retransmission intervals, seconds (timer E doubling from T1 = 0.5 s).
RETRANSMITS = (0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Hop:
    host: str
    port: int


def next_hop(uri: str) -> Hop:
    """Where a request to ``uri`` goes: the URI's host and port (5060 if none)."""
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    rest = rest.split(";", 1)[0].split("?", 1)[0]
    hostport = rest.rsplit("@", 1)[-1]
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port = hostport.partition(":")
    return Hop(host, int(port) if port.isdigit() else 5060)


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


def bye(dialog: Dialog, host: str, port: int, branch: str, why: Ending) -> bytes:
    """A BYE in ``dialog`` from ``host:port``, saying why in a Reason header."""
    sent_by = f"[{host}]" if ":" in host else host
    lines = [
        f"BYE {dialog.remote_target} SIP/2.0",
        f"Via: SIP/2.0/UDP {sent_by}:{port};rport;branch={branch}",
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

    def __init__(self, bind: str) -> None:
        self._bind = bind
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
        if dialog.confirmed:
            host, port = self._transport.get_extra_info("sockname")[:2]
            branch = "z9hG4bK-sipgw-" + secrets.token_hex(8)
            message, hop = bye(dialog, host, port, branch, why), destination(dialog)
        else:
            message, hop = cancel(dialog), invite_destination(dialog)
            branch = _branch_of(message)
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

    async def close(self) -> None:
        """Give the requests under way a moment, then stop."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        if self._transport is not None:
            self._transport.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
