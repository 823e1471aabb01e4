"""The front process never loads pjsua2, aiortc or PyAV, nor the worker's code."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from conftest import ROOT

#: Modules the front must not have in ``sys.modules``, even indirectly.
FORBIDDEN = ("pjsua2", "aiortc", "av", "aioice", "gateway.worker", "gateway.targets")

PROBE = """
import json, sys
import gateway.cli
from gateway.config import Config
from gateway.front.app import build_app
build_app(Config())
print(json.dumps(sorted(sys.modules)))
"""


def test_front_app_imports_nothing_of_the_worker() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    modules = json.loads(result.stdout)
    assert "gateway.front.app" in modules  # the probe did load the front
    leaked = [m for m in modules if m.split(".")[0] in FORBIDDEN or m.startswith(FORBIDDEN)]
    assert leaked == []


def test_worker_and_targets_are_started_by_module_path() -> None:
    from gateway.front.pool import WORKER_ENTRY
    from gateway.front.targets import TARGETS_ENTRY

    assert WORKER_ENTRY.module == "gateway.worker.main"
    assert TARGETS_ENTRY.module == "gateway.targets.main"
    for entry in (WORKER_ENTRY, TARGETS_ENTRY):
        spec = importlib.util.find_spec(entry.module)
        assert spec is not None and spec.origin is not None
        assert f"def {entry.function}(" in open(spec.origin, encoding="utf-8").read()
