"""Typed gateway configuration, read from TOML and validated at start-up.

Every section is a frozen dataclass with a default for every field, so an empty
file (or no file) gives the embedded default: HTTP on 127.0.0.1:8080 and the
built-in ``echo`` and ``tone`` targets. Any unknown key, wrong type or bad value
stops the start with a :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dialplan import DialplanError, Rule, load_rules
from dialplan.numbers import is_region

#: Names the dialplan templates may use besides the number placeholders.
DIALPLAN_VARIABLES = ("embedded", "registrar")


class ConfigError(ValueError):
    """A configuration key is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class HttpConfig:
    """The front process: HTTP, the demo page and WebSocket signaling."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: Largest WebSocket text frame accepted from a browser, in bytes.
    max_message_bytes: int = 65536
    #: Calls one WebSocket connection may have open at once.
    max_calls_per_connection: int = 8
    #: ``call`` requests one connection may make per second (beyond: ``busy``).
    max_call_rate: int = 10
    #: Seconds between WebSocket pings; a connection that misses a pong is closed
    #: (and its calls hung up) within two intervals.
    heartbeat: float = 15.0
    #: Web origins allowed to open the WebSocket (``https://phone.example.org``).
    #: Empty: the gateway's own origin only (the page it serves itself).
    allowed_origins: tuple[str, ...] = ()
    #: Messages one connection may send per second; beyond: ``rate_limited``.
    max_messages_per_second: int = 50
    #: WebSocket connections open at once from one source address (0: no limit).
    max_connections_per_ip: int = 20
    #: Live calls of one token ``sub``, all connections together (0: no limit).
    max_calls_per_user: int = 4
    #: Live calls from one source address, all connections together (0: no limit).
    max_calls_per_ip: int = 16
    #: Live outgoing calls of the whole gateway (0: the workers' capacity alone).
    max_calls_total: int = 0
    #: Calls one token ``sub`` may start per minute (0: no limit).
    calls_per_minute_per_user: int = 30
    #: Calls one source address may start per minute (0: no limit).
    calls_per_minute_per_ip: int = 60
    #: Serve HTTPS/WSS with this certificate chain and key (PEM files); both or neither.
    tls_cert: str = ""
    tls_key: str = ""
    #: Reverse proxies (addresses or networks) whose ``X-Forwarded-For`` is believed.
    trusted_proxies: tuple[str, ...] = ()
    #: ``/metrics`` wants ``Authorization: Bearer <this>`` (empty: open, as /healthz).
    metrics_token: str = field(default="", repr=False)
    #: ...or the name of an environment variable holding it.
    metrics_token_env: str = ""

    @property
    def loopback(self) -> bool:
        """Does the HTTP server listen on a loopback address only?"""
        return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback

    def validate(self) -> None:
        if self.host != "localhost":
            _check_ip("http.host", self.host)
        _check_port("http.port", self.port)
        _check_range("http.max_message_bytes", self.max_message_bytes, 1024, 16 * 1024 * 1024)
        _check_range("http.max_calls_per_connection", self.max_calls_per_connection, 1, 1000)
        _check_range("http.max_call_rate", self.max_call_rate, 1, 1000)
        _check_range("http.heartbeat", self.heartbeat, 1.0, 300.0)
        for i, origin in enumerate(self.allowed_origins):
            if normal_origin(origin) is None:
                raise ConfigError(
                    f"config: http.allowed_origins[{i}] = {origin!r} is not an origin "
                    "(http:// or https://, a host and an optional port, nothing else)"
                )
        _check_range("http.max_messages_per_second", self.max_messages_per_second, 1, 100000)
        _check_range("http.max_connections_per_ip", self.max_connections_per_ip, 0, 1000000)
        for key in (
            "max_calls_per_user",
            "max_calls_per_ip",
            "max_calls_total",
            "calls_per_minute_per_user",
            "calls_per_minute_per_ip",
        ):
            _check_range(f"http.{key}", getattr(self, key), 0, 1000000)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("config: http.tls_cert and http.tls_key go together: set both")
        for key in ("tls_cert", "tls_key"):
            path = getattr(self, key)
            if path and not os.path.isfile(path):
                raise ConfigError(f"config: http.{key} = {path!r}: no such file")
        for i, proxy in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigError(
                    f"config: http.trusted_proxies[{i}] = {proxy!r} is not an address or network"
                ) from None
        if self.metrics_token_env and not os.environ.get(self.metrics_token_env):
            raise ConfigError(
                f"config: http.metrics_token_env = {self.metrics_token_env!r}: "
                "that environment variable is not set"
            )

    @property
    def metrics_secret(self) -> str:
        """The bearer token ``/metrics`` asks for ("" when it is open)."""
        if self.metrics_token_env:
            return os.environ.get(self.metrics_token_env, "")
        return self.metrics_token


_ORIGIN = re.compile(
    r"(?P<scheme>https?)://(?P<host>\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?",
    re.IGNORECASE,
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normal_origin(origin: str) -> str | None:
    """``origin`` as ``scheme://host:port`` (lower case, port always given), or ``None``.

    Only what a browser sends in ``Origin`` for an http(s) page is an origin:
    no path, query, user or trailing slash. ``null`` and other schemes are not.
    """
    match = _ORIGIN.fullmatch(origin)
    if match is None:
        return None
    scheme, host = match["scheme"].lower(), match["host"].lower()
    port = int(match["port"]) if match["port"] else _DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535 or not host.strip("."):
        return None
    return f"{scheme}://{host}:{port}"


@dataclass(frozen=True)
class WorkersConfig:
    """Worker processes: each owns one pjsua2 Endpoint and the aiortc legs of its calls."""

    count: int = 2
    #: pjsua2's PyPI wheel allows 4 calls per process (PJSUA_MAX_CALLS).
    calls_per_worker: int = 4
    #: Seconds to wait before restarting a worker that died.
    restart_delay: float = 1.0
    #: Calls one worker may start per second. pjlib holds each closed RTP/RTCP
    #: socket's slot of its 64-slot pool for 500 ms, so faster churn could empty it.
    max_setups_per_second: int = 20

    def validate(self) -> None:
        _check_range("workers.count", self.count, 1, 256)
        _check_range("workers.calls_per_worker", self.calls_per_worker, 1, 4)
        _check_range("workers.restart_delay", self.restart_delay, 0.0, 600.0)
        # 40 aborted a worker: 486s at that rate ran pjlib's 64-slot socket pool dry.
        _check_range("workers.max_setups_per_second", self.max_setups_per_second, 1, 20)


#: Values of ``sip.session_timers``.
SESSION_TIMER_MODES = ("off", "optional", "required", "always")
#: Values of ``sip.transport``: how the workers reach the PBX.
SIP_TRANSPORTS = ("udp", "tls")
#: Values of ``sip.srtp`` (SDES keying, RFC 4568).
SRTP_MODES = ("off", "optional", "mandatory")


@dataclass(frozen=True)
class SipConfig:
    """The SIP leg (pjsua2) in every worker."""

    #: Address the workers' SIP and RTP sockets bind to.
    bind: str = "127.0.0.1"
    #: SIP UDP port of worker 0; worker N uses port + N. 0 picks free ports.
    port: int = 0
    #: Start of the RTP port block: worker N uses ``rtp_port + 100 * N`` to ``+ 99``.
    #: Below Linux's ephemeral range (32768+), where aiortc's sockets live.
    rtp_port: int = 20000
    #: User part of the From header on outgoing calls.
    user: str = "sipgw"
    #: Codecs offered on the SIP leg, most preferred first.
    codecs: tuple[str, ...] = ("PCMU", "PCMA", "G722")
    #: Seconds to wait for the target to ring (18x) or answer before giving up with 408.
    #: Below pjsip's own 32 s INVITE timeout, so the gateway's 408 is the one reported.
    invite_timeout: float = 30.0
    #: pjsip log level written to the worker's stderr (0 = off, 6 = everything).
    log_level: int = 1
    #: RFC 4028 session timers: "off", "optional" (used when the far end supports
    #: them), "required" (Require: timer) or "always" (refresh even if the far end
    #: does not say it supports them).
    session_timers: str = "optional"
    #: Session-Expires offered, in seconds; an unrefreshed session ends.
    session_expires: int = 1800
    #: Smallest Session-Expires accepted (Min-SE); a 422 raises ours to the far end's.
    min_se: int = 90
    #: Header names a browser's ``call`` may add to the INVITE (``"X-*"`` patterns,
    #: case-insensitive). Empty: none. Core and identity headers never.
    allowed_headers: tuple[str, ...] = ()
    #: Networks (CIDR) allowed to send new out-of-dialog requests to the workers.
    #: Empty: no source check. In-dialog requests (BYE, re-INVITE) are not checked.
    trusted_peers: tuple[str, ...] = ()
    #: Answer to requests from other sources: 0 (no response) or 403.
    untrusted_answer: int = 0
    #: How the workers reach the PBX: "udp", or "tls" (every target but the embedded
    #: ones gets ``;transport=tls``). The embedded targets stay on loopback UDP.
    transport: str = "udp"
    #: SIP/TLS listening port of worker 0; worker N uses tls_port + N. 0 picks free ports.
    tls_port: int = 0
    #: CA certificates (PEM) the PBX's certificate must chain to.
    tls_ca: str = ""
    #: Check the PBX's certificate: chain to ``tls_ca``, name = the target's host.
    tls_verify: bool = True
    #: The gateway's own certificate chain and key (PEM), shown to a PBX that asks
    #: for one and to PBXes connecting to the TLS port; both or neither.
    tls_cert: str = ""
    tls_key: str = ""
    #: SRTP to the PBX, keys exchanged in the SDP (SDES): "off", "optional" (offered
    #: as RTP/AVP with keys, used when the answer takes it) or "mandatory" (RTP/SAVP).
    srtp: str = "off"

    @property
    def tls(self) -> bool:
        return self.transport == "tls"

    @property
    def own_accounts(self) -> int:
        """pjsua accounts a worker holds for itself: the PBX's, and with TLS one more
        for the embedded targets (loopback UDP, no SRTP)."""
        return 2 if self.tls else 1

    def target_uri(self, uri: str) -> str:
        """``uri`` as a worker dials it at the PBX: with ``;transport=tls`` added
        when the transport is TLS and the URI names none (``sips:`` is left alone)."""
        if not self.tls or uri_transport(uri):
            return uri
        head, question, tail = uri.partition("?")
        return f"{head};transport=tls{question}{tail}"

    def validate(self) -> None:
        _check_ip("sip.bind", self.bind)
        for cidr in self.trusted_peers:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(
                    f"config: sip.trusted_peers: {cidr!r} is not an address or network"
                ) from None
        if self.untrusted_answer not in (0, 403):
            raise ConfigError(
                f"config: sip.untrusted_answer = {self.untrusted_answer}: expected 0 or 403"
            )
        if ipaddress.ip_address(self.bind).is_unspecified:
            raise ConfigError(
                f"config: sip.bind = {self.bind!r}: give the address the PBX should reach "
                "(it appears in the From and Contact headers), not a wildcard"
            )
        if self.port != 0:
            _check_port("sip.port", self.port)
        _check_range("sip.rtp_port", self.rtp_port, 1024, 65435)
        _check_token("sip.user", self.user)
        known = {"PCMU", "PCMA", "G722"}
        if not self.codecs:
            raise ConfigError("config: sip.codecs must name at least one codec")
        for codec in self.codecs:
            if codec not in known:
                raise ConfigError(
                    f"config: sip.codecs: unknown codec {codec!r} (known: {sorted(known)})"
                )
        _check_range("sip.invite_timeout", self.invite_timeout, 0.5, 300.0)
        _check_range("sip.log_level", self.log_level, 0, 6)
        if self.session_timers not in SESSION_TIMER_MODES:
            raise ConfigError(
                f"config: sip.session_timers = {self.session_timers!r}: expected one of "
                f"{', '.join(SESSION_TIMER_MODES)}"
            )
        _check_range("sip.min_se", self.min_se, 90, 86400)
        for i, pattern in enumerate(self.allowed_headers):
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*\*?", pattern):
                raise ConfigError(
                    f"config: sip.allowed_headers[{i}] = {pattern!r}: a header name, "
                    'or a prefix ending in * ("X-*")'
                )
        _check_range("sip.session_expires", self.session_expires, self.min_se, 86400)
        self._validate_tls()

    def _validate_tls(self) -> None:
        if self.transport not in SIP_TRANSPORTS:
            raise ConfigError(
                f"config: sip.transport = {self.transport!r}: expected one of "
                f"{', '.join(SIP_TRANSPORTS)}"
            )
        if self.srtp not in SRTP_MODES:
            raise ConfigError(
                f"config: sip.srtp = {self.srtp!r}: expected one of {', '.join(SRTP_MODES)}"
            )
        if not self.tls:
            if self.srtp != "off":
                # SDES puts the SRTP keys in the SDP: over UDP anyone who can read the
                # signalling can decrypt the media, so it would only look protected.
                raise ConfigError(
                    f'config: sip.srtp = {self.srtp!r} needs sip.transport = "tls": SDES '
                    "sends the SRTP keys in the SDP, which UDP carries in the clear"
                )
            for key in ("tls_port", "tls_ca", "tls_cert", "tls_key"):
                if getattr(self, key):
                    raise ConfigError(
                        f'config: sip.{key} is set but sip.transport is "udp" '
                        '(set sip.transport = "tls" to use it)'
                    )
            if not self.tls_verify:
                raise ConfigError(
                    'config: sip.tls_verify = false is set but sip.transport is "udp"'
                )
            return
        if self.tls_port != 0:
            _check_port("sip.tls_port", self.tls_port)
        if self.tls_verify and not self.tls_ca:
            raise ConfigError(
                "config: sip.tls_verify is on (the default): set sip.tls_ca to the CA "
                "certificates (PEM) the PBX's certificate chains to"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("config: sip.tls_cert and sip.tls_key go together: set both")
        check_tls_files("sip", self.tls_ca, self.tls_cert, self.tls_key)


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server given to aiortc and to the browser."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None


@dataclass(frozen=True)
class WebRtcConfig:
    """The WebRTC leg (aiortc) in every worker."""

    #: STUN/TURN servers. Empty (the default) means host candidates only, no STUN wait.
    ice_servers: tuple[IceServer, ...] = ()
    #: Local addresses offered as ICE host candidates. Empty means every interface.
    ice_addresses: tuple[str, ...] = ()
    #: Seconds without an answered ICE consent check before the browser's
    #: connection counts as lost (RFC 7675 says 30).
    consent_timeout: float = 30.0

    def validate(self) -> None:
        for i, server in enumerate(self.ice_servers):
            if not server.urls:
                raise ConfigError(f"config: webrtc.ice_servers[{i}].urls must not be empty")
            for url in server.urls:
                if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
                    raise ConfigError(
                        f"config: webrtc.ice_servers[{i}].urls: {url!r} is not a stun:/turn: URL"
                    )
        for addr in self.ice_addresses:
            _check_ip("webrtc.ice_addresses", addr)
        _check_range("webrtc.consent_timeout", self.consent_timeout, 5.0, 300.0)


@dataclass(frozen=True)
class CallsConfig:
    """Bounds on every call's life, enforced on both legs."""

    #: Seconds for the browser's ICE and DTLS to connect after the answer; after
    #: that the call ends with ``ice_failed`` (before any INVITE, by default).
    setup_timeout: float = 10.0
    #: Send the INVITE only once the browser's ICE and DTLS are connected, so no
    #: phone rings for a browser that can never be heard. ``false`` sends it at
    #: once (lower post-dial delay; an ICE failure then sends CANCEL or BYE).
    invite_after_ice: bool = True
    #: Seconds without audio from either leg (a leg on hold does not count)
    #: before the call ends with ``media_timeout``. 0 turns it off.
    media_timeout: float = 30.0
    #: Seconds a call may ring (after the first 18x) before it is cancelled with
    #: 480 ``no_answer``. 0 turns it off.
    max_ringing: float = 60.0
    #: Seconds an answered call may last before the gateway hangs it up. 0 = no limit.
    max_duration: float = 0.0

    def validate(self) -> None:
        _check_range("calls.setup_timeout", self.setup_timeout, 1.0, 120.0)
        if self.media_timeout:
            _check_range("calls.media_timeout", self.media_timeout, 1.0, 3600.0)
        if self.max_ringing:
            _check_range("calls.max_ringing", self.max_ringing, 1.0, 3600.0)
        if self.max_duration:
            _check_range("calls.max_duration", self.max_duration, 1.0, 7 * 86400.0)


