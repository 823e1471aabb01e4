"""Matching of a single rule against a dialled number."""

from __future__ import annotations

from .model import MatchKind, Rule


def matches(rule: Rule, number: str) -> dict[str, str] | None:
    """Return the template placeholders if ``rule`` matches ``number``, else None.

    Placeholders: ``number`` is the whole dialled string; ``suffix`` is what
    follows the prefix for PREFIX rules and the whole number otherwise; REGEX
    rules add every named group (a group that did not take part is ``""``).
    REGEX rules must match the whole number (``fullmatch``), so a pattern
    cannot accidentally allow extra digits to be appended.
    """
    if rule.kind is MatchKind.EXACT:
        if number != rule.pattern:
            return None
        return {"number": number, "suffix": number}
    if rule.kind is MatchKind.PREFIX:
        if not number.startswith(rule.pattern):
            return None
        return {"number": number, "suffix": number[len(rule.pattern) :]}
    assert rule.compiled is not None
    found = rule.compiled.fullmatch(number)
    if found is None:
        return None
    groups = {key: value or "" for key, value in found.groupdict().items()}
    return {**groups, "number": number, "suffix": number}
