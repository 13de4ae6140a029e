"""The Phorest emulator over real HTTP: envelopes, filters, quirks, errors and staff actions."""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import requests
from requests.auth import HTTPBasicAuth

from tests.support import FakeClock
from syncd.sandbox.http import SandboxServer
from syncd.sandbox.phorest import PhorestEmulator

Serve = Callable[..., SandboxServer]

USER = "global/manager@example.com"
PASSWORD = "s3cret"
BUSINESS = "biz"
PREFIX = f"/third-party-api-server/api/business/{BUSINESS}"
TIMEOUT_SECONDS = 10
START = datetime(2026, 1, 1, 9, 0, 0, tzinfo=UTC)
ISO_MILLIS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")



@dataclass
class Phorest:
    """One running emulator with an authenticated session pointed at it."""

    emulator: PhorestEmulator
    server: SandboxServer
    session: requests.Session
    clock: FakeClock

    @property
    def base(self) -> str:
        return self.server.base_url + PREFIX

    def get(self, path: str, **params: Any) -> requests.Response:
        return self.session.get(self.base + path, params=params, timeout=TIMEOUT_SECONDS)

    def put(self, path: str, body: Any) -> requests.Response:
        return self.session.put(self.base + path, json=body, timeout=TIMEOUT_SECONDS)

    def clients(self, **params: Any) -> list[dict[str, Any]]:
        response = self.get("/client", size=200, **params)
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()["_embedded"]["clients"]
        return rows

    def record(self, client_id: str) -> dict[str, Any]:
        """The emulator's own view of one client, which must exist."""
        client = self.emulator.client(client_id)
        assert client is not None, client_id
        return client

    def names(self, **params: Any) -> list[str]:
        return [f"{c['firstName']} {c['lastName']}" for c in self.clients(**params)]


@pytest.fixture
def phorest(serve: Serve) -> Iterator[Phorest]:
    """An emulator with no rate limit, a fake clock and an authenticated session."""
    clock = FakeClock(START)
    emulator = PhorestEmulator(BUSINESS, USER, PASSWORD, clock=clock, max_requests_per_second=None)
    server = serve(emulator)
    with requests.Session() as session:
        session.auth = (USER, PASSWORD)
        yield Phorest(emulator, server, session, clock)


def add_people(phorest: Phorest) -> dict[str, str]:
    """Five clients created a minute apart; returns name → clientId."""
    people: list[dict[str, Any]] = [
        dict(
            firstName="Jo",
            lastName="Bloggs",
            email="jo@example.com",
            mobile="447700900001",
            externalId="ext-1",
            emailMarketingConsent=True,
        ),
        dict(
            firstName="Joanna", lastName="Smith", email="joanna@example.com", mobile="447700900002"
        ),
        dict(firstName="John", lastName="Jones", email="john@example.com", mobile="447700900003"),
        dict(firstName="Mary", lastName="Johnson", email="mary@example.com", mobile="447700900004"),
        dict(firstName="Bob", lastName="Bobson", email="bob@example.com", mobile="447700900005"),
    ]
    ids = {}
    for person in people:
        phorest.clock.advance(minutes=1)
        created = phorest.emulator.add_client(**person)
        ids[person["firstName"]] = created["clientId"]
    return ids


ALL_FIVE = ["Jo Bloggs", "Joanna Smith", "John Jones", "Mary Johnson", "Bob Bobson"]


# -- Paging -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "size", "total_pages", "last_page_rows"),
    [(40, 20, 2, 20), (45, 20, 3, 5), (7, 10, 1, 7), (0, 20, 0, 0)],
    ids=["exact-multiple", "remainder", "single-page", "empty-table"],
)
def test_client_pages_carry_the_envelope_and_page_counts(
    phorest: Phorest, count: int, size: int, total_pages: int, last_page_rows: int
) -> None:
    for n in range(count):
        phorest.emulator.add_client(firstName="C", lastName=str(n))
    last_page = max(total_pages - 1, 0)
    body = phorest.get("/client", size=size, page=last_page).json()
    assert body["page"] == {
        "size": size,
        "totalElements": count,
        "totalPages": total_pages,
        "number": last_page,
    }
    assert len(body["_embedded"]["clients"]) == last_page_rows


def test_client_list_defaults_to_page_zero_of_twenty(phorest: Phorest) -> None:
    for n in range(25):
        phorest.emulator.add_client(firstName="C", lastName=str(n))
    body = phorest.get("/client").json()
    assert body["page"] == {"size": 20, "totalElements": 25, "totalPages": 2, "number": 0}
    assert len(body["_embedded"]["clients"]) == 20


def test_page_sizes_above_two_hundred_are_clamped_to_two_hundred(phorest: Phorest) -> None:
    for n in range(250):
        phorest.emulator.add_client(firstName="C", lastName=str(n))
    body = phorest.get("/client", size=500).json()
    assert body["page"]["size"] == 200
    assert body["page"]["totalPages"] == 2
    assert len(body["_embedded"]["clients"]) == 200


