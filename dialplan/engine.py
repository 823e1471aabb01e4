"""Routing: pick the rule for a dialled number and build the call's route.

Priority order: rules are tried in the order they are given (the order of
``[[dialplan.rules]]`` in the configuration) and the first rule that matches
decides; later rules are never consulted. There is no "longest match" or
"most specific" ordering, so put specific rules before general ones (the
loader refuses rules that an earlier rule makes unreachable).

Default deny: a number that no rule matches is rejected with 403, so nothing
can be dialled that the dialplan did not explicitly allow (no toll fraud by
omission).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .match import e164_match, matches
from .model import Action, DialplanError, InvalidNumber, MatchKind, Route, Rule
from .numbers import dial_string, normalise

#: The 403 of a number on the built-in deny list (see :mod:`dialplan.numbers`).
RISKY_CODE = 403

MAX_NUMBER_LENGTH = 64
NUMBER_CHARACTER = re.compile(r"[0-9A-Za-z+*#._-]")
NO_MATCH_CODE = 403
NO_MATCH_REASON = "no dialplan rule matches"


def validate_number(number: str) -> None:
    """Raise InvalidNumber unless ``number`` is a plausible dialled string.

    The character set is deliberately narrow: it keeps CR/LF, spaces, ``@``,
    ``;``, ``<>`` and quotes out of the URI we build, which blocks SIP header
    and URI parameter injection through the dialled number.
    """
    if not number:
        raise InvalidNumber("number is empty")
    if len(number) > MAX_NUMBER_LENGTH:
        raise InvalidNumber(f"number is longer than {MAX_NUMBER_LENGTH} characters")
    for char in number:
        if NUMBER_CHARACTER.fullmatch(char) is None:
            # Named by code point: the number came from a stranger and this text goes back
            # to the browser, so it must not echo control characters, quotes or markup.
            raise InvalidNumber(
                f"number contains a character that is not allowed: U+{ord(char):04X}"
            )


def _risks(rule: Rule, number: str) -> set[str]:
    """The deny-list categories of ``number`` that ``rule`` does not allow.

    E164 rules know the number. Other rules are checked when the dialled string
    is in international form (``+`` or ``00``): a prefix or regex rule meant for
    extensions must not become a way out to premium or satellite numbers.
    """
    if rule.kind is MatchKind.E164:
        phone = e164_match(rule, number)
    elif number.startswith(("+", "00")):
        try:
            phone = normalise(number, "ZZ")
        except InvalidNumber:
            phone = None
    else:
        return set()
    if phone is None:
        return set()
    return {str(risk) for risk in phone.risks} - rule.allow


def unsafe_uri_character(text: str) -> str | None:
    """Return the first character that must never appear in a SIP URI we send.

    Whitespace and control characters could split or extend a SIP header;
    ``<``, ``>`` and ``"`` could close a name-addr and smuggle parameters.
    """
    for char in text:
        if char.isspace() or not char.isprintable() or char in '<>"':
            return char
    return None


def route(
    number: str,
    rules: Sequence[Rule],
    variables: Mapping[str, str] | None = None,
) -> Route:
    """Decide what to do with a call to ``number``; the first matching rule wins.

    ``variables`` supplies extra template placeholders (e.g. ``embedded``);
    placeholders taken from the match (``number``, ``suffix``, named groups)
    take precedence over variables of the same name.
    """
    validate_number(number)
    if number.startswith("+"):
        dial_string(number)  # "+" promises a telephone number: nothing but digits after it
    for rule in rules:
        placeholders = matches(rule, number)
        if placeholders is None:
            continue
        risky = _risks(rule, number)
        if risky and rule.reject is None:
            return Route(
                action=Action.REJECT,
                rule=rule.name,
                uri=None,
                code=RISKY_CODE,
                reason=f"{', '.join(sorted(risky))} numbers may not be dialled "
                f"(built-in deny list; rule '{rule.name}' does not allow them)",
            )
        if rule.reject is not None:
            return Route(
                action=Action.REJECT,
                rule=rule.name,
                uri=None,
                code=rule.reject,
                reason=rule.reason or f"rejected by dialplan rule '{rule.name}'",
            )
        assert rule.target is not None
        values = {**(variables or {}), **placeholders}
        try:
            uri = rule.target.format_map(values)
        except KeyError as exc:
            raise DialplanError(
                f"rule {rule.name!r}: target uses unknown placeholder {exc}"
            ) from None
        bad = unsafe_uri_character(uri)
        if bad is not None:
            raise InvalidNumber(
                f"rule {rule.name!r} produced a URI with a character that is not allowed: {bad!r}"
            )
        return Route(
            action=Action.DIAL,
            rule=rule.name,
            uri=uri,
            code=None,
            reason=rule.reason,
            e164=placeholders.get("e164"),
            headers=rule.headers,
        )
    return Route(
        action=Action.REJECT,
        rule=None,
        uri=None,
        code=NO_MATCH_CODE,
        reason=NO_MATCH_REASON,
    )
