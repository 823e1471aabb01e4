"""Who may use the WebSocket: signed tokens, allowed web origins, connections per address.

:class:`TokenVerifier` checks the JWT a browser presents in its first ``hello``
(PyJWT does the signature and the registered claims) and turns it into a
:class:`~gateway.front.calls.Grant`, or raises :class:`Unauthorized` with a
fixed, plain message: never the library's exception text. Single-use tokens
(``jti``) are remembered by :class:`UsedTokens` until they expire, in bounded
memory. :class:`OriginPolicy` decides at the WebSocket upgrade which ``Origin``
may connect, and :class:`ConnectionCounter` caps the sockets of one source
address. No I/O, clocks injectable.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jwt
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from gateway.config import AuthConfig, Config, load_public_keys, normal_origin

from .calls import Grant

#: A token longer than this is refused before it is decoded.
MAX_TOKEN_CHARS = 8192
#: Longest ``sub`` accepted (it names the user in logs and in ``welcome``).
MAX_SUB_CHARS = 256
#: Longest ``jti`` accepted, and most ``dial`` entries.
MAX_JTI_CHARS = 256
MAX_DIAL_ENTRIES = 256
#: Single-use tokens remembered at once; beyond, new single-use tokens are refused
#: until older ones expire (failing closed: a forgotten ``jti`` could be replayed).
MAX_USED_TOKENS = 100_000


class Unauthorized(Exception):
    """A token (or its absence) that does not let the client in; ``message`` is plain words."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsedTokens:
    """The ``jti`` of every single-use token seen, each until its ``exp``; bounded."""

    def __init__(
        self, capacity: int = MAX_USED_TOKENS, clock: Callable[[], float] = time.time
    ) -> None:
        self.capacity = capacity
        self._clock = clock
        self._expiry: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def use(self, jti: str, expires: float) -> None:
        """Record ``jti`` until ``expires``; :class:`Unauthorized` if it was seen already."""
        now = self._clock()
        while self._heap and self._heap[0][0] < now:
            _, old = heapq.heappop(self._heap)
            self._expiry.pop(old, None)
        key = hashlib.sha256(jti.encode("utf-8", "surrogatepass")).digest()
        if key in self._expiry:
            raise Unauthorized("token was already used (its jti is single-use)")
        if len(self._expiry) >= self.capacity:
            raise Unauthorized("too many single-use tokens are in use; try again later")
        self._expiry[key] = expires
        heapq.heappush(self._heap, (expires, key))


class TokenVerifier:
    """Checks tokens against the ``[auth]`` configuration."""

    def __init__(
        self,
        auth: AuthConfig,
        secret: bytes | None,
        public_keys: Sequence[tuple[Any, str]] = (),
        clock: Callable[[], float] = time.time,
        used: UsedTokens | None = None,
    ) -> None:
        self._auth = auth
        self._clock = clock
        self._used = used if used is not None else UsedTokens(clock=clock)
        # The keys each allowed algorithm is checked with; no key, no algorithm.
        keys: dict[str, list[Any]] = {alg: [] for alg in auth.algorithms}
        if secret is not None and "HS256" in keys:
            keys["HS256"].append(secret)
        for key, alg in public_keys:
            if alg in keys:
                keys[alg].append(key)
        self._keys = {alg: found for alg, found in keys.items() if found}

    @classmethod
    def from_config(cls, config: Config) -> TokenVerifier:
        auth = config.auth
        return cls(auth, auth.secret_bytes(), load_public_keys(auth.public_keys))

    def verify(self, token: str) -> Grant:
        """The grant ``token`` carries, or :class:`Unauthorized`."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized(f"token is empty or longer than {MAX_TOKEN_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("token is not a JWT") from None
        alg = header.get("alg")
        keys = self._keys.get(alg) if isinstance(alg, str) else None
        if not isinstance(alg, str) or not keys:
            raise Unauthorized(
                f"token algorithm is not allowed (allowed: {', '.join(sorted(self._keys))})"
            )
        claims = self._decode(token, alg, keys)
        grant = self._grant(claims)
        if "jti" in claims:
            jti = claims["jti"]
            if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_CHARS:
                raise Unauthorized(f"token 'jti' must be a string of 1-{MAX_JTI_CHARS} characters")
            self._used.use(jti, grant.expires + self._auth.leeway)
        return grant

    def _decode(self, token: str, alg: str, keys: Iterable[Any]) -> dict[str, Any]:
        """The verified claims. ``alg`` is one of the configured algorithms, ``keys`` its keys."""
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=self._auth.audience,
                    leeway=self._auth.leeway,
                    options={"require": ["exp", "aud", "sub"]},
                )
            except jwt.InvalidSignatureError:
                continue  # maybe the next key (key rotation)
            except jwt.PyJWTError as exc:
                raise Unauthorized(_plain(exc)) from None
            if not isinstance(claims, dict):  # pragma: no cover - PyJWT returns a dict
                break
            return claims
        raise Unauthorized("token signature is not valid")

    def _grant(self, claims: Mapping[str, Any]) -> Grant:
        now = self._clock()
        for name in ("exp", "iat", "nbf"):  # PyJWT would take "123" as well
            value = claims.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Unauthorized(f"token '{name}' must be a number")
        sub = claims["sub"]
        if not isinstance(sub, str) or not 0 < len(sub) <= MAX_SUB_CHARS or not sub.isprintable():
            raise Unauthorized(f"token 'sub' must be 1-{MAX_SUB_CHARS} printable characters")
        exp = claims["exp"]  # PyJWT checked that it is a number in the future
        iat = claims.get("iat")
        lifetime = exp - iat if isinstance(iat, int | float) else exp - now
        if lifetime > self._auth.max_ttl:
            raise Unauthorized(
                f"token is valid for longer than the gateway allows ({self._auth.max_ttl} s)"
            )
        dial = claims.get("dial")
        if dial is not None and (
            not isinstance(dial, list)
            or len(dial) > MAX_DIAL_ENTRIES
            or not all(isinstance(name, str) for name in dial)
        ):
            raise Unauthorized(
                "token 'dial' must be a list of dialplan rule names or E.164 prefixes"
            )
        max_calls = claims.get("max_calls")
        if max_calls is not None and (
            isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1
        ):
            raise Unauthorized("token 'max_calls' must be a positive integer")
        max_duration = claims.get("max_duration")
        if max_duration is not None and (
            isinstance(max_duration, bool)
            or not isinstance(max_duration, int | float)
            or not 1 <= max_duration <= 7 * 86400
        ):
            raise Unauthorized("token 'max_duration' must be a number of seconds, 1 to 604800")
        return Grant(
            user=sub,
            dial=frozenset(dial) if dial is not None else None,
            max_calls=max_calls,
            expires=float(exp),
            max_duration=float(max_duration) if max_duration is not None else None,
        )


def _plain(exc: Exception) -> str:
    """A fixed message for each way PyJWT refuses a token (its own text is never sent)."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token has expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token is not valid yet"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token is not meant for this gateway (wrong 'aud')"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        claim = exc.claim if exc.claim in ("exp", "aud", "sub") else "a required"
        return f"token lacks the '{claim}' claim"
    if isinstance(exc, jwt.InvalidIssuedAtError):
        return "token 'iat' must be a number"
    if isinstance(exc, InvalidSubjectError):
        return "token 'sub' must be a string"
    if isinstance(exc, InvalidJTIError):
        return "token 'jti' must be a string"
    if isinstance(exc, jwt.DecodeError):
        return "token is not a valid JWT"
    return "token is not valid"