@pytest.mark.parametrize(
    ("params", "size", "number"),
    [({"size": 0}, 20, 0), ({"size": "ten"}, 20, 0), ({"page": -3}, 20, 0), ({"page": "x"}, 20, 0)],
    ids=["zero-size", "non-numeric-size", "negative-page", "non-numeric-page"],
)
def test_bad_paging_parameters_fall_back_to_the_defaults(
    phorest: Phorest, params: dict[str, Any], size: int, number: int
) -> None:
    add_people(phorest)
    response = phorest.get("/client", **params)
    assert response.status_code == 200
    assert (response.json()["page"]["size"], response.json()["page"]["number"]) == (size, number)


def test_a_page_past_the_end_is_empty_but_keeps_the_envelope(phorest: Phorest) -> None:
    add_people(phorest)
    body = phorest.get("/client", page=5).json()
    assert body == {
        "_embedded": {"clients": []},
        "page": {"size": 20, "totalElements": 5, "totalPages": 1, "number": 5},
    }


def test_empty_pages_can_leave_out_embedded_like_spring_hateoas(serve: Serve) -> None:
    emulator = PhorestEmulator(BUSINESS, USER, PASSWORD, omit_empty_embedded=True)
    server = serve(emulator)
    body = requests.get(
        server.base_url + PREFIX + "/client", auth=(USER, PASSWORD), timeout=TIMEOUT_SECONDS
    ).json()
    assert body == {"page": {"size": 20, "totalElements": 0, "totalPages": 0, "number": 0}}


def test_pages_follow_creation_order_and_edits_do_not_reorder_them(phorest: Phorest) -> None:
    late = phorest.emulator.add_client(
        firstName="Late", lastName="A", createdAt=START + timedelta(days=2)
    )
    phorest.emulator.add_client(
        firstName="Early", lastName="B", createdAt=START - timedelta(days=2)
    )
    phorest.emulator.add_client(
        firstName="Middle", lastName="C", createdAt="2026-01-01T09:00:00.000Z"
    )
    assert phorest.names() == ["Early B", "Middle C", "Late A"]
    phorest.emulator.edit_client(late["clientId"], notes="moved?")
    first, second = (
        phorest.get("/client", size=2).json(),
        phorest.get("/client", size=2, page=1).json(),
    )
    seen = [c["firstName"] for c in first["_embedded"]["clients"] + second["_embedded"]["clients"]]
    assert seen == ["Early", "Middle", "Late"]


# -- Filters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"email": "jo@example.com"}, ["Jo Bloggs"]),
        ({"email": "JO@Example.COM"}, ["Jo Bloggs"]),
        ({"email": "nobody@example.com"}, []),
        ({"phone": "447700900002"}, ["Joanna Smith"]),
        ({"phone": "+447700900002"}, []),
        ({"firstName": "Jo"}, ["Jo Bloggs"]),
        ({"firstName": "~Jo%"}, ["Jo Bloggs", "Joanna Smith", "John Jones"]),
        ({"firstName": "~jo%"}, ["Jo Bloggs", "Joanna Smith", "John Jones"]),
        ({"lastName": "~Jo%"}, ["John Jones", "Mary Johnson"]),
        ({"firstName": "~Jo%", "lastName": "~Jo%"}, ["John Jones"]),
        ({"externalId": "ext-1"}, ["Jo Bloggs"]),
        ({"email": ""}, ALL_FIVE),
    ],
    ids=[
        "email",
        "email-any-case",
        "email-unknown",
        "phone",
        "phone-is-exact",
        "first-name",
        "first-name-prefix",
        "first-name-prefix-any-case",
        "last-name-prefix",
        "both-prefixes",
        "external-id",
        "empty-value-is-no-filter",
    ],
)
def test_client_filters_select_the_matching_clients(
    phorest: Phorest, params: dict[str, str], expected: list[str]
) -> None:
    add_people(phorest)
    assert phorest.names(**params) == expected


