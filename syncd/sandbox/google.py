"""A local Google peer: the OAuth token endpoint and the GA4 Admin API calls syncd makes.

The emulator owns one service account with a real RSA key, so the real
``google-auth`` library can sign JWT assertions, trade them for access tokens
here, and call the Admin API through ``AuthorizedSession`` exactly as it would
against Google.

Reference facts reproduced (tags from the API reference's source table; the
vendor corpus files are named where a recorded body was matched):

- B3.1 (GAUTH): :meth:`GoogleEmulator.service_account_info` is a complete key
  file (``type``, ``project_id``, ``private_key_id``, ``private_key`` PEM,
  ``client_email``, ``client_id``, the URIs, ``token_uri``), which
  ``service_account.Credentials.from_service_account_info/_file`` accepts.
- B3.3 (GAUTH, ran): ``POST /token`` takes form-encoded
  ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<RS256 JWT>``
  and answers ``{"access_token", "expires_in": 3600, "token_type": "Bearer"}``.
  ``iss`` must be the service account's ``client_email`` and ``scope`` is the
  space-joined scopes. ``aud`` is Google's own token URL whatever ``token_uri``
  says, so it is checked against Google's token URLs, never the sandbox's.
- Token errors are flat ``{"error", "error_description"}`` objects, not the API
  envelope (corpus ``token-400-invalid-grant-invalid-jwt-signature``,
  ``token-400-invalid-grant-jwt-timeframe-2024``, ``token-401-deleted-client``):
  a wrong or rotated key gives 400 ``invalid_grant`` "Invalid JWT Signature.";
  bad ``iat``/``exp`` give 400 ``invalid_grant`` "Invalid JWT: Token must be a
  short-lived token (60 minutes) and in a reasonable timeframe. ..."; a deleted
  client gives 401 ``deleted_client``.
- B3.2 (GAUTH): an unknown or expired access token gets 401, on which
  ``AuthorizedSession`` refreshes and retries.
- B3.6 / corpus ``rest-error-403-permission-denied``: API errors use the
  ``{"error": {"code", "message", "status", "errors"?, "details"?}}`` envelope.
- B1.3 (GA-SUD): ``POST /v1alpha/properties/{id}:submitUserDeletion`` with
  exactly one of ``userId``, ``clientId``, ``appInstanceId``,
  ``userProvidedData``; answers ``{"deletionRequestTime": "<RFC 3339 Z>"}``;
  scope ``analytics.edit``. Only v1alpha has it (GAA-LIB, discovery documents).
- B1.5 (GA-Q): 500 user deletions per day per property; beyond it 403 with
  reason ``rateLimitExceeded``.
- B2.1-B2.3 (GA-DRS): ``GET``/``PATCH /{v1beta|v1alpha}/properties/{id}/
  dataRetentionSettings`` with fields ``name``, ``eventDataRetention``,
  ``userDataRetention``, ``resetUserDataOnNewActivity``; GET takes
  ``analytics.readonly`` or ``analytics.edit``, PATCH takes ``analytics.edit``
  and a required ``updateMask`` (snake_case paths, ``*`` for everything).
- B2.2 (GA-DRS): the ``RetentionDuration`` enum; 26, 38 and 50 months are for
  360 properties only and for event data only, so a standard property takes
  only ``TWO_MONTHS`` or ``FOURTEEN_MONTHS``.

Assumptions (nothing recorded; chosen to be plausible and documented here):

- An unknown property answers 403 PERMISSION_DENIED "The caller does not have
  permission" (what Google APIs answer for resources the caller cannot see),
  not 404. So a client must tell it from the quota 403 by the reason
  ``rateLimitExceeded``.
- The quota 403 carries both the legacy ``errors[].reason`` =
  ``rateLimitExceeded`` (domain ``usageLimits``) and a ``google.rpc.ErrorInfo``
  detail with reason ``RATE_LIMIT_EXCEEDED``. The quota day is the calendar day
  in US Pacific time, as for Google's other daily quotas. Every accepted
  deletion counts, repeats included; refused requests do not.
- Request bodies are parsed like Google's JSON transcoding: camelCase and
  snake_case field names are both accepted; unknown names give 400 "Invalid JSON
  payload received. Unknown name ..."; a bad enum gives 400 "Invalid value at
  ...". The wording for two identifiers ("Oneof field 'user' is already set")
  and for none is not recorded.
- ``userProvidedData`` is accepted whether or not it is normalised; each
  recorded deletion says whether it was (lower-case, no spaces, no dots before
  ``@`` for gmail.com/googlemail.com; phones ``+`` and digits only), so a test
  can check that syncd normalised it. Google would silently match nothing.
- New properties start at the GA4 defaults as we understand them: events kept
  ``TWO_MONTHS``, user data ``FOURTEEN_MONTHS``, reset on new activity on.
- A JWT may be up to ``JWT_CLOCK_SKEW_SECONDS`` early or late; its lifetime
  (``exp - iat``) may not exceed an hour. An empty ``scope`` gets 400
  ``invalid_scope``; an ``iss`` other than the account gets 400 ``invalid_grant``
  "Invalid grant: account not found".
- 401 responses carry ``WWW-Authenticate: Bearer realm="https://accounts.google.com/"``;
  a missing credential adds an ErrorInfo with reason ``CREDENTIALS_MISSING``; too
  narrow a scope gives 403 with reason ``ACCESS_TOKEN_SCOPE_INSUFFICIENT``.
- Injected faults (and unmatched paths) get the API envelope, also on
  ``/token``, because :meth:`GoogleEmulator.fault_body` does not see the path.
  Google has no 405, so an unmatched method answers 404 NOT_FOUND.

Personal data: deletions are kept as a SHA-256 of the identifier, never the
value; :meth:`GoogleEmulator.dump` and :meth:`GoogleEmulator.deletions` expose
only that hash, and :meth:`GoogleEmulator.was_deleted` answers by hashing the
value it is asked about.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from syncd.sandbox.http import Request, Response, Router

Clock = Callable[[], datetime]

RSA_KEY_BITS = 2048
ACCESS_TOKEN_LIFETIME_SECONDS = 3600
JWT_MAX_LIFETIME_SECONDS = 3600
JWT_CLOCK_SKEW_SECONDS = 300
DEFAULT_DAILY_DELETION_QUOTA = 500

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_AUDIENCES = frozenset(
    {
        "https://oauth2.googleapis.com/token",
        "https://accounts.google.com/o/oauth2/token",
        "https://www.googleapis.com/oauth2/v4/token",
    }
)
SCOPE_EDIT = "https://www.googleapis.com/auth/analytics.edit"
SCOPE_READONLY = "https://www.googleapis.com/auth/analytics.readonly"
GOOGLE_SCOPE_PREFIX = "https://www.googleapis.com/auth/"

PROJECT_ID = "sandbox-project"
CLIENT_EMAIL = f"syncd@{PROJECT_ID}.iam.gserviceaccount.com"
ADMIN_SERVICE = "analyticsadmin.googleapis.com"

RETENTION_DURATIONS = (
    "RETENTION_DURATION_UNSPECIFIED",
    "TWO_MONTHS",
    "FOURTEEN_MONTHS",
    "TWENTY_SIX_MONTHS",
    "THIRTY_EIGHT_MONTHS",
    "FIFTY_MONTHS",
)
STANDARD_RETENTION_DURATIONS = ("TWO_MONTHS", "FOURTEEN_MONTHS")
DEFAULT_EVENT_RETENTION = "TWO_MONTHS"
DEFAULT_USER_RETENTION = "FOURTEEN_MONTHS"
DEFAULT_RESET_ON_NEW_ACTIVITY = True

JSON_CONTENT_TYPE = "application/json; charset=UTF-8"
UNAUTHENTICATED_CHALLENGE = 'Bearer realm="https://accounts.google.com/"'
_SIGN_IN_HELP = "See https://developers.google.com/identity/sign-in/web/devconsole-project."
_TIMEFRAME_TEXT = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)

# The canonical gRPC status for each HTTP status Google uses, with Google's
# generic message for it (used for injected faults and unmatched paths).
_STATUS_BY_HTTP = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials. " + _SIGN_IN_HELP),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: ("NOT_FOUND", "Method not found."),
    409: ("ABORTED", "The operation was aborted."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    500: ("INTERNAL", "Internal error encountered."),
    501: ("UNIMPLEMENTED", "Operation is not implemented, or supported, or enabled."),
    503: ("UNAVAILABLE", "The service is currently unavailable."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}

_MASK_PATHS = {
    # snake_case (documented) and camelCase (the FieldMask JSON form) both map
    # to the JSON field name.
    "event_data_retention": "eventDataRetention",
    "eventDataRetention": "eventDataRetention",
    "user_data_retention": "userDataRetention",
    "userDataRetention": "userDataRetention",
    "reset_user_data_on_new_activity": "resetUserDataOnNewActivity",
    "resetUserDataOnNewActivity": "resetUserDataOnNewActivity",
}
_RETENTION_FIELDS = {
    "name": "name",
    "eventDataRetention": "eventDataRetention",
    "event_data_retention": "eventDataRetention",
    "userDataRetention": "userDataRetention",
    "user_data_retention": "userDataRetention",
    "resetUserDataOnNewActivity": "resetUserDataOnNewActivity",
    "reset_user_data_on_new_activity": "resetUserDataOnNewActivity",
}
_DELETION_FIELDS = {
    "name": "name",
    "userId": "userId",
    "user_id": "userId",
    "clientId": "clientId",
    "client_id": "clientId",
    "appInstanceId": "appInstanceId",
    "app_instance_id": "appInstanceId",
    "userProvidedData": "userProvidedData",
    "user_provided_data": "userProvidedData",
}
_SNAKE = {
    "eventDataRetention": "event_data_retention",
    "userDataRetention": "user_data_retention",
    "resetUserDataOnNewActivity": "reset_user_data_on_new_activity",
    "userId": "user_id",
    "clientId": "client_id",
    "appInstanceId": "app_instance_id",
    "userProvidedData": "user_provided_data",
}
_OIDC_SCOPES = ("openid", "email", "profile")
_EVENT_FIELD = "data_retention_settings.event_data_retention"
_USER_FIELD = "data_retention_settings.user_data_retention"
_PHONE = re.compile(r"^\+\d{6,15}$")
_GMAIL_DOMAINS = ("gmail.com", "googlemail.com")

try:
    _QUOTA_ZONE: timezone | ZoneInfo = ZoneInfo("America/Los_Angeles")
except ZoneInfoNotFoundError:  # no tz database: Pacific standard time is close enough
    _QUOTA_ZONE = timezone(timedelta(hours=-8))


@dataclass(frozen=True)
class _Token:
    scopes: frozenset[str]
    expires_at: datetime


@dataclass
class _Property:
    is_360: bool
    event_retention: str = DEFAULT_EVENT_RETENTION
    user_retention: str = DEFAULT_USER_RETENTION
    reset_on_new_activity: bool = DEFAULT_RESET_ON_NEW_ACTIVITY

    def settings(self, property_id: str) -> dict[str, Any]:
        return {
            "name": f"properties/{property_id}/dataRetentionSettings",
            "eventDataRetention": self.event_retention,
            "userDataRetention": self.user_retention,
            "resetUserDataOnNewActivity": self.reset_on_new_activity,
        }


class _ApiError(Exception):
    """Raised inside a handler to answer with Google's error envelope."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class GoogleEmulator:
    """Google's OAuth token endpoint and the GA4 Admin API calls syncd uses.

    Thread-safe: one lock guards tokens, properties, deletions and quotas.

    Args:
        property_ids: GA4 properties the service account can see, standard
            (non-360) ones.
        daily_deletion_quota: accepted ``submitUserDeletion`` calls per property
            per Pacific calendar day.
        clock: returns the current aware UTC time; defaults to the system clock.
            It drives token expiry, JWT ``iat``/``exp`` checks, deletion times
            and the quota day.
        properties_360: further properties that are GA4 360 ones (they accept
            26, 38 and 50 months of event retention).
    """

    vendor = "google"

    def __init__(
        self,
        property_ids: Sequence[str] = ("123456789",),
        *,
        daily_deletion_quota: int = DEFAULT_DAILY_DELETION_QUOTA,
        clock: Clock | None = None,
        properties_360: Sequence[str] = (),
    ) -> None:
        self._lock = threading.Lock()
        self._clock: Clock = clock or (lambda: datetime.now(UTC))
        self.daily_deletion_quota = daily_deletion_quota
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        self._public_key = self._key.public_key()
        self.client_email = CLIENT_EMAIL
        self.private_key_id = secrets.token_hex(20)
        self.client_id = str(100000000000000000000 + secrets.randbelow(10**20))
        self._client_deleted = False
        self._tokens: dict[str, _Token] = {}
        self._tokens_issued = 0
        self._properties: dict[str, _Property] = {}
        for property_id in property_ids:
            self._properties[str(property_id)] = _Property(is_360=False)
        for property_id in properties_360:
            self._properties[str(property_id)] = _Property(is_360=True)
        self._deletions: list[dict[str, Any]] = []
        self._quota_used: dict[tuple[str, date], int] = {}

    # -- Emulator protocol -------------------------------------------------

    def register(self, router: Router) -> None:
        """Add the token endpoint and the Admin API routes."""
        router.add(self.vendor, "POST", "/token", self._token)
        router.add(
            self.vendor,
            "POST",
            "/v1alpha/properties/{property}:submitUserDeletion",
            self._submit_user_deletion,
        )
        for version in ("v1beta", "v1alpha"):
            template = f"/{version}/properties/{{property}}/dataRetentionSettings"
            router.add(self.vendor, "GET", template, self._get_retention)
            router.add(self.vendor, "PATCH", template, self._update_retention)

    def fault_body(self, status: int) -> Response:
        """Google's error envelope for ``status`` (e.g. 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE)."""
        if status == 405:
            # Google's front end has no 405: a method it does not serve is 404.
            status = 404
        code, message = _STATUS_BY_HTTP.get(status, ("UNKNOWN", "Unknown error."))
        return _api_error(status, code, message)

    def gate(self, request: Request) -> Response | None:
        """No admission check: Google has no connection cap syncd can hit."""
        return None

    # -- service account and tokens ----------------------------------------

    def service_account_info(self, token_uri: str) -> dict[str, str]:
        """A service-account key file, as the Cloud console downloads it.

        Args:
            token_uri: where google-auth should trade assertions for tokens,
                normally ``<sandbox base URL>/token``.

        Returns:
            The key file's JSON object, private key included.
        """
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")
        return {
            "type": "service_account",
            "project_id": PROJECT_ID,
            "private_key_id": self.private_key_id,
            "private_key": pem,
            "client_email": self.client_email,
            "client_id": self.client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": (
                "https://www.googleapis.com/robot/v1/metadata/x509/"
                + self.client_email.replace("@", "%40")
            ),
            "universe_domain": "googleapis.com",
        }

    def issue_token(self, scopes: Iterable[str] = (SCOPE_EDIT,)) -> str:
        """An access token without the JWT exchange, for benchmarks and control tests.

        Args:
            scopes: what the token may be used for.

        Returns:
            A bearer token valid for ``ACCESS_TOKEN_LIFETIME_SECONDS``.
        """
        with self._lock:
            return self._issue(frozenset(scopes))

    def expire_tokens(self) -> None:
        """Make every issued access token expired, so clients must refresh."""
        with self._lock:
            past = self._clock() - timedelta(seconds=1)
            self._tokens = {t: _Token(v.scopes, past) for t, v in self._tokens.items()}

    def delete_service_account(self) -> None:
        """Delete the OAuth client: tokens stop working, new ones get 401 ``deleted_client``."""
        with self._lock:
            self._client_deleted = True
            self._tokens.clear()

    # -- seeding and inspection --------------------------------------------

    def set_retention(
        self,
        property_id: str,
        event_retention: str,
        user_retention: str | None = None,
        reset_on_new_activity: bool | None = None,
    ) -> dict[str, Any]:
        """Seed a property's data-retention settings (no plan limits applied).

        Args:
            property_id: a property the emulator knows.
            event_retention: a ``RetentionDuration`` name for event data.
            user_retention: the same for user data; unchanged when None.
            reset_on_new_activity: ``resetUserDataOnNewActivity``; unchanged when None.

        Returns:
            The settings as the API would return them.

        Raises:
            KeyError: the property is unknown.
            ValueError: a duration is not a ``RetentionDuration`` name.
        """
        for value in (event_retention, user_retention):
            if value is not None and value not in RETENTION_DURATIONS:
                raise ValueError(f"not a RetentionDuration: {value!r}")
        with self._lock:
            prop = self._properties[str(property_id)]
            prop.event_retention = event_retention
            if user_retention is not None:
                prop.user_retention = user_retention
            if reset_on_new_activity is not None:
                prop.reset_on_new_activity = reset_on_new_activity
            return prop.settings(str(property_id))

    def retention(self, property_id: str) -> dict[str, Any]:
        """A property's data-retention settings, as GET would return them.

        Raises:
            KeyError: the property is unknown.
        """
        with self._lock:
            return self._properties[str(property_id)].settings(str(property_id))

    def deletions(self) -> list[dict[str, Any]]:
        """Accepted deletion requests, oldest first, without the identifiers themselves.

        Returns:
            One dict per request: ``property``, ``identifier_type`` (the JSON
            field, e.g. ``clientId``), ``identifier_sha256`` (hex SHA-256 of the
            UTF-8 value), ``normalized`` (for ``userProvidedData``: whether the
            value was normalised as Google asks; None otherwise) and
            ``deletion_request_time``.
        """
        with self._lock:
            return [dict(record) for record in self._deletions]

    def was_deleted(
        self,
        value: str,
        *,
        identifier_type: str | None = None,
        property_id: str | None = None,
    ) -> bool:
        """Whether a deletion for this exact identifier value was accepted.

        Args:
            value: the identifier as the client should have sent it.
            identifier_type: restrict to one field (``userId``, ``clientId`` ...).
            property_id: restrict to one property.
        """
        digest = _sha256(value)
        with self._lock:
            return any(
                record["identifier_sha256"] == digest
                and identifier_type in (None, record["identifier_type"])
                and property_id in (None, record["property"])
                for record in self._deletions
            )

    def dump(self) -> dict[str, Any]:
        """The emulator's state as plain data for the control API.

        Holds no private key, no access token and no raw identifier.
        """
        with self._lock:
            now = self._clock()
            today = _quota_day(now)
            return {
                "service_account": {
                    "client_email": self.client_email,
                    "private_key_id": self.private_key_id,
                    "deleted": self._client_deleted,
                },
                "tokens": {
                    "issued": self._tokens_issued,
                    "active": sum(1 for t in self._tokens.values() if t.expires_at > now),
                },
                "properties": {
                    property_id: {
                        "is_360": prop.is_360,
                        "data_retention_settings": prop.settings(property_id),
                        "deletions_today": self._quota_used.get((property_id, today), 0),
                        "daily_deletion_quota": self.daily_deletion_quota,
                    }
                    for property_id, prop in sorted(self._properties.items())
                },
                "deletions": [dict(record) for record in self._deletions],
            }

    # -- token endpoint ----------------------------------------------------

    def _token(self, request: Request) -> Response:
        try:
            form = request.form()
        except UnicodeDecodeError:
            return _token_error(400, "invalid_request", "Bad Request")
        grant_type = form.get("grant_type", "")
        if grant_type != JWT_BEARER_GRANT:
            return _token_error(400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        assertion = form.get("assertion")
        if not assertion:
            return _token_error(400, "invalid_request", "Missing required parameter: assertion")
        parsed = _parse_jwt(assertion)
        if parsed is None:
            return _token_error(400, "invalid_grant", "Bad Request")
        header, claims, signing_input, signature = parsed
        with self._lock:
            if claims.get("iss") != self.client_email:
                return _token_error(400, "invalid_grant", "Invalid grant: account not found")
            if self._client_deleted:
                return _token_error(401, "deleted_client", "The OAuth client was deleted.")
            if not self._signature_ok(header, signing_input, signature):
                return _token_error(400, "invalid_grant", "Invalid JWT Signature.")
            if claims.get("aud") not in GOOGLE_TOKEN_AUDIENCES:
                return _token_error(400, "invalid_grant", "Invalid JWT: Failed audience check.")
            if not _timeframe_ok(claims, self._clock()):
                return _token_error(400, "invalid_grant", _TIMEFRAME_TEXT)
            scopes = _scopes(claims.get("scope"))
            if not scopes:
                return _token_error(
                    400, "invalid_scope", "Invalid OAuth scope or ID token audience provided."
                )
            token = self._issue(scopes)
        return Response(
            200,
            _pretty(
                {
                    "access_token": token,
                    "expires_in": ACCESS_TOKEN_LIFETIME_SECONDS,
                    "token_type": "Bearer",
                }
            ),
            JSON_CONTENT_TYPE,
            {
                "Cache-Control": "no-cache, no-store, max-age=0, must-revalidate",
                "Pragma": "no-cache",
            },
        )

    def _signature_ok(
        self, header: Mapping[str, Any], signing_input: bytes, signature: bytes
    ) -> bool:
        if header.get("alg") != "RS256":
            return False
        if "kid" in header and header["kid"] != self.private_key_id:
            return False
        try:
            self._public_key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return False
        return True

    def _issue(self, scopes: frozenset[str]) -> str:
        # Caller holds the lock.
        now = self._clock()
        self._tokens = {t: v for t, v in self._tokens.items() if v.expires_at > now}
        token = "ya29.c." + secrets.token_urlsafe(48)
        self._tokens[token] = _Token(scopes, now + timedelta(seconds=ACCESS_TOKEN_LIFETIME_SECONDS))
        self._tokens_issued += 1
        return token

    def _authorize(self, request: Request, scopes: Sequence[str], method: str) -> None:
        """Check the bearer token; raises _ApiError with Google's 401/403."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _ApiError(
                _api_error(
                    401,
                    "UNAUTHENTICATED",
                    "Request is missing required authentication credential. Expected OAuth 2 "
                    "access token, login cookie or other valid authentication credential. "
                    + _SIGN_IN_HELP,
                    details=[_error_info("CREDENTIALS_MISSING", "googleapis.com", method)],
                    headers={"WWW-Authenticate": UNAUTHENTICATED_CHALLENGE},
                )
            )
        with self._lock:
            issued = self._tokens.get(token.strip())
            valid = issued is not None and issued.expires_at > self._clock()
        if not valid or issued is None:
            raise _ApiError(
                _api_error(
                    401,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials. Expected OAuth 2 access "
                    "token, login cookie or other valid authentication credential. "
                    + _SIGN_IN_HELP,
                    headers={"WWW-Authenticate": UNAUTHENTICATED_CHALLENGE},
                )
            )
        if not issued.scopes.intersection(scopes):
            raise _ApiError(
                _api_error(
                    403,
                    "PERMISSION_DENIED",
                    "Request had insufficient authentication scopes.",
                    details=[
                        _error_info("ACCESS_TOKEN_SCOPE_INSUFFICIENT", "googleapis.com", method)
                    ],
                    headers={
                        "WWW-Authenticate": (
                            f'{UNAUTHENTICATED_CHALLENGE}, error="insufficient_scope", '
                            f'scope="{" ".join(scopes)}"'
                        )
                    },
                )
            )

    def _property(self, property_id: str) -> _Property:
        # Caller holds the lock.
        prop = self._properties.get(property_id)
        if prop is None:
            raise _ApiError(
                _api_error(403, "PERMISSION_DENIED", "The caller does not have permission")
            )
        return prop

    # -- Admin API ---------------------------------------------------------

    def _submit_user_deletion(self, request: Request) -> Response:
        method = "google.analytics.admin.v1alpha.AnalyticsAdminService.SubmitUserDeletion"
        try:
            self._authorize(request, (SCOPE_EDIT,), method)
            body = _json_object(request, _DELETION_FIELDS)
            present: list[str] = []
            for raw_name, value in body.items():
                field = _DELETION_FIELDS[raw_name]
                if field == "name":
                    continue
                if not isinstance(value, str):
                    raise _ApiError(_invalid_value(_SNAKE[field], "TYPE_STRING", value))
                if value == "":
                    continue  # proto3: an empty string is an unset field
                if present:
                    raise _ApiError(
                        _bad_request(
                            f"Invalid JSON payload received. Oneof field 'user' is already set. "
                            f"Cannot set '{field}'",
                            None,
                        )
                    )
                present.append(field)
            now = self._clock()
            with self._lock:
                self._property(request.params["property"])
                if not present:
                    raise _ApiError(
                        _bad_request(
                            "One of user_id, client_id, app_instance_id or user_provided_data "
                            "must be set.",
                            "user",
                        )
                    )
                field = present[0]
                value = body[next(k for k in body if _DELETION_FIELDS[k] == field)]
                property_id = request.params["property"]
                quota_key = (property_id, _quota_day(now))
                used = self._quota_used.get(quota_key, 0)
                if used >= self.daily_deletion_quota:
                    raise _ApiError(_quota_exceeded(property_id, self.daily_deletion_quota))
                self._quota_used[quota_key] = used + 1
                stamp = _rfc3339(now)
                self._deletions.append(
                    {
                        "property": property_id,
                        "identifier_type": field,
                        "identifier_sha256": _sha256(value),
                        "normalized": (
                            _is_normalized(value) if field == "userProvidedData" else None
                        ),
                        "deletion_request_time": stamp,
                    }
                )
            return Response(200, _pretty({"deletionRequestTime": stamp}), JSON_CONTENT_TYPE)
        except _ApiError as error:
            return error.response

    def _get_retention(self, request: Request) -> Response:
        version = request.path.split("/")[1]
        method = f"google.analytics.admin.{version}.AnalyticsAdminService.GetDataRetentionSettings"
        try:
            self._authorize(request, (SCOPE_EDIT, SCOPE_READONLY), method)
            property_id = request.params["property"]
            with self._lock:
                settings = self._property(property_id).settings(property_id)
        except _ApiError as error:
            return error.response
        return Response(200, _pretty(settings), JSON_CONTENT_TYPE)

    def _update_retention(self, request: Request) -> Response:
        version = request.path.split("/")[1]
        method = (
            f"google.analytics.admin.{version}.AnalyticsAdminService.UpdateDataRetentionSettings"
        )
        enum_type = (
            f"type.googleapis.com/google.analytics.admin.{version}"
            ".DataRetentionSettings.RetentionDuration"
        )
        try:
            self._authorize(request, (SCOPE_EDIT,), method)
            body = _json_object(request, _RETENTION_FIELDS)
            incoming: dict[str, Any] = {}
            for raw_name, value in body.items():
                field = _RETENTION_FIELDS[raw_name]
                if field == "name":
                    continue  # the URL names the resource
                if field == "resetUserDataOnNewActivity":
                    if not isinstance(value, bool):
                        raise _ApiError(_invalid_value(
                            f"data_retention_settings.{_SNAKE[field]}", "TYPE_BOOL", value
                        ))
                    incoming[field] = value
                else:
                    incoming[field] = _retention_enum(value, field, enum_type)
            paths = _update_mask(request)
            property_id = request.params["property"]
            with self._lock:
                prop = self._property(property_id)
                if not paths:
                    raise _ApiError(_bad_request("The update mask is required.", "update_mask"))
                if paths == ["*"]:
                    fields = list(dict.fromkeys(_MASK_PATHS.values()))
                else:
                    fields = []
                    for path in paths:
                        if path not in _MASK_PATHS:
                            raise _ApiError(_bad_request(
                                f"Field mask path is not valid: {path}", "update_mask"
                            ))
                        fields.append(_MASK_PATHS[path])
                current = prop.settings(property_id)
                defaults = {
                    "eventDataRetention": "RETENTION_DURATION_UNSPECIFIED",
                    "userDataRetention": "RETENTION_DURATION_UNSPECIFIED",
                    "resetUserDataOnNewActivity": False,
                }
                updated = dict(current)
                for field in fields:
                    updated[field] = incoming.get(field, defaults[field])
                _check_retention_allowed(updated, prop.is_360)
                prop.event_retention = updated["eventDataRetention"]
                prop.user_retention = updated["userDataRetention"]
                prop.reset_on_new_activity = updated["resetUserDataOnNewActivity"]
                settings = prop.settings(property_id)
        except _ApiError as error:
            return error.response
        return Response(200, _pretty(settings), JSON_CONTENT_TYPE)


# -- helpers -----------------------------------------------------------------


def _pretty(payload: Any) -> bytes:
    # Google's front ends pretty-print JSON bodies.
    return json.dumps(payload, indent=2).encode() + b"\n"


def _token_error(status: int, error: str, description: str) -> Response:
    body = _pretty({"error": error, "error_description": description})
    return Response(status, body, JSON_CONTENT_TYPE)


def _api_error(
    status: int,
    code: str,
    message: str,
    *,
    errors: list[dict[str, str]] | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    error: dict[str, Any] = {"code": status, "message": message}
    if errors:
        error["errors"] = errors
    error["status"] = code
    if details:
        error["details"] = details
    return Response(status, _pretty({"error": error}), JSON_CONTENT_TYPE, dict(headers or {}))


def _error_info(
    reason: str, domain: str, method: str | None = None, **metadata: str
) -> dict[str, Any]:
    meta = {"service": ADMIN_SERVICE, **metadata}
    if method:
        meta["method"] = method
    return {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": domain,
        "metadata": meta,
    }


def _bad_request(message: str, field: str | None) -> Response:
    violation = {"description": message}
    if field:
        violation = {"field": field, "description": message}
    return _api_error(
        400,
        "INVALID_ARGUMENT",
        message,
        details=[
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [violation]}
        ],
    )


def _invalid_value(field: str, type_name: str, value: Any) -> Response:
    message = f"Invalid value at '{field}' ({type_name}), {json.dumps(value)}"
    return _bad_request(message, field)


def _quota_exceeded(property_id: str, limit: int) -> Response:
    message = (
        "Quota exceeded for quota metric 'User deletions' and limit 'User deletions per day per "
        f"property' of service '{ADMIN_SERVICE}' for property 'properties/{property_id}'."
    )
    return _api_error(
        403,
        "PERMISSION_DENIED",
        message,
        errors=[{"message": message, "domain": "usageLimits", "reason": "rateLimitExceeded"}],
        details=[
            _error_info(
                "RATE_LIMIT_EXCEEDED",
                "googleapis.com",
                quota_metric="analyticsadmin.googleapis.com/user_deletions",
                quota_limit="UserDeletionsPerDayPerProperty",
                quota_limit_value=str(limit),
            )
        ],
    )


def _json_object(request: Request, known: Mapping[str, str]) -> dict[str, Any]:
    try:
        body = request.json()
    except (ValueError, UnicodeDecodeError):
        message = "Invalid JSON payload received. Unexpected token."
        raise _ApiError(_bad_request(message, None)) from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise _ApiError(_bad_request(
            f"Invalid JSON payload received. Unexpected token. {json.dumps(body)[:40]}", None
        ))
    for name in body:
        if name not in known:
            raise _ApiError(_bad_request(
                f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.', None
            ))
    return body


def _retention_enum(value: Any, field: str, enum_type: str) -> str:
    # Proto JSON accepts an enum by name or by number.
    if isinstance(value, str) and value in RETENTION_DURATIONS:
        return value
    is_number = isinstance(value, int) and not isinstance(value, bool)
    if is_number and 0 <= value < len(RETENTION_DURATIONS):
        return RETENTION_DURATIONS[value]
    raise _ApiError(_invalid_value(f"data_retention_settings.{_SNAKE[field]}", enum_type, value))


def _update_mask(request: Request) -> list[str]:
    paths: list[str] = []
    for value in request.query.get("updateMask", []) + request.query.get("update_mask", []):
        paths.extend(p.strip() for p in value.split(",") if p.strip())
    return paths


def _check_retention_allowed(settings: Mapping[str, Any], is_360: bool) -> None:
    event = settings["eventDataRetention"]
    user = settings["userDataRetention"]
    if event == "RETENTION_DURATION_UNSPECIFIED":
        raise _ApiError(_bad_request("event_data_retention is required.", _EVENT_FIELD))
    if user == "RETENTION_DURATION_UNSPECIFIED":
        raise _ApiError(_bad_request("user_data_retention is required.", _USER_FIELD))
    if not is_360 and event not in STANDARD_RETENTION_DURATIONS:
        raise _ApiError(_bad_request(
            f"Event data retention {event} is only available to Google Analytics 360 properties.",
            _EVENT_FIELD,
        ))
    if user not in STANDARD_RETENTION_DURATIONS:
        raise _ApiError(_bad_request(
            f"User data retention {user} is not available: 26, 38 and 50 months apply to event "
            "data only.",
            _USER_FIELD,
        ))


def _parse_jwt(assertion: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes] | None:
    parts = assertion.split(".")
    if len(parts) != 3:
        return None
    try:
        header = json.loads(_b64url(parts[0]))
        claims = json.loads(_b64url(parts[1]))
        signature = _b64url(parts[2])
    except (ValueError, binascii.Error):
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _timeframe_ok(claims: Mapping[str, Any], now: datetime) -> bool:
    iat, exp = claims.get("iat"), claims.get("exp")
    if not isinstance(iat, int | float) or not isinstance(exp, int | float):
        return False
    if isinstance(iat, bool) or isinstance(exp, bool):
        return False
    now_s = now.timestamp()
    return (
        0 < exp - iat <= JWT_MAX_LIFETIME_SECONDS
        and iat <= now_s + JWT_CLOCK_SKEW_SECONDS
        and exp >= now_s - JWT_CLOCK_SKEW_SECONDS
    )


def _scopes(claim: Any) -> frozenset[str]:
    if not isinstance(claim, str):
        return frozenset()
    scopes = frozenset(claim.split())
    if any(not s.startswith(GOOGLE_SCOPE_PREFIX) and s not in _OIDC_SCOPES for s in scopes):
        return frozenset()
    return scopes


def _quota_day(now: datetime) -> date:
    return now.astimezone(_QUOTA_ZONE).date()


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _is_normalized(value: str) -> bool:
    """Whether ``userProvidedData`` is normalised as the API documentation asks."""
    if "@" in value:
        local, _, domain = value.rpartition("@")
        if value != value.lower() or any(c.isspace() for c in value):
            return False
        return not (domain in _GMAIL_DOMAINS and "." in local)
    return bool(_PHONE.match(value))
