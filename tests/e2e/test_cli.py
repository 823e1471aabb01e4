"""Start-up: a bad configuration stops ``sipgw`` with a message naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

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