def test_updated_after_and_before_are_exclusive_bounds_on_updated_at(phorest: Phorest) -> None:
    add_people(phorest)  # updatedAt = START + 1..5 minutes

    def at(minutes: int) -> str:
        return (START + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    assert phorest.names(updatedAfter=at(3)) == ["Mary Johnson", "Bob Bobson"]
    assert phorest.names(updatedBefore=at(3)) == ["Jo Bloggs", "Joanna Smith"]
    assert phorest.names(updatedAfter=at(1), updatedBefore=at(4)) == ["Joanna Smith", "John Jones"]


@pytest.mark.parametrize(
    "query",
    [
        "updatedAfter=2026-01-01T09:03:00.000Z",
        "updatedAfter=2026-01-01T09:03:00Z",
        "updatedAfter=2026-01-01T09:03:00.000%2B0000",
        "updatedAfter=2026-01-01T09:03:00.000+0000",
        "updatedAfter=2026-01-01T10:03:00.000%2B01:00",
    ],
    ids=["millis-z", "no-millis", "rfc822-offset", "unencoded-plus", "colon-offset"],
)
def test_updated_after_accepts_the_documented_format_and_its_variants(
    phorest: Phorest, query: str
) -> None:
    add_people(phorest)
    response = phorest.session.get(f"{phorest.base}/client?{query}", timeout=TIMEOUT_SECONDS)
    assert [c["firstName"] for c in response.json()["_embedded"]["clients"]] == ["Mary", "Bob"]


@pytest.mark.parametrize(
    "params",
    [{"updatedAfter": "2026-01-01"}, {"updatedBefore": "yesterday"}, {"includeArchived": "maybe"}],
    ids=["date-only", "words", "bad-boolean"],
)
def test_malformed_filter_values_are_refused_with_400(
    phorest: Phorest, params: dict[str, str]
) -> None:
    response = phorest.get("/client", **params)
    assert response.status_code == 400
    assert response.json()["errorCode"] == "BAD_REQUEST"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ["Jo Bloggs", "John Jones", "Bob Bobson"]),
        ({"includeArchived": "true"}, ["Jo Bloggs", "Joanna Smith", "John Jones", "Bob Bobson"]),
        ({"includeDeleted": "true"}, ["Jo Bloggs", "John Jones", "Mary Johnson", "Bob Bobson"]),
        ({"includeArchived": "true", "includeDeleted": "true"}, ALL_FIVE),
        ({"includeArchived": "false"}, ["Jo Bloggs", "John Jones", "Bob Bobson"]),
    ],
    ids=["default", "include-archived", "include-deleted", "include-both", "explicit-false"],
)
def test_archived_and_deleted_clients_are_hidden_unless_asked_for(
    phorest: Phorest, params: dict[str, str], expected: list[str]
) -> None:
    ids = add_people(phorest)
    phorest.emulator.archive(ids["Joanna"])
    phorest.emulator.delete(ids["Mary"])
    assert phorest.names(**params) == expected


@pytest.mark.parametrize(
    "params",
    [
        {"updatedSince": "2030-01-01T00:00:00.000Z"},
        {"updatedAt": "2030-01-01T00:00:00.000Z"},
        {"mobile": "447700900002"},
        {"clientId": "nope"},
        {"first_name": "Jo"},
    ],
    ids=["updatedSince", "updatedAt", "mobile-instead-of-phone", "clientId", "snake-case-name"],
)
def test_unknown_or_misspelt_parameters_are_ignored_and_return_the_whole_table(
    phorest: Phorest, params: dict[str, str]
) -> None:
    add_people(phorest)
    assert phorest.names(**params) == ALL_FIVE


