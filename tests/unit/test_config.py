"""Configuration: defaults, and every bad key named."""

from __future__ import annotations

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
