"""Validation of the ``[[dialplan.rules]]`` configuration into Rule objects.

The loader takes already-parsed TOML data (no file access) and refuses
anything suspicious up front, so that mistakes show at startup with a message
naming the rule and key, rather than as misrouted calls later.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .engine import unsafe_uri_character, validate_number
from .headers import MAX_HEADERS, header_problem
from .model import DialplanError, InvalidNumber, MatchKind, Rule
from .numbers import TYPES, Risk, is_region

KNOWN_KEYS = frozenset(
    {
        "name",
        "exact",
        "prefix",
        "regex",
        "e164",
        "countries",
        "types",
        "allow",
        "headers",
        "target",
        "reject",
        "reason",
    }
)
MATCH_KEYS = ("exact", "prefix", "regex", "e164")
RESERVED_PLACEHOLDERS = frozenset({"number", "suffix"})
#: What an ``e164`` rule's target may use besides ``number`` and ``suffix``.
E164_PLACEHOLDERS = frozenset({"e164", "e164_digits", "national", "country_code"})
_E164_PREFIX = re.compile(r"\+[0-9]{0,15}")
URI_SCHEMES = ("sip:", "sips:")


def load_rules(data: object, variables: Iterable[str] = (), region: str = "") -> tuple[Rule, ...]:
    """Build the rule list from the parsed value of ``dialplan.rules``.

    ``region`` (``dialplan.default_region``, e.g. ``US``) is where national
    numbers are dialled from; ``e164`` rules need it.

    ``variables`` names the extra placeholders (e.g. ``embedded``) that the
    caller will pass to :func:`route`; targets may use only those, ``number``,
    ``suffix`` and their regex's named groups.
    """
    if not isinstance(data, list):
        raise DialplanError("dialplan.rules must be an array of tables")
    if isinstance(variables, str):
        raise TypeError("variables must be an iterable of names, not a string")
    known_variables = frozenset(variables)
    rules: list[Rule] = []
    for index, entry in enumerate(data):
        rule = _load_rule(index, entry, known_variables, region)
        _check_reachable(index, rule, rules)
        rules.append(rule)
    return tuple(rules)


def _location(index: int, name: str | None = None) -> str:
    where = f"dialplan.rules[{index}]"
    return where if name is None else f"{where} ({_quote(name)})"


def _quote(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)


def _load_rule(index: int, entry: object, variables: frozenset[str], region: str = "") -> Rule:
    if not isinstance(entry, Mapping):
        raise DialplanError(f"{_location(index)}: must be a table, got {type(entry).__name__}")
    if "name" not in entry:
        raise DialplanError(f"{_location(index)}: missing key 'name'")
    name = _string(entry, "name", _location(index))
    where = _location(index, name)

    unknown = sorted(str(key) for key in entry if key not in KNOWN_KEYS)
    if unknown:
        raise DialplanError(f"{where}: unknown key {unknown[0]!r}")

    kind, pattern = _load_match(entry, where)
    compiled: re.Pattern[str] | None = None
    if kind is MatchKind.REGEX:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise DialplanError(
                f"{where}: key 'regex' is not a valid regular expression: {exc}"
            ) from None
        for group in compiled.groupindex:
            if group in RESERVED_PLACEHOLDERS:
                raise DialplanError(f"{where}: key 'regex' uses reserved group name {group!r}")

    has_target, has_reject = "target" in entry, "reject" in entry
    if has_target and has_reject:
        raise DialplanError(f"{where}: keys 'target' and 'reject' are mutually exclusive")
    if not has_target and not has_reject:
        raise DialplanError(f"{where}: missing key 'target' or 'reject'")

    target: str | None = None
    reject: int | None = None
    if kind is MatchKind.E164 and not region:
        raise DialplanError(
            f"{where}: key 'e164' needs dialplan.default_region (e.g. \"US\"), the region "
            "national numbers are dialled from"
        )
    if kind is not MatchKind.E164:
        for key in ("countries", "types"):
            if key in entry:
                raise DialplanError(f"{where}: key {key!r} needs an 'e164' rule")
    countries = _names(entry, "countries", where, is_region, 'a region code such as "US"')
    types = _names(entry, "types", where, TYPES.__contains__, f"one of {', '.join(TYPES)}")
    risks = [r.value for r in Risk]
    allow = _names(entry, "allow", where, risks.__contains__, f"one of {', '.join(risks)}")
    if has_target:
        target = _string(entry, "target", where)
        groups = compiled.groupindex if compiled is not None else {}
        known = RESERVED_PLACEHOLDERS | variables | set(groups)
        if kind is MatchKind.E164:
            known |= E164_PLACEHOLDERS
        _check_target(target, known, where)
    else:
        reject = _reject_code(entry["reject"], where)

    reason = _string(entry, "reason", where, allow_empty=True) if "reason" in entry else ""
    return Rule(
        name=name,
        kind=kind,
        pattern=pattern,
        target=target,
        reject=reject,
        reason=reason,
        countries=countries,
        types=types,
        allow=allow,
        region=region if kind is MatchKind.E164 else "",
        headers=_headers(entry, where),
    )


def _headers(entry: Mapping[object, object], where: str) -> tuple[tuple[str, str], ...]:
    """A rule's fixed headers: a table of names to string values."""
    if "headers" not in entry:
        return ()
    value = entry["headers"]
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise DialplanError(f"{where}: key 'headers' must be a table of strings")
    if len(value) > MAX_HEADERS:
        raise DialplanError(f"{where}: key 'headers' has more than {MAX_HEADERS} headers")
    for name, text in value.items():
        problem = header_problem(name, text)
        if problem is not None:
            raise DialplanError(f"{where}: key 'headers': {problem}")
    return tuple(value.items())