class OriginPolicy:
    """Which ``Origin`` may open the WebSocket.

    With no list configured, the gateway's own origin: ``http(s)://`` plus the
    request's ``Host``. A gateway listening on loopback only takes a ``Host`` that
    names loopback (``localhost``, ``127.x.x.x``, ``[::1]``): a name that merely
    resolves there could be a DNS rebinding attack from another site's page.
    A missing ``Origin`` (a client that is not a browser) is allowed only when
    ``allow_missing``.
    """

    def __init__(self, allowed: Iterable[str], allow_missing: bool, loopback: bool) -> None:
        normal = [normal_origin(origin) for origin in allowed]
        self._allowed = frozenset(o for o in normal if o is not None)
        self._allow_missing = allow_missing
        self._loopback = loopback

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None:
            return self._allow_missing
        mine = normal_origin(origin)
        if mine is None:
            return False  # "null", other schemes, garbage
        if self._allowed:
            return mine in self._allowed
        return host is not None and self._own(mine, host)

    def _own(self, origin: str, host: str) -> bool:
        scheme = origin.split(":", 1)[0]
        served = normal_origin(f"{scheme}://{host}")
        if served != origin:
            return False
        if not self._loopback:
            return True
        name = origin.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
        if name == "localhost":
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False


class ConnectionCounter:
    """Open WebSocket connections per source address, at most ``limit`` each (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        """Count one more connection from ``address``; ``False`` (not counted) if at the limit."""
        count = self._open.get(address, 0)
        if self.limit and count >= self.limit:
            return False
        self._open[address] = count + 1
        return True

    def release(self, address: str) -> None:
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)

    def __len__(self) -> int:
        return len(self._open)


def loopback_peer(remote: str | None) -> bool:
    """Is ``remote`` (a request's peer address) on this host's loopback?"""
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


class ClientAddress:
    """The browser's address: the TCP peer, or what a trusted reverse proxy says.

    ``X-Forwarded-For`` is read only when the peer is one of ``trusted``
    (``http.trusted_proxies``); then the address is the right-most entry that is
    not itself a trusted proxy (each proxy appends the address it saw, so the
    entries to its left are the client's word and can be forged).
    """

    def __init__(self, trusted: Sequence[str]) -> None:
        self._trusted = [ipaddress.ip_network(t, strict=False) for t in trusted]

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def of(self, remote: str | None, forwarded_for: str | None) -> str:
        peer = remote or ""
        if not forwarded_for or not self._is_trusted(peer):
            return peer
        for entry in reversed([e.strip() for e in forwarded_for.split(",")]):
            try:
                ipaddress.ip_address(entry)
            except ValueError:
                return peer  # garbage in the header: trust nothing of it
            if not self._is_trusted(entry):
                return entry
        return peer
