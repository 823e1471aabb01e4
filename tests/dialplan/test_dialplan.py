"""Table-driven tests of the dialplan: routing, loader validation, number checks."""

from __future__ import annotations

import re
from typing import Any

import pytest

from dialplan import (
    Action,
    DialplanError,
    InvalidNumber,
    MatchKind,
    Route,
    Rule,
    load_rules,
    matches,
    route,
)

VARIABLES = {"embedded": "127.0.0.1:5070", "trunk": "trunk.example.net"}

# One dialplan exercising every feature; order matters (first match wins).
RULES: list[dict[str, Any]] = [
    {"name": "echo", "exact": "600", "target": "sip:echo@{embedded}"},
    {"name": "premium", "prefix": "0900", "reject": 403, "reason": "premium rate barred"},
    {"name": "busy", "exact": "486", "reject": 486},
    {"name": "intl-uk", "prefix": "0044", "target": "sip:+44{suffix}@{trunk}"},
    {"name": "intl", "prefix": "00", "target": "sips:+{suffix}@{trunk};user=phone"},
    {
        "name": "ext",
        "regex": r"(?P<site>[1-3])(?P<ext>\d{3})(?:\*(?P<tag>\w+))?",
        "target": "sip:{ext}-{tag}@site{site}.example.net",
        "reason": "internal extension",
    },
    {"name": "national", "regex": r"0[1-8]\d{8,9}", "target": "sip:{number}@{trunk}"},
]

ROUTING_CASES = [
    ("exact", "600", Route(Action.DIAL, "echo", "sip:echo@127.0.0.1:5070", None, "")),
    (
        "prefix-suffix",
        "00442079460000",
        Route(Action.DIAL, "intl-uk", "sip:+442079460000@trunk.example.net", None, ""),
    ),
    (
        "first-match-wins",
        "0033123456789",
        Route(Action.DIAL, "intl", "sips:+33123456789@trunk.example.net;user=phone", None, ""),
    ),
    (
        "regex-named-groups",
        "2123*home",
        Route(Action.DIAL, "ext", "sip:123-home@site2.example.net", None, "internal extension"),
    ),
    (
        "regex-unmatched-group-is-empty",
        "3456",
        Route(Action.DIAL, "ext", "sip:456-@site3.example.net", None, "internal extension"),
    ),
    (
        "regex-number-placeholder",
        "02079460000",
        Route(Action.DIAL, "national", "sip:02079460000@trunk.example.net", None, ""),
    ),
    (
        "reject-with-reason",
        "0900123456",
        Route(Action.REJECT, "premium", None, 403, "premium rate barred"),
    ),
    (
        "reject-default-reason",
        "486",
        Route(Action.REJECT, "busy", None, 486, "rejected by dialplan rule 'busy'"),
    ),
    (
        "regex-is-fullmatch",
        "21234",
        Route(Action.REJECT, None, None, 403, "no dialplan rule matches"),
    ),
    (
        "exact-is-not-prefix",
        "6001",
        Route(Action.REJECT, None, None, 403, "no dialplan rule matches"),
    ),
    ("no-match-403", "911", Route(Action.REJECT, None, None, 403, "no dialplan rule matches")),
]


@pytest.mark.parametrize(
    ("number", "expected"),
    [case[1:] for case in ROUTING_CASES],
    ids=[case[0] for case in ROUTING_CASES],
)
def test_route(number: str, expected: Route) -> None:
    rules = load_rules(RULES, variables=VARIABLES)
    assert route(number, rules, VARIABLES) == expected


def test_empty_dialplan_rejects_everything() -> None:
    assert route("100", load_rules([])) == Route(
        Action.REJECT, None, None, 403, "no dialplan rule matches"
    )


def test_match_placeholders_override_variables() -> None:
    rules = load_rules([{"name": "a", "prefix": "9", "target": "sip:{suffix}@{number}"}])
    result = route("912", rules, {"number": "evil", "suffix": "evil"})
    assert result.uri == "sip:12@912"


def test_loaded_rules() -> None:
    rules = load_rules(RULES, variables=VARIABLES)
    assert [rule.name for rule in rules] == [entry["name"] for entry in RULES]
    assert rules[0] == Rule("echo", MatchKind.EXACT, "600", target="sip:echo@{embedded}")
    assert rules[1].reject == 403 and rules[1].target is None
    assert isinstance(rules[5].compiled, re.Pattern)
    assert rules[0].compiled is None


