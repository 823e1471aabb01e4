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
    #: The number, normalised to E.164 (``phonenumbers``), starts with one of
    #: the rule's prefixes (``pattern``: comma-separated, e.g. ``+1,+44``) and
    #: passes its country and type filters.
    E164 = "e164"


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
    #: E164 rules: ISO regions the number must belong to (empty: any).
    countries: frozenset[str] = frozenset()
    #: E164 rules: number types allowed (``fixed_line``, ``mobile``...; empty: any).
    types: frozenset[str] = frozenset()
    #: Categories of the built-in deny list this rule lets through (``premium_rate``...).
    allow: frozenset[str] = frozenset()
    #: E164 rules: the region a national number is dialled from (``dialplan.default_region``).
    region: str = ""
    #: Fixed headers added to the INVITE (a P-Asserted-Identity, a trunk tag).
    headers: tuple[tuple[str, str], ...] = ()
    compiled: re.Pattern[str] | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.target is None) == (self.reject is None):
            raise ValueError(f"rule {self.name!r}: exactly one of target and reject must be set")
        if self.kind is MatchKind.REGEX:
            object.__setattr__(self, "compiled", re.compile(self.pattern))

    @property
    def prefixes(self) -> tuple[str, ...]:
        """An E164 rule's E.164 prefixes."""
        return tuple(self.pattern.split(","))


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
    #: The number in E.164 form, when an ``e164`` rule recognised it.
    e164: str | None = None
    #: The rule's fixed headers for the INVITE.
    headers: tuple[tuple[str, str], ...] = ()


class DialplanError(ValueError):
    """The dialplan configuration is invalid; raised by the loader."""


class InvalidNumber(ValueError):
    """The dialled string cannot be dialled (empty, too long, bad characters)."""
