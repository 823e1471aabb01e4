"""Tokens, origins and connection counts, checked without a gateway (PyJWT does the crypto)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config import AuthConfig
from gateway.front.auth import (
    MAX_TOKEN_CHARS,
    ConnectionCounter,
    OriginPolicy,
    TokenVerifier,
    Unauthorized,
    UsedTokens,
    loopback_peer,
)

SECRET = b"0123456789abcdef0123456789abcdef-unit"


def now() -> int:
    """PyJWT checks exp, nbf and iat against the real clock: tokens are made around it."""
    return int(time.time())


AUD = "sipgw-unit"


class Clock:
    """The real time, or a fixed one once ``now`` is set."""

    def __init__(self, now: float | None = None) -> None:
        self.now = now

    def __call__(self) -> float:
        return time.time() if self.now is None else self.now


def verifier(clock: Clock | None = None, **auth: object) -> TokenVerifier:
    config = AuthConfig(**{"audience": AUD, **auth})  # type: ignore[arg-type]
    rsa_key = RSA_KEY.public_key()
    ec_key = EC_KEY.public_key()
    return TokenVerifier(config, SECRET, [(rsa_key, "RS256"), (ec_key, "ES256")], clock or Clock())


RSA_KEY = rsa.generate_private_key(65537, 2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def claims(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {"sub": "alice", "aud": AUD, "iat": now(), "exp": now() + 300}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def hs256(**changes: object) -> str:
    return jwt.encode(claims(**changes), SECRET, algorithm="HS256")


def unsigned(**changes: object) -> str:
    """An ``alg: none`` token (what an attacker sends hoping the signature is skipped)."""

    def part(data: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims(**changes))}."


def test_a_valid_token_gives_its_grant():
    exp = now() + 300
    grant = verifier().verify(hs256(dial=["echo", "tone"], max_calls=2, exp=exp))
    assert grant.user == "alice"
    assert grant.dial == frozenset({"echo", "tone"})
    assert grant.max_calls == 2
    assert grant.expires == exp
    bare = verifier().verify(hs256())
    assert (bare.dial, bare.max_calls) == (None, None)


REFUSED = [
    ("expired", lambda: hs256(iat=now() - 400, exp=now() - 100), "token has expired"),
    ("not-yet-valid", lambda: hs256(nbf=now() + 60), "token is not valid yet"),
    ("iat-in-the-future", lambda: hs256(iat=now() + 60, exp=now() + 300), "not valid yet"),
    ("too-long-lived", lambda: hs256(exp=now() + 901), "longer than the gateway allows"),
    (
        "too-long-lived-no-iat",
        lambda: hs256(iat=None, exp=now() + 1000),
        "longer than the gateway allows",
    ),
    (
        "old-iat-long-life",
        lambda: hs256(iat=now() - 1000, exp=now() + 10),
        "longer than the gateway allows",
    ),
    (
        "bad-signature",
        lambda: jwt.encode(claims(), b"another secret of at least 32 bytes!!", algorithm="HS256"),
        "signature is not valid",
    ),
    ("alg-none", lambda: unsigned(), "algorithm is not allowed"),
    (
        "rs256-when-only-hs256",
        lambda: jwt.encode(claims(), RSA_KEY, algorithm="RS256"),
        "algorithm is not allowed (allowed: HS256)",
    ),
    (
        "hs512",
        lambda: jwt.encode(claims(), SECRET + SECRET, algorithm="HS512"),
        "algorithm is not allowed",
    ),
    ("wrong-aud", lambda: hs256(aud="someone-else"), "wrong 'aud'"),
    ("no-aud", lambda: hs256(aud=None), "lacks the 'aud' claim"),
    ("no-sub", lambda: hs256(sub=None), "lacks the 'sub' claim"),
    ("no-exp", lambda: hs256(exp=None), "lacks the 'exp' claim"),
    ("empty-sub", lambda: hs256(sub=""), "'sub' must be"),
    ("control-in-sub", lambda: hs256(sub="a\r\nb"), "'sub' must be"),
    ("number-sub", lambda: hs256(sub=5), "'sub' must be a string"),
    ("string-exp", lambda: hs256(exp=str(now() + 60)), "'exp' must be a number"),
    ("dial-not-list", lambda: hs256(dial="echo"), "'dial' must be a list"),
    ("dial-not-strings", lambda: hs256(dial=[1]), "'dial' must be a list"),
    ("max-calls-zero", lambda: hs256(max_calls=0), "'max_calls' must be a positive integer"),
    ("max-calls-bool", lambda: hs256(max_calls=True), "'max_calls' must be a positive integer"),
    ("not-a-jwt", lambda: "hello", "token is not a JWT"),
    ("empty", lambda: "", "token is empty"),
    ("huge", lambda: "a" * (MAX_TOKEN_CHARS + 1), "longer than"),
    ("garbage-payload", lambda: hs256().split(".")[0] + ".!!!.x", "not a JWT"),
]


@pytest.mark.parametrize(("make", "words"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_every_bad_token_is_refused_in_plain_words(make, words):
    with pytest.raises(Unauthorized) as refused:
        verifier(algorithms=("HS256",)).verify(make())
    assert words in refused.value.message
    # Never PyJWT's own text or a Python repr.
    assert "Error" not in refused.value.message and "(exp)" not in refused.value.message


def test_the_clock_leeway_forgives_a_few_seconds():
    assert verifier(leeway=5).verify(hs256(iat=now() + 3, exp=now() + 300))
    with pytest.raises(Unauthorized):
        verifier(leeway=0).verify(hs256(iat=now() + 3, exp=now() + 300))


def test_public_key_algorithms_and_key_rotation():
    both = verifier(algorithms=("RS256", "ES256"))
    assert both.verify(jwt.encode(claims(), RSA_KEY, algorithm="RS256")).user == "alice"
    assert both.verify(jwt.encode(claims(), EC_KEY, algorithm="ES256")).user == "alice"
    with pytest.raises(Unauthorized, match="algorithm is not allowed"):
        both.verify(hs256())  # HS256 not in this allow-list, though a secret is known
    other = rsa.generate_private_key(65537, 2048)
    with pytest.raises(Unauthorized, match="signature is not valid"):
        both.verify(jwt.encode(claims(), other, algorithm="RS256"))
    # Two RSA keys (rotation): either one's tokens pass.
    rotated = TokenVerifier(
        AuthConfig(audience=AUD, algorithms=("RS256",)),
        None,
        [(RSA_KEY.public_key(), "RS256"), (other.public_key(), "RS256")],
        Clock(),
    )
    assert rotated.verify(jwt.encode(claims(sub="bob"), other, algorithm="RS256")).user == "bob"


def test_an_hmac_token_signed_with_the_public_key_is_refused():
    """The classic key confusion: HS256 "signed" with the RSA public key's PEM."""
    from cryptography.hazmat.primitives import serialization

    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    # PyJWT refuses to sign with a PEM as an HMAC key; build the forgery by hand.
    def part(data: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    signing = f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims())}"
    signature = hmac.new(pem, signing.encode(), hashlib.sha256).digest()
    forged = f"{signing}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
    with pytest.raises(Unauthorized, match="algorithm is not allowed"):
        verifier(algorithms=("RS256",)).verify(forged)
    with pytest.raises(Unauthorized, match="signature is not valid"):
        verifier(algorithms=("HS256", "RS256")).verify(forged)


