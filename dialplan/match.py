"""Matching of a single rule against a dialled number."""

from __future__ import annotations

from .model import InvalidNumber, MatchKind, Rule
from .numbers import PhoneNumber, normalise

#: A rule naming one of these types also takes numbers libphonenumber cannot
#: tell apart (US and Canadian numbers are all "fixed line or mobile").
_EITHER = {"fixed_line", "mobile"}


def matches(rule: Rule, number: str) -> dict[str, str] | None:
    """Return the template placeholders if ``rule`` matches ``number``, else None.

    Placeholders: ``number`` is the whole dialled string; ``suffix`` is what
    follows the prefix for PREFIX rules and the whole number otherwise; REGEX
    rules add every named group (a group that did not take part is ``""``).
    REGEX rules must match the whole number (``fullmatch``), so a pattern
    cannot accidentally allow extra digits to be appended.
    """
    if rule.kind is MatchKind.E164:
        phone = e164_match(rule, number)
        return None if phone is None else {**phone.placeholders, "number": number, "suffix": number}
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


def e164_match(rule: Rule, number: str) -> PhoneNumber | None:
    """The telephone number ``number`` is, if it passes E164 ``rule``'s filters."""
    try:
        phone = normalise(number, rule.region)
    except InvalidNumber:
        return None
    if phone is None or not phone.e164.startswith(rule.prefixes):
        return None
    if rule.countries and phone.region not in rule.countries:
        return None
    if rule.types:
        either = phone.type == "fixed_line_or_mobile" and rule.types & _EITHER
        if phone.type not in rule.types and not either:
            return None
    return phone
