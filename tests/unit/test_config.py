"""Configuration: defaults, and every bad key named."""

from __future__ import annotations

import re

import pytest

from dialplan import Action, route
from gateway.config import Config, ConfigError, config_from_dict, load_config


def test_default_is_the_embedded_demo():
    config = load_config(None)
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8080)
    assert config.workers.calls_per_worker == 4
    assert config.embedded.enabled
    assert route("echo", config.rules, {"embedded": "127.0.0.1:5"}).uri == "sip:echo@127.0.0.1:5"
    assert route("tone", config.rules, {"embedded": "h:1"}).uri == "sip:tone@h:1"
    assert route("0044123", config.rules, {"embedded": "h:1"}).action is Action.REJECT


def test_values_are_typed():
    config = config_from_dict(
        {
            "sip": {"invite_timeout": 5, "codecs": ["PCMA"]},
            "webrtc": {"ice_servers": [{"urls": "stun:192.0.2.1:3478"}]},
        }
    )
    assert config.sip.invite_timeout == 5.0
    assert config.sip.codecs == ("PCMA",)
    assert config.webrtc.ice_servers[0].urls == ("stun:192.0.2.1:3478",)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"http": {"prot": 1}}, "http: unknown key 'prot'"),
        ({"http": {"port": 0}}, "http.port"),
        ({"http": {"port": True}}, "http.port: expected an integer"),
        ({"sip": {"bind": "localhost"}}, "sip.bind"),
        ({"sip": {"codecs": []}}, "sip.codecs"),
        ({"sip": {"user": "a b"}}, "sip.user"),
        ({"workers": {"count": 0}}, "workers.count"),
        ({"webrtc": {"ice_servers": [{"urls": ["http://x"]}]}}, "ice_servers[0].urls"),
        ({"webrtc": {"ice_servers": [{}]}}, "missing key 'urls'"),
        ({"embedded": {"enabled": "yes"}}, "embedded.enabled: expected true or false"),
        ({"embedded": {"enabled": False}}, "embedded.enabled is false"),
        ({"embedded": {"port": 65535}}, "targets process 1 would need port 65536"),
        ({"embedded": {"rtp_port": 65400}}, "2 targets processes need 100 RTP ports"),
        ({"embedded": {"rtp_port": 20150}}, "overlap the workers'"),
        ({"workers": {"count": 12}}, "embedded.rtp_port = 19000: its 12 blocks"),
        ({"dialplan": {"rules": [{"name": "a", "exact": "1"}]}}, "dialplan"),
        ({"dialplan": {"rulez": []}}, "unknown key 'rulez'"),
        ({"x": {}}, "unknown section [x]"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_values_name_the_key(data, words):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("count", "calls", "processes"),
    [(1, 1, 1), (1, 4, 1), (2, 4, 2), (3, 3, 3), (5, 3, 4)],
    ids=lambda v: str(v),
)
def test_enough_embedded_targets_for_every_worker_call(count, calls, processes):
    config = config_from_dict({"workers": {"count": count, "calls_per_worker": calls}})
    assert config.embedded_processes == processes


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().http.port = 1  # type: ignore[misc]


SECRET = "s" * 32