def test_the_list_reflects_changes_made_after_it_was_first_read(phorest: Phorest) -> None:
    ids = add_people(phorest)
    since = (START + timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert phorest.names(updatedAfter=since) == []
    phorest.clock.advance(minutes=20)
    current = phorest.get(f"/client/{ids['John']}").json()
    assert phorest.put(f"/client/{ids['John']}", {**current, "lastName": "Doe"}).status_code == 200
    phorest.emulator.archive(ids["Bob"])
    assert phorest.names(updatedAfter=since) == ["John Doe"]
    assert "Bob Bobson" not in phorest.names()


def expected_names(phorest: Phorest, params: dict[str, str]) -> list[str]:
    """What a list query should return, worked out from the snapshot by hand."""
    rows = phorest.emulator.snapshot_clients()
    if "includeArchived" not in params:
        rows = [c for c in rows if not c["archived"]]
    if "includeDeleted" not in params:
        rows = [c for c in rows if not c["deleted"]]
    if "updatedAfter" in params:
        rows = [c for c in rows if c["updatedAt"] > params["updatedAfter"]]
    if "firstName" in params:
        rows = [
            c for c in rows if c["firstName"].lower().startswith(params["firstName"][1:-1].lower())
        ]
    return [f"{c['firstName']} {c['lastName']}" for c in rows]


def test_cached_results_stay_right_through_interleaved_changes(phorest: Phorest) -> None:
    rng = random.Random(7)
    for n in range(40):
        phorest.emulator.add_client(firstName=rng.choice(["Ann", "Andy", "Bea"]), lastName=str(n))
    queries = [
        {},
        {"includeArchived": "true", "includeDeleted": "true"},
        {"updatedAfter": "2026-01-01T09:00:00.000Z"},
        {"firstName": "~An%", "includeArchived": "true"},
    ]
    for step in range(60):
        for params in queries:  # read first, so every query is cached before the next change
            assert phorest.names(**params) == expected_names(phorest, params), (step, params)
        phorest.clock.advance(seconds=1)
        ids = [c["clientId"] for c in phorest.emulator.snapshot_clients()]
        target = rng.choice(ids)
        action = rng.choice(
            ["rename", "archive", "unarchive", "delete", "forget", "add", "add-early", "merge"]
        )
        if action == "rename":
            phorest.emulator.edit_client(target, firstName=rng.choice(["Ann", "Bea", "Andrea"]))
        elif action in ("archive", "unarchive"):
            phorest.emulator.archive(target, archived=action == "archive")
        elif action == "delete":
            phorest.emulator.delete(target)
        elif action == "forget":
            phorest.emulator.forget(target)
        elif action == "merge":
            with contextlib.suppress(ValueError):
                phorest.emulator.merge(target, rng.choice(ids))
        else:
            created = START - timedelta(days=rng.randint(1, 99)) if action == "add-early" else None
            phorest.emulator.add_client(firstName="Andy", lastName=f"new{step}", createdAt=created)


# -- Auth and unknown things -----------------------------------------------------


@pytest.mark.parametrize(
    "auth_header",
    [
        None,
        "Basic Z2xvYmFsL21hbmFnZXJAZXhhbXBsZS5jb206d3Jvbmc=",  # right user, password "wrong"
        "Basic Z2xvYmFsL290aGVyQGV4YW1wbGUuY29tOnMzY3JldA==",  # global/other@example.com:s3cret
        "Basic bWFuYWdlckBleGFtcGxlLmNvbTpzM2NyZXQ=",  # user without the global/ prefix
        "Bearer s3cret",
        "Basic !!!not-base64!!!",
    ],
    ids=["missing", "wrong-password", "wrong-user", "no-global-prefix", "bearer", "garbage"],
)
def test_requests_without_valid_credentials_get_401_with_a_json_body(
    phorest: Phorest, auth_header: str | None
) -> None:
    headers = {"Authorization": auth_header} if auth_header else {}
    response = requests.get(phorest.base + "/client", headers=headers, timeout=TIMEOUT_SECONDS)
    assert response.status_code == 401
    assert response.json()["errorCode"] == "UNAUTHORIZED"
    assert response.headers["WWW-Authenticate"].startswith("Basic")


def test_credentials_are_decoded_as_utf8_so_a_latin1_password_fails(serve: Serve) -> None:
    password = "pässwörd"
    server = serve(PhorestEmulator(BUSINESS, USER, password, max_requests_per_second=None))
    url = server.base_url + PREFIX + "/client"
    utf8 = requests.get(
        url, auth=HTTPBasicAuth(USER.encode(), password.encode("utf-8")), timeout=TIMEOUT_SECONDS
    )
    latin1 = requests.get(
        url, auth=HTTPBasicAuth(USER.encode(), password.encode("latin-1")), timeout=TIMEOUT_SECONDS
    )
    assert (utf8.status_code, latin1.status_code) == (200, 401)


@pytest.mark.parametrize(
    "path",
    [
        "/third-party-api-server/api/business/other/client",
        "/third-party-api-server/api/business/other/client/abc",
        PREFIX + "/client/no-such-client",
        PREFIX + "/branch/no-such-branch/appointment?from_date=2026-01-01&to_date=2026-01-02",
        PREFIX + "/client/abc/nothing-here",
    ],
    ids=["business-list", "business-client", "client", "branch", "unknown-path"],
)
def test_unknown_businesses_clients_branches_and_paths_answer_404(
    phorest: Phorest, path: str
) -> None:
    response = phorest.session.get(phorest.server.base_url + path, timeout=TIMEOUT_SECONDS)
    assert response.status_code == 404
    assert set(response.json()) == {"errorCode", "message"}


@pytest.mark.parametrize("method", ["DELETE", "PATCH"])
def test_unsupported_methods_answer_500_as_phorest_does(phorest: Phorest, method: str) -> None:
    ids = add_people(phorest)
    response = phorest.session.request(
        method, f"{phorest.base}/client/{ids['Jo']}", timeout=TIMEOUT_SECONDS
    )
    assert response.status_code == 500
    assert response.json()["message"] == "Request method not supported"
    assert phorest.record(ids["Jo"])["deleted"] is False


# -- One client -------------------------------------------------------------------


def test_a_client_carries_the_documented_fields_and_formats(phorest: Phorest) -> None:
    branch = phorest.emulator.add_branch("Main")
    created = phorest.emulator.add_client(
        firstName="Jo",
        lastName="Bloggs",
        email="jo@example.com",
        mobile="447700900123",
        creatingBranchId=branch["branchId"],
        gender="FEMALE",
        birthDate="1990-05-17",
        address={"streetAddress1": "1 High St", "city": "Leeds", "postalCode": "LS1 1AA"},
    )
    phorest.emulator.record_visit(
        created["clientId"], date(2025, 10, 21), branch_id=branch["branchId"]
    )
    client = phorest.get(f"/client/{created['clientId']}").json()
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", client["clientId"])
    assert client["version"] == 2  # created at 1, the visit saved once more
    assert ISO_MILLIS.match(client["createdAt"]) and ISO_MILLIS.match(client["updatedAt"])
    assert (client["lastVisit"], client["firstVisit"]) == ("2025-10-21", "2025-10-21")
    assert client["lastVisitedBranchId"] == branch["branchId"]
    assert client["mobile"] == "447700900123"
    assert client["address"]["city"] == "Leeds" and client["address"]["streetAddress2"] is None
    for flag in (
        "smsMarketingConsent",
        "emailMarketingConsent",
        "smsReminderConsent",
        "emailReminderConsent",
        "archived",
        "banned",
        "deleted",
    ):
        assert client[flag] is False
    assert {
        "mergedToClientId",
        "linkedClientId",
        "externalId",
        "clientSince",
        "notes",
        "landLine",
    } <= set(client)


def test_deleted_archived_and_merged_clients_still_answer_by_id(phorest: Phorest) -> None:
    ids = add_people(phorest)
    phorest.emulator.delete(ids["Jo"])
    phorest.emulator.archive(ids["Joanna"])
    phorest.emulator.merge(ids["John"], ids["Mary"])
    states = [phorest.get(f"/client/{ids[n]}").json() for n in ("Jo", "Joanna", "John")]
    assert [s["deleted"] for s in states] == [True, False, False]
    assert states[1]["archived"] is True
    assert states[2]["mergedToClientId"] == ids["Mary"]


# -- PUT ------------------------------------------------------------------------


def test_put_with_the_current_version_saves_and_bumps_version_and_updated_at(
    phorest: Phorest,
) -> None:
    ids = add_people(phorest)
    before = phorest.get(f"/client/{ids['Jo']}").json()
    phorest.clock.advance(hours=1)
    response = phorest.put(f"/client/{ids['Jo']}", {**before, "emailMarketingConsent": False})
    assert response.status_code == 200
    saved = response.json()
    assert saved["version"] == before["version"] + 1
    assert saved["updatedAt"] == "2026-01-01T10:05:00.000Z"  # five seeded minutes, then an hour
    assert saved["createdAt"] == before["createdAt"]
    assert phorest.get(f"/client/{ids['Jo']}").json() == saved
    assert saved["emailMarketingConsent"] is False


def test_put_ignores_read_only_and_unknown_fields(phorest: Phorest) -> None:
    ids = add_people(phorest)
    before = phorest.get(f"/client/{ids['Jo']}").json()
    body = {
        **before,
        "clientId": "someone-else",
        "createdAt": "2000-01-01T00:00:00.000Z",
        "deleted": True,
        "mergedToClientId": ids["Bob"],
        "lastVisit": "2020-01-01",
        "favouriteColour": "teal",
    }
    saved = phorest.put(f"/client/{ids['Jo']}", body).json()
    assert {
        k: saved[k] for k in ("clientId", "createdAt", "deleted", "mergedToClientId", "lastVisit")
    } == {
        "clientId": ids["Jo"],
        "createdAt": before["createdAt"],
        "deleted": False,
        "mergedToClientId": None,
        "lastVisit": None,
    }
    assert "favouriteColour" not in saved


def test_put_keeps_fields_the_body_leaves_out(phorest: Phorest) -> None:
    ids = add_people(phorest)
    before = phorest.get(f"/client/{ids['Jo']}").json()
    saved = phorest.put(
        f"/client/{ids['Jo']}",
        {"firstName": "Joanne", "lastName": "Bloggs", "version": before["version"]},
    ).json()
    assert saved["firstName"] == "Joanne"
    assert (saved["email"], saved["emailMarketingConsent"]) == ("jo@example.com", True)


@pytest.mark.parametrize(
    "version",
    [0, 2, None, "one", True],
    ids=["stale", "ahead", "missing", "not-a-number", "boolean"],
)
def test_put_with_a_stale_or_missing_version_is_refused_with_409(
    phorest: Phorest, version: Any
) -> None:
    ids = add_people(phorest)
    before = phorest.get(f"/client/{ids['Jo']}").json()
    body = {**before, "email": "new@example.com", "version": version}
    if version is None:
        del body["version"]
    response = phorest.put(f"/client/{ids['Jo']}", body)
    assert response.status_code == 409
    assert response.json()["errorCode"] == "CONFLICT"
    assert phorest.get(f"/client/{ids['Jo']}").json() == before


@pytest.mark.parametrize(
    ("change", "raw"),
    [
        ({"firstName": None}, None),
        ({"lastName": "  "}, None),
        ({"emailMarketingConsent": "yes"}, None),
        ({"gender": "ROBOT"}, None),
        ({"birthDate": "17/05/1990"}, None),
        ({"address": "1 High St"}, None),
        ({}, b'{"firstName": "Jo", '),
        ({}, b'["firstName", "Jo"]'),
    ],
    ids=[
        "no-first-name",
        "blank-last-name",
        "consent-not-boolean",
        "unknown-gender",
        "birth-date-format",
        "address-not-object",
        "malformed-json",
        "json-array",
    ],
)
def test_put_bodies_that_fail_validation_are_refused_with_400(
    phorest: Phorest, change: dict[str, Any], raw: bytes | None
) -> None:
    ids = add_people(phorest)
    before = phorest.get(f"/client/{ids['Jo']}").json()
    body = {k: v for k, v in {**before, **change}.items() if v is not None}
    url = f"{phorest.base}/client/{ids['Jo']}"
    if raw is None:
        response = phorest.session.put(url, json=body, timeout=TIMEOUT_SECONDS)
    else:
        headers = {"Content-Type": "application/json"}
        response = phorest.session.put(url, data=raw, headers=headers, timeout=TIMEOUT_SECONDS)
    assert response.status_code == 400
    assert response.json()["errorCode"] == "BAD_REQUEST"
    assert phorest.get(f"/client/{ids['Jo']}").json() == before


def test_put_on_an_unknown_client_answers_404(phorest: Phorest) -> None:
    response = phorest.put("/client/nobody", {"firstName": "A", "lastName": "B", "version": 1})
    assert response.status_code == 404


def test_a_forgotten_client_cannot_be_put_back_unchanged(phorest: Phorest) -> None:
    ids = add_people(phorest)
    forgotten = phorest.emulator.forget(ids["Jo"])
    assert phorest.put(f"/client/{ids['Jo']}", forgotten).status_code == 400


def test_post_creates_a_client_at_version_one(phorest: Phorest) -> None:
    response = phorest.session.post(
        phorest.base + "/client",
        json={
            "firstName": "New",
            "lastName": "Person",
            "email": "new@example.com",
            "clientId": "ignored",
        },
        timeout=TIMEOUT_SECONDS,
    )
    assert response.status_code == 201
    created = response.json()
    assert (created["version"], created["email"]) == (1, "new@example.com")
    assert created["clientId"] != "ignored"
    assert phorest.get(f"/client/{created['clientId']}").status_code == 200


# -- Branches and appointments --------------------------------------------------------


def test_branches_are_listed_in_the_paged_envelope(phorest: Phorest) -> None:
    main = phorest.emulator.add_branch("Main", branch_id="branch-main")
    phorest.emulator.add_branch("Annex")
    body = phorest.get("/branch").json()
    assert [b["name"] for b in body["_embedded"]["branches"]] == ["Main", "Annex"]
    assert body["_embedded"]["branches"][0]["branchId"] == main["branchId"] == "branch-main"
    assert body["page"] == {"size": 20, "totalElements": 2, "totalPages": 1, "number": 0}


@pytest.fixture
def booked(phorest: Phorest) -> dict[str, str]:
    """A branch with five appointments on 2026-01-10, one of each kind."""
    ids = add_people(phorest)
    branch = phorest.emulator.add_branch("Main", branch_id="main")["branchId"]
    day = date(2026, 1, 10)
    add = phorest.emulator.add_appointment
    add(
        branch,
        appointmentId="paid",
        clientId=ids["Jo"],
        appointmentDate=day,
        state="PAID",
        startTime="09:00:00",
        updatedAt="2026-01-10T09:00:00.000Z",
    )
    add(
        branch,
        appointmentId="booked",
        clientId=ids["John"],
        appointmentDate=day,
        startTime="10:00:00",
        updatedAt="2026-01-11T09:00:00.000Z",
    )
    add(
        branch,
        appointmentId="canceled",
        clientId=ids["Jo"],
        appointmentDate=day,
        activationState="CANCELED",
        startTime="11:00:00",
    )
    add(
        branch,
        appointmentId="deleted",
        clientId=ids["Jo"],
        appointmentDate=day,
        deleted=True,
        startTime="12:00:00",
    )
    add(branch, appointmentId="outside", clientId=ids["Jo"], appointmentDate=date(2026, 3, 1))
    return {"branch": branch, **ids}


@pytest.mark.parametrize(
    ("to_date", "status"),
    [("2026-02-01", 200), ("2026-02-02", 400)],
    ids=["31-days-ok", "32-days-refused"],
)
def test_the_appointment_window_is_capped_at_31_days(
    phorest: Phorest, booked: dict[str, str], to_date: str, status: int
) -> None:
    response = phorest.get(
        f"/branch/{booked['branch']}/appointment", from_date="2026-01-01", to_date=to_date
    )
    assert response.status_code == status
    if status == 400:
        assert response.json()["message"] == "Max date range allowed is 31 days"


@pytest.mark.parametrize(
    "params",
    [
        {"to_date": "2026-01-31"},
        {"from_date": "2026-01-01"},
        {"from_date": "01/01/2026", "to_date": "2026-01-31"},
        {"from_date": "2026-01-31", "to_date": "2026-01-01"},
    ],
    ids=["no-from-date", "no-to-date", "bad-format", "reversed"],
)
def test_appointment_dates_are_required_and_well_formed(
    phorest: Phorest, booked: dict[str, str], params: dict[str, str]
) -> None:
    response = phorest.get(f"/branch/{booked['branch']}/appointment", **params)
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ["paid", "booked"]),
        ({"fetch_canceled": "true"}, ["paid", "booked", "canceled"]),
        ({"fetch_deleted": "true"}, ["paid", "booked", "deleted"]),
        ({"client_id": "John"}, ["booked"]),
        ({"clientId": "John"}, ["paid", "booked"]),
        ({"updated_from": "2026-01-11T00:00:00.000Z"}, ["booked"]),
        ({"updated_to": "2026-01-10T09:00:00.000Z"}, ["paid"]),
    ],
    ids=[
        "default",
        "fetch-canceled",
        "fetch-deleted",
        "client-id",
        "misspelt-client-id-ignored",
        "updated-from",
        "updated-to-inclusive",
    ],
)
def test_appointment_filters_select_the_matching_rows(
    phorest: Phorest, booked: dict[str, str], params: dict[str, str], expected: list[str]
) -> None:
    params = {k: booked.get(v, v) for k, v in params.items()}
    response = phorest.get(
        f"/branch/{booked['branch']}/appointment",
        from_date="2026-01-01",
        to_date="2026-01-31",
        **params,
    )
    assert [a["appointmentId"] for a in response.json()["_embedded"]["appointments"]] == expected


