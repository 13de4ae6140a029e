"""Tests for connectors.google_analytics: faked at the wire with ``responses``, then the emulator.

The service-account key is real (an RSA key made once per module), so google-auth signs
real JWT assertions; ``responses`` answers the token endpoint and the Admin API alike.
"""

from __future__ import annotations

import io
import json
import types
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import google.auth._exponential_backoff
import pytest
import requests
import responses
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from connectors.base import Action, ReadableConnector, add_call_observer, remove_call_observer
from connectors.google_analytics import (
    APPLY_BATCH_SIZE,
    QUOTA_RESET_MARGIN_SECONDS,
    WRITES_PER_MINUTE,
    GoogleAnalyticsConnector,
    RetentionSettings,
    seconds_until_quota_reset,
    user_provided_email,
)
from syncd.config import GoogleAnalyticsSettings
from syncd.errors import ConfigError, PermanentError
from syncd.identity import SubjectKeys
from syncd.ledger import Ledger
from syncd.reconcile import Planned
from syncd.retry import RetryPolicy
from syncd.sandbox.google import GoogleEmulator
from syncd.sandbox.http import SandboxServer, Traffic
from syncd.tasks import enqueue, run_due
from tests.support import FakeClock

ADMIN = "https://analyticsadmin.test"
TOKEN_URL = "https://oauth2.test/token"
PROPERTY = "123456789"
DELETION_URL = f"{ADMIN}/v1alpha/properties/{PROPERTY}:submitUserDeletion"
RETENTION_URL = f"{ADMIN}/v1beta/properties/{PROPERTY}/dataRetentionSettings"
TOKEN = {"access_token": "ya29.test-token", "expires_in": 3600, "token_type": "Bearer"}
DELETED_AT = "2026-11-24T19:40:05.123456Z"
RETENTION = {
    "name": f"properties/{PROPERTY}/dataRetentionSettings",
    "eventDataRetention": "TWO_MONTHS",
    "userDataRetention": "FOURTEEN_MONTHS",
    "resetUserDataOnNewActivity": True,
}
CLIENT_ID = "AbCdEfGhIjKlMnOpQrStUv"
SEEDED_EMAIL = " Zelda.Quimby@GMail.com"
NORMALISED_EMAIL = "zeldaquimby@gmail.com"
EDITOR_HINT = f"the service account needs the Editor role on GA4 property {PROPERTY}"
# 2026-11-24 11:40:05 in Los Angeles (PST): the next quota day starts 12:19:55 later.
NOW = datetime(2026, 11, 24, 19, 40, 5, tzinfo=UTC)
TO_MIDNIGHT_SECONDS = 12 * 3600 + 19 * 60 + 55


def google_error(status: int, code: str, message: str, *, reasons: tuple[str, ...] = (),
                 info: str | None = None, **metadata: str) -> dict[str, Any]:
    """Google's error envelope: legacy ``errors[].reason`` and an ErrorInfo detail."""
    error: dict[str, Any] = {"code": status, "message": message, "status": code}
    if reasons:
        error["errors"] = [{"message": message, "domain": "usageLimits", "reason": r}
                           for r in reasons]  # fmt: skip
    if info:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": info,
                             "domain": "googleapis.com", "metadata": metadata}]  # fmt: skip
    return {"error": error}


DAILY_QUOTA = google_error(
    403, "PERMISSION_DENIED",
    "Quota exceeded for quota metric 'User deletions' and limit 'User deletions per day per "
    f"property' of service 'analyticsadmin.googleapis.com' for property 'properties/{PROPERTY}'.",
    reasons=("rateLimitExceeded",), info="RATE_LIMIT_EXCEEDED",
    quota_limit="UserDeletionsPerDayPerProperty", quota_limit_value="500",
)  # fmt: skip
PER_MINUTE = google_error(
    403, "PERMISSION_DENIED",
    "Quota exceeded for quota metric 'Write requests' and limit 'Write requests per minute per "
    "user' of service 'analyticsadmin.googleapis.com'.",
    reasons=("rateLimitExceeded",), info="RATE_LIMIT_EXCEEDED",
    quota_limit="WriteRequestsPerMinutePerUser",
)  # fmt: skip
# The shape of the corpus's recorded 403 (rest-error-403-permission-denied).
PERMISSION_DENIED = {"error": {
    "code": 403, "message": "User does not have sufficient permissions for this property.",
    "errors": [{"message": "User does not have sufficient permissions for this property.",
                "domain": "global", "reason": "forbidden"}],
    "status": "PERMISSION_DENIED"}}  # fmt: skip