def test_a_single_use_token_works_once_and_is_forgotten_after_it_expires():
    clock = Clock()
    check = verifier(clock)
    token = hs256(jti="once-1")
    assert check.verify(token).user == "alice"
    with pytest.raises(Unauthorized, match="already used"):
        check.verify(token)
    assert check.verify(hs256(jti="once-2"))  # another jti is another token
    assert check.verify(hs256()) and check.verify(hs256())  # no jti: reusable
    # A token refused for another reason does not burn its jti.
    with pytest.raises(Unauthorized, match="wrong 'aud'"):
        check.verify(hs256(jti="once-3", aud="x"))
    assert check.verify(hs256(jti="once-3"))


def test_used_tokens_are_bounded_and_pruned():
    t0 = 1_000_000.0  # no PyJWT here: any clock will do
    clock = Clock(t0)
    used = UsedTokens(capacity=3, clock=clock)
    for i in range(3):
        used.use(f"j{i}", t0 + 10 + i)
    with pytest.raises(Unauthorized, match="too many single-use tokens"):
        used.use("j3", t0 + 100)
    clock.now = t0 + 11  # j0 expired: room again
    used.use("j3", t0 + 100)
    assert len(used) == 3
    with pytest.raises(Unauthorized, match="already used"):
        used.use("j2", t0 + 100)
    clock.now = t0 + 1000
    used.use("j0", t0 + 1100)  # long expired, forgotten: a new token may reuse it
    assert len(used) == 1


