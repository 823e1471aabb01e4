"""``sip.transport``, ``sip.tls_*`` and ``sip.srtp``: typed, checked at start-up, each bad
value named; and the URIs a worker dials with TLS."""

from __future__ import annotations

import re

import pytest
from peers.certs import TestCa

from gateway.config import ConfigError, SipConfig, config_from_dict, uri_transport

RULE = {"name": "pbx", "regex": "[0-9]+", "target": "sip:{number}@192.0.2.10:5061"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("pki")
    ca = TestCa.create(tmp, "ca")
    ours = ca.issue(tmp, "gateway", ip="127.0.0.1")
    other = ca.issue(tmp, "other", ip="127.0.0.1")
    garbage = tmp / "garbage.pem"
    garbage.write_text("not PEM at all\n")
    return {
        "ca": str(ca.cert),
        "cert": str(ours.cert),
        "key": str(ours.key),
        "other_key": str(other.key),
        "garbage": str(garbage),
    }


def sip(**keys: object) -> dict[str, object]:
    return {"sip": keys, "dialplan": {"rules": [RULE]}}


def test_the_default_is_udp_without_srtp():
    config = config_from_dict({})
    assert (config.sip.transport, config.sip.srtp, config.sip.tls_verify) == ("udp", "off", True)
    assert config.sip.own_accounts == 1
    assert config.sip.target_uri("sip:100@pbx") == "sip:100@pbx"


def test_tls_with_a_ca_client_cert_and_srtp(pki):
    config = config_from_dict(
        sip(
            transport="tls",
            tls_ca=pki["ca"],
            tls_cert=pki["cert"],
            tls_key=pki["key"],
            tls_port=5061,
            srtp="mandatory",
        )
    )
    assert config.sip.tls and config.sip.srtp == "mandatory"
    assert config.sip.own_accounts == 2  # the PBX's, and the embedded targets' on UDP
    # Unverified TLS is allowed when asked for in so many words.
    assert not config_from_dict(sip(transport="tls", tls_verify=False)).sip.tls_verify


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        ({"transport": "tcp"}, "sip.transport = 'tcp': expected one of udp, tls"),
        ({"transport": "TLS"}, "sip.transport = 'TLS'"),
        ({"transport": True}, "sip.transport: expected a string"),
        ({"srtp": "on"}, "sip.srtp = 'on': expected one of off, optional, mandatory"),
        ({"srtp": "mandatory"}, "sip.srtp = 'mandatory' needs sip.transport = \"tls\""),
        ({"srtp": "optional"}, "UDP carries in the clear"),
        ({"tls_ca": "{ca}"}, 'sip.tls_ca is set but sip.transport is "udp"'),
        ({"tls_port": 5061}, 'sip.tls_port is set but sip.transport is "udp"'),
        ({"tls_verify": False}, 'sip.tls_verify = false is set but sip.transport is "udp"'),
        ({"transport": "tls"}, "sip.tls_verify is on (the default): set sip.tls_ca"),
        ({"transport": "tls", "tls_verify": "yes"}, "sip.tls_verify: expected true or false"),
        (
            {"transport": "tls", "tls_ca": "/nonexistent/ca.pem"},
            "sip.tls_ca = '/nonexistent/ca.pem': cannot read it: No such file",
        ),
        ({"transport": "tls", "tls_ca": "{garbage}"}, "sip.tls_ca = '{garbage}' holds no PEM"),
        ({"transport": "tls", "tls_ca": "{key}"}, "holds no PEM certificate"),
        (
            {"transport": "tls", "tls_ca": "{ca}", "tls_cert": "{cert}"},
            "sip.tls_cert and sip.tls_key go together",
        ),
        (
            {"transport": "tls", "tls_ca": "{ca}", "tls_cert": "{key}", "tls_key": "{key}"},
            "sip.tls_cert = '{key}' holds no PEM certificate",
        ),
        (
            {"transport": "tls", "tls_ca": "{ca}", "tls_cert": "{cert}", "tls_key": "{cert}"},
            "sip.tls_key = '{cert}' is not an unencrypted PEM private key",
        ),
        (
            {"transport": "tls", "tls_ca": "{ca}", "tls_cert": "{cert}", "tls_key": "{other_key}"},
            "sip.tls_key = '{other_key}' is not the key of the certificate in sip.tls_cert",
        ),
        ({"transport": "tls", "tls_verify": False, "tls_port": 70000}, "sip.tls_port = 70000"),
        (
            {"transport": "tls", "tls_verify": False, "tls_port": 65535},
            "sip.tls_port = 65535: worker 1 would need port 65536",
        ),
    ],
    ids=lambda v: str(v)[:60],
)
def test_bad_values_name_the_key(pki, keys, words):
    keys = {k: v.format(**pki) if isinstance(v, str) else v for k, v in keys.items()}
    with pytest.raises(ConfigError) as info:
        config_from_dict(sip(**keys))
    assert words.format(**pki) in str(info.value)


