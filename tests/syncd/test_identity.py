"""Tests for syncd.identity: normalisation and subject keys."""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from contextlib import AbstractContextManager, nullcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.errors import IdentifierError
from syncd.identity import (
    SubjectKeys,
    normalise_client_id,
    normalise_email,
    normalise_phone,
)

HMAC_KEY = b"0123456789abcdef-test-only-key"
OTHER_HMAC_KEY = b"fedcba9876543210-test-only-key"
HEX_KEY_RE = re.compile(r"[0-9a-f]{64}")


@pytest.fixture
def keys() -> SubjectKeys:
    return SubjectKeys(hmac_key=HMAC_KEY, default_phone_region="GB")


# --- email -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("jane.doe@example.com", "jane.doe@example.com"),
        ("Jane.Doe@Example.COM", "jane.doe@example.com"),
        ("  jane.doe@example.com\t\n", "jane.doe@example.com"),
        ("JANE.DOE+salon@EXAMPLE.co.uk ", "jane.doe+salon@example.co.uk"),
        ("o'brien@example.ie", "o'brien@example.ie"),
    ],
    ids=["plain", "mixed-case", "surrounding-whitespace", "plus-tag-and-case", "apostrophe"],
)
def test_normalise_email_trims_and_lower_cases(raw: str, expected: str) -> None:
    assert normalise_email(raw) == expected


INVALID_EMAILS = [
    pytest.param("", id="empty"),
    pytest.param("   ", id="only-whitespace"),
    pytest.param("jane.doe.example.com", id="no-at"),
    pytest.param("jane@doe@example.com", id="two-ats"),
    pytest.param("@example.com", id="empty-local-part"),
    pytest.param("jane.doe@", id="empty-domain"),
    pytest.param("jane.doe@localhost", id="undotted-domain"),
    pytest.param("jane.doe@example..com", id="empty-domain-label"),
    pytest.param("jane.doe@example.com.", id="trailing-dot-in-domain"),
    pytest.param("jane doe@example.com", id="inner-space"),
    pytest.param("jane.doe@exa\tmple.com", id="inner-tab"),
    pytest.param("jane.doe\x00@example.com", id="control-character"),
    pytest.param("jane\u200b.doe@example.com", id="zero-width-space"),
    pytest.param("jane.doe@example.com, john@example.com", id="two-addresses"),
    pytest.param("j" * 243 + "@example.com", id="255-characters"),
]


@pytest.mark.parametrize("raw", INVALID_EMAILS)
def test_normalise_email_rejects_implausible_addresses_without_echoing_them(raw: str) -> None:
    with pytest.raises(IdentifierError) as excinfo:
        normalise_email(raw)
    message = str(excinfo.value).lower()
    assert message
    # Neither the value nor any distinctive piece of it may be echoed.
    pieces = [raw.strip(), *re.split(r"[@\s,\x00\u200b]+", raw)]
    assert not [piece for piece in pieces if len(piece) >= 4 and piece.lower() in message]


def test_normalise_email_accepts_exactly_254_characters() -> None:
    address = "j" * 242 + "@example.com"
    assert len(address) == 254
    assert normalise_email(address) == address


# --- phone -----------------------------------------------------------------

GB_FORMS_OF_ONE_MOBILE = [
    pytest.param("07700 900123", id="national-spaced"),
    pytest.param("07700900123", id="national-compact"),
    pytest.param("07700-900-123", id="national-hyphens"),
    pytest.param("+44 7700 900123", id="international"),
    pytest.param("+447700900123", id="e164"),
    pytest.param("+44 (0)7700 900123", id="international-with-trunk-zero"),
    pytest.param("0044 7700 900123", id="double-zero-prefix"),
    pytest.param("447700900123", id="phorest-digits-without-plus"),
    pytest.param("  07700 900123 ", id="surrounding-whitespace"),
]


@pytest.mark.parametrize("raw", GB_FORMS_OF_ONE_MOBILE)
def test_normalise_phone_gives_e164_for_every_gb_format(raw: str) -> None:
    assert normalise_phone(raw, "GB") == "+447700900123"


