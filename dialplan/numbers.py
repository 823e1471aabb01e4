"""Telephone numbers: E.164 normalisation and the built-in toll-fraud deny list.

A dialled string becomes a :class:`PhoneNumber` with Google's libphonenumber
data (the maintained ``phonenumbers`` package): its E.164 form, country,
number type and the risk categories it falls in. Only plain ASCII dial
strings get that far: :func:`dial_string` refuses anything else first, since
``phonenumbers`` itself would quietly turn full-width or Arabic-Indic digits,
letters (vanity numbers) and ``tel:`` URIs into digits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import phonenumbers
from phonenumbers import PhoneNumberType

from .model import InvalidNumber

#: What a dialled number may look like before normalisation: ASCII digits, an
#: optional leading ``+``, and single dots or dashes between digits.
_DIAL_STRING = re.compile(r"\+?[0-9]+(?:[.\-][0-9]+)*")
#: E.164 allows 15 digits; a few more for national prefixes and 00 access codes.
MAX_DIGITS = 17


class Risk(StrEnum):
    """Why a number is on the built-in deny list; a rule's ``allow`` names these."""

    #: Premium rate services (UK 09, US 1-900, ...), per libphonenumber.
    PREMIUM_RATE = "premium_rate"
    #: Shared cost (UK 084/087, ...): the caller pays part of a service's cost.
    SHARED_COST = "shared_cost"
    #: Personal numbers (UK 070) and pagers: classic fronts for revenue share.
    PERSONAL_NUMBER = "personal_number"
    #: Non-geographic "global network" codes: satellite (+870 Inmarsat, +881
    #: Iridium, Globalstar), international networks (+882, +883), the
    #: international premium rate service (+979) and shared cost (+808).
    GLOBAL_NETWORK = "global_network"
    #: NANP (+1) numbers outside the US and Canada: Caribbean and Pacific
    #: islands whose rates are international although they look domestic.
    NANP_OUTSIDE_US_CA = "nanp_outside_us_ca"
    #: Countries most reported as International Revenue Share Fraud targets.
    HIGH_RISK_COUNTRY = "high_risk_country"


#: Country calling codes most often reported as IRSF destinations (fraud
#: reports of the CFCA and of carriers; reviewed by hand, extend as needed).
#: Small island and satellite-served networks with high termination rates.
HIGH_RISK_CALLING_CODES = frozenset(
    {
        53,  # Cuba
        222,  # Mauritania
        232,  # Sierra Leone
        235,  # Chad
        239,  # Sao Tome and Principe
        247,  # Ascension
        252,  # Somalia
        290,  # Saint Helena, Tristan da Cunha
        674,  # Nauru
        677,  # Solomon Islands
        678,  # Vanuatu
        682,  # Cook Islands
        683,  # Niue
        686,  # Kiribati
        688,  # Tuvalu
        690,  # Tokelau
        691,  # Micronesia
        692,  # Marshall Islands
    }
)
#: NANP premium prefixes libphonenumber may not classify as such (976 is
#: a legacy US premium exchange, dialled as NXX after the area code).
NANP_PREMIUM_PREFIXES = ("+1900", "+1976")

#: Number types by the names rules use.
TYPES: dict[str, int] = {
    "fixed_line": PhoneNumberType.FIXED_LINE,
    "mobile": PhoneNumberType.MOBILE,
    "fixed_line_or_mobile": PhoneNumberType.FIXED_LINE_OR_MOBILE,
    "toll_free": PhoneNumberType.TOLL_FREE,
    "premium_rate": PhoneNumberType.PREMIUM_RATE,
    "shared_cost": PhoneNumberType.SHARED_COST,
    "voip": PhoneNumberType.VOIP,
    "personal_number": PhoneNumberType.PERSONAL_NUMBER,
    "pager": PhoneNumberType.PAGER,
    "uan": PhoneNumberType.UAN,
    "voicemail": PhoneNumberType.VOICEMAIL,
}
_TYPE_NAMES = {value: name for name, value in TYPES.items()}


@dataclass(frozen=True)
class PhoneNumber:
    """A valid telephone number and what the dialplan knows of it."""

    e164: str
    #: ISO 3166 region (``US``, ``GB``), or ``001`` for global network codes.
    region: str
    type: str
    risks: frozenset[Risk]

    @property
    def placeholders(self) -> dict[str, str]:
        """What a rule's target may use: ``{e164}``, ``{e164_digits}``, ``{national}``."""
        parsed = phonenumbers.parse(self.e164)
        national = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
        return {
            "e164": self.e164,
            "e164_digits": self.e164[1:],
            "national": re.sub(r"[^0-9]", "", national),
            "country_code": str(parsed.country_code),
        }


def dial_string(number: str) -> str:
    """``number`` without separators if it is a plain dial string, else InvalidNumber.

    Refused: anything but ASCII digits, one leading ``+`` and ``.`` or ``-``
    between two digits; so no
    URIs (``sip:``, ``tel:``), no ``@ ; , %``, no letters, no full-width or
    Arabic-Indic digits, no control characters; and more than
    :data:`MAX_DIGITS` digits.
    """
    if not _DIAL_STRING.fullmatch(number):
        raise InvalidNumber(
            "number is not a telephone number (digits, a leading +, single . or - between digits)"
        )
    digits = re.sub(r"[.\-]", "", number)
    count = len(digits.lstrip("+"))
    if count == 0 or count > MAX_DIGITS:
        raise InvalidNumber(f"a telephone number has 1 to {MAX_DIGITS} digits")
    return digits


def normalise(number: str, region: str) -> PhoneNumber | None:
    """The valid telephone number ``number`` is, dialled from ``region``; None if it is none.

    ``00`` is read as the international access code (so ``0044...`` is
    ``+44...``) whatever ``region`` says.
    """
    digits = dial_string(number)
    if digits.startswith("00"):
        digits = "+" + digits[2:]
    try:
        parsed = phonenumbers.parse(digits, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    region_code = phonenumbers.region_code_for_number(parsed) or ""
    kind = _TYPE_NAMES.get(phonenumbers.number_type(parsed), "unknown")
    return PhoneNumber(e164, region_code, kind, _risks(parsed, e164, region_code, kind))


def _risks(parsed: phonenumbers.PhoneNumber, e164: str, region: str, kind: str) -> frozenset[Risk]:
    risks = set()
    if kind == "premium_rate" or e164.startswith(NANP_PREMIUM_PREFIXES):
        risks.add(Risk.PREMIUM_RATE)
    if kind == "shared_cost":
        risks.add(Risk.SHARED_COST)
    if kind in ("personal_number", "pager"):
        risks.add(Risk.PERSONAL_NUMBER)
    if region == "001":
        risks.add(Risk.GLOBAL_NETWORK)
    if parsed.country_code == 1 and region not in ("US", "CA"):
        risks.add(Risk.NANP_OUTSIDE_US_CA)
    if parsed.country_code in HIGH_RISK_CALLING_CODES:
        risks.add(Risk.HIGH_RISK_COUNTRY)
    return frozenset(risks)


def is_region(code: str) -> bool:
    """Whether ``code`` is a region libphonenumber knows (``US``, ``GB``, ... or ``001``)."""
    return code in phonenumbers.SUPPORTED_REGIONS or code == "001"
