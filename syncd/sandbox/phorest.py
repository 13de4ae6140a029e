"""A local Phorest third-party API: clients, branches and appointments over real HTTP.

The emulator is the Phorest peer for end-to-end tests, the demo and benchmarks.
It reproduces what the Phorest API reference (verified facts) records, with the
source tag of each fact, and states every assumption where the reference says
"not confirmed" so that a test passing here is not mistaken for proof.

Facts reproduced, each with its reference section and source tag:

- Paths start ``/third-party-api-server/api/business/{businessId}`` — §1 (DOC-CLIENT,
  SUP-CALL, every codebase).
- HTTP Basic on every request, username ``global/<email>`` — §1 (NOTES, GHL, SKIN,
  KLAVIYO, ERICA); credentials decoded as UTF-8, so a Latin-1 encoded password fails —
  §1 (conformance test, Medium); 401 for bad or missing credentials — §6.
- Clients live at business level, appointments per branch; ``GET …/branch`` is paged
  under ``_embedded.branches`` — §1 Scoping (KLAVIYO, DATAHUB).
- Ids are opaque 22-character URL-safe strings — §1 IDs (DOC-CLIENT).
- ``GET …/client``: ``page`` zero-based, default 0; ``size`` default 20, max 200 —
  §2 (DOC-LIST).
- Envelope ``{"_embedded": {"clients": [...]}, "page": {"size", "totalElements",
  "totalPages", "number"}}``, the same shape for branches and appointments — §2
  (KLAVIYO, DATAHUB, GHL, SKIN, CHG-1.25).
- Filters ``email``, ``phone`` (matches ``mobile``), ``firstName``, ``lastName``, with
  the ``~Jo%`` prefix form for names — §2 (DOC-LIST); ``externalId`` — §2 (CHG-1.10).
- ``updatedAfter``/``updatedBefore`` in the form ``2026-01-02T03:04:05.000Z`` — §2
  (DOC-LIST, DATAHUB).
- ``includeArchived``/``includeDeleted``; archived and deleted clients are hidden
  without them — §2 (names from APIEV, Medium).
- Unknown query parameters are silently ignored: ``mobile=``, ``updatedSince=`` or
  ``clientId=`` on appointments return everything — §2 (ERICA, probed live).
- ``GET …/client/{clientId}``, 404 for an unknown id — §2, §6 (CHG-1.10, CHG-1.41).
- Client fields, ``version`` starting at 1 — §3 (DOC-CLIENT, DATAHUB, KLAVIYO, GHL);
  the ``gender`` enum — §3 (CHG-1.22); ``lastVisitedBranchId``, ``linkedClientId``,
  ``hasActiveMembership`` — §3 (CHG-1.25, CHG-1.31, CHG-1.38).
- ``createdAt``/``updatedAt`` ISO-8601 UTC with milliseconds — §3; ``firstVisit`` and
  ``lastVisit`` are dates such as ``2025-10-21`` — §3 (ERICA, probed live).
- Consent flags are plain booleans with no timestamps, marketing and reminder apart
  for SMS and email — §3 (DOC-CLIENT).
- ``PUT …/client/{clientId}`` answers 200 with the updated client — §4 (DOC-NAV,
  DOC-UPD, CHG-1.25); ``firstName`` and ``lastName`` are required — §3, §4 (DOC-UPD,
  GHL); ``version`` travels in the body and rises with every save — §4 (GHL, SKIN;
  ERICA for appointments).
- ``POST …/client`` creates a client, 201 — §6 (CHG-1.25, DOC-UPD).
- No DELETE, forget or anonymise endpoint — §4 (DOC-NAV); a wrong method answers 500
  "Request method not supported" — §6 (ERICA).
- Erasure happens only in the Phorest UI, by Forget or automatic data retention
  (:meth:`PhorestEmulator.forget`) — §4 (SUP-FORGET, SUP-RET).
- Archiving hides and can be undone — §4 (SUP-ARCH); merges cannot be undone — §3
  (SUP-MERGE); merged clients keep existing with ``mergedToClientId`` — §3 (DATAHUB,
  GHL, NOTES).
- Appointments take snake_case ``from_date``/``to_date`` (``yyyy-MM-dd``, both
  required), ``client_id``, ``updated_from``/``updated_to``, ``fetch_canceled``,
  ``fetch_deleted`` — §5 (DATAHUB, KLAVIYO, ERICA); a range over 31 days gets 400
  "Max date range allowed is 31 days" — §5 (ERICA, probed live); rows carry
  ``appointmentDate``, ``startTime``, ``clientId``, ``state``, ``activationState``,
  ``deleted``, ``branchId``, ``createdAt``, ``updatedAt``, ``version`` — §5; ``size``
  max 100 — §5 (conformance test, Low to Medium).
- 100 requests per second, then 429 without ``Retry-After`` — §6 (APIEV, NOTES).

Assumptions, where the reference says "not confirmed" or says nothing:

- **Error body.** Every error is ``{"errorCode": "<STATUS_NAME>", "message": "…"}``,
  e.g. ``{"errorCode": "CONFLICT", "message": "…"}`` (§6: shape not confirmed;
  syncd must branch on the status only).
- **Stale or missing ``version`` on PUT → 409** with a message naming both
  versions. Checks run in this order: malformed JSON or a non-object body (400),
  field validation (400), unknown client (404), version (409).
- **PUT merges.** Writable fields present in the body replace the stored ones
  (``null`` clears); omitted fields keep their values (GHL's partial bodies
  suggest this). Read-only fields (``clientId``, ``createdAt``, ``updatedAt``,
  ``version``, ``firstVisit``, ``lastVisit``, ``lastVisitedBranchId``,
  ``mergedToClientId``, ``deleted``, ``creatingBranchId``, ``clientSince``,
  ``linkedClientId``, ``creditAccount``, ``loyaltyCard``,
  ``hasActiveMembership``) and unknown fields are ignored. A required name that
  is missing, not a string or blank gives 400; so does a wrongly typed field
  (a non-boolean flag, an unknown ``gender``, a ``birthDate`` not ``yyyy-MM-dd``).
  Every successful PUT raises ``version`` by 1 and sets ``updatedAt`` to now,
  even when nothing changed.
- **Forgotten clients** (Client actions > Forget, or automatic data retention)
  stay in the API: same ``clientId``, ``deleted`` stays ``false``, ``archived``,
  ``banned``, ``mergedToClientId``, ``linkedClientId``, ``createdAt``,
  ``clientSince``, ``firstVisit``, ``lastVisit``, the branch ids and
  ``clientCategoryIds`` are kept (financial history survives, anonymised).
  ``firstName`` becomes ``"Anonymous"`` and ``lastName`` ``""``; ``email``,
  ``mobile``, ``landLine``, ``linkedClientMobile``, ``birthDate``, ``gender``,
  ``address``, ``notes``, ``photoUrl`` and ``externalId`` become ``null``; all
  four consent flags become ``false``; ``version`` rises and ``updatedAt`` moves,
  so an ``updatedAfter`` poll sees it. syncd must recognise it by the blanked
  ``email`` *and* ``mobile`` (plus the ``"Anonymous"`` name), not by
  ``deleted``. Because ``lastName`` is blank, a PUT echoing a forgotten client
  back is refused with 400. Forgetting twice changes nothing.
- **Paging bounds** follow Spring Data, which the envelope comes from: ``size``
  above the maximum is clamped (``page.size`` reports the clamped value),
  ``size`` below 1 or not a number falls back to 20, ``page`` below 0 or not a
  number to 0. A page past the end answers 200 with no rows.
- **Empty pages** carry ``"_embedded": {"clients": []}``. Spring HATEOAS would
  leave ``_embedded`` out altogether; pass ``omit_empty_embedded=True`` to make
  syncd cope with that too.
- **Ordering** is by ``createdAt``, then ``clientId``, so pages are stable while
  staff edit records. Appointments order by date, start time, id.
- **Filters.** ``email``, ``firstName`` and ``lastName`` compare
  case-insensitively and exactly; ``~Jo%`` (a leading ``~`` and trailing ``%``)
  is a case-insensitive prefix, a leading ``~`` alone an exact match.
  ``phone`` compares the stored ``mobile`` string exactly (no normalisation), so
  syncd must send Phorest's own format. An empty filter value counts as absent.
  ``updatedAfter`` and ``updatedBefore`` are exclusive bounds. Instants need a
  zone (``Z``, ``+0000`` or ``+00:00``; a ``+`` that arrived decoded as a space is
  accepted); milliseconds are optional; anything else gives 400. Booleans
  accept Spring's words (``true/false/on/off/yes/no/1/0``), others give 400.
  ``includeLinked`` is accepted and ignored.
- **Mobile format.** Stored and returned as given; the seed uses international
  digits without ``+`` (``447700900123``). The reference only says "strings".
- **Merges.** The merged-away client keeps ``deleted: false`` and stays listed,
  with ``mergedToClientId`` set; both records get a new ``version`` and
  ``updatedAt``. Deleted, archived and merged clients answer
  ``GET …/client/{id}`` with 200.
- **Staff actions** (:meth:`PhorestEmulator.edit_client`, ``record_visit``,
  ``archive``, ``delete``, ``merge``, ``forget``) each raise ``version`` and
  move ``updatedAt``, like a save in the Phorest UI. Whether Phorest really
  moves ``updatedAt`` for visits or retention purges is unknown (§ "Not
  confirmed"); syncd's nightly full scan must not depend on it.
- **Appointment window** is ``to_date - from_date`` in days: 31 is allowed, 32
  is refused; ``to_date`` before ``from_date`` is 400. ``updated_from`` and
  ``updated_to`` are inclusive. ``startTime``/``endTime`` are ``HH:MM:SS``
  (DATAHUB's comment; not in the reference); the seeder may store
  ``HH:MM:SS.SSS`` and gets it back unchanged. ``fetch_archived`` is accepted
  and ignored.
- **Branches** page with a maximum ``size`` of 100 (§ "Not confirmed": use 100
  everywhere but clients).
- **Rate limit** is one token bucket per emulator holding one second's worth of
  requests (``max_requests_per_second``, default 100; ``None`` disables it).
  It runs before authentication; the 429 has no ``Retry-After``.
- **401** carries ``WWW-Authenticate: Basic realm="Phorest"``. Auth is checked
  before the business id, and an unknown business id is 404.
- Responses are ``application/json`` (not ``application/hal+json``).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import hmac
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from syncd.sandbox.http import Request, Response, Router, json_response

API_PREFIX = "/third-party-api-server/api/business/{business_id}"
DEFAULT_PAGE_SIZE = 20
MAX_CLIENT_PAGE_SIZE = 200
MAX_BRANCH_PAGE_SIZE = 100
MAX_APPOINTMENT_PAGE_SIZE = 100
MAX_APPOINTMENT_RANGE_DAYS = 31
DEFAULT_MAX_REQUESTS_PER_SECOND = 100.0
# Filter combinations whose results are kept (least recently used dropped
# first); a sync pages through one or two at a time, so a handful is plenty.
FILTER_CACHE_ENTRIES = 16
# base64url of 16 bytes is 22 characters, the length of Phorest's ids.
ID_DIGEST_BYTES = 16
FORGOTTEN_FIRST_NAME = "Anonymous"
FORGOTTEN_LAST_NAME = ""
DEFAULT_APPOINTMENT_MINUTES = 60

GENDERS = frozenset(
    {"MALE", "FEMALE", "NON_BINARY", "NOT_SPECIFIED", "PREFER_NOT_TO_SAY", "UNKNOWN"}
)
APPOINTMENT_STATES = frozenset({"BOOKED", "CHECKED_IN", "PAID"})
ACTIVATION_STATES = frozenset({"ACTIVE", "RESERVED", "CANCELED"})
ADDRESS_FIELDS = ("streetAddress1", "streetAddress2", "city", "state", "postalCode", "country")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}\Z")
_TIME = re.compile(r"\d{2}:\d{2}:\d{2}(?:\.\d{3})?\Z")
_INSTANT = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})T(?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<fraction>\d{1,9}))?"
    r"(?P<zone>Z|[+-]\d{2}:?\d{2})\Z"
)
_TRUE_WORDS = frozenset({"true", "on", "yes", "1"})
_FALSE_WORDS = frozenset({"false", "off", "no", "0"})
_ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    429: "TOO_MANY_REQUESTS",
    500: "INTERNAL_SERVER_ERROR",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}
_ERROR_MESSAGES = {
    401: "Full authentication is required to access this resource",
    404: "Not found",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


# ---------------------------------------------------------------------------
# Stored records. Attributes carry the wire names so request bodies map onto
# them one to one; slots keep 100,000 clients well under 100 MB.
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Client:
    clientId: str  # noqa: N815 - wire name
    version: int
    createdAt: int  # noqa: N815 - epoch milliseconds, rendered as ISO text
    updatedAt: int  # noqa: N815
    firstName: str  # noqa: N815
    lastName: str  # noqa: N815
    email: str | None = None
    mobile: str | None = None
    landLine: str | None = None  # noqa: N815
    linkedClientMobile: str | None = None  # noqa: N815
    smsMarketingConsent: bool = False  # noqa: N815
    emailMarketingConsent: bool = False  # noqa: N815
    smsReminderConsent: bool = False  # noqa: N815
    emailReminderConsent: bool = False  # noqa: N815
    archived: bool = False
    banned: bool = False
    deleted: bool = False
    mergedToClientId: str | None = None  # noqa: N815
    linkedClientId: str | None = None  # noqa: N815
    clientSince: int | None = None  # noqa: N815 - epoch milliseconds
    firstVisit: str | None = None  # noqa: N815 - yyyy-MM-dd
    lastVisit: str | None = None  # noqa: N815 - yyyy-MM-dd
    lastVisitedBranchId: str | None = None  # noqa: N815
    creatingBranchId: str | None = None  # noqa: N815
    preferredStaffId: str | None = None  # noqa: N815
    externalId: str | None = None  # noqa: N815
    clientCategoryIds: tuple[str, ...] = ()  # noqa: N815
    gender: str | None = None
    birthDate: str | None = None  # noqa: N815 - yyyy-MM-dd
    notes: str | None = None
    photoUrl: str | None = None  # noqa: N815
    address: tuple[str | None, ...] | None = None  # in ADDRESS_FIELDS order
    hasActiveMembership: bool = False  # noqa: N815
    forgotten: bool = False  # not on the wire: lets dump() count forgotten clients


@dataclass(slots=True)
class _Appointment:
    appointmentId: str  # noqa: N815 - wire name
    branchId: str  # noqa: N815
    clientId: str | None  # noqa: N815
    appointmentDate: str  # noqa: N815 - yyyy-MM-dd
    startTime: str  # noqa: N815 - HH:MM:SS
    endTime: str  # noqa: N815
    state: str
    activationState: str  # noqa: N815
    deleted: bool
    createdAt: int  # noqa: N815 - epoch milliseconds
    updatedAt: int  # noqa: N815
    version: int
    staffId: str | None = None  # noqa: N815
    serviceId: str | None = None  # noqa: N815
    serviceName: str | None = None  # noqa: N815
    price: float = 0.0


@dataclass(frozen=True, slots=True)
class _ClientQuery:
    """One filter combination of ``GET …/client``; hashable, so it keys the cache."""

    email: str | None = None
    phone: str | None = None
    first_name: tuple[str, bool] | None = None  # (casefolded text, is prefix)
    last_name: tuple[str, bool] | None = None
    external_id: str | None = None
    updated_after_ms: int | None = None
    updated_before_ms: int | None = None
    include_archived: bool = False
    include_deleted: bool = False

    @property
    def visibility(self) -> _ClientQuery:
        """The same query without its value filters: only the include flags."""
        return _ClientQuery(
            include_archived=self.include_archived, include_deleted=self.include_deleted
        )

    def select(self, rows: list[_Client], *, visible: bool = False) -> list[_Client]:
        """The rows this query keeps, in their order.

        One comprehension per filter, so a poll such as ``updatedAfter=…`` over
        100,000 clients costs a few milliseconds. ``visible`` says the rows
        already passed the include flags (they came from ``visibility``'s result).
        """
        rows_in = rows  # never hand back a cached list itself: callers patch their own
        if self.email is not None:
            email = self.email
            rows = [c for c in rows if c.email is not None and c.email.casefold() == email]
        if self.phone is not None:
            phone = self.phone
            rows = [c for c in rows if c.mobile == phone]
        if self.external_id is not None:
            external_id = self.external_id
            rows = [c for c in rows if c.externalId == external_id]
        if self.updated_after_ms is not None:
            after = self.updated_after_ms
            rows = [c for c in rows if c.updatedAt > after]
        if self.updated_before_ms is not None:
            before = self.updated_before_ms
            rows = [c for c in rows if c.updatedAt < before]
        if self.first_name is not None or self.last_name is not None:
            rows = [c for c in rows if self._names_match(c)]
        if visible:
            return rows if rows is not rows_in else list(rows)
        if not self.include_archived and not self.include_deleted:
            return [c for c in rows if not c.archived and not c.deleted]
        if not self.include_archived:
            return [c for c in rows if not c.archived]
        if not self.include_deleted:
            return [c for c in rows if not c.deleted]
        return list(rows)

    def _names_match(self, c: _Client) -> bool:
        if self.first_name is not None and not _name_matches(c.firstName, self.first_name):
            return False
        return self.last_name is None or _name_matches(c.lastName, self.last_name)

    def matches(self, c: _Client) -> bool:
        """Whether one client belongs in this query's result (used to patch cached results)."""
        if c.archived and not self.include_archived:
            return False
        if c.deleted and not self.include_deleted:
            return False
        if self.email is not None and (c.email is None or c.email.casefold() != self.email):
            return False
        if self.phone is not None and c.mobile != self.phone:
            return False
        if self.first_name is not None and not _name_matches(c.firstName, self.first_name):
            return False
        if self.last_name is not None and not _name_matches(c.lastName, self.last_name):
            return False
        if self.external_id is not None and c.externalId != self.external_id:
            return False
        if self.updated_after_ms is not None and c.updatedAt <= self.updated_after_ms:
            return False
        return self.updated_before_ms is None or c.updatedAt < self.updated_before_ms


class _ApiError(Exception):
    """An HTTP error answer raised inside a handler."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _RateLimiter:
    """A token bucket holding one second's worth of requests."""

    def __init__(self, per_second: float, monotonic: Callable[[], float]) -> None:
        self._rate = per_second
        self._monotonic = monotonic
        self._tokens = per_second
        self._last = monotonic()
        self._lock = threading.Lock()

    def admit(self) -> bool:
        with self._lock:
            now = self._monotonic()
            self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


# ---------------------------------------------------------------------------
# Field validation shared by HTTP bodies and the Python "staff" API.
# Each validator returns the stored form or raises ValueError with a message
# that becomes the 400's message.
# ---------------------------------------------------------------------------


def _as_string(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{name} must be a string")


def _as_boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be true or false")


def _as_gender(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value in GENDERS:
        return value
    raise ValueError(f"{name} must be one of {', '.join(sorted(GENDERS))}")


def _as_date(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        value = value.date()
    if isinstance(value, date):
        return sys.intern(value.isoformat())
    if isinstance(value, str) and _DATE.match(value):
        try:
            date.fromisoformat(value)
        except ValueError:
            pass
        else:
            # Visit dates repeat across thousands of clients; share one string each.
            return sys.intern(value)
    raise ValueError(f"{name} must be a date in the format yyyy-MM-dd")


def _as_address(name: str, value: Any) -> tuple[str | None, ...] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be an object")
    return tuple(_as_string(f"{name}.{key}", value.get(key)) for key in ADDRESS_FIELDS)


def _as_string_list(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ValueError(f"{name} must be a list of strings")


def _as_instant(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return _to_ms(value)
    if isinstance(value, str):
        parsed = _parse_instant_ms(value)
        if parsed is not None:
            return parsed
    raise ValueError(f"{name} must be a datetime or text like 2026-01-02T03:04:05.000Z")


Validator = Callable[[str, Any], Any]

# What a PUT or POST body (and a staff edit) may change.
WRITABLE_FIELDS: dict[str, Validator] = {
    "firstName": _as_string,
    "lastName": _as_string,
    "email": _as_string,
    "mobile": _as_string,
    "landLine": _as_string,
    "linkedClientMobile": _as_string,
    "smsMarketingConsent": _as_boolean,
    "emailMarketingConsent": _as_boolean,
    "smsReminderConsent": _as_boolean,
    "emailReminderConsent": _as_boolean,
    "archived": _as_boolean,
    "banned": _as_boolean,
    "gender": _as_gender,
    "birthDate": _as_date,
    "notes": _as_string,
    "photoUrl": _as_string,
    "externalId": _as_string,
    "preferredStaffId": _as_string,
    "clientCategoryIds": _as_string_list,
    "address": _as_address,
}
# What Phorest itself sets (visits, branches, memberships); staff actions and
# the seeder may set these directly, HTTP bodies may not.
SYSTEM_FIELDS: dict[str, Validator] = {
    "firstVisit": _as_date,
    "lastVisit": _as_date,
    "lastVisitedBranchId": _as_string,
    "creatingBranchId": _as_string,
    "linkedClientId": _as_string,
    "hasActiveMembership": _as_boolean,
    "clientSince": _as_instant,
}
# Only the seeder backdates records.
SEED_FIELDS: dict[str, Validator] = {"createdAt": _as_instant, "updatedAt": _as_instant}
EDITABLE_FIELDS = {**WRITABLE_FIELDS, **SYSTEM_FIELDS}
ADDABLE_FIELDS = {**WRITABLE_FIELDS, **SYSTEM_FIELDS, **SEED_FIELDS}


def _validated(fields: Mapping[str, Any], allowed: Mapping[str, Validator]) -> dict[str, Any]:
    """Validate the allowed keys of ``fields``; other keys are left out.

    Raises:
        ValueError: a field has the wrong type or format.
    """
    return {name: allowed[name](name, value) for name, value in fields.items() if name in allowed}


def _require_names(fields: Mapping[str, Any]) -> None:
    for name in ("firstName", "lastName"):
        value = fields.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must not be blank")


def _reject_unknown(fields: Mapping[str, Any], allowed: Mapping[str, Validator]) -> None:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"unknown client fields: {', '.join(unknown)}")


# ---------------------------------------------------------------------------
# Time and text helpers.
# ---------------------------------------------------------------------------


def _to_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _ONE_MS


def _iso(ms: int) -> str:
    moment = _EPOCH + timedelta(milliseconds=ms)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def _parse_instant_ms(text: str) -> int | None:
    """``2026-01-02T03:04:05.000Z`` (or ``+0000``, ``+00:00``, no millis) as epoch ms."""
    # A "+0000" sent unencoded in a query string arrives as " 0000".
    found = _INSTANT.match(text.replace(" ", "+"))
    if not found:
        return None
    zone = found["zone"]
    offset = "+00:00" if zone == "Z" else f"{zone[:3]}:{zone[-2:]}"
    try:
        moment = datetime.fromisoformat(f"{found['date']}T{found['time']}{offset}")
    except ValueError:
        return None
    millis = int((found["fraction"] or "0").ljust(3, "0")[:3])
    return _to_ms(moment) + millis


def _name_matches(value: str, wanted: tuple[str, bool]) -> bool:
    text, prefix = wanted
    folded = value.casefold()
    return folded.startswith(text) if prefix else folded == text


def _name_filter(raw: str | None) -> tuple[str, bool] | None:
    if not raw:
        return None
    if raw.startswith("~"):
        body = raw[1:]
        if body.endswith("%"):
            return body[:-1].casefold(), True
        return body.casefold(), False
    return raw.casefold(), False


def _shift_time(start: str, minutes: int) -> str:
    """``HH:MM:SS[.SSS]`` moved by ``minutes`` (wrapping at midnight), same format."""
    hours, mins, rest = start.split(":", 2)
    total = (int(hours) * 60 + int(mins) + minutes) % (24 * 60)
    return f"{total // 60:02d}:{total % 60:02d}:{rest}"


# ---------------------------------------------------------------------------
# Query-string parsing.
# ---------------------------------------------------------------------------


def _nonempty_arg(request: Request, name: str) -> str | None:
    value = request.arg(name)
    return value if value else None


def _flag_arg(request: Request, name: str) -> bool:
    raw = request.arg(name)
    if raw is None or raw == "":
        return False
    word = raw.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise _ApiError(400, f"Invalid boolean value for parameter {name}: {raw}")


def _instant_arg(request: Request, name: str) -> int | None:
    raw = request.arg(name)
    if not raw:
        return None
    parsed = _parse_instant_ms(raw)
    if parsed is None:
        raise _ApiError(
            400, f"Invalid date format for parameter {name}, expected yyyy-MM-dd'T'HH:mm:ss.SSSZ"
        )
    return parsed


def _date_arg(request: Request, name: str) -> date:
    raw = request.arg(name)
    if not raw:
        raise _ApiError(400, f"Required parameter {name} is missing")
    try:
        if not _DATE.match(raw):
            raise ValueError(raw)
        return date.fromisoformat(raw)
    except ValueError:
        raise _ApiError(
            400, f"Invalid date format for parameter {name}, expected yyyy-MM-dd"
        ) from None


def _int_arg(request: Request, name: str, default: int) -> int:
    try:
        return int(request.arg(name) or "")
    except ValueError:
        return default


def _paging(request: Request, max_size: int) -> tuple[int, int]:
    """Spring Data's bounds: a bad page gives 0, a bad size 20, a big size the maximum."""
    page = max(0, _int_arg(request, "page", 0))
    size = _int_arg(request, "size", DEFAULT_PAGE_SIZE)
    if size < 1:
        size = DEFAULT_PAGE_SIZE
    return page, min(size, max_size)


def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = request.json()
    except (ValueError, UnicodeDecodeError):
        raise _ApiError(400, "Malformed JSON request body") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "Request body must be a JSON object")
    return body


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    """User and password from an ``Authorization: Basic`` header, decoded as UTF-8."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


# ---------------------------------------------------------------------------
# Rendering.
# ---------------------------------------------------------------------------


def _client_json(c: _Client) -> dict[str, Any]:
    return {
        "clientId": c.clientId,
        "version": c.version,
        "firstName": c.firstName,
        "lastName": c.lastName,
        "email": c.email,
        "mobile": c.mobile,
        "landLine": c.landLine,
        "linkedClientMobile": c.linkedClientMobile,
        "smsMarketingConsent": c.smsMarketingConsent,
        "emailMarketingConsent": c.emailMarketingConsent,
        "smsReminderConsent": c.smsReminderConsent,
        "emailReminderConsent": c.emailReminderConsent,
        "archived": c.archived,
        "banned": c.banned,
        "deleted": c.deleted,
        "mergedToClientId": c.mergedToClientId,
        "linkedClientId": c.linkedClientId,
        "createdAt": _iso(c.createdAt),
        "updatedAt": _iso(c.updatedAt),
        "clientSince": None if c.clientSince is None else _iso(c.clientSince),
        "firstVisit": c.firstVisit,
        "lastVisit": c.lastVisit,
        "lastVisitedBranchId": c.lastVisitedBranchId,
        "creatingBranchId": c.creatingBranchId,
        "preferredStaffId": c.preferredStaffId,
        "externalId": c.externalId,
        "clientCategoryIds": list(c.clientCategoryIds),
        "gender": c.gender,
        "birthDate": c.birthDate,
        "notes": c.notes,
        "photoUrl": c.photoUrl,
        "address": None if c.address is None else dict(zip(ADDRESS_FIELDS, c.address, strict=True)),
        "creditAccount": {"outstandingBalance": 0.0, "creditDays": 0, "creditLimit": 0.0},
        "loyaltyCard": None,
        "hasActiveMembership": c.hasActiveMembership,
    }


def _appointment_json(a: _Appointment) -> dict[str, Any]:
    return {
        "appointmentId": a.appointmentId,
        "version": a.version,
        "branchId": a.branchId,
        "clientId": a.clientId,
        "appointmentDate": a.appointmentDate,
        "startTime": a.startTime,
        "endTime": a.endTime,
        "state": a.state,
        "activationState": a.activationState,
        "deleted": a.deleted,
        "staffId": a.staffId,
        "serviceId": a.serviceId,
        "serviceName": a.serviceName,
        "price": a.price,
        "createdAt": _iso(a.createdAt),
        "updatedAt": _iso(a.updatedAt),
    }


def _order_key(c: _Client) -> tuple[int, str]:
    return c.createdAt, c.clientId


def _appointment_order_key(a: _Appointment) -> tuple[str, str, str]:
    return a.appointmentDate, a.startTime, a.appointmentId


class PhorestEmulator:
    """The Phorest third-party API for one business, in memory, served over HTTP.

    One ``RLock`` guards all state, so the threaded server and the control API
    can use it at once. Each filter combination's sorted client list is cached,
    so paging through 100,000 clients scans them once, not once per page. A
    change patches the cached lists in place (the sort key, ``createdAt`` then
    ``clientId``, never changes, so the record's position is found by
    bisection) rather than dropping them, so the first page after a staff edit
    is as quick as the rest.

    Args:
        business_id: The ``{businessId}`` path segment this emulator answers.
        username: The Basic-auth user, ``global/<email>``.
        password: The Basic-auth password.
        clock: Current time for ``createdAt``/``updatedAt``; UTC now by default.
        max_requests_per_second: Rate limit before answering 429; ``None`` for none.
        monotonic: Seconds for the rate limiter; ``time.monotonic`` by default.
        omit_empty_embedded: Leave ``_embedded`` out of empty pages, as Spring
            HATEOAS would, instead of sending an empty list.
    """

    vendor = "phorest"

    def __init__(
        self,
        business_id: str,
        username: str,
        password: str,
        *,
        clock: Callable[[], datetime] | None = None,
        max_requests_per_second: float | None = DEFAULT_MAX_REQUESTS_PER_SECOND,
        monotonic: Callable[[], float] | None = None,
        omit_empty_embedded: bool = False,
    ) -> None:
        self.business_id = business_id
        self._username = username.encode("utf-8")
        self._password = password.encode("utf-8")
        self._clock = clock or (lambda: datetime.now(UTC))
        self._omit_empty_embedded = omit_empty_embedded
        self._limiter = (
            _RateLimiter(max_requests_per_second, monotonic or time.monotonic)
            if max_requests_per_second is not None
            else None
        )
        self._lock = threading.RLock()
        self._clients: dict[str, _Client] = {}
        self._ordered: list[_Client] = []  # by _order_key once _order_dirty is False
        self._order_dirty = False
        self._query_cache: dict[_ClientQuery, list[_Client]] = {}
        self._revision = 0  # bumped on every client change; the cache lives one revision
        self._branches: dict[str, dict[str, Any]] = {}
        # branch id → appointment date → rows: a 31-day window reads 32 buckets.
        self._appointments: dict[str, dict[str, list[_Appointment]]] = {}
        self._appointment_ids: set[str] = set()
        self._id_counter = 0

    # -- Emulator protocol -------------------------------------------------

    def register(self, router: Router) -> None:
        """Add Phorest's routes to the sandbox router."""
        routes = [
            ("GET", "/client", self._list_clients),
            ("POST", "/client", self._create_client),
            ("GET", "/client/{client_id}", self._get_client),
            ("PUT", "/client/{client_id}", self._put_client),
            ("GET", "/branch", self._list_branches),
            ("GET", "/branch/{branch_id}/appointment", self._list_appointments),
        ]
        for method, path, handler in routes:
            router.add(self.vendor, method, API_PREFIX + path, self._endpoint(handler))

    def fault_body(self, status: int) -> Response:
        """Phorest's error answer for ``status`` (also used for injected faults).

        A wrong method on a known path (the server asks for 405) answers 500
        "Request method not supported", as ERICA saw live.
        """
        if status == 405:
            return self._error(500, "Request method not supported")
        return self._error(status, _ERROR_MESSAGES.get(status, "Error"))

    def gate(self, request: Request) -> Response | None:
        """Answer 429 once the rate limit is spent; otherwise admit the request."""
        if self._limiter is None or self._limiter.admit():
            return None
        return self.fault_body(429)

    # -- Staff and seeding actions ------------------------------------------

    def add_client(self, **fields: Any) -> dict[str, Any]:
        """Create a client as if typed into Phorest; returns its JSON.

        Fields use the wire names. ``clientId`` is generated deterministically
        unless given; ``createdAt``/``updatedAt``/``clientSince`` (datetime or
        ISO text) backdate the record for seeding, and default to now.

        Raises:
            ValueError: an unknown or wrongly typed field, or a taken ``clientId``.
        """
        client_id = fields.pop("clientId", None)
        _reject_unknown(fields, ADDABLE_FIELDS)
        values = _validated(fields, ADDABLE_FIELDS)
        with self._lock:
            if client_id is None:
                client_id = self._new_id("client")
            elif not isinstance(client_id, str) or not client_id or client_id in self._clients:
                raise ValueError(f"clientId {client_id!r} is invalid or taken")
            now = self._now_ms()
            created = values.pop("createdAt", None)
            created = now if created is None else created
            updated = values.pop("updatedAt", None)
            record = _Client(
                clientId=client_id,
                version=1,
                createdAt=created,
                updatedAt=max(created, updated if updated is not None else created),
                firstName=values.pop("firstName", None) or "Client",
                lastName=values.pop("lastName", None) or str(len(self._clients) + 1),
                clientSince=created,
            )
            for name, value in values.items():
                setattr(record, name, value)
            self._clients[client_id] = record
            if self._ordered and _order_key(record) < _order_key(self._ordered[-1]):
                self._order_dirty = True
            self._ordered.append(record)
            self._changed(record)
            return _client_json(record)

    def add_branch(
        self, name: str, *, branch_id: str | None = None, time_zone: str = "Europe/London"
    ) -> dict[str, Any]:
        """Create a branch (salon site); returns its JSON.

        Raises:
            ValueError: ``branch_id`` is taken.
        """
        with self._lock:
            branch_id = branch_id or self._new_id("branch")
            if branch_id in self._branches:
                raise ValueError(f"branchId {branch_id!r} is taken")
            branch = {"branchId": branch_id, "name": name, "timeZone": time_zone}
            self._branches[branch_id] = branch
            self._appointments[branch_id] = {}
            return dict(branch)

    def add_appointment(self, branch_id: str, **fields: Any) -> dict[str, Any]:
        """Book an appointment at a branch; returns its JSON.

        Fields use the wire names: ``clientId``, ``appointmentDate`` (date or
        ``yyyy-MM-dd``, default today), ``startTime``/``endTime`` (``HH:MM:SS``,
        or with ``.SSS``; kept as given; ``endTime`` defaults to an hour later),
        ``state``, ``activationState``, ``deleted``, ``createdAt``/``updatedAt``
        (datetime or ISO text), ``staffId``, ``serviceId``, ``serviceName``,
        ``price``, ``appointmentId``. Booking does not touch the client's
        ``lastVisit``; call :meth:`record_visit` for a paid checkout.

        Raises:
            KeyError: unknown branch or client.
            ValueError: an unknown or badly formatted field, or a taken id.
        """
        allowed = {
            "appointmentId",
            "clientId",
            "appointmentDate",
            "startTime",
            "endTime",
            "state",
            "activationState",
            "deleted",
            "createdAt",
            "updatedAt",
            "staffId",
            "serviceId",
            "serviceName",
            "price",
        }
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ValueError(f"unknown appointment fields: {', '.join(unknown)}")
        with self._lock:
            if branch_id not in self._branches:
                raise KeyError(f"unknown branch {branch_id!r}")
            client_id = fields.get("clientId")
            if client_id is not None and client_id not in self._clients:
                raise KeyError(f"unknown client {client_id!r}")
            appointment_id = fields.get("appointmentId") or self._new_id("appointment")
            if appointment_id in self._appointment_ids:
                raise ValueError(f"appointmentId {appointment_id!r} is taken")
            now = self._now_ms()
            on = _as_date("appointmentDate", fields.get("appointmentDate") or self._clock().date())
            start = fields.get("startTime", "10:00:00")
            end = fields.get("endTime") or (
                _shift_time(start, DEFAULT_APPOINTMENT_MINUTES) if _TIME.match(str(start)) else None
            )
            if not _TIME.match(str(start)) or not _TIME.match(str(end)):
                raise ValueError("startTime and endTime must be HH:MM:SS or HH:MM:SS.SSS")
            state = fields.get("state", "BOOKED")
            activation = fields.get("activationState", "ACTIVE")
            if state not in APPOINTMENT_STATES or activation not in ACTIVATION_STATES:
                raise ValueError(f"bad state {state!r} or activationState {activation!r}")
            created = _as_instant("createdAt", fields.get("createdAt")) or now
            updated = _as_instant("updatedAt", fields.get("updatedAt")) or created
            row = _Appointment(
                appointmentId=appointment_id,
                branchId=branch_id,
                clientId=client_id,
                appointmentDate=on or "",
                startTime=start,
                endTime=str(end),
                state=state,
                activationState=activation,
                deleted=_as_boolean("deleted", fields.get("deleted", False)),
                createdAt=created,
                updatedAt=max(created, updated),
                version=1,
                staffId=_as_string("staffId", fields.get("staffId")),
                serviceId=_as_string("serviceId", fields.get("serviceId")),
                serviceName=_as_string("serviceName", fields.get("serviceName")),
                price=float(fields.get("price", 0.0)),
            )
            self._appointments[branch_id].setdefault(row.appointmentDate, []).append(row)
            self._appointment_ids.add(appointment_id)
            return _appointment_json(row)

    def edit_client(self, client_id: str, **changes: Any) -> dict[str, Any]:
        """A staff edit in the Phorest UI (e.g. ``emailMarketingConsent=False``); returns the JSON.

        Raises:
            KeyError: unknown client.
            ValueError: an unknown, read-only or wrongly typed field, or a blank name.
        """
        _reject_unknown(changes, EDITABLE_FIELDS)
        values = _validated(changes, EDITABLE_FIELDS)
        for name in ("firstName", "lastName"):
            if name in values and not (values[name] or "").strip():
                raise ValueError(f"{name} must not be blank")
        with self._lock:
            record = self._record(client_id)
            for name, value in values.items():
                setattr(record, name, value)
            self._touch(record)
            return _client_json(record)

    def record_visit(
        self, client_id: str, on: date, *, branch_id: str | None = None
    ) -> dict[str, Any]:
        """A paid checkout on ``on``: moves ``lastVisit`` forward and sets ``firstVisit`` if unset.

        An older visit (seeding history out of order) moves ``firstVisit``
        back instead. Returns the client's JSON.

        Raises:
            KeyError: unknown client.
            ValueError: ``on`` is not a date.
        """
        day = _as_date("on", on)
        if day is None:
            raise ValueError("on must be a date")
        with self._lock:
            record = self._record(client_id)
            if record.lastVisit is None or day > record.lastVisit:
                record.lastVisit = day
                if branch_id is not None:
                    record.lastVisitedBranchId = branch_id
            if record.firstVisit is None or day < record.firstVisit:
                record.firstVisit = day
            self._touch(record)
            return _client_json(record)

    def forget(self, client_id: str) -> dict[str, Any]:
        """Client actions > Forget (or automatic data retention): blank the personal data.

        The record stays, anonymised, as the module docstring describes.
        Forgetting a forgotten client changes nothing. Returns the JSON.

        Raises:
            KeyError: unknown client.
        """
        with self._lock:
            record = self._record(client_id)
            if record.forgotten:
                return _client_json(record)
            record.firstName = FORGOTTEN_FIRST_NAME
            record.lastName = FORGOTTEN_LAST_NAME
            for name in (
                "email",
                "mobile",
                "landLine",
                "linkedClientMobile",
                "birthDate",
                "gender",
                "address",
                "notes",
                "photoUrl",
                "externalId",
            ):
                setattr(record, name, None)
            record.smsMarketingConsent = record.emailMarketingConsent = False
            record.smsReminderConsent = record.emailReminderConsent = False
            record.forgotten = True
            self._touch(record)
            return _client_json(record)

    def archive(self, client_id: str, *, archived: bool = True) -> dict[str, Any]:
        """Archive a client (hidden from lists by default); ``archived=False`` undoes it.

        Raises:
            KeyError: unknown client.
        """
        return self.edit_client(client_id, archived=archived)

    def delete(self, client_id: str) -> dict[str, Any]:
        """Mark a client ``deleted: true`` (hidden from lists by default). Returns the JSON.

        Raises:
            KeyError: unknown client.
        """
        with self._lock:
            record = self._record(client_id)
            record.deleted = True
            self._touch(record)
            return _client_json(record)

    def merge(self, from_id: str, into_id: str) -> dict[str, Any]:
        """Merge ``from_id`` into ``into_id``; returns the merged-away client's JSON.

        The source keeps existing with ``mergedToClientId``; merges cannot be undone.

        Raises:
            KeyError: unknown client.
            ValueError: merging a client into itself, or either side already merged away.
        """
        with self._lock:
            source, target = self._record(from_id), self._record(into_id)
            if source is target:
                raise ValueError("cannot merge a client into itself")
            if source.mergedToClientId is not None or target.mergedToClientId is not None:
                raise ValueError("a merged-away client cannot be merged again")
            source.mergedToClientId = target.clientId
            self._touch(source)
            self._touch(target)
            return _client_json(source)

    # -- Inspection ------------------------------------------------------------

    def client(self, client_id: str) -> dict[str, Any] | None:
        """A client's JSON as the API would return it, or None."""
        with self._lock:
            record = self._clients.get(client_id)
            return None if record is None else _client_json(record)

    def clients_count(self) -> int:
        """Every client, including archived, deleted, merged and forgotten ones."""
        with self._lock:
            return len(self._clients)

    def snapshot_clients(self) -> list[dict[str, Any]]:
        """Every client's JSON, in list order (for tests)."""
        with self._lock:
            return [_client_json(c) for c in self._sorted()]

    def dump(self) -> dict[str, Any]:
        """A small summary for the control API: counts, not records."""
        with self._lock:
            clients = self._clients.values()
            return {
                "vendor": self.vendor,
                "business_id": self.business_id,
                "clients": len(self._clients),
                "email_marketing_consent": sum(c.emailMarketingConsent for c in clients),
                "sms_marketing_consent": sum(c.smsMarketingConsent for c in clients),
                "archived": sum(c.archived for c in clients),
                "deleted": sum(c.deleted for c in clients),
                "merged": sum(c.mergedToClientId is not None for c in clients),
                "forgotten": sum(c.forgotten for c in clients),
                "branches": len(self._branches),
                "appointments": len(self._appointment_ids),
                "revision": self._revision,
            }

    # -- Route handlers ------------------------------------------------------

    def _endpoint(self, handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def run(request: Request) -> Response:
            try:
                credentials = _basic_credentials(request.headers.get("authorization"))
                if credentials is None or not self._credentials_match(*credentials):
                    response = self._error(401, _ERROR_MESSAGES[401])
                    response.headers["WWW-Authenticate"] = 'Basic realm="Phorest"'
                    return response
                if request.params.get("business_id") != self.business_id:
                    raise _ApiError(404, "Business not found")
                return handler(request)
            except _ApiError as error:
                return self._error(error.status, error.message)

        return run

    def _list_clients(self, request: Request) -> Response:
        page, size = _paging(request, MAX_CLIENT_PAGE_SIZE)
        query = _ClientQuery(
            email=(_nonempty_arg(request, "email") or "").casefold() or None,
            phone=_nonempty_arg(request, "phone"),
            first_name=_name_filter(request.arg("firstName")),
            last_name=_name_filter(request.arg("lastName")),
            external_id=_nonempty_arg(request, "externalId"),
            updated_after_ms=_instant_arg(request, "updatedAfter"),
            updated_before_ms=_instant_arg(request, "updatedBefore"),
            include_archived=_flag_arg(request, "includeArchived"),
            include_deleted=_flag_arg(request, "includeDeleted"),
        )
        _flag_arg(request, "includeLinked")  # validated like Spring would, then ignored
        with self._lock:
            matching = self._matching(query)
            rows = [_client_json(c) for c in matching[page * size : (page + 1) * size]]
            total = len(matching)
        return json_response(200, self._paged("clients", rows, total, page, size))

    def _get_client(self, request: Request) -> Response:
        with self._lock:
            return json_response(200, _client_json(self._found(request.params["client_id"])))

    def _put_client(self, request: Request) -> Response:
        body = _json_object(request)
        values = self._validated_body(body)
        with self._lock:
            record = self._found(request.params["client_id"])
            version = body.get("version")
            if isinstance(version, str) and version.isdigit():
                version = int(version)
            if version is None:
                raise _ApiError(409, f"version is required; current version is {record.version}")
            if isinstance(version, bool) or version != record.version:
                raise _ApiError(
                    409, f"Stale version {version!r}: the client is at version {record.version}"
                )
            for name, value in values.items():
                setattr(record, name, value)
            self._touch(record)
            return json_response(200, _client_json(record))

    def _create_client(self, request: Request) -> Response:
        values = self._validated_body(_json_object(request))
        try:
            created = self.add_client(**values)
        except ValueError as error:  # pragma: no cover - the body was validated already
            raise _ApiError(400, str(error)) from None
        return json_response(201, created)

    def _list_branches(self, request: Request) -> Response:
        page, size = _paging(request, MAX_BRANCH_PAGE_SIZE)
        with self._lock:
            branches = [dict(b) for b in self._branches.values()]
        rows = branches[page * size : (page + 1) * size]
        return json_response(200, self._paged("branches", rows, len(branches), page, size))

    def _list_appointments(self, request: Request) -> Response:
        branch_id = request.params["branch_id"]
        with self._lock:
            if branch_id not in self._branches:
                raise _ApiError(404, "Branch not found")
        first, last = _date_arg(request, "from_date"), _date_arg(request, "to_date")
        if last < first:
            raise _ApiError(400, "to_date must not be before from_date")
        if (last - first).days > MAX_APPOINTMENT_RANGE_DAYS:
            raise _ApiError(400, f"Max date range allowed is {MAX_APPOINTMENT_RANGE_DAYS} days")
        client_id = _nonempty_arg(request, "client_id")
        updated_from = _instant_arg(request, "updated_from")
        updated_to = _instant_arg(request, "updated_to")
        fetch_canceled = _flag_arg(request, "fetch_canceled")
        fetch_deleted = _flag_arg(request, "fetch_deleted")
        _flag_arg(request, "fetch_archived")  # validated, then ignored
        page, size = _paging(request, MAX_APPOINTMENT_PAGE_SIZE)
        with self._lock:
            by_day = self._appointments[branch_id]
            matching = []
            for offset in range((last - first).days + 1):
                for row in by_day.get((first + timedelta(days=offset)).isoformat(), ()):
                    if client_id is not None and row.clientId != client_id:
                        continue
                    if row.activationState == "CANCELED" and not fetch_canceled:
                        continue
                    if row.deleted and not fetch_deleted:
                        continue
                    if updated_from is not None and row.updatedAt < updated_from:
                        continue
                    if updated_to is not None and row.updatedAt > updated_to:
                        continue
                    matching.append(row)
            matching.sort(key=_appointment_order_key)
            rows = [_appointment_json(a) for a in matching[page * size : (page + 1) * size]]
        return json_response(200, self._paged("appointments", rows, len(matching), page, size))

    # -- Internals -----------------------------------------------------------

    def _credentials_match(self, user: str, password: str) -> bool:
        # Compare both halves every time so timing says nothing about which was wrong.
        user_ok = hmac.compare_digest(user.encode("utf-8"), self._username)
        password_ok = hmac.compare_digest(password.encode("utf-8"), self._password)
        return user_ok and password_ok

    def _validated_body(self, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            _require_names(body)
            return _validated(body, WRITABLE_FIELDS)
        except ValueError as error:
            raise _ApiError(400, str(error)) from None

    def _paged(
        self, key: str, rows: list[dict[str, Any]], total: int, page: int, size: int
    ) -> dict[str, Any]:
        envelope: dict[str, Any] = {}
        if rows or not self._omit_empty_embedded:
            envelope["_embedded"] = {key: rows}
        envelope["page"] = {
            "size": size,
            "totalElements": total,
            "totalPages": math.ceil(total / size),
            "number": page,
        }
        return envelope

    def _error(self, status: int, message: str) -> Response:
        return json_response(
            status, {"errorCode": _ERROR_CODES.get(status, "ERROR"), "message": message}
        )

    def _found(self, client_id: str) -> _Client:
        record = self._clients.get(client_id)
        if record is None:
            raise _ApiError(404, f"Client {client_id} not found")
        return record

    def _record(self, client_id: str) -> _Client:
        record = self._clients.get(client_id)
        if record is None:
            raise KeyError(f"unknown client {client_id!r}")
        return record

    def _matching(self, query: _ClientQuery) -> list[_Client]:
        """The clients a query selects, in list order; cached and kept current by ``_changed``."""
        cached = self._query_cache.pop(
            query, None
        )  # re-inserted below: least recently used goes first
        if cached is None:
            visibility = query.visibility
            if query == visibility:
                cached = query.select(self._sorted())
            else:
                # Start from the (cached, kept current) visible set: one pass, not two.
                cached = query.select(self._matching(visibility), visible=True)
            while len(self._query_cache) >= FILTER_CACHE_ENTRIES:
                self._query_cache.pop(next(iter(self._query_cache)))
        self._query_cache[query] = cached
        return cached

    def _sorted(self) -> list[_Client]:
        if self._order_dirty:
            self._ordered.sort(key=_order_key)
            self._order_dirty = False
        return self._ordered

    def _touch(self, record: _Client) -> None:
        """What every save in Phorest does: a new version and ``updatedAt``."""
        record.version += 1
        record.updatedAt = max(self._now_ms(), record.createdAt)
        self._changed(record)

    def _changed(self, record: _Client) -> None:
        """Count a change to ``record`` and patch every cached result it enters or leaves."""
        self._revision += 1
        if self._order_dirty:
            # Out-of-order seeding: the lists are re-sorted on the next read anyway.
            self._query_cache.clear()
            return
        key = _order_key(record)
        for query, rows in self._query_cache.items():
            at = bisect.bisect_left(rows, key, key=_order_key)
            present = at < len(rows) and rows[at] is record
            wanted = query.matches(record)
            if wanted and not present:
                rows.insert(at, record)
            elif present and not wanted:
                del rows[at]

    def _now_ms(self) -> int:
        return _to_ms(self._clock())

    def _new_id(self, kind: str) -> str:
        while True:
            self._id_counter += 1
            seed = f"{self.business_id}/{kind}/{self._id_counter}".encode()
            digest = hashlib.blake2b(seed, digest_size=ID_DIGEST_BYTES).digest()
            candidate = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
            taken = (self._clients, self._branches, self._appointment_ids)
            if not any(candidate in ids for ids in taken):
                return candidate