@pytest.mark.parametrize("raw", GB_FORMS_OF_ONE_MOBILE)
def test_phone_key_is_the_same_for_every_gb_format(keys: SubjectKeys, raw: str) -> None:
    assert keys.phone(raw) == keys.phone("+447700900123")


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("(020) 7946 0958", "GB", "+442079460958"),
        ("087 123 4567", "IE", "+353871234567"),
        ("+353 87 123 4567", "GB", "+353871234567"),
        ("353871234567", "GB", "+353871234567"),
        ("353871234567", "IE", "+353871234567"),
        ("447700900123", "IE", "+447700900123"),
        ("(202) 555-0123", "US", "+12025550123"),
        ("2025550123", "US", "+12025550123"),
        ("07700 900123", "gb", "+447700900123"),
    ],
    ids=[
        "gb-landline",
        "ie-national-mobile",
        "ie-international-from-gb",
        "phorest-ie-digits-read-in-gb",
        "phorest-ie-digits-read-in-ie",
        "phorest-gb-digits-read-in-ie",
        "us-national",
        "us-national-digits-stay-national",
        "lower-case-region",
    ],
)
def test_normalise_phone_returns_e164(raw: str, region: str, expected: str) -> None:
    assert normalise_phone(raw, region) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="only-whitespace"),
        pytest.param("not a number", id="words"),
        pytest.param("12345", id="local-number-without-area-code"),
        pytest.param("07700", id="too-short"),
        pytest.param("0770090012345678", id="too-long"),
        pytest.param("+44 77", id="too-short-international"),
        pytest.param("0" * 300, id="far-too-long"),
        pytest.param("0353871234567", id="digits-too-long-for-the-region-and-no-country-code"),
    ],
)
def test_normalise_phone_rejects_impossible_numbers_without_echoing_them(raw: str) -> None:
    with pytest.raises(IdentifierError) as excinfo:
        normalise_phone(raw, "GB")
    if raw.strip():
        assert raw.strip() not in str(excinfo.value)


@pytest.mark.parametrize("region", ["", "UK", "XX", "EU", "Great Britain"], ids=repr)
def test_normalise_phone_rejects_unknown_regions(region: str) -> None:
    with pytest.raises(IdentifierError, match="region"):
        normalise_phone("07700 900123", region)


# --- client id -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("aBc123XyZ_-==", "aBc123XyZ_-=="),
        ("  aBc123  ", "aBc123"),
        ("jane@example.com", "jane@example.com"),
    ],
    ids=["kept-as-is-including-case", "surrounding-whitespace", "not-parsed-as-email"],
)
def test_normalise_client_id_only_trims(raw: str, expected: str) -> None:
    assert normalise_client_id(raw) == expected


@pytest.mark.parametrize("raw", ["", " \t "], ids=["empty", "whitespace"])
def test_normalise_client_id_rejects_empty(raw: str) -> None:
    with pytest.raises(IdentifierError):
        normalise_client_id(raw)


# --- SubjectKeys -----------------------------------------------------------


@pytest.mark.parametrize(
    ("hmac_key", "region", "expectation"),
    [
        (b"x" * 16, "GB", nullcontext()),
        (b"x" * 64, "ie", nullcontext()),
        (b"", "GB", pytest.raises(IdentifierError, match="at least 16 bytes")),
        (b"x" * 15, "GB", pytest.raises(IdentifierError, match="at least 16 bytes")),
        ("x" * 32, "GB", pytest.raises(IdentifierError, match="bytes")),
        (b"x" * 16, "ZZ", pytest.raises(IdentifierError, match="region")),
    ],
    ids=[
        "16-bytes",
        "64-bytes-lower-case-region",
        "empty",
        "15-bytes",
        "str-not-bytes",
        "bad-region",
    ],
)
def test_subject_keys_checks_its_key_and_region(
    hmac_key: bytes, region: str, expectation: AbstractContextManager[object]
) -> None:
    with expectation:
        SubjectKeys(hmac_key=hmac_key, default_phone_region=region)


def test_subject_keys_repr_does_not_reveal_the_hmac_key() -> None:
    keys = SubjectKeys(hmac_key=HMAC_KEY, default_phone_region="GB")
    assert HMAC_KEY.decode() not in repr(keys)
    assert "GB" in repr(keys)


def test_key_is_hmac_sha256_of_kind_and_normalised_value(keys: SubjectKeys) -> None:
    expected = hmac.new(HMAC_KEY, b"email:jane.doe@example.com", hashlib.sha256).hexdigest()
    assert keys.key("email", " Jane.Doe@Example.com ") == expected
    assert keys.email(" Jane.Doe@Example.com ") == expected