OWN = "127.0.0.1:8080"


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("http://127.0.0.1:8080", OWN, True),
        ("HTTP://127.0.0.1:8080", OWN, True),
        ("https://127.0.0.1:8080", OWN, True),
        ("http://localhost:8080", "localhost:8080", True),
        ("http://[::1]:8080", "[::1]:8080", True),
        ("http://evil.example", OWN, False),
        ("http://127.0.0.1:8081", OWN, False),
        ("http://127.0.0.1", OWN, False),
        ("null", OWN, False),
        ("file://", OWN, False),
        ("http://127.0.0.1:8080/", OWN, False),
        ("http://127.0.0.1:8080", None, False),
        # DNS rebinding: a name of the attacker's resolving to 127.0.0.1.
        ("http://rebind.example:8080", "rebind.example:8080", False),
        (None, OWN, False),
    ],
)
def test_own_origin_on_loopback(origin, host, allowed):
    policy = OriginPolicy((), allow_missing=False, loopback=True)
    assert policy.allows(origin, host) is allowed


def test_own_origin_behind_a_proxy_and_a_configured_list():
    public = OriginPolicy((), allow_missing=False, loopback=False)
    assert public.allows("https://phone.example.org", "phone.example.org")
    assert public.allows("https://phone.example.org", "phone.example.org:443")
    assert not public.allows("https://phone.example.org", "phone.example.org:8443")
    assert not public.allows("https://evil.example", "phone.example.org")
    listed = OriginPolicy(
        ["https://shop.example", "http://LOCALHOST:3000"], allow_missing=True, loopback=True
    )
    assert listed.allows("https://shop.example:443", "gw.example")
    assert listed.allows("http://localhost:3000", "127.0.0.1:8080")
    assert not listed.allows("http://127.0.0.1:8080", OWN)  # the list replaces the default
    assert listed.allows(None, OWN)


def test_connections_per_address():
    counter = ConnectionCounter(2)
    assert counter.acquire("a") and counter.acquire("a") and counter.acquire("b")
    assert not counter.acquire("a")
    counter.release("a")
    assert counter.acquire("a")
    for _ in range(2):
        counter.release("a")
    counter.release("b")
    assert len(counter) == 0
    unlimited = ConnectionCounter(0)
    assert all(unlimited.acquire("a") for _ in range(1000))


def test_only_loopback_peers_count_as_local():
    assert loopback_peer("127.0.0.1") and loopback_peer("127.8.9.1") and loopback_peer("::1")
    assert not loopback_peer("192.0.2.7")
    assert not loopback_peer("::ffff:192.0.2.7")
    assert not loopback_peer("")
    assert not loopback_peer(None)
    assert not loopback_peer("not an address")


def test_client_address_believes_forwarded_for_only_from_trusted_proxies():
    from gateway.front.auth import ClientAddress

    none = ClientAddress([])
    assert none.of("198.51.100.1", "203.0.113.5") == "198.51.100.1"
    proxies = ClientAddress(["10.0.0.0/8", "192.0.2.1"])
    assert proxies.of("198.51.100.1", "203.0.113.5") == "198.51.100.1"  # not a proxy
    assert proxies.of("10.1.2.3", "203.0.113.5") == "203.0.113.5"
    # The right-most entry that is not a proxy: the left ones are the client's word.
    assert proxies.of("10.1.2.3", "6.6.6.6, 203.0.113.5, 192.0.2.1") == "203.0.113.5"
    assert proxies.of("10.1.2.3", "203.0.113.5, junk") == "10.1.2.3"
    assert proxies.of("10.1.2.3", "") == "10.1.2.3"
    assert proxies.of("10.1.2.3", "10.9.9.9") == "10.1.2.3"  # only proxies: the peer