@dataclass(frozen=True)
class EmbeddedConfig:
    """The built-in SIP targets ``echo`` and ``tone``, reached over real SIP on loopback."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    #: SIP UDP port of the embedded targets; 0 picks a free one.
    port: int = 0
    #: First of the 100 RTP ports the embedded targets may use.
    rtp_port: int = 19000
    #: Frequency of the ``tone`` target, in Hz.
    tone_hz: int = 1000

    def validate(self) -> None:
        _check_ip("embedded.bind", self.bind)
        if self.port != 0:
            _check_port("embedded.port", self.port)
        _check_range("embedded.rtp_port", self.rtp_port, 1024, 65435)
        _check_range("embedded.tone_hz", self.tone_hz, 50, 3900)


@dataclass(frozen=True)
class RegistrarConfig:
    """The PBX or registrar browsers register to, through the gateway (softphone use)."""

    #: Registrar URI (``sip:pbx.example.com`` or ``sip:192.0.2.10:5060``). Empty: no
    #: registration; ``register`` requests get ``unavailable``.
    uri: str = ""
    #: Domain of the users' addresses of record (``sip:USER@DOMAIN``); empty: the
    #: registrar URI's host.
    domain: str = ""
    #: Registration lifetime asked for, in seconds; pjsip refreshes before it ends
    #: and honours a shorter one from the registrar.
    expires: int = 300
    #: Seconds an incoming call rings in the browser before it is refused with 480.
    ring_timeout: float = 30.0
    #: The digest realm the users' passwords are for: only challenges in this
    #: realm are answered (an attacker's 407 with another realm gets no digest).
    #: Empty: the users' domain. Asterisk's default realm is ``asterisk``.
    realm: str = ""

    def validate(self) -> None:
        if self.realm and (not _plain(self.realm) or "*" in self.realm):
            raise ConfigError(
                f"config: registrar.realm = {self.realm!r} is not a realm (no spaces, "
                "quotes, angle brackets or *)"
            )
        if self.uri:
            if not self.uri.startswith(("sip:", "sips:")) or not _plain(self.uri):
                raise ConfigError(
                    f"config: registrar.uri = {self.uri!r}: expected a sip: URI "
                    "without spaces, quotes or angle brackets"
                )
        if self.domain and not _plain(self.domain):
            raise ConfigError(f"config: registrar.domain = {self.domain!r} is not a host name")
        _check_range("registrar.expires", self.expires, 60, 86400)
        _check_range("registrar.ring_timeout", self.ring_timeout, 1.0, 600.0)

    @property
    def digest_realm(self) -> str:
        """The realm whose challenges the users' credentials answer."""
        return self.realm or self.realm_domain

    @property
    def realm_domain(self) -> str:
        """The users' domain: ``domain``, or the registrar URI's host."""
        if self.domain:
            return self.domain
        hostport = self.uri.split(":", 1)[1].split(";", 1)[0].rsplit("@", 1)[-1]
        if hostport.startswith("["):
            return hostport.split("]", 1)[0] + "]"
        return hostport.split(":", 1)[0]