def test_appointment_rows_carry_the_documented_fields(
    phorest: Phorest, booked: dict[str, str]
) -> None:
    body = phorest.get(
        f"/branch/{booked['branch']}/appointment", from_date="2026-01-10", to_date="2026-01-10"
    ).json()
    row = body["_embedded"]["appointments"][0]
    assert {
        k: row[k]
        for k in (
            "appointmentId",
            "appointmentDate",
            "startTime",
            "clientId",
            "state",
            "activationState",
            "deleted",
            "branchId",
            "version",
        )
    } == {
        "appointmentId": "paid",
        "appointmentDate": "2026-01-10",
        "startTime": "09:00:00",
        "clientId": booked["Jo"],
        "state": "PAID",
        "activationState": "ACTIVE",
        "deleted": False,
        "branchId": "main",
        "version": 1,
    }
    assert ISO_MILLIS.match(row["createdAt"]) and ISO_MILLIS.match(row["updatedAt"])
    assert body["page"] == {"size": 20, "totalElements": 2, "totalPages": 1, "number": 0}


def test_appointment_pages_are_capped_at_100(phorest: Phorest) -> None:
    branch = phorest.emulator.add_branch("Main")["branchId"]
    for n in range(130):
        phorest.emulator.add_appointment(branch, appointmentDate=date(2026, 1, 1 + n % 28))
    body = phorest.get(
        f"/branch/{branch}/appointment", from_date="2026-01-01", to_date="2026-01-31", size=500
    ).json()
    assert body["page"] == {"size": 100, "totalElements": 130, "totalPages": 2, "number": 0}
    assert len(body["_embedded"]["appointments"]) == 100


