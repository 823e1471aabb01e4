"""Command line: ``sipgw [--config FILE] [--check] [--version]``.

Exit codes: 0 after a clean stop, 2 when the configuration is invalid or a
socket it names cannot be bound (one line on stderr names the key).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gateway import __version__
from gateway.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sipgw", description="SIP/WebRTC gateway: browsers call phones."
    )
    parser.add_argument(
        "--config", type=Path, help="TOML configuration file (default: embedded demo)"
    )
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"sipgw {__version__}")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s front %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"sipgw: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print("sipgw: configuration is valid")
        return 0

    import asyncio

    from gateway.front.app import serve
    from gateway.front.pool import StartupError

    def listening(url: str) -> None:
        print(f"sipgw: demo page at {url}  (Ctrl-C to stop)", flush=True)

    try:
        asyncio.run(serve(config, on_listening=listening))
    except StartupError as exc:
        print(f"sipgw: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"sipgw: http.host = {config.http.host!r}, http.port = {config.http.port}: "
            f"cannot listen: {os.strerror(exc.errno) if exc.errno else exc}",
            file=sys.stderr,
        )
        return 2
    return 0
