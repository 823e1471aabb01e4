"""Dialplan: pure routing rules mapping a dialled number to a SIP route.

No I/O: the loader takes already-parsed configuration data.
"""

from .engine import route
from .loader import load_rules
from .match import matches
from .model import (
    Action,
    DialplanError,
    InvalidNumber,
    MatchKind,
    Route,
    Rule,
)

__all__ = [
    "Action",
    "DialplanError",
    "InvalidNumber",
    "MatchKind",
    "Route",
    "Rule",
    "load_rules",
    "matches",
    "route",
]
