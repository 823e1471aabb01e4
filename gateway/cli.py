"""Command line: ``sipgw [--config FILE] [--check] [--version]``, and
``sipgw token --sub USER [--ttl S] [--dial RULE]... [--config FILE]``.

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
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["token"]:
        return token(args_in[1:])
    parser = argparse.ArgumentParser(
        prog="sipgw", description="SIP/WebRTC gateway: browsers call phones."
    )
    parser.add_argument(
        "--config", type=Path, help="TOML configuration file (default: embedded demo)"
    )
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"sipgw {__version__}")
    parser.epilog = "sipgw token --help: mint a signed token for testing (see docs/security.md)"
    args = parser.parse_args(args_in)
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
        print(f"sipgw: softphone page at {url}  (Ctrl-C to stop)", flush=True)

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


def token(argv: list[str]) -> int:
    """``sipgw token``: print an HS256 token signed with the configuration's secret."""
    parser = argparse.ArgumentParser(
        prog="sipgw token",
        description="Mint a signed token (HS256, the configuration's auth secret) for testing. "
        "A site's backend mints its own the same way: see docs/security.md.",
    )
    parser.add_argument("--sub", required=True, help="the user the token names")
    parser.add_argument(
        "--ttl", type=int, default=300, help="seconds the token is valid for (default 300)"
    )
    parser.add_argument(
        "--dial",
        action="append",
        metavar="RULE",
        help="a dialplan rule name the holder may use (repeat; default: any rule)",
    )
    parser.add_argument("--max-calls", type=int, help="calls the connection may have at once")
    parser.add_argument(
        "--single-use", action="store_true", help="add a random jti: the token works once"
    )
    parser.add_argument(
        "--config", type=Path, help="TOML configuration file with the [auth] secret"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        secret = config.auth.secret_bytes()
    except ConfigError as exc:
        print(f"sipgw: {exc}", file=sys.stderr)
        return 2
    auth = config.auth
    problem = None
    if secret is None:
        problem = "the configuration has no auth.secret or auth.secret_env to sign with"
    elif "HS256" not in auth.algorithms:
        problem = "auth.algorithms does not allow HS256, the algorithm this command signs with"
    elif not auth.audience:
        problem = "the configuration has no auth.audience"
    elif not 1 <= args.ttl <= auth.max_ttl:
        problem = f"--ttl must be 1 to {auth.max_ttl} (auth.max_ttl)"
    elif args.max_calls is not None and args.max_calls < 1:
        problem = "--max-calls must be at least 1"
    if problem is not None or secret is None:
        print(f"sipgw token: {problem}", file=sys.stderr)
        return 2

    import secrets
    import time

    import jwt

    now = int(time.time())
    claims: dict[str, object] = {
        "sub": args.sub,
        "aud": auth.audience,
        "iat": now,
        "exp": now + args.ttl,
    }
    if args.dial:
        claims["dial"] = args.dial
    if args.max_calls is not None:
        claims["max_calls"] = args.max_calls
    if args.single_use:
        claims["jti"] = secrets.token_urlsafe(16)
    print(jwt.encode(claims, secret, algorithm="HS256"))
    return 0