# -- Staff actions -----------------------------------------------------------------------


def test_forget_blanks_personal_fields_and_shows_up_as_an_update(phorest: Phorest) -> None:
    ids = add_people(phorest)
    phorest.emulator.edit_client(
        ids["Jo"],
        landLine="441130000000",
        birthDate=date(1990, 5, 17),
        address={"city": "Leeds"},
        notes="allergic to latex",
        smsMarketingConsent=True,
    )
    phorest.emulator.record_visit(ids["Jo"], date(2024, 3, 1))
    before = phorest.record(ids["Jo"])
    phorest.clock.advance(days=1)
    phorest.emulator.forget(ids["Jo"])
    after = phorest.get(f"/client/{ids['Jo']}").json()
    for name in (
        "email",
        "mobile",
        "landLine",
        "birthDate",
        "address",
        "notes",
        "externalId",
        "gender",
    ):
        assert after[name] is None, name
    assert (after["firstName"], after["lastName"]) == ("Anonymous", "")
    assert not any(
        after[f]
        for f in (
            "smsMarketingConsent",
            "emailMarketingConsent",
            "smsReminderConsent",
            "emailReminderConsent",
        )
    )
    assert after["deleted"] is False
    assert (after["clientId"], after["createdAt"], after["lastVisit"]) == (
        before["clientId"],
        before["createdAt"],
        "2024-03-01",
    )
    assert after["version"] == before["version"] + 1
    assert after["updatedAt"] > before["updatedAt"]
    assert phorest.names(updatedAfter=before["updatedAt"]) == ["Anonymous "]
    assert phorest.emulator.forget(ids["Jo"]) == after  # forgetting again changes nothing


