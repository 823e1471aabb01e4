"""Is anyone listening? A closed SIP port, told in milliseconds instead of 30 s.

pjsip sends its INVITE from an unconnected UDP socket, which never hears the
ICMP "port unreachable" a host sends back for a closed port: the call would
wait for the invite timeout. While the INVITE waits for its first response,
the worker sends a few SIP keep-alives (a bare CRLFCRLF, RFC 5626 section
4.4.1, which every SIP stack ignores) to the same address from a *connected*
UDP socket; the kernel reports that ICMP on a connected socket as
``ConnectionRefusedError``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: What is sent: a SIP keep-alive, ignored by anything listening.
KEEPALIVE = b"\r\n\r\n"
#: Seconds between keep-alives (the ICMP answer of a closed port is immediate).
INTERVAL = 0.25


@dataclass(frozen=True)
class Target:
    """Where a UDP INVITE for a SIP URI goes, when that is known without DNS SRV."""

    host: str
    port: int


def udp_target(uri: str) -> Target | None:
    """The host and port of a ``sip:`` URI sent over UDP, or ``None`` if not plain.

    ``None`` for ``sips:``, ``transport=tcp/tls/ws``, and a host name without a
    port (its address may come from DNS SRV records, which this does not follow).
    """
    scheme, _, rest = uri.partition(":")
    if scheme.lower() != "sip" or not rest:
        return None
    hostport, _, params = rest.rpartition("@")[2].partition(";")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "transport" and value.strip().lower() != "udp":
            return None
    hostport = hostport.split("?", 1)[0]
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = hostport.partition(":")
    try:
        port = int(port_text) if port_text else 0
    except ValueError:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not port:
            return None  # SRV territory
    if not host or not 0 <= port < 65536:
        return None
    return Target(host, port or 5060)


class _Listener(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.refused = asyncio.get_running_loop().create_future()

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError) and not self.refused.done():
            self.refused.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.refused.done():
            self.refused.set_result(False)


async def port_closed(target: Target, duration: float) -> bool:
    """Whether ``target`` answers keep-alives with ICMP port unreachable within ``duration``."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_DGRAM)
        family, address = infos[0][0], infos[0][4]
        transport, listener = await loop.create_datagram_endpoint(
            _Listener, remote_addr=(str(address[0]), int(address[1])), family=family
        )
    except OSError as exc:
        logger.debug("probe of %s:%s not sent: %s", target.host, target.port, exc)
        return False
    try:
        deadline = loop.time() + duration
        while loop.time() < deadline:
            transport.sendto(KEEPALIVE)
            try:
                return await asyncio.wait_for(asyncio.shield(listener.refused), INTERVAL)
            except TimeoutError:
                continue
        return False
    finally:
        transport.close()
