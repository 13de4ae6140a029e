"""Tests for the Google emulator, driven by the real google-auth library over real HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import crypt
from google.auth import jwt as google_jwt
from google.auth.exceptions import RefreshError
from google.auth.transport.requests import AuthorizedSession
from google.oauth2 import service_account

from tests.support import FakeClock
from syncd.sandbox.google import SCOPE_EDIT, SCOPE_READONLY, GoogleEmulator
from syncd.sandbox.http import SandboxServer

PROPERTY = "123456789"
PROPERTY_360 = "360360360"
TIMEOUT_SECONDS = 10
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
START = datetime(2026, 11, 24, 19, 40, 5, tzinfo=UTC)
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TIMEFRAME = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)

Serve = Callable[..., SandboxServer]  # the conftest's ``serve`` fixture
Connect = Callable[..., AuthorizedSession]



@pytest.fixture
def google() -> GoogleEmulator:
    return GoogleEmulator((PROPERTY,), properties_360=(PROPERTY_360,))


@pytest.fixture
def server(serve: Serve, google: GoogleEmulator) -> SandboxServer:
    return serve(google)


@pytest.fixture
def connect(tmp_path: Path, server: SandboxServer, google: GoogleEmulator) -> Iterator[Connect]:
    """Opens an AuthorizedSession from a key file written like an operator would."""
    sessions: list[AuthorizedSession] = []

    def open_session(
        scopes: tuple[str, ...] = (SCOPE_EDIT,), info: dict[str, Any] | None = None
    ) -> AuthorizedSession:
        path = tmp_path / f"key-{len(sessions)}.json"
        path.write_text(json.dumps(info or google.service_account_info(server.base_url + "/token")))
        creds = service_account.Credentials.from_service_account_file(
            str(path), scopes=list(scopes)
        )
        session = AuthorizedSession(creds, refresh_timeout=TIMEOUT_SECONDS)
        sessions.append(session)
        return session

    yield open_session
    for session in sessions:
        session.close()


def url(server: SandboxServer, path: str, version: str = "v1beta") -> str:
    return f"{server.base_url}/{version}/properties/{path}"


def deletion_url(server: SandboxServer, property_id: str = PROPERTY) -> str:
    return url(server, f"{property_id}:submitUserDeletion", "v1alpha")


def retention_url(
    server: SandboxServer, property_id: str = PROPERTY, version: str = "v1beta"
) -> str:
    return url(server, f"{property_id}/dataRetentionSettings", version)


def error_of(response: requests.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def assertion(info: dict[str, Any], lifetime_seconds: int = 3600, **claims: Any) -> str:
    """A JWT like google-auth's, signed with ``info``'s key, with some claims replaced."""
    now = int(time.time())
    payload = {
        "iat": now,
        "exp": now + lifetime_seconds,
        "iss": info["client_email"],
        "aud": GOOGLE_TOKEN_AUDIENCE,
        "scope": SCOPE_EDIT,
        **claims,
    }
    signer = crypt.RSASigner.from_service_account_info(info)
    return google_jwt.encode(signer, payload).decode("ascii")


def grant(**claims: Any) -> Callable[[dict[str, Any]], dict[str, str]]:
    """A token-endpoint form whose assertion has some claims replaced."""
    return lambda info: {"grant_type": JWT_GRANT, "assertion": assertion(info, **claims)}


def other_private_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


# -- token endpoint ------------------------------------------------------------


def test_google_auth_obtains_a_token_that_the_admin_api_accepts(
    connect: Connect, server: SandboxServer
) -> None:
    session = connect()

    response = session.get(retention_url(server), timeout=TIMEOUT_SECONDS)

    assert response.status_code == 200
    assert session.credentials.token
    assert session.credentials.expiry is not None
    lifetime = session.credentials.expiry - datetime.now(UTC).replace(tzinfo=None)
    assert timedelta(minutes=55) < lifetime <= timedelta(hours=1)


def test_a_key_the_sandbox_did_not_issue_is_refused_as_an_invalid_jwt_signature(
    connect: Connect, server: SandboxServer, google: GoogleEmulator
) -> None:
    info = google.service_account_info(server.base_url + "/token")
    info["private_key"] = other_private_key_pem()
    session = connect(info=info)

    with pytest.raises(RefreshError, match="Invalid JWT Signature"):
        session.get(retention_url(server), timeout=TIMEOUT_SECONDS)


def test_an_assertion_outside_a_reasonable_timeframe_is_refused(
    serve: Serve, tmp_path: Path
) -> None:
    # The sandbox's clock runs two hours ahead of google-auth's, as with a skewed host clock.
    google = GoogleEmulator(clock=lambda: datetime.now(UTC) + timedelta(hours=2))
    server = serve(google)
    creds = service_account.Credentials.from_service_account_info(
        google.service_account_info(server.base_url + "/token"), scopes=[SCOPE_EDIT]
    )

    with pytest.raises(RefreshError, match="reasonable timeframe"):
        AuthorizedSession(creds, refresh_timeout=TIMEOUT_SECONDS).get(
            retention_url(server), timeout=TIMEOUT_SECONDS
        )


def test_credentials_without_scopes_are_refused_as_invalid_scope(
    connect: Connect, server: SandboxServer
) -> None:
    session = connect(scopes=())

    with pytest.raises(RefreshError, match="invalid_scope"):
        session.get(retention_url(server), timeout=TIMEOUT_SECONDS)


def test_a_deleted_service_account_gets_no_more_tokens(
    connect: Connect, server: SandboxServer, google: GoogleEmulator
) -> None:
    google.delete_service_account()

    with pytest.raises(RefreshError, match="deleted_client"):
        connect().get(retention_url(server), timeout=TIMEOUT_SECONDS)


@pytest.mark.parametrize(
    ("form", "status", "error", "description"),
    [
        pytest.param(
            lambda info: {"grant_type": "client_credentials"},
            400, "unsupported_grant_type", "Invalid grant_type: client_credentials",
            id="wrong-grant-type",
        ),
        pytest.param(
            lambda info: {"grant_type": JWT_GRANT},
            400, "invalid_request", "Missing required parameter: assertion",
            id="no-assertion",
        ),
        pytest.param(
            lambda info: {"grant_type": JWT_GRANT, "assertion": "not.a.jwt"},
            400, "invalid_grant", "Bad Request",
            id="garbled-assertion",
        ),
        pytest.param(
            grant(iss="someone@else.iam.gserviceaccount.com"),
            400, "invalid_grant", "Invalid grant: account not found",
            id="unknown-issuer",
        ),
        pytest.param(
            grant(aud="http://127.0.0.1/token"),
            400, "invalid_grant", "Invalid JWT: Failed audience check.",
            id="sandbox-audience",
        ),
        pytest.param(
            grant(lifetime_seconds=7200), 400, "invalid_grant", TIMEFRAME, id="two-hour-lifetime"
        ),
    ],
)  # fmt: skip
def test_token_endpoint_refuses_bad_grants_with_googles_flat_error(
    server: SandboxServer,
    google: GoogleEmulator,
    form: Callable[[dict[str, Any]], dict[str, str]],
    status: int,
    error: str,
    description: str,
) -> None:
    info = google.service_account_info(server.base_url + "/token")

    response = requests.post(server.base_url + "/token", data=form(info), timeout=TIMEOUT_SECONDS)

    assert response.status_code == status
    assert response.json() == {"error": error, "error_description": description}


def test_token_endpoint_answers_a_good_grant_with_a_bearer_token(
    server: SandboxServer, google: GoogleEmulator
) -> None:
    info = google.service_account_info(server.base_url + "/token")
    form = {"grant_type": JWT_GRANT, "assertion": assertion(info)}

    response = requests.post(server.base_url + "/token", data=form, timeout=TIMEOUT_SECONDS)

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "expires_in", "token_type"}
    assert (body["expires_in"], body["token_type"]) == (3600, "Bearer")


# -- bearer tokens on the Admin API ----------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer ya29.not-issued-here", "Basic c3luY2Q6c2VjcmV0"],
    ids=["no-header", "unknown-token", "not-bearer"],
)
def test_admin_api_without_a_valid_bearer_token_is_unauthenticated(
    server: SandboxServer, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}

    response = requests.get(retention_url(server), headers=headers, timeout=TIMEOUT_SECONDS)

    assert response.status_code == 401
    assert error_of(response)["status"] == "UNAUTHENTICATED"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_an_expired_token_is_refused_and_google_auth_refreshes_it(
    connect: Connect, server: SandboxServer, google: GoogleEmulator
) -> None:
    session = connect()
    session.get(retention_url(server), timeout=TIMEOUT_SECONDS)
    google.expire_tokens()

    response = session.get(retention_url(server), timeout=TIMEOUT_SECONDS)

    assert response.status_code == 200
    assert google.dump()["tokens"]["issued"] == 2
    routes = server.traffic.summary()["google"]["routes"]
    assert routes["GET /v1beta/properties/{property}/dataRetentionSettings"] == {"200": 2, "401": 1}


def test_a_read_only_token_can_read_retention_but_not_submit_deletions(
    connect: Connect, server: SandboxServer, google: GoogleEmulator
) -> None:
    session = connect(scopes=(SCOPE_READONLY,))

    read = session.get(retention_url(server), timeout=TIMEOUT_SECONDS)
    write = session.post(deletion_url(server), json={"clientId": "1.2"}, timeout=TIMEOUT_SECONDS)

    assert read.status_code == 200
    assert write.status_code == 403
    error = error_of(write)
    assert error["status"] == "PERMISSION_DENIED"
    assert error["message"] == "Request had insufficient authentication scopes."
    assert error["details"][0]["reason"] == "ACCESS_TOKEN_SCOPE_INSUFFICIENT"
    assert google.deletions() == []


# -- submitUserDeletion ----------------------------------------------------------


def test_submit_user_deletion_returns_the_request_time_and_is_recorded_without_the_identifier(
    connect: Connect, server: SandboxServer, google: GoogleEmulator
) -> None:
    before = datetime.now(UTC)

    response = connect().post(
        deletion_url(server), json={"clientId": "1234567890.1700000000"}, timeout=TIMEOUT_SECONDS
    )

    assert response.status_code == 200
    assert set(response.json()) == {"deletionRequestTime"}
    stamp = response.json()["deletionRequestTime"]
    assert stamp.endswith("Z")
    assert before <= datetime.fromisoformat(stamp) <= datetime.now(UTC)
    [record] = google.deletions()
    assert (record["property"], record["identifier_type"]) == (PROPERTY, "clientId")
    assert record["deletion_request_time"] == stamp
    assert google.was_deleted("1234567890.1700000000", identifier_type="clientId")
    assert not google.was_deleted("1234567890.1700000001")
    assert "1234567890.1700000000" not in json.dumps(google.dump())


@pytest.mark.parametrize(
    ("value", "normalized"),
    [
        pytest.param("janedoe@gmail.com", True, id="normalised-email"),
        pytest.param("Jane.Doe@Gmail.com", False, id="raw-email"),
        pytest.param("+447700900123", True, id="e164-phone"),
        pytest.param("07700 900123", False, id="national-phone"),
    ],
)
def test_user_provided_data_is_accepted_and_its_normalisation_recorded(
    connect: Connect, server: SandboxServer, google: GoogleEmulator, value: str, normalized: bool
) -> None:
    response = connect().post(
        deletion_url(server), json={"userProvidedData": value}, timeout=TIMEOUT_SECONDS
    )

    assert response.status_code == 200
    [record] = google.deletions()
    assert record["identifier_type"] == "userProvidedData"
    assert record["normalized"] is normalized


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"userId": ""},
        {"userId": "u-1", "clientId": "1.2"},
        {"user_id": "u-1", "appInstanceId": "abc"},
        {"userId": 42},
        {"email": "jane@example.com"},
    ],
    ids=["none", "empty", "two", "two-snake-and-camel", "not-a-string", "unknown-field"],
)
def test_submit_user_deletion_needs_exactly_one_identifier(
    connect: Connect, server: SandboxServer, google: GoogleEmulator, body: dict[str, Any]
) -> None:
    response = connect().post(deletion_url(server), json=body, timeout=TIMEOUT_SECONDS)

    assert response.status_code == 400
    assert error_of(response)["status"] == "INVALID_ARGUMENT"
    assert google.deletions() == []


def test_submit_user_deletion_accepts_snake_case_field_names(
    connect: Connect, server: SandboxServer, google: GoogleEmulator
) -> None:
    response = connect().post(
        deletion_url(server), json={"user_id": "u-1"}, timeout=TIMEOUT_SECONDS
    )

    assert response.status_code == 200
    assert google.was_deleted("u-1", identifier_type="userId", property_id=PROPERTY)


def test_submit_user_deletion_on_a_property_the_account_cannot_see_is_permission_denied(
    connect: Connect, server: SandboxServer
) -> None:
    response = connect().post(
        deletion_url(server, "999999999"), json={"userId": "u-1"}, timeout=TIMEOUT_SECONDS
    )

    assert response.status_code == 403
    error = error_of(response)
    assert error["status"] == "PERMISSION_DENIED"
    assert error["message"] == "The caller does not have permission"


def test_submit_user_deletion_exists_only_in_v1alpha(
    connect: Connect, server: SandboxServer
) -> None:
    beta_url = url(server, f"{PROPERTY}:submitUserDeletion", "v1beta")

    response = connect().post(beta_url, json={"userId": "u"}, timeout=TIMEOUT_SECONDS)


    assert response.status_code == 404
    assert error_of(response)["status"] == "NOT_FOUND"


def test_deletions_beyond_the_daily_property_quota_are_refused_until_the_next_day(
    serve: Serve,
) -> None:
    clock = FakeClock(START)
    google = GoogleEmulator((PROPERTY,), daily_deletion_quota=2, clock=clock)
    server = serve(google)

    def submit(user_id: str) -> requests.Response:
        headers = {"Authorization": f"Bearer {google.issue_token()}"}
        return requests.post(
            deletion_url(server), json={"userId": user_id}, headers=headers, timeout=TIMEOUT_SECONDS
        )

    statuses = [submit(f"u-{n}").status_code for n in range(2)]
    refused = submit("u-2")
    clock.advance(days=1)
    next_day = submit("u-2")

    assert statuses == [200, 200]
    assert refused.status_code == 403
    error = error_of(refused)
    assert error["status"] == "PERMISSION_DENIED"
    assert [e["reason"] for e in error["errors"]] == ["rateLimitExceeded"]
    assert next_day.status_code == 200
    assert [d["identifier_type"] for d in google.deletions()] == ["userId"] * 3


# -- dataRetentionSettings ----------------------------------------------------------


@pytest.mark.parametrize("version", ["v1beta", "v1alpha"])
def test_retention_settings_are_read_in_both_api_versions(
    connect: Connect, server: SandboxServer, google: GoogleEmulator, version: str
) -> None:
    google.set_retention(PROPERTY, "FOURTEEN_MONTHS", "TWO_MONTHS", reset_on_new_activity=False)

    response = connect().get(retention_url(server, version=version), timeout=TIMEOUT_SECONDS)

    assert response.status_code == 200
    assert response.json() == {
        "name": f"properties/{PROPERTY}/dataRetentionSettings",
        "eventDataRetention": "FOURTEEN_MONTHS",
        "userDataRetention": "TWO_MONTHS",
        "resetUserDataOnNewActivity": False,
    }


@pytest.mark.parametrize(
    ("mask", "body", "expected"),
    [
        pytest.param(
            "event_data_retention",
            {"eventDataRetention": "FOURTEEN_MONTHS", "resetUserDataOnNewActivity": False},
            ("FOURTEEN_MONTHS", "TWO_MONTHS", True),
            id="snake-case-mask-ignores-unmasked-fields",
        ),
        pytest.param(
            "eventDataRetention",
            {"eventDataRetention": "FOURTEEN_MONTHS"},
            ("FOURTEEN_MONTHS", "TWO_MONTHS", True),
            id="camel-case-mask",
        ),
        pytest.param(
            "event_data_retention,reset_user_data_on_new_activity",
            {"eventDataRetention": "FOURTEEN_MONTHS", "resetUserDataOnNewActivity": False},
            ("FOURTEEN_MONTHS", "TWO_MONTHS", False),
            id="two-paths",
        ),
        pytest.param(
            "*",
            {"eventDataRetention": "FOURTEEN_MONTHS", "userDataRetention": "FOURTEEN_MONTHS"},
            ("FOURTEEN_MONTHS", "FOURTEEN_MONTHS", False),
            id="star-replaces-everything",
        ),
        pytest.param(
            "user_data_retention",
            {"userDataRetention": 2},
            ("TWO_MONTHS", "FOURTEEN_MONTHS", True),
            id="enum-by-number",
        ),
    ],
)
def test_patch_updates_only_the_fields_in_the_update_mask(
    connect: Connect,
    server: SandboxServer,
    google: GoogleEmulator,
    mask: str,
    body: dict[str, Any],
    expected: tuple[str, str, bool],
) -> None:
    google.set_retention(PROPERTY, "TWO_MONTHS", "TWO_MONTHS", reset_on_new_activity=True)

    response = connect().patch(
        retention_url(server), params={"updateMask": mask}, json=body, timeout=TIMEOUT_SECONDS
    )

    assert response.status_code == 200, response.text
    event, user, reset = expected
    settings = {
        "name": f"properties/{PROPERTY}/dataRetentionSettings",
        "eventDataRetention": event,
        "userDataRetention": user,
        "resetUserDataOnNewActivity": reset,
    }
    assert response.json() == settings
    assert google.retention(PROPERTY) == settings


def masked(mask: str, **body: Any) -> Any:
    """One PATCH case: the update mask and the body fields."""
    return pytest.param({"updateMask": mask}, body)


@pytest.mark.parametrize(
    ("params", "body"),
    [
        pytest.param({}, {"eventDataRetention": "FOURTEEN_MONTHS"}),
        masked("event_data_retention", eventDataRetention="SIX_MONTHS"),
        masked("event_data_retention", eventDataRetention="TWENTY_SIX_MONTHS"),
        masked("user_data_retention", userDataRetention="FIFTY_MONTHS"),
        masked("event_data_retention", eventDataRetention="RETENTION_DURATION_UNSPECIFIED"),
        masked("*", eventDataRetention="FOURTEEN_MONTHS"),
        masked("data_retention", eventDataRetention="FOURTEEN_MONTHS"),
        masked("reset_user_data_on_new_activity", resetUserDataOnNewActivity="yes"),
        masked("event_data_retention", eventDataRetention="FOURTEEN_MONTHS", color="red"),
    ],
    ids=[
        "missing-mask",
        "unknown-enum",
        "26-months-on-standard-property",
        "user-data-beyond-14-months",
        "unspecified",
        "star-without-user-retention",
        "unknown-mask-path",
        "not-a-bool",
        "unknown-field",
    ],
)
def test_patch_refuses_invalid_updates_and_changes_nothing(
    connect: Connect,
    server: SandboxServer,
    google: GoogleEmulator,
    params: dict[str, str],
    body: dict[str, Any],
) -> None:
    before = google.retention(PROPERTY)

    response = connect().patch(
        retention_url(server), params=params, json=body, timeout=TIMEOUT_SECONDS
    )

    assert response.status_code == 400
    assert error_of(response)["status"] == "INVALID_ARGUMENT"
    assert google.retention(PROPERTY) == before


def test_a_360_property_may_keep_event_data_for_26_months(
    connect: Connect, server: SandboxServer
) -> None:
    response = connect().patch(
        retention_url(server, PROPERTY_360),
        params={"updateMask": "event_data_retention"},
        json={"eventDataRetention": "TWENTY_SIX_MONTHS"},
        timeout=TIMEOUT_SECONDS,
    )

    assert response.status_code == 200
    assert response.json()["eventDataRetention"] == "TWENTY_SIX_MONTHS"


def test_a_read_only_token_cannot_change_retention(
    connect: Connect, server: SandboxServer, google: GoogleEmulator
) -> None:
    before = google.retention(PROPERTY)

    response = connect(scopes=(SCOPE_READONLY,)).patch(
        retention_url(server),
        params={"updateMask": "event_data_retention"},
        json={"eventDataRetention": "FOURTEEN_MONTHS"},
        timeout=TIMEOUT_SECONDS,
    )

    assert response.status_code == 403
    assert google.retention(PROPERTY) == before


# -- injected faults -----------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [("rate_5xx", 503, "UNAVAILABLE"), ("rate_429", 429, "RESOURCE_EXHAUSTED")],
    ids=["5xx", "429"],
)
def test_injected_faults_answer_in_googles_error_envelope(
    server: SandboxServer, google: GoogleEmulator, fault: str, status: int, code: str
) -> None:
    setattr(server.traffic.faults["google"], fault, 1.0)
    headers = {"Authorization": f"Bearer {google.issue_token()}"}

    response = requests.post(
        deletion_url(server), json={"userId": "u-1"}, headers=headers, timeout=TIMEOUT_SECONDS
    )

    assert response.status_code == status
    error = error_of(response)
    assert (error["code"], error["status"]) == (status, code)
    assert error["message"]
    assert google.deletions() == []