def test_merge_sets_merged_to_client_id_and_cannot_be_repeated(phorest: Phorest) -> None:
    ids = add_people(phorest)
    target_before = phorest.record(ids["Mary"])
    merged = phorest.emulator.merge(ids["John"], ids["Mary"])
    assert merged["mergedToClientId"] == ids["Mary"]
    assert phorest.record(ids["Mary"])["version"] == target_before["version"] + 1
    assert "John Jones" in phorest.names()  # still listed, not deleted
    with pytest.raises(ValueError):
        phorest.emulator.merge(ids["John"], ids["Bob"])
    with pytest.raises(ValueError):
        phorest.emulator.merge(ids["Bob"], ids["Bob"])


def test_record_visit_moves_last_visit_forward_and_first_visit_back(phorest: Phorest) -> None:
    ids = add_people(phorest)
    phorest.emulator.record_visit(ids["Jo"], date(2025, 6, 1))
    phorest.emulator.record_visit(ids["Jo"], date(2025, 9, 1))
    visited = phorest.emulator.record_visit(ids["Jo"], date(2024, 1, 1))
    assert (visited["firstVisit"], visited["lastVisit"]) == ("2024-01-01", "2025-09-01")
    assert visited["version"] == 4


@pytest.mark.parametrize(
    "changes",
    [
        {"deleted": True},
        {"version": 9},
        {"favouriteColour": "teal"},
        {"emailMarketingConsent": "no"},
        {"firstName": ""},
    ],
    ids=["deleted", "version", "unknown", "wrong-type", "blank-name"],
)
def test_edit_client_refuses_unknown_read_only_or_bad_fields(
    phorest: Phorest, changes: dict[str, Any]
) -> None:
    ids = add_people(phorest)
    with pytest.raises(ValueError):
        phorest.emulator.edit_client(ids["Jo"], **changes)