@pytest.mark.parametrize(
    ("transport", "target", "words"),
    [
        ("tls", "sip:{number}@192.0.2.10;transport=udp", "asks for transport udp"),
        ("tls", "sip:{number}@192.0.2.10;transport=TCP", "asks for transport tcp"),
        ("udp", "sips:{number}@192.0.2.10", "asks for transport tls"),
        ("udp", "sip:{number}@192.0.2.10;transport=tls", "but sip.transport is 'udp'"),
    ],
)
def test_a_target_naming_another_transport_is_refused(transport, target, words):
    rule = {**RULE, "target": target}
    keys = {"transport": transport, "tls_verify": transport == "udp"}
    with pytest.raises(ConfigError, match=re.escape(words)) as info:
        config_from_dict({"sip": keys, "dialplan": {"rules": [rule]}})
    assert "dialplan rule 'pbx'" in str(info.value)


def test_the_registrar_uri_must_fit_the_transport():
    with pytest.raises(ConfigError, match=re.escape("registrar.uri asks for transport udp")):
        config_from_dict(
            {
                "sip": {"transport": "tls", "tls_verify": False},
                "registrar": {"uri": "sip:192.0.2.10;transport=udp"},
            }
        )


def test_embedded_targets_keep_their_udp_whatever_the_transport():
    # The default rules route echo and tone to {embedded}: no complaint with TLS.
    config = config_from_dict({"sip": {"transport": "tls", "tls_verify": False}})
    assert [rule.name for rule in config.rules] == ["echo", "tone"]


@pytest.mark.parametrize(
    ("uri", "dialled"),
    [
        ("sip:100@pbx.example.org", "sip:100@pbx.example.org;transport=tls"),
        ("sip:100@192.0.2.10:5061", "sip:100@192.0.2.10:5061;transport=tls"),
        ("sip:+15551234@pbx;user=phone", "sip:+15551234@pbx;user=phone;transport=tls"),
        ("sip:100@pbx?X-A=1", "sip:100@pbx;transport=tls?X-A=1"),
        ("sip:100@pbx;transport=TLS", "sip:100@pbx;transport=TLS"),
        ("sips:100@pbx", "sips:100@pbx"),
    ],
)
def test_tls_targets_get_transport_tls(uri, dialled):
    assert SipConfig(transport="tls", tls_verify=False).target_uri(uri) == dialled


@pytest.mark.parametrize(
    ("uri", "transport"),
    [
        ("sip:a@h", ""),
        ("sip:a@h;transport=UDP", "udp"),
        ("SIPS:a@h", "tls"),
        ("sip:a@h;lr;transport=tls", "tls"),
        ("sip:a@h?Route=x;transport=tcp", ""),  # a header, not a URI parameter
    ],
)
def test_uri_transport(uri, transport):
    assert uri_transport(uri) == transport