@pytest.mark.parametrize(
    ("kind", "value"),
    [("email", "jane@example.com"), ("phone", "07700 900123"), ("client_id", "abc123")],
    ids=["email", "phone", "client-id"],
)
def test_key_is_64_lower_case_hex_characters(keys: SubjectKeys, kind: str, value: str) -> None:
    assert HEX_KEY_RE.fullmatch(keys.key(kind, value))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "value", "shortcut"),
    [
        ("email", "Jane@Example.com", "email"),
        ("phone", "07700 900123", "phone"),
        ("client_id", " abc123 ", "client_id"),
    ],
    ids=["email", "phone", "client-id"],
)
def test_shortcut_methods_equal_key(
    keys: SubjectKeys, kind: str, value: str, shortcut: str
) -> None:
    assert getattr(keys, shortcut)(value) == keys.key(kind, value)  # type: ignore[arg-type]


def test_same_string_as_email_and_as_client_id_gives_different_keys(keys: SubjectKeys) -> None:
    value = "jane.doe@example.com"
    assert keys.email(value) != keys.client_id(value)


def test_same_digits_as_phone_and_as_client_id_give_different_keys(keys: SubjectKeys) -> None:
    assert keys.phone("+447700900123") != keys.client_id("+447700900123")


def test_different_hmac_keys_give_different_subject_keys(keys: SubjectKeys) -> None:
    other = SubjectKeys(hmac_key=OTHER_HMAC_KEY, default_phone_region="GB")
    assert keys.email("jane@example.com") != other.email("jane@example.com")


def test_default_region_decides_how_national_numbers_are_keyed() -> None:
    gb = SubjectKeys(hmac_key=HMAC_KEY, default_phone_region="GB")
    ie = SubjectKeys(hmac_key=HMAC_KEY, default_phone_region="IE")
    assert gb.phone("087 123 4567") != ie.phone("087 123 4567")
    assert gb.phone("+353871234567") == ie.phone("087 123 4567")


def test_key_rejects_unknown_kind(keys: SubjectKeys) -> None:
    with pytest.raises(IdentifierError, match="unknown identifier kind"):
        keys.key("name", "Jane")  # type: ignore[arg-type]


def test_key_rejects_invalid_values_without_echoing_them(keys: SubjectKeys) -> None:
    with pytest.raises(IdentifierError) as excinfo:
        keys.email("jane.doe at example.com")
    assert "jane" not in str(excinfo.value)


# --- properties ------------------------------------------------------------

_PADDING = st.text(alphabet=" \t\r\n", max_size=3)


@given(st.text(max_size=300))
def test_normalise_email_is_idempotent_or_rejects(raw: str) -> None:
    try:
        once = normalise_email(raw)
    except IdentifierError:
        return
    assert normalise_email(once) == once


@given(st.characters(), st.sampled_from(["{}jane@example.com", "ja{}ne@example.com",
                                          "jane@exam{}ple.com"]))
def test_normalise_email_rejects_a_whitespace_or_category_c_character_and_only_that(
    ch: str, template: str,
) -> None:
    invisible = ch.isspace() or unicodedata.category(ch).startswith("C")
    raw = template.format(ch).lower()
    if invisible and template.startswith("{}") and ch.strip() == "":
        return  # leading whitespace is trimmed, not refused
    try:
        normalise_email(raw)
    except IdentifierError:
        refused = True
    else:
        refused = False
    if invisible:
        assert refused
    elif ch not in "@." and not ch.isspace():
        assert not refused


@given(email=st.emails(), before=_PADDING, after=_PADDING, data=st.data())
def test_email_key_is_stable_under_case_and_whitespace_changes(
    email: str, before: str, after: str, data: st.DataObject
) -> None:
    keys = SubjectKeys(hmac_key=HMAC_KEY, default_phone_region="GB")
    # hypothesis emails are ASCII, so flipping case is reversible by lower().
    flips = data.draw(st.lists(st.booleans(), min_size=len(email), max_size=len(email)))
    variant = "".join(ch.swapcase() if flip else ch for ch, flip in zip(email, flips, strict=True))
    try:
        expected = keys.email(email)
    except IdentifierError:
        # RFC-valid but implausible for us (e.g. longer than 254 characters).
        with pytest.raises(IdentifierError):
            keys.email(before + variant + after)
        return
    assert keys.email(before + variant + after) == expected
