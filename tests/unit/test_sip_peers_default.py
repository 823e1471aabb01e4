"""The default of sip.trusted_peers: the addresses of the hosts the gateway is set up to call."""

from __future__ import annotations

import pytest

from gateway.config import config_from_dict
from gateway.front.sip_peers import trusted_peers, uri_host

NAMES = {"pbx.example.com": ["192.0.2.10"], "trunk.example.net": ["198.51.100.7", "2001:db8::7"]}


def resolver(host: str) -> list[str]:
    """Names of the documentation ranges (RFC 5737, 3849); IP literals as themselves."""
    if host in NAMES:
        return NAMES[host]
    if host[0].isdigit() or ":" in host:
        return [host]
    raise OSError(f"unknown host {host}")


@pytest.mark.parametrize(
    ("uri", "host"),
    [
        ("sip:{number}@192.0.2.1:5060;transport=udp", "192.0.2.1"),
        ("sip:{number}@[2001:db8::1]:5080", "2001:db8::1"),
        ("sips:{e164}@trunk.example.net", "trunk.example.net"),
        ("sip:pbx.example.com", "pbx.example.com"),
        ("sip:x@{registrar}", "{registrar}"),
    ],
)
def test_uri_host(uri, host):
    assert uri_host(uri) == host


def test_targets_registrar_and_embedded_are_trusted():
    config = config_from_dict(
        {
            "registrar": {"uri": "sip:pbx.example.com:5060"},
            "dialplan": {
                "rules": [
                    {"name": "ext", "regex": "1[0-9]{3}", "target": "sip:{number}@{registrar}"},
                    {"name": "out", "prefix": "9", "target": "sip:{number}@trunk.example.net"},
                    {"name": "lab", "exact": "lab", "target": "sip:lab@192.0.2.99:5070"},
                    {"name": "bad", "exact": "x", "target": "sip:x@nowhere.invalid"},
                    {"name": "no", "exact": "no", "reject": 403},
                ]
            },
        }
    )
    peers = trusted_peers(config, resolver)
    assert peers.networks == (
        "192.0.2.10/32",
        "127.0.0.1/32",  # the embedded targets (on by default)
        "198.51.100.7/32",
        "2001:db8::7/128",
        "192.0.2.99/32",
    )
    assert peers.unresolved == ("nowhere.invalid",)


def test_the_default_demo_trusts_its_embedded_targets_and_a_set_list_wins():
    assert trusted_peers(config_from_dict({}), resolver).networks == ("127.0.0.1/32",)
    config = config_from_dict({"sip": {"trusted_peers": ["0.0.0.0/0", "::/0"]}})
    assert trusted_peers(config, resolver).networks == ("0.0.0.0/0", "::/0")
