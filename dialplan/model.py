"""Data types of the dialplan: rules in, routes out.

Everything here is immutable so that a loaded dialplan can be shared between
calls (and tasks) without copying or locking.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum


class MatchKind(StrEnum):
    """How a rule's pattern is compared with the dialled number."""

    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"


@dataclass(frozen=True)
class Rule:
    """One dialplan rule: a pattern plus what to do when it matches.

    Exactly one of ``target`` (a SIP URI template) and ``reject`` (a SIP
    status code) is set. For :attr:`MatchKind.REGEX` rules the pattern is
    compiled once, here, so that routing never recompiles it.
    """

    name: str
    kind: MatchKind
    pattern: str
    target: str | None = None
    reject: int | None = None
    reason: str = ""
    compiled: re.Pattern[str] | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.target is None) == (self.reject is None):
            raise ValueError(f"rule {self.name!r}: exactly one of target and reject must be set")
        if self.kind is MatchKind.REGEX:
            object.__setattr__(self, "compiled", re.compile(self.pattern))


class Action(StrEnum):
    """What the gateway should do with a call."""

    DIAL = "dial"
    REJECT = "reject"


@dataclass(frozen=True)
class Route:
    """The routing decision for one dialled number.

    ``rule`` is the name of the rule that decided, or None when no rule
    matched (the call is then rejected by default).
    """

    action: Action
    rule: str | None
    uri: str | None
    code: int | None
    reason: str


class DialplanError(ValueError):
    """The dialplan configuration is invalid; raised by the loader."""


class InvalidNumber(ValueError):
    """The dialled string cannot be dialled (empty, too long, bad characters)."""
