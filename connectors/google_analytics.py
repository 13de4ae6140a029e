"""Google Analytics 4, a write-only processor: erase a person's data; read and set retention.

Facts from ``reference/mailchimp-and-google-analytics-api.md`` part B:

- B3: a service-account key through google-auth, every call through its
  ``AuthorizedSession`` (a requests session that adds the bearer token, fetches
  one from the key's ``token_uri`` when it has none or it expired, and on a 401
  refreshes and resends). The API root is ``admin_base_url``, so a sandbox can
  stand in for Google.
- B1.3: ``POST /v1alpha/properties/{id}:submitUserDeletion`` (only v1alpha has
  it), scope ``analytics.edit``, with exactly one identifier, chosen by
  ``[google_analytics] identity``: ``userId`` or ``clientId`` (the Phorest
  client id, which the website must set as GA's user id or client id: see the
  README), or ``userProvidedData`` (the email, normalised as the API documents).
  The answer's ``deletionRequestTime`` (everything GA holds on that identifier
  from before it will be deleted) is the audit trail's evidence.
- B1.5 and assumption 11: 500 deletions per property per day; a spent quota is
  403 ``rateLimitExceeded`` naming a per-day limit. The quota day is taken to be
  the US Pacific calendar day, as for Google's other daily quotas. Such an
  action is not failed: its outcome says to wait for the reset (``quota_wait``)
  and, until then, this connector sends no further deletion.
- B2: ``GET``/``PATCH /v1beta/properties/{id}/dataRetentionSettings``.
- Assumption 12: writes need the service account to hold the Editor role on
  the property, so a 403 that is not a rate limit names that role.

GA holds no list of users syncd could read, so this is a plain
:class:`~connectors.base.Connector`, with no ``scan`` or ``changes``.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from datetime import time as midnight
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import requests
import structlog
from google.auth import exceptions as google_errors
from google.auth.transport.requests import AuthorizedSession
from google.auth.transport.requests import Request as TokenRequest
from google.oauth2 import service_account

from connectors.base import Action, CheckResult, Outcome, report_attempt, report_call
from syncd.config import GoogleAnalyticsSettings
from syncd.errors import (
    ConfigError,
    ConnectorError,
    PermanentError,
    QuotaExhaustedError,
    RetriableError,
)
from syncd.retry import RetryPolicy

log = structlog.get_logger(__name__)

SCOPES = ("https://www.googleapis.com/auth/analytics.edit",)
DELETION = "/v1alpha/properties/{property_id}:submitUserDeletion"
RETENTION = "/v1beta/properties/{property_id}/dataRetentionSettings"
IDENTIFIER_FIELDS = {"user_id": "userId", "client_id": "clientId", "email": "userProvidedData"}
GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})
RETENTION_DURATIONS = frozenset({"TWO_MONTHS", "FOURTEEN_MONTHS", "TWENTY_SIX_MONTHS",
                                 "THIRTY_EIGHT_MONTHS", "FIFTY_MONTHS"})  # fmt: skip
# Admin API writes: 180 a minute per user (GA-Q). The default ([google_analytics]
# writes_per_minute) stays under it, so a day's 500 deletions never trip the
# per-minute limit: one write every 0.4 s.
WRITES_PER_MINUTE = 150
# 25 deletions at that pace take about 10 s: progress stays fine and a stopping
# daemon (which stops between applies) exits promptly.
APPLY_BATCH_SIZE = 25
# Google's quota day may turn a little after ours: a minute late costs nothing.
QUOTA_RESET_MARGIN_SECONDS = 60.0
# Quota reasons: the legacy ``errors[].reason`` codes and the ErrorInfo one. A daily
# limit is known by its reason, or by the quota limit (or message) naming a day.
RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "RATE_LIMIT_EXCEEDED",
                                "userRateLimitExceeded", "dailyLimitExceeded"})  # fmt: skip
DAILY_LIMIT_REASONS = frozenset({"dailyLimitExceeded"})
# Why a 401 or 403 that is not a rate limit was refused: title, and what a person must do.
SERVICE_DISABLED_REASONS = frozenset({"SERVICE_DISABLED", "accessNotConfigured"})
SCOPE_REASONS = frozenset({"ACCESS_TOKEN_SCOPE_INSUFFICIENT", "insufficientPermissions"})
HINTS = {
    "needs_editor_role": "the service account needs the Editor role on GA4 property {property}",
    "credentials_refused": "the service-account key was refused",
    "admin_api_disabled": ("the Google Analytics Admin API is not enabled in the service "
                           "account's Cloud project"),
    "scope_insufficient": "the access token lacks the analytics.edit scope",
}
CREDENTIAL_TITLES = frozenset({"needs_editor_role", "credentials_refused", "scope_insufficient"})
_OAUTH_CODE = re.compile(r"[a-z_]{1,40}")

try:
    QUOTA_ZONE: ZoneInfo | timezone = ZoneInfo("America/Los_Angeles")
except ZoneInfoNotFoundError:  # no tz database: Pacific standard time is an hour off at worst
    QUOTA_ZONE = timezone(timedelta(hours=-8))


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """A property's data-retention settings (``DataRetentionSettings``).

    Attributes:
        event_data_retention: a ``RetentionDuration`` name, e.g. ``FOURTEEN_MONTHS``.
        user_data_retention: the same, for user-level data.
        reset_user_data_on_new_activity: whether each event restarts a user's clock.
    """

    event_data_retention: str
    user_data_retention: str
    reset_user_data_on_new_activity: bool


class GoogleAnalyticsConnector:
    """One GA4 property, through the Admin API.

    Args:
        settings: the ``[google_analytics]`` section.
        retry: the in-call retry policy (default :class:`RetryPolicy`).
        sleep: how retries and the write pacing wait; tests pass a recorder.
        clock: monotonic seconds, for the write pacing.
        now: the current aware time, for the quota day.

    Raises:
        ConfigError: the credentials are not set or are not a usable service-account key.
    """

    name = "google_analytics"
    apply_batch_size = APPLY_BATCH_SIZE

    def __init__(
        self,
        settings: GoogleAnalyticsSettings,
        *,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if settings.credentials is None:
            raise ConfigError("google_analytics.credentials is not set")
        try:
            info = json.loads(settings.credentials.get_secret_value())
            credentials = service_account.Credentials.from_service_account_info(
                info, scopes=list(SCOPES))
        except (ValueError, TypeError, google_errors.GoogleAuthError):
            # Not the exception's text: it could quote the key.
            message = "google_analytics.credentials: not a usable service-account key"
            raise ConfigError(message) from None
        self._settings = settings
        self._retry = retry or RetryPolicy()
        self._sleep, self._clock, self._now = sleep, clock, now
        # Every response, the token endpoint's included and each one the session resends
        # after a 401, is counted by a hook; requests that got no answer, in _request.
        token_session = requests.Session()
        token_session.hooks["response"].append(self._observe)
        self._session = AuthorizedSession(credentials, auth_request=TokenRequest(token_session))
        self._session.hooks["response"].append(self._observe)
        self._root = settings.admin_base_url.rstrip("/")
        self._field = IDENTIFIER_FIELDS[settings.identity]
        self.identity = settings.identity  # how GA knows a person (user_id, client_id, email)
        self._next_write_at: float | None = None
        self._quota_resets_at: datetime | None = None

    def check(self) -> CheckResult:
        """A token and one read of the retention settings, not retried."""
        try:
            settings = self._retention("GET", retried=False)
        except ConnectorError as error:
            what = str(error).removeprefix(f"GET {RETENTION}: ")
            if error.title in CREDENTIAL_TITLES:
                return CheckResult(False, f"credentials refused: {what}", credentials_refused=True)
            return CheckResult(False, f"{'refused' if error.permanent else 'unreachable'}: {what}")
        return CheckResult(True, "credentials accepted",
                           {"event_data_retention": settings.event_data_retention})

    def apply(self, actions: Sequence[Action], *, dry_run: bool = False) -> list[Outcome]:
        """Submit one user deletion per ``erase`` action, one after another; never raises.

        Args:
            actions: what to do; anything but ``erase`` is refused.
            dry_run: decide and log, but send nothing.

        Returns:
            Exactly one outcome per action, in order: done with the deletion time as
            evidence; retriable with ``quota_wait`` and the time to the quota's reset
            when today's deletions are spent; permanent when GA refused.
        """
        outcomes = [self._apply_one(action, dry_run) for action in actions]
        if outcomes:
            log.info("google_analytics_applied", dry_run=dry_run, identifier=self._field,
                     **Counter(o.status for o in outcomes))  # fmt: skip
        return outcomes

    def data_retention(self) -> RetentionSettings:
        """The property's data-retention settings.

        Raises:
            RetriableError: GA stayed unavailable through the in-call retries.
            PermanentError: refused (see :meth:`_raise_for`), or not the documented shape.
        """
        return self._retention("GET")

    def set_event_retention(self, duration: str, *, dry_run: bool = False) -> RetentionSettings:
        """Set how long event-level data is kept, and nothing else (``updateMask``).

        Args:
            duration: a ``RetentionDuration`` name, e.g. ``FOURTEEN_MONTHS``.
            dry_run: read the settings and log the change, but do not make it.

        Returns:
            The settings as GA now holds them (a dry run: as they would be).

        Raises:
            ValueError: ``duration`` is not a retention duration.
            RetriableError: GA stayed unavailable through the in-call retries.
            PermanentError: refused (e.g. 26 months on a standard property), or the
                answer does not hold the new value.
        """
        if duration not in RETENTION_DURATIONS:
            raise ValueError(f"not a retention duration: {duration!r}")
        if dry_run:
            log.info("would_set_event_retention", label="(dry run)", path=RETENTION,
                     duration=duration)  # fmt: skip
            return replace(self._retention("GET"), event_data_retention=duration)
        stored = self._retention("PATCH", body={"eventDataRetention": duration},
                                 params={"updateMask": "event_data_retention"})  # fmt: skip
        if stored.event_data_retention != duration:
            raise PermanentError(f"PATCH {RETENTION}: the answer holds another value",
                                 title="verify_failed")  # fmt: skip
        log.info("google_analytics_retention_set", path=RETENTION, duration=duration)
        return stored

    def _apply_one(self, action: Action, dry_run: bool) -> Outcome:
        """One deletion whose failure, even an unexpected one, becomes its outcome."""
        refused = self._refusal(action)
        if refused:
            return Outcome(action, "permanent", refused)
        if dry_run:
            log.info("would_submit_user_deletion", label="(dry run)", path=DELETION,
                     identifier=self._field)  # fmt: skip
            return Outcome(action, "done", "dry_run")
        if (wait := self._quota_wait_seconds()) is not None:
            return Outcome(action, "retriable", "quota_exhausted", retry_after_seconds=wait,
                           quota_wait=True)  # fmt: skip
        try:
            stamp = self._submit_user_deletion(self._identifier(action))
        except QuotaExhaustedError as error:
            wait = error.retry_after_seconds or 0.0
            self._quota_resets_at = self._now() + timedelta(seconds=wait)
            log.warning("google_analytics_quota_exhausted", path=DELETION, wait_seconds=wait)
            return Outcome(action, "retriable", error.title, retry_after_seconds=wait,
                           quota_wait=True)  # fmt: skip
        except RetriableError as error:
            return Outcome(action, "retriable", error.title,
                           retry_after_seconds=error.retry_after_seconds)  # fmt: skip
        except PermanentError as error:
            log.error("google_analytics_refused", path=DELETION, status=error.status,
                      title=error.title, hint=self._hint(error))  # fmt: skip
            return Outcome(action, "permanent", error.title)
        except Exception as error:  # noqa: BLE001 — one action's bug must not lose the others
            # The type only: a message could quote a request or an answer.
            log.error("google_analytics_apply_failed", path=DELETION, error=type(error).__name__)
            return Outcome(action, "retriable", "unexpected_error")
        return Outcome(action, "done", "deleted", evidence=f"deletionRequestTime={stamp}")

    def _refusal(self, action: Action) -> str | None:
        """Why GA cannot carry ``action`` out at all (the permanent reason), or None."""
        if action.kind != "erase":
            return "unsupported_action"
        if self._field == "userProvidedData":
            return None if action.email and "@" in action.email else "missing_email"
        return None if action.client_id else "missing_client_id"

    def _identifier(self, action: Action) -> dict[str, str]:
        """The request body: exactly one identifier, the one ``identity`` names."""
        if self._field == "userProvidedData":
            return {self._field: user_provided_email(action.email or "")}
        return {self._field: action.client_id or ""}

    def _submit_user_deletion(self, body: dict[str, str]) -> str:
        """Send one deletion; the ``deletionRequestTime`` GA answers with.

        Replaying it after a lost answer only deletes again (and spends one more of
        the day's quota), so it is retried like an idempotent call.

        Raises:
            QuotaExhaustedError: today's deletions for the property are spent.
            RetriableError: GA stayed unavailable through the in-call retries.
            PermanentError: refused, or an answer without the deletion time.
        """
        answer = self._request("POST", DELETION, body=body)
        stamp = answer.get("deletionRequestTime") if isinstance(answer, dict) else None
        if not isinstance(stamp, str) or not stamp:
            raise PermanentError(f"POST {DELETION}: no deletionRequestTime", title="bad_response")
        log.info("google_analytics_deletion_submitted", path=DELETION, identifier=self._field)
        return stamp

    def _retention(self, method: str, *, retried: bool = True, **call: Any) -> RetentionSettings:
        """GET or PATCH the retention settings.

        Raises:
            PermanentError: bad_response, when the answer is not the documented shape.
        """
        answer = self._request(method, RETENTION, retried=retried, **call)
        try:
            settings = RetentionSettings(str(answer["eventDataRetention"]),
                                         str(answer["userDataRetention"]),
                                         answer.get("resetUserDataOnNewActivity") is True)
        except (KeyError, TypeError, AttributeError):
            message = f"{method} {RETENTION}: not DataRetentionSettings"
            raise PermanentError(message, title="bad_response") from None
        return settings

    def _quota_wait_seconds(self) -> float | None:
        """Seconds until the spent quota resets, or None when deletions may be sent."""
        if self._quota_resets_at is None:
            return None
        left = (self._quota_resets_at - self._now()).total_seconds()
        if left <= 0:
            self._quota_resets_at = None
            return None
        return left

    def _pace(self) -> None:
        """Space writes ``60 / writes_per_minute`` seconds apart."""
        now = self._clock()
        if self._next_write_at is not None and now < self._next_write_at:
            self._sleep(self._next_write_at - now)
            now = self._next_write_at
        self._next_write_at = now + 60.0 / self._settings.writes_per_minute

    def _observe(self, response: requests.Response, *_: Any, **__: Any) -> requests.Response:
        report_call(self.name, str(response.status_code))
        return response

    def _hint(self, error: ConnectorError) -> str:
        """What a person must do about a refusal, naming the role or the setting."""
        template = HINTS.get(error.title or "", "")
        return template.format(property=self._settings.property_id)

    def _request(
        self,
        method: str,
        template: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        retried: bool = True,
    ) -> Any:
        """Send one request (with the in-call retries); the decoded JSON of a 2xx.

        Raises:
            RetriableError: see :meth:`_raise_for`, once the retries are spent.
            QuotaExhaustedError: at once, never retried in-call.
            PermanentError: see :meth:`_raise_for`.
        """
        url = self._root + template.format(property_id=quote(self._settings.property_id, safe=""))

        def once() -> Any:
            if method != "GET":
                self._pace()
            result: requests.Response | requests.RequestException | google_errors.GoogleAuthError
            try:
                result = self._session.request(
                    method, url, json=body, params=params, headers={"Accept": "application/json"},
                    timeout=self._settings.timeout_seconds,  # the token request's too
                )
            except (requests.RequestException, google_errors.GoogleAuthError) as error:
                result = error  # classified outside the except: no chained URL in tracebacks
            if isinstance(result, requests.RequestException):
                report_attempt(self.name, result)
            elif isinstance(result, google_errors.TransportError):  # the token request
                cause = result.args[0] if result.args else None
                if isinstance(cause, requests.RequestException):
                    report_attempt(self.name, cause)
            status = getattr(result, "status_code", None)
            log.debug("google_analytics_request", method=method, path=template, status=status)
            return self._raise_for(method, template, result)

        return self._retry.retrying(sleep=self._sleep)(once) if retried else once()

    def _raise_for(
        self,
        method: str,
        template: str,
        result: requests.Response | requests.RequestException | google_errors.GoogleAuthError,
    ) -> Any:
        """The one classification of a Google answer; returns the decoded JSON of a 2xx.

        Messages carry the method, the path template, the status and Google's reason
        codes: never a body, an identifier or the key.

        Raises:
            QuotaExhaustedError: 403 or 429 naming a per-day quota, with the wait until
                the next Pacific midnight.
            RetriableError: 429, 5xx, 403 ``rateLimitExceeded``, timeouts, connection
                failures, a token endpoint that is down.
            PermanentError: 401 and other 403s (titled with what a person must do, see
                ``HINTS``), the token endpoint refusing the key, any other 4xx, a 2xx
                that is not JSON.
        """
        where = f"{method} {template}"
        if isinstance(result, google_errors.RefreshError):
            code = _oauth_code(result)
            if result.retryable:
                raise RetriableError(f"{where}: token endpoint unavailable ({code})",
                                     title="token_unavailable", reached_server=False)
            raise PermanentError(f"{where}: token endpoint refused the key ({code})",
                                 title="credentials_refused")  # fmt: skip
        if isinstance(result, google_errors.GoogleAuthError):
            # The token could not be fetched, so the call itself was never sent.
            kind = type(result).__name__
            raise RetriableError(f"{where}: no token ({kind})", title="token_unavailable",
                                 reached_server=False)  # fmt: skip
        if isinstance(result, requests.RequestException):
            kind = type(result).__name__
            if not isinstance(result, requests.Timeout | requests.ConnectionError
                              | requests.exceptions.ChunkedEncodingError):
                raise PermanentError(f"{where}: {kind}", title="request_failed")
            title = "timeout" if isinstance(result, requests.Timeout) else "connection_failed"
            reached = False if isinstance(result, requests.ConnectTimeout) else None
            raise RetriableError(f"{where}: {kind}", title=title, reached_server=reached)
        status = result.status_code
        reasons, daily = _error_reasons(result)
        named = " ".join([f"{where}: HTTP {status}", *sorted(reasons)])
        if status in (403, 429) and daily:
            wait = seconds_until_quota_reset(self._now()) + QUOTA_RESET_MARGIN_SECONDS
            raise QuotaExhaustedError(named, status=status, title="quota_exhausted",
                                      retry_after_seconds=wait, reached_server=True)
        if status == 429 or status >= 500 or (status == 403 and reasons & RATE_LIMIT_REASONS):
            raise RetriableError(
                named, status=status, title="server_error" if status >= 500 else "rate_limited",
                retry_after_seconds=_retry_after(result.headers.get("Retry-After")),
                reached_server=True,
            )
        if status in (401, 403):
            title = ("admin_api_disabled" if reasons & SERVICE_DISABLED_REASONS
                     else "scope_insufficient" if reasons & SCOPE_REASONS
                     else "credentials_refused" if status == 401 else "needs_editor_role")
            hint = HINTS[title].format(property=self._settings.property_id)
            raise PermanentError(f"{named}: {hint}", status=status, title=title)
        if not 200 <= status < 300:
            title = {400: "invalid_argument", 404: "not_found"}.get(status, "rejected")
            raise PermanentError(named, status=status, title=title)
        try:
            return result.json()
        except ValueError:
            message = f"{where}: HTTP {status} with a body that is not JSON"
            raise PermanentError(message, status=status, title="bad_response") from None


def user_provided_email(email: str) -> str:
    """An email as ``userProvidedData`` wants it (the v1alpha discovery document).

    Lower-cased, every space removed, and for gmail.com and googlemail.com no dots
    before the ``@``. Not hashed: the field takes the address itself.
    """
    value = "".join(email.split()).lower()
    local, at, domain = value.rpartition("@")
    if at and domain in GMAIL_DOMAINS:
        return f"{local.replace('.', '')}@{domain}"
    return value


def seconds_until_quota_reset(now: datetime) -> float:
    """Seconds from ``now`` (aware) to the next midnight in US Pacific time.

    Worked out in UTC, so a day of 23 or 25 hours (daylight saving) comes out right.
    """
    local = now.astimezone(QUOTA_ZONE)
    reset = datetime.combine(local.date() + timedelta(days=1), midnight(), tzinfo=QUOTA_ZONE)
    return (reset.astimezone(UTC) - now.astimezone(UTC)).total_seconds()


def _error_reasons(response: requests.Response) -> tuple[frozenset[str], bool]:
    """Google's reason codes in an error envelope, and whether it names a per-day quota.

    Reads ``error.errors[].reason`` (the legacy form) and ``error.details[]`` ErrorInfo
    reasons; the quota's period from the ErrorInfo's ``quota_limit`` or the message.
    Nothing of the body is kept but these codes.
    """
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return frozenset(), False
    if not isinstance(error, dict):
        return frozenset(), False
    reasons: set[str] = set()
    limits: list[str] = [str(error.get("message") or "")]
    for item in [*(error.get("errors") or []), *(error.get("details") or [])]:
        if isinstance(item, dict) and isinstance(item.get("reason"), str):
            reasons.add(item["reason"])
            metadata = item.get("metadata")
            if isinstance(metadata, dict):
                limits.append(str(metadata.get("quota_limit") or ""))
    safe = frozenset(r for r in reasons if re.fullmatch(r"[A-Za-z_]{1,64}", r))
    names_a_day = any("perday" in limit.lower().replace(" ", "") for limit in limits)
    daily = bool(safe & DAILY_LIMIT_REASONS) or (bool(safe & RATE_LIMIT_REASONS) and names_a_day)
    return safe, daily


def _oauth_code(error: google_errors.RefreshError) -> str:
    """The OAuth error code (``invalid_grant``, ``deleted_client`` …) of a token refusal."""
    data = error.args[1] if len(error.args) > 1 else None
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) and _OAUTH_CODE.fullmatch(code) else "no code"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a delta-seconds Retry-After (an HTTP date is ignored)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
