"""Command line: ``sipgw [--config FILE] [--check]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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

    from aiohttp import web

    from gateway.app import build_app

    app = build_app(config)
    url = f"http://{config.http.host}:{config.http.port}/"
    try:
        web.run_app(
            app,
            host=config.http.host,
            port=config.http.port,
            print=lambda _: print(f"sipgw: demo page at {url}  (Ctrl-C to stop)", flush=True),
            shutdown_timeout=5.0,
        )
    except OSError as exc:
        print(
            f"sipgw: cannot listen on {config.http.host}:{config.http.port}: {exc}", file=sys.stderr
        )
        return 1
    return 0