@dataclass(frozen=True)
class AccountConfig:
    """A server-side SIP account: the browser registers by user name, no password sent."""

    user: str
    #: The password itself, or (better) the environment variable holding it.
    password: str = ""
    password_env: str = ""
    #: Digest user name when it differs from ``user``.
    auth_user: str = ""
    display_name: str = ""
    #: With ``[auth]`` on, the token subjects (``sub``) that may register this
    #: account. Empty: only a token whose ``sub`` is the account's ``user``.
    subs: tuple[str, ...] = ()

    def may_register(self, subject: str | None) -> bool:
        """Whether a connection whose token names ``subject`` (``None``: auth off) may use it."""
        return subject is None or subject in (self.subs or (self.user,))

    def secret(self) -> str:
        if self.password_env:
            return os.environ.get(self.password_env, "")
        return self.password


def _plain(text: str) -> bool:
    """No whitespace, quotes, angle brackets or control characters (safe in a SIP header)."""
    return bool(text) and not any(c.isspace() or c in '"<>\\' or ord(c) < 32 for c in text)


#: Token signature algorithms the gateway can check (``none`` is never one of them).
AUTH_ALGORITHMS = ("HS256", "RS256", "ES256")
#: An HS256 secret must be at least as long as the hash (RFC 7518, section 3.2).
MIN_SECRET_BYTES = 32
#: RSA public keys shorter than this are refused (NIST SP 800-131A).
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class AuthConfig:
    """Signed tokens (JWT) that a browser must present in its first ``hello``."""

    #: ``None`` (the default): on unless ``http.host`` is a loopback address.
    enabled: bool | None = None
    #: Signature algorithms accepted, from :data:`AUTH_ALGORITHMS`.
    algorithms: tuple[str, ...] = ("HS256",)
    #: The HS256 secret itself, or (better) the name of an environment variable holding it.
    secret: str = ""
    secret_env: str = ""
    #: PEM files of the public keys that RS256/ES256 tokens are checked against.
    public_keys: tuple[str, ...] = ()
    #: The ``aud`` claim every token must carry.
    audience: str = ""
    #: Seconds a token may be valid for (``exp - iat``, or ``exp - now`` without ``iat``).
    max_ttl: int = 900
    #: Seconds of clock difference tolerated on ``exp``, ``nbf`` and ``iat``.
    leeway: int = 5
    #: Let clients that send no ``Origin`` header (not browsers) connect.
    allow_non_browser: bool = False

    def validate(self) -> None:
        if not self.algorithms:
            raise ConfigError("config: auth.algorithms must name at least one algorithm")
        for alg in self.algorithms:
            if alg not in AUTH_ALGORITHMS:
                raise ConfigError(
                    f"config: auth.algorithms: {alg!r} is not supported "
                    f"(known: {', '.join(AUTH_ALGORITHMS)})"
                )
        if self.secret and self.secret_env:
            raise ConfigError("config: auth: give auth.secret or auth.secret_env, not both")
        if self.secret_env and not _ENV_NAME.fullmatch(self.secret_env):
            raise ConfigError(
                f"config: auth.secret_env = {self.secret_env!r} is not an environment variable name"
            )
        if self.secret and len(self.secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"config: auth.secret is shorter than {MIN_SECRET_BYTES} bytes "
                "(generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        _check_range("auth.max_ttl", self.max_ttl, 1, 86400)
        _check_range("auth.leeway", self.leeway, 0, 300)

    def secret_bytes(self) -> bytes | None:
        """The HS256 secret (read from the environment for ``secret_env``), or ``None``.

        Raises :class:`ConfigError` when ``secret_env`` names a variable that is
        not set, is empty or is too short.
        """
        if self.secret:
            return self.secret.encode()
        if not self.secret_env:
            return None
        value = os.environ.get(self.secret_env, "")
        if not value:
            raise ConfigError(
                f"config: auth.secret_env = {self.secret_env!r}: that environment variable "
                "is not set or is empty"
            )
        if len(value.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"config: auth.secret_env = {self.secret_env!r}: the secret is shorter than "
                f"{MIN_SECRET_BYTES} bytes"
            )
        return value.encode()

    def check_keys(self) -> None:
        """Check that every algorithm allowed has its key material: a secret, or public keys."""
        if "HS256" in self.algorithms and self.secret_bytes() is None:
            raise ConfigError(
                "config: auth: HS256 is allowed but neither auth.secret nor auth.secret_env is set"
            )
        kinds = [kind for _, kind in load_public_keys(self.public_keys)]
        for alg in ("RS256", "ES256"):
            if alg in self.algorithms and alg not in kinds:
                raise ConfigError(
                    f"config: auth: {alg} is allowed but auth.public_keys has no "
                    f"{'RSA' if alg == 'RS256' else 'P-256 EC'} key"
                )
        for path, kind in zip(self.public_keys, kinds, strict=True):
            if kind not in self.algorithms:
                raise ConfigError(
                    f"config: auth.public_keys: {path} is a key for {kind}, "
                    "which auth.algorithms does not allow"
                )


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def load_public_keys(paths: tuple[str, ...]) -> list[tuple[Any, str]]:
    """Each PEM public key file read and parsed, with the algorithm it serves.

    ``cryptography`` is imported only when there are keys to read.
    """
    if not paths:
        return []
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    keys: list[tuple[Any, str]] = []
    for i, path in enumerate(paths):
        where = f"auth.public_keys[{i}]"
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"config: {where}: cannot read {path}: {exc.strerror}") from None
        try:
            key = load_pem_public_key(data)
        except (ValueError, TypeError):
            raise ConfigError(f"config: {where}: {path} is not a PEM public key") from None
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < MIN_RSA_BITS:
                raise ConfigError(
                    f"config: {where}: {path} is an RSA key of {key.key_size} bits "
                    f"(at least {MIN_RSA_BITS})"
                )
            keys.append((key, "RS256"))
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            keys.append((key, "ES256"))
        else:
            raise ConfigError(
                f"config: {where}: {path} is neither an RSA key (RS256) nor a P-256 EC key (ES256)"
            )
    return keys


