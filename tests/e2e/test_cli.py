"""Start-up: a bad configuration stops ``sipgw`` with a message naming the key."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from conftest import ROOT, free_port

import gateway

CASES = [
    ("unknown-key", "[sip]\ncodec = ['PCMU']\n", "sip: unknown key 'codec'"),
    ("wrong-type", "[http]\nport = 'eighty'\n", "http.port: expected an integer"),
    ("out-of-range", "[workers]\ncalls_per_worker = 5\n", "workers.calls_per_worker"),
    ("bad-codec", "[sip]\ncodecs = ['OPUS']\n", "unknown codec 'OPUS'"),
    ("bad-section", "[sipp]\nx = 1\n", "unknown section [sipp]"),
    ("bad-toml", "[sip\n", "not valid TOML"),
    (
        "bad-rule",
        "[[dialplan.rules]]\nname = 'x'\nexact = '1'\ntagret = 'sip:a@b'\n",
        "'tagret'",
    ),
]


@pytest.mark.parametrize(("text", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_refused_at_start(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_check_accepts_the_default(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--check", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def _run_gateway(tmp_path, config: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gateway.toml"
    path.write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_sip_port_in_use_stops_the_start_with_one_line(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        http = free_port()
        result = _run_gateway(
            tmp_path, f"[http]\nport = {http}\n[sip]\nport = {port}\nlog_level = 0\n"
        )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("sipgw:")]
    assert errors == [
        f"sipgw: sip.bind = '127.0.0.1', sip.port = {port} (worker 0 uses {port}): "
        f"cannot listen for SIP on UDP 127.0.0.1:{port}: Address already in use"
    ]
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "pjlib" not in output and "pjsua_core.c" not in output  # log_level 0: silent
    # Nothing was left running: the embedded targets and the other worker stopped.
    assert "did not exit" not in output


def test_a_sip_bind_address_not_on_this_host_is_named(tmp_path):
    # 192.0.2.0/24 is TEST-NET-1: no host has it, so bind() fails with EADDRNOTAVAIL
    # and no packet is ever sent.
    result = _run_gateway(tmp_path, f'[http]\nport = {free_port()}\n[sip]\nbind = "192.0.2.1"\n')
    assert result.returncode == 2
    assert (
        "sipgw: sip.bind = '192.0.2.1', sip.port = 0: cannot listen for SIP on UDP "
        "192.0.2.1:any: Cannot assign requested address"
    ) in result.stderr
    assert "Traceback" not in result.stderr


def test_version():
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"sipgw {gateway.__version__}"