@dataclass
class Waits:
    """A monotonic clock that only moves when something sleeps, and the sleeps."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture(scope="module")
def private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_info(key: rsa.RSAPrivateKey, token_uri: str = TOKEN_URL) -> dict[str, str]:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()  # fmt: skip
    return {"type": "service_account", "project_id": "test", "private_key_id": "k1",
            "private_key": pem, "client_email": "syncd@test.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": token_uri}  # fmt: skip


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
def make(private_key: rsa.RSAPrivateKey, waits: Waits) -> Any:
    """Build a connector: ``make(identity="email", attempts=1, now=...)``."""

    def build(*, attempts: int = 3, now: Any = lambda: NOW, **overrides: Any) -> Any:
        values: dict[str, Any] = {
            "property_id": PROPERTY, "credentials": json.dumps(key_info(private_key)),
            "admin_base_url": ADMIN, "timeout_seconds": 7, **overrides,
        }  # fmt: skip
        return GoogleAnalyticsConnector(
            GoogleAnalyticsSettings(**values), retry=RetryPolicy(attempts=attempts),
            sleep=waits.sleep, clock=waits.clock, now=now,
        )

    return build


@pytest.fixture
def token(wire: responses.RequestsMock) -> responses.BaseResponse:
    return wire.add(responses.POST, TOKEN_URL, json=TOKEN)


def erase(client_id: str | None = CLIENT_ID, email: str | None = SEEDED_EMAIL) -> Action:
    return Action("erase", "f" * 64, client_id=client_id, email=email)


def sent(wire: responses.RequestsMock, url: str = DELETION_URL) -> list[Any]:
    return [json.loads(c.request.body) for c in wire.calls if c.request.url.startswith(url)]


def calls_to(wire: responses.RequestsMock, url: str) -> int:
    return sum(1 for c in wire.calls if c.request.url.split("?")[0] == url)


# -- submitUserDeletion: the identifier -------------------------------------------------


def test_a_deletion_sends_one_identifier_with_a_token_and_keeps_the_deletion_time(
    wire: responses.RequestsMock, token: Any, make: Any
) -> None:
    wire.add(responses.POST, DELETION_URL, json={"deletionRequestTime": DELETED_AT})

    [outcome] = make().apply([erase()])

    assert (outcome.status, outcome.reason) == ("done", "deleted")
    assert outcome.evidence == f"deletionRequestTime={DELETED_AT}"
    assert sent(wire) == [{"userId": CLIENT_ID}]
    call = next(c for c in wire.calls if c.request.url == DELETION_URL)
    assert call.request.headers["Authorization"] == "Bearer ya29.test-token"
    assert call.request.req_kwargs["timeout"] == 7
    # The assertion went to the key's token_uri, with the analytics.edit scope, in time.
    assert token.call_count == 1
    assert wire.calls[0].request.req_kwargs["timeout"] == 7


@pytest.mark.parametrize(
    ("identity", "body"),
    [
        pytest.param("user_id", {"userId": CLIENT_ID}, id="user_id"),
        pytest.param("client_id", {"clientId": CLIENT_ID}, id="client_id"),
        pytest.param("email", {"userProvidedData": NORMALISED_EMAIL}, id="email"),
    ],
)
def test_identity_chooses_the_one_identifier_sent(
    wire: responses.RequestsMock, token: Any, make: Any, identity: str, body: dict[str, str]
) -> None:
    wire.add(responses.POST, DELETION_URL, json={"deletionRequestTime": DELETED_AT})

    [outcome] = make(identity=identity).apply([erase()])

    assert outcome.status == "done"
    [sent_body] = sent(wire)
    assert sent_body == body and len(sent_body) == 1


@pytest.mark.parametrize(
    ("email", "expected"),
    [
        pytest.param("  Zelda.Quimby@Example.ORG ", "zelda.quimby@example.org", id="trim-lower"),
        pytest.param("Jo.Hn.Smith@GMail.com", "johnsmith@gmail.com", id="gmail-dots"),
        pytest.param("j.o@googlemail.com", "jo@googlemail.com", id="googlemail-dots"),
        pytest.param("a.b+news@gmail.com", "ab+news@gmail.com", id="gmail-plus-kept"),
        pytest.param("a.b@gmail.co.uk", "a.b@gmail.co.uk", id="other-domain-keeps-dots"),
        pytest.param("first last@example.com", "firstlast@example.com", id="inner-space"),
        pytest.param("x.y@sub.gmail.com", "x.y@sub.gmail.com", id="gmail-subdomain"),
    ],
)
def test_emails_are_normalised_as_google_asks(email: str, expected: str) -> None:
    assert user_provided_email(email) == expected


@pytest.mark.parametrize(
    ("identity", "action", "reason"),
    [
        pytest.param("user_id", Action("unsubscribe", "k", email="a@example.com"),
                     "unsupported_action", id="not-erase"),
        pytest.param("user_id", erase(client_id=None), "missing_client_id", id="no-client-id"),
        pytest.param("client_id", erase(client_id=""), "missing_client_id", id="empty-client-id"),
        pytest.param("email", erase(email=None), "missing_email", id="no-email"),
        pytest.param("email", erase(email="not-an-address"), "missing_email", id="bad-email"),
    ],
)  # fmt: skip
def test_actions_ga_cannot_do_are_permanent_without_a_call(
    wire: responses.RequestsMock, make: Any, identity: str, action: Action, reason: str
) -> None:
    [outcome] = make(identity=identity).apply([action])

    assert (outcome.status, outcome.reason) == ("permanent", reason)
    assert len(wire.calls) == 0


def test_a_dry_run_sends_nothing_not_even_for_a_token(
    wire: responses.RequestsMock, make: Any, captured_log: io.StringIO
) -> None:
    outcomes = make().apply([erase(), erase(client_id="other")], dry_run=True)

    assert [(o.status, o.reason) for o in outcomes] == [("done", "dry_run")] * 2
    assert len(wire.calls) == 0
    assert "(dry run)" in captured_log.getvalue()


# -- classification ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "status", "reason", "retry_after", "quota_wait"),
    [
        pytest.param({"status": 503, "json": google_error(503, "UNAVAILABLE", "down")},
                     "retriable", "server_error", None, False, id="503"),
        pytest.param({"status": 500}, "retriable", "server_error", None, False, id="500"),
        pytest.param({"status": 429, "headers": {"Retry-After": "12"},
                      "json": google_error(429, "RESOURCE_EXHAUSTED", "slow down")},
                     "retriable", "rate_limited", 12.0, False, id="429-retry-after"),
        pytest.param({"status": 403, "json": PER_MINUTE},
                     "retriable", "rate_limited", None, False, id="403-rateLimitExceeded-minute"),
        pytest.param({"status": 403, "json": google_error(
                         403, "PERMISSION_DENIED", "Quota exceeded",
                         info="RATE_LIMIT_EXCEEDED")},
                     "retriable", "rate_limited", None, False, id="403-RATE_LIMIT_EXCEEDED-only"),
        pytest.param({"status": 403, "json": DAILY_QUOTA}, "retriable", "quota_exhausted",
                     TO_MIDNIGHT_SECONDS + QUOTA_RESET_MARGIN_SECONDS, True, id="403-daily-quota"),
        pytest.param({"status": 403, "json": google_error(
                         403, "PERMISSION_DENIED", "Daily Limit Exceeded",
                         reasons=("dailyLimitExceeded",))},
                     "retriable", "quota_exhausted",
                     TO_MIDNIGHT_SECONDS + QUOTA_RESET_MARGIN_SECONDS, True,
                     id="403-legacy-dailyLimitExceeded"),
        pytest.param({"status": 403, "json": google_error(
                         403, "PERMISSION_DENIED", "User Rate Limit Exceeded",
                         reasons=("userRateLimitExceeded",))},
                     "retriable", "rate_limited", None, False,
                     id="403-legacy-userRateLimitExceeded"),
        pytest.param({"status": 429, "json": google_error(
                         429, "RESOURCE_EXHAUSTED", "Quota exceeded", info="RATE_LIMIT_EXCEEDED",
                         quota_limit="UserDeletionsPerDayPerProperty")},
                     "retriable", "quota_exhausted",
                     TO_MIDNIGHT_SECONDS + QUOTA_RESET_MARGIN_SECONDS, True, id="429-daily-quota"),
        pytest.param({"status": 403, "json": PERMISSION_DENIED},
                     "permanent", "needs_editor_role", None, False, id="403-permission"),
        pytest.param({"status": 403, "json": google_error(
                         403, "PERMISSION_DENIED", "The caller does not have permission")},
                     "permanent", "needs_editor_role", None, False, id="403-no-reason"),
        pytest.param({"status": 403, "json": google_error(
                         403, "PERMISSION_DENIED", "API not used", info="SERVICE_DISABLED")},
                     "permanent", "admin_api_disabled", None, False, id="403-api-disabled"),
        pytest.param({"status": 403, "json": google_error(
                         403, "PERMISSION_DENIED", "insufficient scopes",
                         info="ACCESS_TOKEN_SCOPE_INSUFFICIENT")},
                     "permanent", "scope_insufficient", None, False, id="403-scope"),
        pytest.param({"status": 400, "json": google_error(400, "INVALID_ARGUMENT", "bad")},
                     "permanent", "invalid_argument", None, False, id="400"),
        pytest.param({"status": 404}, "permanent", "not_found", None, False, id="404"),
        pytest.param({"status": 409}, "permanent", "rejected", None, False, id="409"),
        pytest.param({"body": requests.ConnectionError("refused")},
                     "retriable", "connection_failed", None, False, id="connection-refused"),
        pytest.param({"body": requests.ReadTimeout("slow")},
                     "retriable", "timeout", None, False, id="read-timeout"),
        pytest.param({"status": 200, "body": "<html>proxy</html>"},
                     "permanent", "bad_response", None, False, id="not-json"),
        pytest.param({"status": 200, "json": {}},
                     "permanent", "bad_response", None, False, id="no-deletion-time"),
    ],
)  # fmt: skip
def test_every_answer_is_classified_in_one_place(
    wire: responses.RequestsMock, token: Any, make: Any, answer: dict[str, Any], status: str,
    reason: str, retry_after: float | None, quota_wait: bool,
) -> None:  # fmt: skip
    wire.add(responses.POST, DELETION_URL, **answer)

    [outcome] = make(attempts=1).apply([erase()])

    assert (outcome.status, outcome.reason) == (status, reason)
    assert outcome.retry_after_seconds == retry_after
    assert outcome.quota_wait is quota_wait
    assert outcome.evidence is None


@pytest.mark.parametrize(
    ("answer", "expectation", "title"),
    [
        pytest.param({"json": RETENTION}, nullcontext(), None, id="ok"),
        pytest.param({"json": {"name": "x"}}, pytest.raises(PermanentError), "bad_response",
                     id="not-retention-settings"),
        pytest.param({"json": [RETENTION]}, pytest.raises(PermanentError), "bad_response",
                     id="a-list"),
        pytest.param({"status": 403, "json": PERMISSION_DENIED}, pytest.raises(PermanentError),
                     "needs_editor_role", id="403"),
    ],
)  # fmt: skip
def test_a_retention_read_is_classified_by_the_same_rules(
    wire: responses.RequestsMock, token: Any, make: Any, answer: dict[str, Any],
    expectation: AbstractContextManager[Any], title: str | None,
) -> None:  # fmt: skip
    wire.add(responses.GET, RETENTION_URL, **answer)
    with expectation as raised:
        settings = make(attempts=1).data_retention()
    if title is None:
        assert settings == RetentionSettings("TWO_MONTHS", "FOURTEEN_MONTHS", True)
        return
    error = raised.value
    assert error.title == title
    # The message names the call by template: no host, no body.
    assert str(error).startswith("GET /v1beta/properties/{property_id}/dataRetentionSettings")
    assert "analyticsadmin.test" not in str(error) and "sufficient" not in str(error)


# -- retries ----------------------------------------------------------------------------


def test_a_deletion_survives_two_503s(
    script: responses.RequestsMock, make: Any, waits: Waits
) -> None:
    script.add(responses.POST, TOKEN_URL, json=TOKEN)
    for _ in range(2):
        script.add(responses.POST, DELETION_URL, status=503)
    script.add(responses.POST, DELETION_URL, json={"deletionRequestTime": DELETED_AT})

    [outcome] = make().apply([erase()])

    assert outcome.status == "done"
    assert [c.request.url for c in script.calls] == [TOKEN_URL] + [DELETION_URL] * 3
    assert len(waits.sleeps) >= 2  # backoff between the tries


def test_three_503s_give_up_with_a_retriable_outcome(
    wire: responses.RequestsMock, token: Any, make: Any
) -> None:
    wire.add(responses.POST, DELETION_URL, status=503)

    [outcome] = make().apply([erase()])

    assert (outcome.status, outcome.reason) == ("retriable", "server_error")
    assert calls_to(wire, DELETION_URL) == 3


def test_a_permission_refusal_is_not_retried_and_names_the_role(
    wire: responses.RequestsMock, token: Any, make: Any, captured_log: io.StringIO
) -> None:
    wire.add(responses.POST, DELETION_URL, status=403, json=PERMISSION_DENIED)

    [outcome] = make().apply([erase()])

    assert (outcome.status, outcome.reason) == ("permanent", "needs_editor_role")
    assert calls_to(wire, DELETION_URL) == 1
    assert EDITOR_HINT in captured_log.getvalue()


# -- the daily quota ----------------------------------------------------------------------


def test_a_spent_daily_quota_waits_for_the_next_pacific_midnight_without_more_calls(
    wire: responses.RequestsMock, token: Any, make: Any
) -> None:
    clock = FakeClock(NOW)
    wire.add(responses.POST, DELETION_URL, status=403, json=DAILY_QUOTA)
    connector = make(now=clock)

    outcomes = connector.apply([erase(), erase(client_id="b"), erase(client_id="c")])

    wait = TO_MIDNIGHT_SECONDS + QUOTA_RESET_MARGIN_SECONDS
    assert [(o.status, o.reason, o.quota_wait) for o in outcomes] == [
        ("retriable", "quota_exhausted", True)] * 3  # fmt: skip
    assert outcomes[0].retry_after_seconds == wait
    # Not retried in-call, and nothing more is sent until the quota day turns.
    assert calls_to(wire, DELETION_URL) == 1
    clock.advance(hours=1)
    [later] = connector.apply([erase()])
    assert later.quota_wait and later.retry_after_seconds == wait - 3600
    assert calls_to(wire, DELETION_URL) == 1

    clock.advance(seconds=wait - 3600)
    wire.replace(responses.POST, DELETION_URL, json={"deletionRequestTime": DELETED_AT})
    [next_day] = connector.apply([erase()])
    assert next_day.status == "done" and calls_to(wire, DELETION_URL) == 2


@pytest.mark.parametrize(
    ("now", "expected_hours"),
    [
        pytest.param(datetime(2026, 11, 24, 19, 40, 5, tzinfo=UTC), 12 + 19 / 60 + 55 / 3600,
                     id="standard-time"),
        pytest.param(datetime(2026, 7, 1, 6, 59, 0, tzinfo=UTC), 1 / 60, id="daylight-time"),
        pytest.param(datetime(2026, 3, 8, 8, 30, tzinfo=UTC), 22.5, id="spring-forward-23h-day"),
        pytest.param(datetime(2026, 11, 1, 7, 30, tzinfo=UTC), 24.5, id="fall-back-25h-day"),
        pytest.param(datetime(2026, 11, 25, 8, 0, tzinfo=UTC), 24.0, id="at-midnight"),
    ],
)  # fmt: skip
def test_the_quota_day_turns_at_midnight_in_los_angeles(now: datetime,
                                                        expected_hours: float) -> None:
    assert seconds_until_quota_reset(now) == pytest.approx(expected_hours * 3600)


# -- credentials --------------------------------------------------------------------------


def test_a_401_refreshes_the_token_and_resends_once(
    script: responses.RequestsMock, make: Any
) -> None:
    script.add(responses.POST, TOKEN_URL, json=TOKEN)
    script.add(responses.POST, DELETION_URL, status=401,
               json=google_error(401, "UNAUTHENTICATED", "expired"))  # fmt: skip
    script.add(responses.POST, TOKEN_URL, json={**TOKEN, "access_token": "ya29.fresh"})
    script.add(responses.POST, DELETION_URL, json={"deletionRequestTime": DELETED_AT})

    [outcome] = make().apply([erase()])

    assert outcome.status == "done"
    assert script.calls[-1].request.headers["Authorization"] == "Bearer ya29.fresh"


def test_a_401_that_outlasts_fresh_tokens_is_permanent(
    wire: responses.RequestsMock, token: Any, make: Any
) -> None:
    wire.add(responses.POST, DELETION_URL, status=401,
             json=google_error(401, "UNAUTHENTICATED", "no"))  # fmt: skip

    [outcome] = make().apply([erase()])

    assert (outcome.status, outcome.reason) == ("permanent", "credentials_refused")
    # google-auth refreshes and resends twice; syncd does not retry on top.
    assert calls_to(wire, DELETION_URL) == 3 and token.call_count == 3


def test_a_key_the_token_endpoint_refuses_is_permanent_and_reaches_no_api(
    wire: responses.RequestsMock, make: Any
) -> None:
    wire.add(responses.POST, TOKEN_URL, status=400,
             json={"error": "invalid_grant", "error_description": "Invalid JWT Signature."})

    [outcome] = make().apply([erase()])
    result = make().check()

    assert (outcome.status, outcome.reason) == ("permanent", "credentials_refused")
    assert calls_to(wire, DELETION_URL) == 0 and calls_to(wire, RETENTION_URL) == 0
    assert not result.ok and result.credentials_refused
    assert result.detail == "credentials refused: token endpoint refused the key (invalid_grant)"


def test_a_token_endpoint_that_is_down_is_retriable(
    wire: responses.RequestsMock, make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # google-auth retries the token endpoint itself, sleeping for real: not here.
    monkeypatch.setattr(google.auth._exponential_backoff, "time",
                        types.SimpleNamespace(sleep=lambda _seconds: None))
    wire.add(responses.POST, TOKEN_URL, status=503, json={"error": "temporarily_unavailable"})

    [outcome] = make(attempts=1).apply([erase()])

    assert (outcome.status, outcome.reason) == ("retriable", "token_unavailable")
    assert calls_to(wire, DELETION_URL) == 0


def test_credentials_that_are_not_a_usable_key_are_a_config_error_without_the_key(
    make: Any, private_key: rsa.RSAPrivateKey
) -> None:
    info = {**key_info(private_key), "private_key": "-----BEGIN PRIVATE KEY-----\nZm9v\n-----END"}
    with pytest.raises(ConfigError) as raised:
        make(credentials=json.dumps(info))
    assert "BEGIN" not in str(raised.value) and "Zm9v" not in str(raised.value)
    assert raised.value.__cause__ is None


# -- check ---------------------------------------------------------------------------------


def test_check_gets_a_token_and_reads_the_retention_settings_once(
    wire: responses.RequestsMock, token: Any, make: Any
) -> None:
    wire.add(responses.GET, RETENTION_URL, status=503)
    down = make().check()
    wire.replace(responses.GET, RETENTION_URL, json=RETENTION)
    up = make().check()

    assert not down.ok and not down.credentials_refused
    assert down.detail == "unreachable: HTTP 503"
    assert calls_to(wire, RETENTION_URL) == 2  # not retried
    assert up.ok and up.detail == "credentials accepted"
    assert up.extra == {"event_data_retention": "TWO_MONTHS"}


@pytest.mark.parametrize(
    ("answer", "detail", "refused"),
    [
        pytest.param({"status": 403, "json": PERMISSION_DENIED},
                     f"credentials refused: HTTP 403 forbidden: {EDITOR_HINT}", True, id="role"),
        pytest.param({"status": 401, "json": google_error(401, "UNAUTHENTICATED", "no")},
                     "credentials refused: HTTP 401: the service-account key was refused", True,
                     id="401"),
        pytest.param({"status": 403, "json": google_error(403, "PERMISSION_DENIED", "x",
                                                          info="SERVICE_DISABLED")},
                     "refused: HTTP 403 SERVICE_DISABLED: the Google Analytics Admin API is not "
                     "enabled in the service account's Cloud project", False, id="api-disabled"),
    ],
)  # fmt: skip
def test_check_says_what_a_person_must_do_about_a_refusal(
    wire: responses.RequestsMock, token: Any, make: Any, answer: dict[str, Any], detail: str,
    refused: bool,
) -> None:  # fmt: skip
    wire.add(responses.GET, RETENTION_URL, **answer)

    result = make().check()

    assert not result.ok and result.detail == detail
    assert result.credentials_refused is refused


# -- retention (R9) ------------------------------------------------------------------------


def test_set_event_retention_patches_only_the_event_retention(
    wire: responses.RequestsMock, token: Any, make: Any, waits: Waits
) -> None:
    wire.add(responses.PATCH, RETENTION_URL,
             json={**RETENTION, "eventDataRetention": "FOURTEEN_MONTHS"})  # fmt: skip

    stored = make().set_event_retention("FOURTEEN_MONTHS")

    assert stored == RetentionSettings("FOURTEEN_MONTHS", "FOURTEEN_MONTHS", True)
    [call] = [c for c in wire.calls if c.request.method == "PATCH"]
    assert parse_qs(urlsplit(call.request.url).query) == {"updateMask": ["event_data_retention"]}
    assert json.loads(call.request.body) == {"eventDataRetention": "FOURTEEN_MONTHS"}


def test_a_dry_run_of_set_event_retention_reads_but_does_not_patch(
    wire: responses.RequestsMock, token: Any, make: Any
) -> None:
    wire.add(responses.GET, RETENTION_URL, json=RETENTION)

    would = make().set_event_retention("FOURTEEN_MONTHS", dry_run=True)

    assert would.event_data_retention == "FOURTEEN_MONTHS"
    assert not [c for c in wire.calls if c.request.method == "PATCH"]


def test_set_event_retention_refuses_an_unknown_duration_and_checks_the_answer(
    wire: responses.RequestsMock, token: Any, make: Any
) -> None:
    with pytest.raises(ValueError, match="retention duration"):
        make().set_event_retention("FOREVER")
    wire.add(responses.PATCH, RETENTION_URL, json=RETENTION)  # still two months
    with pytest.raises(PermanentError) as raised:
        make().set_event_retention("FOURTEEN_MONTHS")
    assert raised.value.title == "verify_failed"


def test_a_retention_only_360_properties_may_have_is_refused_permanently(
    wire: responses.RequestsMock, token: Any, make: Any
) -> None:
    wire.add(responses.PATCH, RETENTION_URL, status=400, json=google_error(
        400, "INVALID_ARGUMENT", "only available to Google Analytics 360 properties"))

    with pytest.raises(PermanentError) as raised:
        make().set_event_retention("TWENTY_SIX_MONTHS")

    assert raised.value.title == "invalid_argument"
    assert calls_to(wire, RETENTION_URL) == 1


# -- pacing, calls, logs ----------------------------------------------------------------------


def test_deletions_are_spaced_under_the_per_minute_write_limit(
    wire: responses.RequestsMock, token: Any, make: Any, waits: Waits
) -> None:
    wire.add(responses.POST, DELETION_URL, json={"deletionRequestTime": DELETED_AT})

    outcomes = make().apply([erase(client_id=f"c{n}") for n in range(4)])

    assert {o.status for o in outcomes} == {"done"}
    assert waits.sleeps == [pytest.approx(60 / WRITES_PER_MINUTE)] * 3
    assert APPLY_BATCH_SIZE * 60 / WRITES_PER_MINUTE <= 15  # an apply stays short


def test_every_request_is_reported_the_token_and_the_resent_one_included(
    script: responses.RequestsMock, make: Any
) -> None:
    heard: list[tuple[str, str]] = []
    observer = lambda vendor, status: heard.append((vendor, status))  # noqa: E731
    script.add(responses.POST, TOKEN_URL, json=TOKEN)
    script.add(responses.POST, DELETION_URL, status=401)
    script.add(responses.POST, TOKEN_URL, json=TOKEN)
    script.add(responses.POST, DELETION_URL, body=requests.ConnectionError("reset"))
    script.add(responses.POST, DELETION_URL, json={"deletionRequestTime": DELETED_AT})
    add_call_observer(observer)
    try:
        [outcome] = make().apply([erase()])
    finally:
        remove_call_observer(observer)

    assert outcome.status == "done"
    assert Counter(heard) == Counter({("google_analytics", "200"): 3,
                                      ("google_analytics", "401"): 1,
                                      ("google_analytics", "connection_error"): 1})  # fmt: skip


def exercise_everything(wire: responses.RequestsMock, connector: Any) -> None:
    """Delete (done, refused with the address echoed, quota), dry run, check: by email."""
    echo = google_error(400, "INVALID_ARGUMENT", f"bad user_provided_data {NORMALISED_EMAIL}")
    wire.add(responses.POST, DELETION_URL, json={"deletionRequestTime": DELETED_AT})
    wire.add(responses.POST, DELETION_URL, status=400, json=echo)
    wire.add(responses.POST, DELETION_URL, status=403, json=DAILY_QUOTA)
    wire.add(responses.GET, RETENTION_URL, json=RETENTION)
    for _ in range(3):
        connector.apply([erase()])
    connector.apply([erase()], dry_run=True)
    connector.check()


def test_no_email_or_client_id_reaches_the_rendered_log(
    wire: responses.RequestsMock, token: Any, make: Any, captured_log: io.StringIO
) -> None:
    exercise_everything(wire, make(identity="email"))
    output = captured_log.getvalue()
    assert "google_analytics_deletion_submitted" in output
    assert "google_analytics_quota_exhausted" in output
    for value in (SEEDED_EMAIL.strip(), NORMALISED_EMAIL, "zelda", CLIENT_ID, "ya29"):
        assert value.lower() not in output.lower()


def test_the_connector_itself_logs_no_personal_data_before_redaction(
    wire: responses.RequestsMock, token: Any, make: Any
) -> None:
    with structlog.testing.capture_logs() as events:
        exercise_everything(wire, make(identity="email"))
    assert events
    for value in (SEEDED_EMAIL.strip(), NORMALISED_EMAIL, CLIENT_ID):
        assert value not in repr(events)


def test_google_analytics_is_a_connector_that_reads_nothing(make: Any) -> None:
    connector = make()
    assert not isinstance(connector, ReadableConnector)
    assert not hasattr(connector, "scan") and not hasattr(connector, "changes")


# -- against the sandbox's emulator, over HTTP, through real google-auth ---------------------


@pytest.fixture
def emulator() -> Iterator[tuple[GoogleEmulator, SandboxServer]]:
    google = GoogleEmulator((PROPERTY,))
    server = SandboxServer(("127.0.0.1", 0), [google], Traffic())
    server.start()
    try:
        yield google, server
    finally:
        server.shutdown()
        server.server_close()


def emulated(google: GoogleEmulator, server: SandboxServer, *, now: Any = None,
             **overrides: Any) -> GoogleAnalyticsConnector:  # fmt: skip
    info = google.service_account_info(f"{server.base_url}/token")
    values = {"property_id": PROPERTY, "credentials": json.dumps(info),
              "admin_base_url": server.base_url, **overrides}  # fmt: skip
    settings = GoogleAnalyticsSettings(**values)
    return GoogleAnalyticsConnector(settings, retry=RetryPolicy(attempts=2),
                                    sleep=lambda _seconds: None,
                                    now=now or (lambda: datetime.now(UTC)))  # fmt: skip


def test_a_deletion_by_email_reaches_the_emulator_normalised(
    emulator: tuple[GoogleEmulator, SandboxServer],
) -> None:
    google, server = emulator
    connector = emulated(google, server, identity="email")

    assert connector.check().ok
    [outcome] = connector.apply([erase()])

    assert outcome.status == "done"
    [record] = google.deletions()
    assert record["identifier_type"] == "userProvidedData" and record["normalized"] is True
    assert google.was_deleted(NORMALISED_EMAIL, identifier_type="userProvidedData")
    assert outcome.evidence == f"deletionRequestTime={record['deletion_request_time']}"
    assert google.dump()["tokens"]["issued"] == 1  # one JWT exchange served both calls


def test_retention_round_trips_on_the_emulator(
    emulator: tuple[GoogleEmulator, SandboxServer],
) -> None:
    google, server = emulator
    connector = emulated(google, server)

    assert connector.data_retention().event_data_retention == "TWO_MONTHS"
    connector.set_event_retention("FOURTEEN_MONTHS")

    assert google.retention(PROPERTY)["eventDataRetention"] == "FOURTEEN_MONTHS"
    assert google.retention(PROPERTY)["userDataRetention"] == "FOURTEEN_MONTHS"  # untouched
    with pytest.raises(PermanentError):
        connector.set_event_retention("FIFTY_MONTHS")  # a standard property


def test_bad_credentials_and_a_missing_property_are_told_apart_on_the_emulator(
    emulator: tuple[GoogleEmulator, SandboxServer], private_key: rsa.RSAPrivateKey,
) -> None:
    google, server = emulator
    info = {**google.service_account_info(f"{server.base_url}/token"),
            "private_key": key_info(private_key)["private_key"]}  # another key, same account
    wrong = emulated(google, server, credentials=json.dumps(info)).check()
    elsewhere = emulated(google, server, property_id="999").check()

    assert wrong.credentials_refused and "invalid_grant" in wrong.detail
    assert elsewhere.credentials_refused
    assert "Editor role on GA4 property 999" in elsewhere.detail


def test_past_the_daily_quota_erasures_wait_in_the_ledger_and_never_fail(
    emulator: tuple[GoogleEmulator, SandboxServer], tmp_path: Path,
) -> None:
    google, server = emulator
    # The emulator keeps real time (google-auth signs with it); the ledger and the
    # connector share a clock syncd's side can move to the next quota day.
    clock = FakeClock(datetime.now(UTC))
    connector = emulated(google, server, now=clock)
    keys = SubjectKeys(b"k" * 32, "GB")
    policy = RetryPolicy(budget=1)  # a single counted failure would fail a task
    quota = google.daily_deletion_quota
    ids = [f"client-{n}" for n in range(quota + 3)]
    with Ledger.open(tmp_path / "ledger.sqlite3", clock=clock) as ledger:
        tasks = enqueue(ledger, [Planned("google_analytics", Action(
            "erase", keys.client_id(i), client_id=i), "R3", "erasure") for i in ids])

        report = run_due(ledger, {"google_analytics": connector}, policy, keys, now=clock.now)

        assert report and report.failed == 0
        assert report.counts["google_analytics"] == {"done": quota, "retriable": 3}
        assert len(google.deletions()) == quota
        waiting = [t for t in map(ledger.task, tasks) if t is not None and t.state == "pending"]
        assert len(waiting) == 3
        reset = clock.now + timedelta(seconds=seconds_until_quota_reset(clock.now)
                                      + QUOTA_RESET_MARGIN_SECONDS)
        assert {t.next_attempt_at for t in waiting} == {reset}
        assert {t.last_error for t in waiting} == {"quota_wait:quota_exhausted"}

        # Two more quota days with no quota left at all: still waiting, never failed.
        google.daily_deletion_quota = 0
        for _ in range(2):
            clock.now = min(t.next_attempt_at for t in map(ledger.task, tasks)
                            if t is not None and t.state == "pending")
            report = run_due(ledger, {"google_analytics": connector}, policy, keys,
                             now=clock.now)  # fmt: skip
            assert report.counts["google_analytics"] == {"retriable": 3} and report.failed == 0

        google.daily_deletion_quota = quota * 3  # the emulator's day turns too
        clock.now = min(t.next_attempt_at for t in map(ledger.task, tasks)
                        if t is not None and t.state == "pending")
        report = run_due(ledger, {"google_analytics": connector}, policy, keys, now=clock.now)

        assert report.counts["google_analytics"] == {"done": 3}
        assert ledger.count_tasks_by_state("google_analytics")["done"] == quota + 3
        assert ledger.open_alerts() == []
        assert all(google.was_deleted(i, identifier_type="userId") for i in ids)