#: Routes used when the config has no ``[[dialplan.rules]]``: only the embedded targets.
DEFAULT_RULES: tuple[dict[str, Any], ...] = (
    {"name": "echo", "exact": "echo", "target": "sip:echo@{embedded}"},
    {"name": "tone", "exact": "tone", "target": "sip:tone@{embedded}"},
)


#: Calls one embedded targets process answers at once: PJSUA_MAX_CALLS in pjsua2-python.
EMBEDDED_CALLS_PER_PROCESS = 4


@dataclass(frozen=True)
class Config:
    """The whole gateway configuration."""

    http: HttpConfig = field(default_factory=HttpConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    sip: SipConfig = field(default_factory=SipConfig)
    webrtc: WebRtcConfig = field(default_factory=WebRtcConfig)
    calls: CallsConfig = field(default_factory=CallsConfig)
    registrar: RegistrarConfig = field(default_factory=RegistrarConfig)
    accounts: tuple[AccountConfig, ...] = ()
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    rules: tuple[Rule, ...] = field(
        default_factory=lambda: load_rules(list(DEFAULT_RULES), DIALPLAN_VARIABLES)
    )

    @property
    def embedded_processes(self) -> int:
        """Embedded targets processes needed to answer every call the workers can carry."""
        calls = self.workers.count * self.workers.calls_per_worker
        return max(1, -(-calls // EMBEDDED_CALLS_PER_PROCESS))

    @property
    def auth_enabled(self) -> bool:
        """``auth.enabled``, or by default: on unless the HTTP server listens on loopback."""
        if self.auth.enabled is not None:
            return self.auth.enabled
        return not self.http.loopback

    def validate(self) -> None:
        for section in (
            self.http,
            self.workers,
            self.sip,
            self.webrtc,
            self.calls,
            self.registrar,
            self.embedded,
            self.auth,
        ):
            section.validate()
        self._validate_accounts()
        if not self.registrar.uri:
            for rule in self.rules:
                if rule.target and "{registrar}" in rule.target:
                    raise ConfigError(
                        f"config: dialplan rule {rule.name!r} routes to {{registrar}} "
                        "but registrar.uri is not set"
                    )
        if self.auth_enabled:
            self._validate_auth()
        last = self.workers.count - 1
        if self.sip.port and self.sip.port + last > 65535:
            raise ConfigError(
                f"config: sip.port = {self.sip.port}: worker {last} would need port "
                f"{self.sip.port + last} (worker N uses sip.port + N)"
            )
        if self.sip.tls_port and self.sip.tls_port + last > 65535:
            raise ConfigError(
                f"config: sip.tls_port = {self.sip.tls_port}: worker {last} would need port "
                f"{self.sip.tls_port + last} (worker N uses sip.tls_port + N)"
            )
        self._validate_transports()
        if self.sip.rtp_port + 100 * self.workers.count > 65536:
            raise ConfigError(
                f"config: sip.rtp_port = {self.sip.rtp_port}: {self.workers.count} workers need "
                f"100 RTP ports each, past port 65535"
            )
        if self.embedded.enabled:
            self._validate_embedded_ports()
        else:
            for rule in self.rules:
                if rule.target and "{embedded}" in rule.target:
                    raise ConfigError(
                        f"config: dialplan rule {rule.name!r} routes to {{embedded}} "
                        "but embedded.enabled is false"
                    )

    def _validate_transports(self) -> None:
        """Targets and the registrar ask for no transport the workers do not use for them.

        With TLS every target but the embedded ones gets ``;transport=tls``; one that
        names UDP or TCP would contradict it. Without TLS the workers have no TLS
        transport, so a ``sips:`` or ``transport=tls`` target could never be reached.
        """
        wanted = "tls" if self.sip.tls else "udp"
        named = [
            (f"dialplan rule {rule.name!r}", rule.target)
            for rule in self.rules
            if rule.target and "{embedded}" not in rule.target
        ]
        if self.registrar.uri:
            named.append(("registrar.uri", self.registrar.uri))
        for where, uri in named:
            transport = uri_transport(uri)
            if transport and transport != wanted:
                raise ConfigError(
                    f"config: {where} asks for transport {transport} ({uri!r}) but "
                    f"sip.transport is {self.sip.transport!r}"
                )

    def _validate_accounts(self) -> None:
        seen: set[str] = set()
        for i, account in enumerate(self.accounts):
            where = f"config: accounts[{i}]"
            _check_token(f"accounts[{i}].user", account.user)
            if account.user in seen:
                raise ConfigError(f"{where}: user {account.user!r} appears twice")
            seen.add(account.user)
            if bool(account.password) == bool(account.password_env):
                raise ConfigError(f"{where}: give exactly one of password and password_env")
            if account.password_env and account.password_env not in os.environ:
                raise ConfigError(
                    f"{where}.password_env: environment variable {account.password_env!r} "
                    "is not set"
                )
            for j, sub in enumerate(account.subs):
                if not isinstance(sub, str) or not sub or not sub.isprintable():
                    raise ConfigError(f"{where}.subs[{j}] = {sub!r}: a token subject (sub)")
            for key in ("auth_user", "display_name"):
                value = getattr(account, key)
                if value and not _plain(value.replace(" ", "_")):
                    raise ConfigError(f"{where}.{key} = {value!r}: no quotes, <, > or controls")
        if self.accounts and not self.registrar.uri:
            raise ConfigError("config: [[accounts]] need a registrar (registrar.uri)")
        if self.accounts and not self.auth_enabled and not self.http.loopback:
            raise ConfigError(
                "config: [[accounts]] with auth off on a non-loopback http.host would let anyone "
                "who reaches the WebSocket register them by name: turn [auth] on (each account "
                "is then bound to token subjects, accounts[].subs)"
            )

    def _validate_auth(self) -> None:
        why = (
            ""
            if self.auth.enabled
            else (
                f" (auth is on because http.host = {self.http.host!r} is not a loopback address; "
                "set auth.enabled = false to run without tokens)"
            )
        )
        if not self.auth.audience:
            raise ConfigError(f"config: auth.audience must be set when auth is on{why}")
        try:
            self.auth.check_keys()
        except ConfigError as exc:
            raise ConfigError(f"{exc}{why}") from None

    def _validate_embedded_ports(self) -> None:
        embedded, count = self.embedded, self.embedded_processes
        last = count - 1
        if embedded.port and embedded.port + last > 65535:
            raise ConfigError(
                f"config: embedded.port = {embedded.port}: targets process {last} would need "
                f"port {embedded.port + last} (process N uses embedded.port + N)"
            )
        rtp_end = embedded.rtp_port + 100 * count
        if rtp_end > 65536:
            raise ConfigError(
                f"config: embedded.rtp_port = {embedded.rtp_port}: {count} targets processes "
                "need 100 RTP ports each, past port 65535"
            )
        workers_end = self.sip.rtp_port + 100 * self.workers.count
        if embedded.rtp_port < workers_end and self.sip.rtp_port < rtp_end:
            raise ConfigError(
                f"config: embedded.rtp_port = {embedded.rtp_port}: its {count} blocks of 100 "
                f"RTP ports overlap the workers' (sip.rtp_port = {self.sip.rtp_port}, "
                f"{self.workers.count} blocks)"
            )


_SECTIONS: dict[str, type[Any]] = {
    "http": HttpConfig,
    "workers": WorkersConfig,
    "sip": SipConfig,
    "webrtc": WebRtcConfig,
    "calls": CallsConfig,
    "registrar": RegistrarConfig,
    "embedded": EmbeddedConfig,
    "auth": AuthConfig,
}


def load_config(path: Path | None) -> Config:
    """Read and validate a TOML file; ``None`` gives the embedded default."""
    if path is None:
        config = Config()
        config.validate()
        return config
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from exc
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a :class:`Config` from parsed TOML, naming any bad key."""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "dialplan":
            kwargs["rules"] = _load_dialplan(value)
        elif key == "accounts":
            if not isinstance(value, list):
                raise ConfigError("config: accounts must be an array of tables ([[accounts]])")
            kwargs["accounts"] = tuple(
                _build(AccountConfig, item, f"accounts[{i}]") for i, item in enumerate(value)
            )
        elif key in _SECTIONS:
            kwargs[key] = _build(_SECTIONS[key], value, key)
        else:
            known = sorted([*_SECTIONS, "dialplan", "accounts"])
            raise ConfigError(f"config: unknown section [{key}] (known: {', '.join(known)})")
    config = Config(**kwargs)
    config.validate()
    return config


def _load_dialplan(value: Any) -> tuple[Rule, ...]:
    if not isinstance(value, dict):
        raise ConfigError("config: [dialplan] must be a table")
    unknown = set(value) - {"rules", "default_region"}
    if unknown:
        raise ConfigError(
            f"config: dialplan: unknown key {sorted(unknown)[0]!r} (known: default_region, rules)"
        )
    region = value.get("default_region", "")
    if not isinstance(region, str) or (region and not is_region(region)):
        raise ConfigError(
            f'config: dialplan.default_region: {region!r} is not a region code such as "US"'
        )
    try:
        return load_rules(value.get("rules", []), DIALPLAN_VARIABLES, region)
    except DialplanError as exc:
        raise ConfigError(f"config: {exc}") from exc


def _build(cls: type[Any], data: Any, where: str) -> Any:
    """Construct dataclass ``cls`` from a TOML table, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: {where} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"config: {where}: unknown key {key!r} (known: {', '.join(sorted(fields))})"
            )
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}")
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"config: {where}: missing key {missing[0]!r}")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(options[0], value, where)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"config: {where}: expected an array, got {_kind(value)}")
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type[Any], hint), value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config: {where}: expected true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config: {where}: expected an integer, got {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config: {where}: expected a number, got {_kind(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config: {where}: expected a string, got {_kind(value)}")
        return value
    raise ConfigError(f"config: {where}: unsupported type {hint!r}")  # pragma: no cover


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"config: {key} = {value!r} is out of range ({low} to {high})")


def _check_port(key: str, value: int) -> None:
    _check_range(key, value, 1, 65535)


def _check_ip(key: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"config: {key} = {value!r} is not an IP address") from None


def _check_token(key: str, value: str) -> None:
    if not value or not all((c.isascii() and c.isalnum()) or c in "-_.!~*'()+" for c in value):
        raise ConfigError(f"config: {key} = {value!r} is not a valid SIP user part")


def uri_transport(uri: str) -> str:
    """The transport a SIP URI asks for: ``"tls"`` for ``sips:``, else its ``transport``
    parameter in lower case, else ``""``."""
    scheme, _, rest = uri.strip().partition(":")
    if scheme.lower() == "sips":
        return "tls"
    params = rest.split("?", 1)[0].split(";")[1:]
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "transport":
            return value.strip().lower()
    return ""


def check_tls_files(section: str, ca: str, cert: str, key: str) -> None:
    """Each PEM file given exists and holds what it should, and the key fits the cert.

    pjsip reads these files only when a TLS connection is made, so a bad file would
    otherwise show up as a failed call long after the start.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    def read(name: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"config: {section}.{name} = {path!r}: cannot read it: {exc.strerror}"
            ) from None

    # (ConfigError is a ValueError: each file is read before the parser's try.)
    if ca:
        data = read("tls_ca", ca)
        try:
            x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ConfigError(
                f"config: {section}.tls_ca = {ca!r} holds no PEM certificate"
            ) from None
    if not cert:
        return
    data = read("tls_cert", cert)
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            f"config: {section}.tls_cert = {cert!r} holds no PEM certificate"
        ) from None
    data = read("tls_key", key)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"config: {section}.tls_key = {key!r} is not an unencrypted PEM private key"
        ) from None
    if not isinstance(private, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"config: {section}.tls_key = {key!r}: an RSA or EC key, please (the pjsua2 "
            "wheel's OpenSSL 1.0.2k knows no other)"
        )
    ours = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = (
        chain[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    if ours != theirs:
        raise ConfigError(
            f"config: {section}.tls_key = {key!r} is not the key of the certificate in "
            f"{section}.tls_cert"
        )
