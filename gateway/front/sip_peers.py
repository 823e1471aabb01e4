"""Who may send new SIP requests to the workers: ``sip.trusted_peers``, or the targets' hosts.

An empty ``sip.trusted_peers`` (the default) does not mean "anyone": the
gateway trusts the hosts it was configured to talk to, the hosts of the
dialplan's targets, the registrar and the embedded targets, resolved once at
start-up. A stranger spraying INVITEs or OPTIONS at the workers then gets no
answer at all. ``["0.0.0.0/0", "::/0"]`` trusts everyone.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.config import Config

logger = logging.getLogger(__name__)

Resolver = Callable[[str], list[str]]


@dataclass(frozen=True)
class PeerSources:
    """The trusted networks, and the hosts that gave none (unresolvable or templated)."""

    networks: tuple[str, ...]
    unresolved: tuple[str, ...] = ()


def resolve(host: str) -> list[str]:
    """Every address ``host`` resolves to (an IP literal is itself)."""
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    return sorted({str(info[4][0]) for info in infos})


def uri_host(uri: str) -> str:
    """The host of a ``sip:`` URI or target template (``sip:{number}@[::1]:5060;x`` -> ``::1``)."""
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    rest = rest.split(";", 1)[0].split("?", 1)[0].split(">", 1)[0]
    hostport = rest.rsplit("@", 1)[-1]
    if hostport.startswith("["):
        return hostport[1 : hostport.find("]")] if "]" in hostport else hostport
    return hostport.split(":", 1)[0]


def _target_hosts(config: Config) -> Iterable[str]:
    """The host of every place the gateway sends calls or registrations."""
    variables = {"embedded": config.embedded.bind}
    if config.registrar.uri:
        variables["registrar"] = uri_host(config.registrar.uri)
        yield variables["registrar"]
    if config.embedded.enabled:
        yield config.embedded.bind
    for rule in config.rules:
        if rule.target is None:
            continue
        host = uri_host(rule.target)
        fields = [f for _, f, _, _ in string.Formatter().parse(host) if f is not None]
        if fields and all(f in variables for f in fields):
            host = host.format_map(variables)
        yield host


def trusted_peers(config: Config, resolver: Resolver = resolve) -> PeerSources:
    """``sip.trusted_peers`` if set, else the networks of the configured targets' hosts."""
    if config.sip.trusted_peers:
        return PeerSources(config.sip.trusted_peers)
    networks: dict[str, None] = {}
    unresolved: list[str] = []
    for host in dict.fromkeys(_target_hosts(config)):
        if not host or "{" in host:
            unresolved.append(host)
            continue
        try:
            addresses = resolver(host)
        except (OSError, UnicodeError):
            unresolved.append(host)
            continue
        for address in addresses:
            ip = ipaddress.ip_address(address)
            networks[str(ipaddress.ip_network(ip))] = None
    return PeerSources(tuple(networks), tuple(unresolved))


def worker_trusted_peers(config: Config) -> tuple[str, ...]:
    """The networks the workers admit new requests from (empty: no check), logged once."""
    peers = trusted_peers(config)
    if config.sip.trusted_peers:
        return peers.networks
    for host in peers.unresolved:
        logger.warning(
            "sip.trusted_peers: cannot tell the address of target host %r at start-up; "
            "list its addresses in sip.trusted_peers or its requests get no answer",
            host,
        )
    if not peers.networks:
        logger.warning("sip.trusted_peers: no target address known: every source is admitted")
        return ()
    logger.info("SIP requests admitted from %s (sip.trusted_peers)", ", ".join(peers.networks))
    return peers.networks