MATCH_CASES = [
    ("exact", Rule("r", MatchKind.EXACT, "123", target="sip:x"), "123",
     {"number": "123", "suffix": "123"}),
    ("exact-miss", Rule("r", MatchKind.EXACT, "123", target="sip:x"), "1234", None),
    ("prefix", Rule("r", MatchKind.PREFIX, "9", target="sip:x"), "9123",
     {"number": "9123", "suffix": "123"}),
    ("prefix-whole", Rule("r", MatchKind.PREFIX, "9", target="sip:x"), "9",
     {"number": "9", "suffix": ""}),
    ("prefix-miss", Rule("r", MatchKind.PREFIX, "9", target="sip:x"), "19", None),
    ("regex", Rule("r", MatchKind.REGEX, r"(?P<a>\d)(?P<b>x)?", target="sip:x"), "7",
     {"number": "7", "suffix": "7", "a": "7", "b": ""}),
    ("regex-fullmatch", Rule("r", MatchKind.REGEX, r"\d", target="sip:x"), "77", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rule", "number", "expected"),
    [case[1:] for case in MATCH_CASES],
    ids=[case[0] for case in MATCH_CASES],
)
def test_matches(rule: Rule, number: str, expected: dict[str, str] | None) -> None:
    assert matches(rule, number) == expected


INVALID_NUMBER_CASES = [
    ("crlf", "100\r\nVia: evil", "not allowed: U+000D"),
    ("space", "1 2", "not allowed: U+0020"),
    ("at", "a@b", "not allowed: U+0040"),
    ("semicolon", "100;user=phone", "not allowed: U+003B"),
    ("angle", "<sip:x>", "not allowed: U+003C"),
    ("nul", "1\x00", "not allowed: U+0000"),
    ("unicode-digit", "١٢٣", "not allowed: U+0661"),
    ("empty", "", "number is empty"),
    ("too-long", "1" * 65, "longer than 64 characters"),
]


@pytest.mark.parametrize(
    ("number", "message"),
    [case[1:] for case in INVALID_NUMBER_CASES],
    ids=[case[0] for case in INVALID_NUMBER_CASES],
)
def test_invalid_number(number: str, message: str) -> None:
    # A catch-all rule proves the number is refused before any rule is tried.
    rules = load_rules([{"name": "all", "regex": ".*", "target": "sip:{number}@x"}])
    with pytest.raises(InvalidNumber, match=re.escape(message)):
        route(number, rules)


def test_longest_allowed_number_and_charset() -> None:
    rules = load_rules([{"name": "all", "regex": ".*", "target": "sip:{number}@x"}])
    assert route("1" * 64, rules).action is Action.DIAL
    assert route("*#._-aZ09+", rules).uri == "sip:*#._-aZ09+@x"
    # A leading "+" promises a telephone number: only digits (and separators) follow.
    with pytest.raises(InvalidNumber, match="not a telephone number"):
        route("+*#._-aZ09", rules)


def test_expanded_uri_is_checked() -> None:
    rules = load_rules([{"name": "v", "exact": "1", "target": "sip:{host}"}], variables=["host"])
    with pytest.raises(InvalidNumber, match=r"'v'.*not allowed: '\\n'"):
        route("1", rules, {"host": "x\nVia: evil"})


def _rule(**entry: Any) -> dict[str, Any]:
    """A valid table with ``entry`` merged in (a value of None deletes the key)."""
    base: dict[str, Any] = {"name": "uk", "prefix": "44", "target": "sip:{suffix}@gw"}
    base.update(entry)
    return {key: value for key, value in base.items() if value is not None}


OK = {"name": "ok", "exact": "1", "target": "sip:1@gw"}

LOADER_ERROR_CASES = [
    ("not-a-list", {"rules": []}, "dialplan.rules must be an array of tables"),
    ("entry-not-table", [OK, "x"], "dialplan.rules[1]: must be a table, got str"),
    ("missing-name", [_rule(name=None)], "dialplan.rules[0]: missing key 'name'"),
    ("name-not-string", [_rule(name=3)], "dialplan.rules[0]: key 'name' must be a string"),
    ("empty-name", [_rule(name="")], "dialplan.rules[0]: key 'name' must not be empty"),
    ("unknown-key", [OK, OK | {"name": "b", "exact": "2"}, _rule(tagret="sip:x")],
     "dialplan.rules[2] (\"uk\"): unknown key 'tagret'"),
    ("no-match-key", [_rule(prefix=None)], "(\"uk\"): missing match key"),
    ("two-match-keys", [_rule(exact="44")], "keys 'exact' and 'prefix' are mutually exclusive"),
    ("pattern-not-string", [_rule(prefix=44)], "key 'prefix' must be a string, got int"),
    ("pattern-empty", [_rule(prefix="")], "key 'prefix' must not be empty"),
    ("exact-undialable", [_rule(prefix=None, exact="1 2")], "key 'exact' can never match"),
    ("prefix-undialable", [_rule(prefix="a@")], "key 'prefix' can never match"),
    ("bad-regex", [_rule(prefix=None, regex="(")],
     "key 'regex' is not a valid regular expression: missing ), unterminated subpattern"),
    ("reserved-group", [_rule(prefix=None, regex="(?P<number>1)")],
     "key 'regex' uses reserved group name 'number'"),
    ("target-and-reject", [_rule(reject=403)],
     "keys 'target' and 'reject' are mutually exclusive"),
    ("no-action", [_rule(target=None)], "(\"uk\"): missing key 'target' or 'reject'"),
    ("target-not-string", [_rule(target=1)], "key 'target' must be a string"),
    ("target-scheme", [_rule(target="tel:{suffix}")],
     "key 'target' must start with 'sip:' or 'sips:'"),
    ("target-bad-template", [_rule(target="sip:{suffix")], "key 'target' is not a valid template"),
    ("target-literal-space", [_rule(target="sip:{suffix}@gw x")],
     "key 'target' contains a character that is not allowed: ' '"),
    ("unknown-placeholder", [_rule(target="sip:{sufix}@gw")],
     "key 'target' uses unknown placeholder {sufix} (known: number, suffix)"),
    ("variable-not-declared", [_rule(target="sip:{suffix}@{embedded}")],
     "unknown placeholder {embedded}"),
    ("group-of-other-kind", [_rule(target="sip:{ext}@gw")], "unknown placeholder {ext}"),
    ("positional-placeholder", [_rule(target="sip:{}@gw")], "placeholder {} must be a plain name"),
    ("index-placeholder", [_rule(target="sip:{number[0]}@gw")],
     "placeholder {number[0]} must be a plain name"),
    ("attribute-placeholder", [_rule(target="sip:{number.x}@gw")],
     "placeholder {number.x} must be a plain name"),
    ("format-spec", [_rule(target="sip:{number:>20}@gw")],
     "placeholder {number} must not have a format spec or conversion"),
    ("conversion", [_rule(target="sip:{number!r}@gw")],
     "placeholder {number} must not have a format spec or conversion"),
    ("reject-bool", [_rule(target=None, reject=True)],
     "key 'reject' must be an integer, got bool"),
    ("reject-string", [_rule(target=None, reject="403")],
     "key 'reject' must be an integer, got str"),
    ("reject-low", [_rule(target=None, reject=399)], "key 'reject' must be a SIP error code"),
    ("reject-high", [_rule(target=None, reject=700)], "400..699, got 700"),
    ("reason-not-string", [_rule(reason=1)], "key 'reason' must be a string, got int"),
    ("duplicate-name", [_rule(), _rule(prefix="33")],
     "dialplan.rules[1] (\"uk\"): key 'name' duplicates rules[0]"),
    ("shadow-same-exact", [OK, OK | {"name": "b"}],
     "dialplan.rules[1] (\"b\"): key 'exact' is shadowed by rules[0] (\"ok\")"),
    ("shadow-same-prefix", [_rule(), _rule(name="b", target=None, reject=403)],
     "dialplan.rules[1] (\"b\"): key 'prefix' is shadowed by rules[0] (\"uk\")"),
    ("shadow-same-regex",
     [_rule(prefix=None, regex="1."), _rule(name="b", prefix=None, regex="1.")],
     "dialplan.rules[1] (\"b\"): key 'regex' is shadowed by rules[0] (\"uk\")"),
    ("shadow-exact-by-prefix", [OK, _rule(), _rule(name="b", prefix=None, exact="4420")],
     "dialplan.rules[2] (\"b\"): key 'exact' is shadowed by rules[1] (\"uk\")"),
    ("shadow-longer-prefix", [_rule(), _rule(name="b", prefix="441")],
     "key 'prefix' is shadowed by rules[0] (\"uk\")"),
    ("shadow-exact-by-regex",
     [_rule(prefix=None, regex=r"\d+"), _rule(name="b", prefix=None, exact="7")],
     "key 'exact' is shadowed by rules[0] (\"uk\")"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "message"),
    [case[1:] for case in LOADER_ERROR_CASES],
    ids=[case[0] for case in LOADER_ERROR_CASES],
)
def test_loader_error(data: object, message: str) -> None:
    with pytest.raises(DialplanError, match=re.escape(message)):
        load_rules(data)


LOADER_OK_CASES = [
    ("specific-before-general", [_rule(prefix="441"), _rule(name="b")]),
    ("exact-before-prefix", [_rule(name="a", prefix=None, exact="4420"), _rule()]),
    ("same-pattern-other-kind", [_rule(prefix=None, exact="44"), _rule(name="b")]),
    ("reason-and-sips", [_rule(target="sips:{number}@gw", reason="tls")]),
    ("escaped-braces", [_rule(target="sip:{{x}}{suffix}@gw")]),
    ("reject-bounds", [_rule(target=None, reject=400), _rule(name="b", prefix="1", target=None,
                                                            reject=699)]),
]  # fmt: skip


@pytest.mark.parametrize("data", [case[1] for case in LOADER_OK_CASES],
                         ids=[case[0] for case in LOADER_OK_CASES])  # fmt: skip
def test_loader_accepts(data: list[dict[str, Any]]) -> None:
    assert len(load_rules(data)) == len(data)


def test_loader_errors_are_value_errors() -> None:
    # Callers that catch ValueError for configuration problems keep working.
    assert issubclass(DialplanError, ValueError)
    assert issubclass(InvalidNumber, ValueError)