@pytest.mark.parametrize(
    ("http", "auth", "enabled"),
    [
        ({}, {}, False),  # the embedded demo on 127.0.0.1 stays open
        ({"host": "localhost"}, {}, False),
        ({"host": "::1"}, {}, False),
        ({"host": "0.0.0.0"}, {"audience": "a", "secret": SECRET}, True),
        ({"host": "192.0.2.20"}, {"audience": "a", "secret": SECRET}, True),
        ({"host": "0.0.0.0"}, {"enabled": False}, False),
        ({}, {"enabled": True, "audience": "a", "secret": SECRET}, True),
    ],
    ids=lambda v: str(v)[:40],
)
def test_auth_is_on_by_default_off_loopback(http, auth, enabled):
    assert config_from_dict({"http": http, "auth": auth}).auth_enabled is enabled


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"http": {"host": "0.0.0.0"}}, "auth.audience must be set when auth is on (auth is on"),
        ({"http": {"host": "0.0.0.0"}, "auth": {"audience": "a"}}, "neither auth.secret"),
        ({"auth": {"secret": "short"}}, "auth.secret is shorter than 32 bytes"),
        ({"auth": {"secret": SECRET, "secret_env": "X"}}, "not both"),
        ({"auth": {"secret_env": "1X"}}, "not an environment variable name"),
        (
            {"auth": {"enabled": True, "audience": "a", "secret_env": "SIPGW_TEST_UNSET_VAR"}},
            "'SIPGW_TEST_UNSET_VAR': that environment variable is not set",
        ),
        ({"auth": {"algorithms": ["none"]}}, "'none' is not supported"),
        ({"auth": {"algorithms": ["HS512"]}}, "'HS512' is not supported"),
        ({"auth": {"algorithms": []}}, "at least one algorithm"),
        ({"auth": {"max_ttl": 0}}, "auth.max_ttl"),
        ({"auth": {"enabled": "yes"}}, "auth.enabled: expected true or false"),
        ({"auth": {"secrett": SECRET}}, "auth: unknown key 'secrett'"),
        (
            {"auth": {"enabled": True, "audience": "a", "algorithms": ["RS256"]}},
            "RS256 is allowed but auth.public_keys has no RSA key",
        ),
        (
            {
                "auth": {
                    "enabled": True,
                    "audience": "a",
                    "secret": SECRET,
                    "public_keys": ["/x.pem"],
                }
            },
            "auth.public_keys[0]: cannot read /x.pem",
        ),
        ({"http": {"allowed_origins": ["https://a.example/"]}}, "http.allowed_origins[0]"),
        ({"http": {"allowed_origins": ["*"]}}, "is not an origin"),
        ({"http": {"allowed_origins": ["null"]}}, "is not an origin"),
        ({"http": {"max_messages_per_second": 0}}, "http.max_messages_per_second"),
        ({"http": {"max_connections_per_ip": -1}}, "http.max_connections_per_ip"),
    ],
    ids=lambda v: str(v)[:50],
)
def test_bad_auth_and_limits_name_the_key(data, words):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert words in str(info.value)


def test_the_secret_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SIPGW_TEST_SECRET", SECRET)
    config = config_from_dict(
        {"auth": {"enabled": True, "audience": "a", "secret_env": "SIPGW_TEST_SECRET"}}
    )
    assert config.auth.secret_bytes() == SECRET.encode()
    monkeypatch.setenv("SIPGW_TEST_SECRET", "short")
    with pytest.raises(ConfigError, match="shorter than 32 bytes"):
        config.auth.secret_bytes()


def test_public_keys_are_read_and_matched_to_their_algorithm(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    def pem(key) -> str:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.pem"
        path.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return str(path)

    rsa_pem = pem(rsa.generate_private_key(65537, 2048))
    ec_pem = pem(ec.generate_private_key(ec.SECP256R1()))
    small_pem = pem(rsa.generate_private_key(65537, 1024))
    p384_pem = pem(ec.generate_private_key(ec.SECP384R1()))
    base = {"enabled": True, "audience": "a"}
    config = config_from_dict(
        {"auth": {**base, "algorithms": ["RS256", "ES256"], "public_keys": [rsa_pem, ec_pem]}}
    )
    assert config.auth_enabled
    for keys, words in [
        ([small_pem], "RSA key of 1024 bits"),
        ([p384_pem], "neither an RSA key (RS256) nor a P-256 EC key"),
        ([ec_pem], "RS256 is allowed but auth.public_keys has no RSA key"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            config_from_dict({"auth": {**base, "algorithms": ["RS256"], "public_keys": keys}})
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(ConfigError, match="is not a PEM public key"):
        config_from_dict({"auth": {**base, "algorithms": ["RS256"], "public_keys": [str(garbage)]}})
    with pytest.raises(ConfigError, match=r"which auth\.algorithms does not allow"):
        config_from_dict({"auth": {**base, "secret": SECRET, "public_keys": [rsa_pem]}})


def test_server_side_accounts_are_bound_to_token_subjects():
    registrar = {"uri": "sip:192.0.2.10"}
    account = {"user": "1001", "password": "pw"}
    config = config_from_dict({"registrar": registrar, "accounts": [account]})
    (bound,) = config.accounts
    assert bound.may_register(None)  # auth off (the loopback demo)
    assert bound.may_register("1001") and not bound.may_register("mallory")
    config = config_from_dict(
        {"registrar": registrar, "accounts": [{**account, "subs": ["alice", "bob"]}]}
    )
    (bound,) = config.accounts
    assert bound.may_register("bob") and not bound.may_register("1001")
    with pytest.raises(ConfigError, match=re.escape("accounts[0].subs[0]")):
        config_from_dict({"registrar": registrar, "accounts": [{**account, "subs": [""]}]})
    # Off loopback with auth off, anyone could register them by name: refused.
    with pytest.raises(ConfigError, match=re.escape("[[accounts]] with auth off")):
        config_from_dict(
            {
                "http": {"host": "0.0.0.0"},
                "auth": {"enabled": False},
                "registrar": registrar,
                "accounts": [account],
            }
        )