@pytest.mark.parametrize("action", ["edit_client", "forget", "archive", "delete", "record_visit"])
def test_staff_actions_on_an_unknown_client_raise_key_error(phorest: Phorest, action: str) -> None:
    args: tuple[Any, ...] = (
        ("nobody", date(2026, 1, 1)) if action == "record_visit" else ("nobody",)
    )
    with pytest.raises(KeyError):
        getattr(phorest.emulator, action)(*args)


def test_generated_ids_are_deterministic_per_business(phorest: Phorest) -> None:
    twin = PhorestEmulator(BUSINESS, USER, PASSWORD, clock=phorest.clock)
    first = [phorest.emulator.add_client()["clientId"] for _ in range(3)]
    assert [twin.add_client()["clientId"] for _ in range(3)] == first
    assert len(set(first)) == 3


def test_dump_counts_clients_by_state_and_snapshot_lists_them_all(phorest: Phorest) -> None:
    ids = add_people(phorest)
    phorest.emulator.archive(ids["Joanna"])
    phorest.emulator.delete(ids["John"])
    phorest.emulator.merge(ids["Mary"], ids["Bob"])
    phorest.emulator.forget(ids["Bob"])
    summary = phorest.emulator.dump()
    assert {
        k: summary[k]
        for k in (
            "clients",
            "email_marketing_consent",
            "archived",
            "deleted",
            "merged",
            "forgotten",
        )
    } == {
        "clients": 5,
        "email_marketing_consent": 1,
        "archived": 1,
        "deleted": 1,
        "merged": 1,
        "forgotten": 1,
    }
    assert phorest.emulator.clients_count() == 5
    assert [c["clientId"] for c in phorest.emulator.snapshot_clients()] == list(ids.values())


# -- Faults, counting, rate limit --------------------------------------------------------


def test_an_injected_5xx_uses_the_phorest_error_shape(phorest: Phorest) -> None:
    phorest.server.traffic.faults["phorest"].rate_5xx = 1.0
    response = phorest.get("/client")
    assert response.status_code == 503
    assert response.json() == {"errorCode": "SERVICE_UNAVAILABLE", "message": "Service unavailable"}


def test_requests_are_counted_by_route_and_status(phorest: Phorest) -> None:
    ids = add_people(phorest)
    phorest.get("/client")
    phorest.get("/client")
    phorest.get(f"/client/{ids['Jo']}")
    phorest.get("/client/nobody")
    requests.get(phorest.base + "/client", timeout=TIMEOUT_SECONDS)
    summary = phorest.server.traffic.summary()["phorest"]
    assert summary["total"] == 5
    assert summary["routes"][f"GET {PREFIX.replace(BUSINESS, '{business_id}')}/client"] == {
        "200": 2,
        "401": 1,
    }
    assert summary["routes"][
        f"GET {PREFIX.replace(BUSINESS, '{business_id}')}/client/{{client_id}}"
    ] == {
        "200": 1,
        "404": 1,
    }


def test_the_rate_limit_answers_429_until_the_bucket_refills(serve: Serve) -> None:
    now = [0.0]
    emulator = PhorestEmulator(
        BUSINESS, USER, PASSWORD, max_requests_per_second=3, monotonic=lambda: now[0]
    )
    server = serve(emulator)
    url = server.base_url + PREFIX + "/client"

    def status() -> int:
        return requests.get(url, auth=(USER, PASSWORD), timeout=TIMEOUT_SECONDS).status_code

    assert [status() for _ in range(4)] == [200, 200, 200, 429]
    now[0] += 0.34  # one token back
    assert [status(), status()] == [200, 429]
    response = requests.get(url, auth=(USER, PASSWORD), timeout=TIMEOUT_SECONDS)
    assert response.json()["errorCode"] == "TOO_MANY_REQUESTS"
    assert "Retry-After" not in response.headers


# -- Scale ---------------------------------------------------------------------------------


def test_paging_through_100000_clients_sees_each_exactly_once(serve: Serve) -> None:
    clock = FakeClock(START)
    emulator = PhorestEmulator(BUSINESS, USER, PASSWORD, clock=clock, max_requests_per_second=None)
    for n in range(100_000):
        emulator.add_client(
            firstName="Client",
            lastName=str(n),
            email=f"c{n}@example.com",
            mobile=f"4477009{n:05d}",
            createdAt=START + timedelta(seconds=n),
        )
    server = serve(emulator)
    seen: list[str] = []
    with requests.Session() as session:
        session.auth = (USER, PASSWORD)
        page, total_pages = 0, 1
        while page < total_pages:
            body = session.get(
                server.base_url + PREFIX + "/client",
                params={"size": 200, "page": page},
                timeout=TIMEOUT_SECONDS,
            ).json()
            assert body["page"]["totalElements"] == 100_000
            total_pages = body["page"]["totalPages"]
            seen += [c["clientId"] for c in body["_embedded"]["clients"]]
            page += 1
    assert total_pages == 500
    assert len(seen) == len(set(seen)) == 100_000
    assert seen == [c["clientId"] for c in emulator.snapshot_clients()]
