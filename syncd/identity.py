"""Subject keys: the only form in which syncd remembers who a person is.

A subject is known by an email address, a phone number or a Phorest client id.
Each is normalised (email trimmed and lower-cased, phone in E.164, client id
trimmed) and then keyed with HMAC-SHA256 under the secret ``[identity] hmac_key``.
The suppression list and the audit trail store only these keys, so the ledger
holds no plain personal data once work is done (DESIGN "Identity and personal
data", rules R3 and R11).

Error messages never repeat the value they reject: they end up in logs and in
CLI output, and the value is personal data.

Phone numbers in Phorest come back as free-form strings. Besides the usual
national (``07700 900123``) and international (``+44 7700 900123``) forms,
clients are often stored as the full international number without the plus
(``353871234567``). :func:`normalise_phone` accepts that form with one rule,
applied only when the national reading fails:

* the value is ASCII digits only (``00``-prefixed international numbers need
  no rule: ``phonenumbers`` reads them already, and no country code starts
  with ``0``), and
* it is not a possible number of the default region, but
* it is a possible number once read as ``+<digits>``.

The national reading always wins, so a number that is possible both ways keeps
its meaning in the default region.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

import phonenumbers

from syncd.errors import IdentifierError

# RFC 5321 limits a forward path to 256 octets including the angle brackets.
EMAIL_MAX_LENGTH_CHARS: Final = 254
# A shorter HMAC key than this is guessable enough to undo the pseudonymisation.
HMAC_KEY_MIN_LENGTH_BYTES: Final = 16

SubjectKind = Literal["email", "phone", "client_id"]
SUBJECT_KINDS: Final[tuple[str, ...]] = get_args(SubjectKind)


def normalise_email(value: str) -> str:
    """Return the canonical form of an email address: trimmed and lower-cased.

    Only plausibility is checked (one ``@``, a non-empty local part, a dotted
    domain without empty labels, no whitespace or control characters, at most
    254 characters); deliverability is the mail provider's business.

    Args:
        value: the address as typed or as stored by a processor.

    Returns:
        The normalised address.

    Raises:
        IdentifierError: the value is not a plausible single address. The
            message does not contain the value.
    """
    email = value.strip().lower()
    # Checked after lower-casing: a few characters grow when lower-cased, and
    # checking the final form keeps the function idempotent.
    if not email:
        raise IdentifierError("email address is empty")
    if len(email) > EMAIL_MAX_LENGTH_CHARS:
        raise IdentifierError(f"email address is longer than {EMAIL_MAX_LENGTH_CHARS} characters")
    if not email.isprintable() or " " in email:
        # No whitespace and nothing in Unicode category C (control, format such
        # as zero-width, surrogate, private-use, unassigned): invisible
        # differences would split one person into two keys. str.isprintable()
        # is False exactly for categories C and Z except the ASCII space, and
        # every Z character is whitespace, so this is that test in one C call.
        raise IdentifierError("email address contains whitespace or control characters")
    if email.count("@") != 1:
        raise IdentifierError("email address must contain exactly one '@'")
    local, domain = email.split("@")
    if not local:
        raise IdentifierError("email address has an empty local part")
    if "." not in domain or any(not label for label in domain.split(".")):
        raise IdentifierError("email address has no valid domain")
    return email


def normalise_phone(value: str, default_region: str) -> str:
    """Return a phone number in E.164 form (``+447700900123``).

    National numbers are read in ``default_region``; international numbers may
    be written with ``+``, with the region's international prefix (``00``), or,
    as Phorest sometimes stores them, as bare digits starting with the country
    code (see the module docstring for that rule).

    The number must be *possible* (a full number of the right length for its
    country), not *valid* (in a range ``phonenumbers`` knows to be allocated):
    validity would reject Ofcom's drama range (07700 900xxx) that the sandbox
    and tests use, and real numbers in ranges allocated after the library's
    metadata was released. A key needs a canonical form, not proof that the
    line exists.

    Args:
        value: the number as typed or stored.
        default_region: ISO 3166 alpha-2 region for national numbers, e.g. ``GB``.

    Returns:
        The number in E.164 form.

    Raises:
        IdentifierError: the region is unknown, or the value is not a possible
            phone number. The message does not contain the value.
    """
    region = _normalise_region(default_region)
    text = value.strip()
    if not text:
        raise IdentifierError("phone number is empty")
    number = _parse_possible(text, region)
    if number is None and text.isascii() and text.isdigit():
        number = _parse_possible("+" + text, region)
    if number is None:
        raise IdentifierError(f"phone number is not a possible number (default region {region})")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalise_client_id(value: str) -> str:
    """Return a Phorest client id as Phorest wrote it, minus surrounding whitespace.

    Client ids are opaque and case-sensitive, so nothing else is changed.

    Args:
        value: the client id.

    Returns:
        The trimmed client id.

    Raises:
        IdentifierError: the value is empty or only whitespace.
    """
    client_id = value.strip()
    if not client_id:
        raise IdentifierError("client id is empty")
    return client_id


@dataclass(frozen=True)
class SubjectKeys:
    """Turns identifiers into subject keys with the configured secret.

    Attributes:
        hmac_key: the secret ``[identity] hmac_key``, at least 16 bytes. Kept
            out of ``repr`` so it never reaches a log line.
        default_phone_region: region for national phone numbers, e.g. ``GB``.
    """

    hmac_key: bytes = field(repr=False)
    default_phone_region: str = "GB"
    _keyed: hmac.HMAC = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Validate the key and the region once, at construction.

        Raises:
            IdentifierError: the key is not bytes or shorter than 16 bytes, or
                the region is unknown.
        """
        if not isinstance(self.hmac_key, bytes):
            raise IdentifierError("identity hmac_key must be bytes")
        if len(self.hmac_key) < HMAC_KEY_MIN_LENGTH_BYTES:
            raise IdentifierError(
                f"identity hmac_key must be at least {HMAC_KEY_MIN_LENGTH_BYTES} bytes"
            )
        # Frozen dataclass: store the canonical region through object.__setattr__.
        object.__setattr__(
            self, "default_phone_region", _normalise_region(self.default_phone_region)
        )
        object.__setattr__(self, "_keyed", hmac.new(self.hmac_key, digestmod="sha256"))

    def email(self, value: str) -> str:
        """Return the subject key of an email address.

        Args:
            value: the address in any case, with or without surrounding spaces.

        Returns:
            64 lower-case hex characters.

        Raises:
            IdentifierError: the address is not plausible.
        """
        return self.key("email", value)

    def phone(self, value: str) -> str:
        """Return the subject key of a phone number.

        Args:
            value: the number in any format :func:`normalise_phone` accepts.

        Returns:
            64 lower-case hex characters.

        Raises:
            IdentifierError: the number is not a possible phone number.
        """
        return self.key("phone", value)

    def client_id(self, value: str) -> str:
        """Return the subject key of a Phorest client id.

        Args:
            value: the client id.

        Returns:
            64 lower-case hex characters.

        Raises:
            IdentifierError: the client id is empty.
        """
        return self.key("client_id", value)

    def key(self, kind: SubjectKind, value: str) -> str:
        """Return the subject key of one identifier.

        The HMAC covers ``"<kind>:<normalised value>"`` so that the same string
        used as, say, an email and a client id gives two unrelated keys.

        Args:
            kind: ``"email"``, ``"phone"`` or ``"client_id"``.
            value: the identifier, normalised here.

        Returns:
            The HMAC-SHA256 as 64 lower-case hex characters.

        Raises:
            IdentifierError: the kind is unknown or the value is invalid for it.
        """
        if kind == "email":
            normalised = normalise_email(value)
        elif kind == "phone":
            normalised = normalise_phone(value, self.default_phone_region)
        elif kind == "client_id":
            normalised = normalise_client_id(value)
        else:
            raise IdentifierError(
                f"unknown identifier kind {kind!r}; expected one of {', '.join(SUBJECT_KINDS)}"
            )
        # A copy of the keyed state, not hmac.digest: that one-shot call releases
        # the GIL, and while a reader thread is busy parsing a page, getting it
        # back can take a whole switch interval (5 ms) per key; hashing a short
        # message on a copy keeps the GIL and takes about a microsecond.
        mac = self._keyed.copy()
        mac.update(f"{kind}:{normalised}".encode())
        return mac.hexdigest()


def _normalise_region(region: str) -> str:
    """Return a region code upper-cased, checked against ``phonenumbers``.

    Raises:
        IdentifierError: the region is not one ``phonenumbers`` supports.
    """
    canonical = region.strip().upper()
    if canonical not in phonenumbers.SUPPORTED_REGIONS:
        # A region code is configuration, not personal data, so it may be shown.
        raise IdentifierError(f"unknown phone region {region!r}; expected e.g. 'GB' or 'IE'")
    return canonical


def _parse_possible(text: str, region: str) -> phonenumbers.PhoneNumber | None:
    """Parse ``text`` in ``region``; return the number only if it is possible."""
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        # Its message is generic, but the caller raises its own without
        # chaining so nothing about the input can ride along.
        return None
    # IS_POSSIBLE only: is_possible_number() also accepts IS_POSSIBLE_LOCAL_ONLY,
    # a subscriber number without its area code (GB "12345"), which does not
    # identify anyone.
    reason = phonenumbers.is_possible_number_with_reason(number)
    return number if reason == phonenumbers.ValidationResult.IS_POSSIBLE else None
