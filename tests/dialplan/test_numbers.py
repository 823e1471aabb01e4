"""E.164 rules and the built-in deny list (:mod:`dialplan.numbers`)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dialplan import Action, DialplanError, InvalidNumber, load_rules, route
from dialplan.numbers import Risk, dial_string, normalise

US_CA = {
    "name": "us-ca",
    "e164": "+1",
    "countries": ["US", "CA"],
    "types": ["fixed_line", "mobile", "toll_free"],
    "target": "sip:{e164_digits}@trunk.example",
}
UK = {
    "name": "uk",
    "e164": "+44",
    "types": ["fixed_line", "mobile"],
    "target": "sip:{national}@uk.example",
}
ANY = {"name": "world", "e164": "+", "target": "sip:{e164}@trunk.example"}


def rules(*entries: dict, region: str = "US"):
    return load_rules(list(entries), region=region)


@pytest.mark.parametrize(
    "dialled, uri",
    [
        ("2025550123", "sip:12025550123@trunk.example"),
        ("12025550123", "sip:12025550123@trunk.example"),
        ("+12025550123", "sip:12025550123@trunk.example"),
        ("+1-202-555-0123", "sip:12025550123@trunk.example"),
        ("+16135550123", "sip:16135550123@trunk.example"),  # Ottawa
        ("18005550123", "sip:18005550123@trunk.example"),  # toll free
        ("+442079460123", "sip:02079460123@uk.example"),
        ("00442079460123", "sip:02079460123@uk.example"),
    ],
)
def test_e164_rules_normalise_and_rewrite(dialled, uri):
    decision = route(dialled, rules(US_CA, UK))
    assert (decision.action, decision.uri) == (Action.DIAL, uri), decision
    assert decision.e164 is not None and decision.e164.startswith("+")


@pytest.mark.parametrize(
    "dialled, risk",
    [
        ("+19002345678", Risk.PREMIUM_RATE),  # US 900
        ("+18765230123", Risk.NANP_OUTSIDE_US_CA),  # Jamaica
        ("+12843001234", Risk.NANP_OUTSIDE_US_CA),  # British Virgin Islands
        ("+881612345678", Risk.GLOBAL_NETWORK),  # Iridium
        ("+870301234567", Risk.GLOBAL_NETWORK),  # Inmarsat
        ("+8823421234", Risk.GLOBAL_NETWORK),  # international networks
        ("+979123456789", Risk.GLOBAL_NETWORK),  # international premium rate
        ("+5351234567", Risk.HIGH_RISK_COUNTRY),  # Cuba
        ("+449012345678", Risk.PREMIUM_RATE),  # UK 09
        ("+447012345678", Risk.PERSONAL_NUMBER),  # UK 070
    ],
)
def test_the_deny_list_refuses_risky_numbers_even_on_a_catch_all_rule(dialled, risk):
    phone = normalise(dialled, "US")
    assert phone is not None and risk in phone.risks, phone
    decision = route(dialled, rules(ANY))
    assert (decision.action, decision.rule, decision.code) == (Action.REJECT, "world", 403)
    assert risk.value in decision.reason


def test_a_rule_may_allow_a_category_explicitly():
    premium = {**ANY, "allow": ["premium_rate"]}
    assert route("+19002345678", rules(premium)).action is Action.DIAL
    assert route("+881612345678", rules(premium)).action is Action.REJECT


def test_country_and_type_filters():
    assert route("+18765230123", rules(US_CA)).rule is None  # JM: not US/CA, no match
    assert route("+447700900123", rules(UK)).rule is None  # reserved for drama: not valid
    mobile_only = {**UK, "types": ["mobile"]}
    assert route("+442079460123", rules(mobile_only)).rule is None


def test_international_form_on_other_rules_is_checked_too():
    """A prefix rule that sends ``00...`` to a trunk still refuses satellite numbers."""
    out = {"name": "out", "prefix": "00", "target": "sip:{number}@trunk.example"}
    assert route("0049301234567", rules(out)).action is Action.DIAL
    refused = route("00881612345678", rules(out))
    assert (refused.action, refused.rule) == (Action.REJECT, "out")
    assert route("1001", rules({"name": "ext", "regex": "[0-9]{4}", "target": "sip:{number}@pbx"}))


@pytest.mark.parametrize(
    "dialled",
    [
        "sip:+12025550123@evil.example",
        "tel:+12025550123",
        "+1202555O123",  # letter O
        "+" + "".join(chr(0xFF10 + int(d)) for d in "12025550123"),  # full-width digits
        "+" + "".join(chr(0x0660 + int(d)) for d in "12025550123"),  # Arabic-Indic digits
        "+12025550123;user=phone",
        "+12025550123@x",
        "%2B12025550123",
        "+12025550123\r\nX: y",
        "+1" + "2" * 50,
        "1-800-FLOWERS",
    ],
)
def test_anything_but_a_plain_number_is_refused(dialled):
    try:
        decision = route(dialled, rules(US_CA, UK, ANY))
    except InvalidNumber:
        return
    assert (decision.action, decision.rule) == (Action.REJECT, None), decision


@pytest.mark.parametrize(
    "entry, words",
    [
        ({**US_CA, "countries": ["USA"]}, "region code"),
        ({**US_CA, "types": ["landline"]}, "one of fixed_line"),
        ({**US_CA, "allow": ["cheap"]}, "one of premium_rate"),
        ({**US_CA, "e164": "1"}, "E.164 prefix"),
        ({**US_CA, "target": "sip:{digits}@x"}, "unknown placeholder"),
        ({"name": "x", "prefix": "9", "countries": ["US"], "target": "sip:x@y"}, "needs an 'e164'"),
    ],
)
def test_loader_names_the_bad_key(entry, words):
    with pytest.raises(DialplanError, match=words):
        rules(entry)


def test_e164_rules_need_a_region():
    with pytest.raises(DialplanError, match="default_region"):
        load_rules([US_CA])


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
def test_normaliser_never_raises_anything_but_invalid_number(text):
    try:
        phone = normalise(text, "GB")
    except InvalidNumber:
        return
    assert phone is None or (phone.e164.startswith("+") and phone.e164[1:].isdigit())
    assert dial_string(text).lstrip("+").isascii()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789+ -()."), max_size=24))
def test_route_gives_a_safe_uri_or_a_refusal(text):
    try:
        decision = route(text, rules(US_CA, UK, ANY))
    except InvalidNumber:
        return
    if decision.action is Action.DIAL:
        assert decision.uri is not None
        assert all(c.isalnum() or c in "+:@.-" for c in decision.uri), decision.uri