def _names(
    entry: Mapping[object, object], key: str, where: str, valid: Any, expected: str
) -> frozenset[str]:
    """A list of names (``countries``, ``types``, ``allow``), each one checked."""
    if key not in entry:
        return frozenset()
    value = entry[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DialplanError(f"{where}: key {key!r} must be a list of strings")
    for item in value:
        if not valid(item):
            raise DialplanError(f"{where}: key {key!r}: {item!r} is not {expected}")
    return frozenset(value)


def _string(
    entry: Mapping[object, object], key: str, where: str, *, allow_empty: bool = False
) -> str:
    value = entry[key]
    if not isinstance(value, str):
        raise DialplanError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise DialplanError(f"{where}: key {key!r} must not be empty")
    return value


def _load_match(entry: Mapping[object, object], where: str) -> tuple[MatchKind, str]:
    present = [key for key in MATCH_KEYS if key in entry]
    if not present:
        raise DialplanError(f"{where}: missing match key, one of 'exact', 'prefix', 'regex'")
    if len(present) > 1:
        raise DialplanError(
            f"{where}: keys {present[0]!r} and {present[1]!r} are mutually exclusive"
        )
    key = present[0]
    if key == "e164":
        return MatchKind.E164, _e164_prefixes(entry[key], where)
    pattern = _string(entry, key, where)
    if key != "regex":
        # A literal pattern that is not itself dialable can never match.
        try:
            validate_number(pattern)
        except InvalidNumber as exc:
            raise DialplanError(f"{where}: key {key!r} can never match: {exc}") from None
    return MatchKind(key), pattern


def _e164_prefixes(value: object, where: str) -> str:
    """``e164 = "+1"`` or ``["+1", "+44"]`` (``"+"``: any number) as the rule's pattern."""
    prefixes = [value] if isinstance(value, str) else value
    if not isinstance(prefixes, list) or not prefixes:
        raise DialplanError(f"{where}: key 'e164' must be a prefix such as \"+1\" or a list")
    for prefix in prefixes:
        if not isinstance(prefix, str) or not _E164_PREFIX.fullmatch(prefix):
            raise DialplanError(
                f"{where}: key 'e164': {prefix!r} is not an E.164 prefix ('+' and digits)"
            )
    return ",".join(prefixes)


def _reject_code(value: object, where: str) -> int:
    # bool is a subclass of int, but "reject = true" is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise DialplanError(f"{where}: key 'reject' must be an integer, got {type(value).__name__}")
    if not 400 <= value <= 699:
        raise DialplanError(f"{where}: key 'reject' must be a SIP error code 400..699, got {value}")
    return value


def _check_target(target: str, known: Iterable[str], where: str) -> None:
    """Refuse targets that are not SIP URIs or use anything but plain names."""
    if not target.lower().startswith(URI_SCHEMES):
        raise DialplanError(f"{where}: key 'target' must start with 'sip:' or 'sips:'")
    try:
        parsed = list(string.Formatter().parse(target))
    except ValueError as exc:
        raise DialplanError(f"{where}: key 'target' is not a valid template: {exc}") from None
    known_names = frozenset(known)
    for literal, field_name, spec, conversion in parsed:
        bad = unsafe_uri_character(literal)
        if bad is not None:
            raise DialplanError(
                f"{where}: key 'target' contains a character that is not allowed: {bad!r}"
            )
        if field_name is None:
            continue
        if spec or conversion:
            raise DialplanError(
                f"{where}: key 'target' placeholder {{{field_name}}} must not have "
                "a format spec or conversion"
            )
        if not field_name.isidentifier():
            raise DialplanError(
                f"{where}: key 'target' placeholder {{{field_name}}} must be a plain name"
            )
        if field_name not in known_names:
            raise DialplanError(
                f"{where}: key 'target' uses unknown placeholder {{{field_name}}} "
                f"(known: {', '.join(sorted(known_names))})"
            )


def _check_reachable(index: int, rule: Rule, earlier: Sequence[Rule]) -> None:
    """Refuse a duplicate name, or a rule an earlier rule always matches first."""
    for position, other in enumerate(earlier):
        if other.name == rule.name:
            raise DialplanError(
                f"{_location(index, rule.name)}: key 'name' duplicates rules[{position}]"
            )
    for position, other in enumerate(earlier):
        if _shadows(other, rule):
            raise DialplanError(
                f"{_location(index, rule.name)}: key {rule.kind.value!r} is "
                f"shadowed by rules[{position}] ({_quote(other.name)}), "
                "so this rule can never match"
            )


def _shadows(first: Rule, later: Rule) -> bool:
    """True if every number ``later`` matches is already matched by ``first``."""
    if MatchKind.E164 in (first.kind, later.kind):
        return (
            first.kind is later.kind
            and first.pattern == later.pattern
            and (first.countries, first.types) == (later.countries, later.types)
        )
    if first.kind is later.kind and first.pattern == later.pattern:
        return True
    if first.kind is MatchKind.PREFIX:
        return later.kind in (MatchKind.EXACT, MatchKind.PREFIX) and (
            later.pattern.startswith(first.pattern)
        )
    if first.kind is MatchKind.REGEX and later.kind is MatchKind.EXACT:
        assert first.compiled is not None
        return first.compiled.fullmatch(later.pattern) is not None
    return False
