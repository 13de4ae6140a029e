"""Tests for connectors.mailchimp, faked at the wire with ``responses`` (STYLE item 14).

The real ``mailchimp-marketing`` SDK makes every request, so each SDK quirk (reference A1)
is met as it is on the wire: problem+json errors, empty-bodied answers, network errors.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

import connectors
from connectors.base import Action, MemberRecord
from connectors.mailchimp import MailchimpConnector
from syncd.config import MailchimpSettings
from syncd.errors import ConnectorError, PermanentError, RetriableError
from syncd.retry import RetryPolicy

KEY = "0123456789abcdef0123456789abcdef-us6"
LIST_ID = "a1b2c3d4e5"
ROOT = "https://us6.api.mailchimp.com/3.0"
LIST_URL = f"{ROOT}/lists/{LIST_ID}"
MEMBERS_URL = f"{LIST_URL}/members"
PROBLEM_JSON = "application/problem+json; charset=utf-8"
REQUEST_ID = "e534b8ca-c438-4ddb-acbb-fb0d87c6da7c"

SEEDED_EMAIL = "Zelda.Quimby@example.org"
SEEDED_FIRST_NAME = "Zelda"
SEEDED_LAST_NAME = "Quimby"
SEEDED = (SEEDED_EMAIL, SEEDED_EMAIL.lower(), SEEDED_FIRST_NAME, SEEDED_LAST_NAME)
NEW_EMAIL = "zelda.new@example.org"


def md5(email: str) -> str:
    return hashlib.md5(email.strip().lower().encode()).hexdigest()  # noqa: S324


MEMBER_URL = f"{MEMBERS_URL}/{md5(SEEDED_EMAIL)}"
ERASE_URL = f"{MEMBER_URL}/actions/delete-permanent"


def make_connector(
    *, attempts: int = 3, sleeps: list[float] | None = None, **settings: Any
) -> MailchimpConnector:
    values: dict[str, Any] = {"api_key": KEY, "list_id": LIST_ID, "timeout_seconds": 7}
    values.update(settings)
    sink = sleeps if sleeps is not None else []
    return MailchimpConnector(
        MailchimpSettings(**values), retry=RetryPolicy(attempts=attempts), sleep=sink.append
    )


def problem(status: int, title: str, detail: str = "", **extra: Any) -> dict[str, Any]:
    """A Mailchimp error as ``responses`` kwargs: problem+json, so the SDK keeps a string."""
    body = {
        "type": "https://mailchimp.com/developer/marketing/docs/errors/",
        "title": title,
        "status": status,
        "detail": detail or f"{SEEDED_EMAIL} could not be processed.",
        "instance": REQUEST_ID,
        **extra,
    }
    return {"status": status, "body": json.dumps(body), "content_type": PROBLEM_JSON}


def member_json(email: str = SEEDED_EMAIL, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "email_address": email,
        "status": "subscribed",
        "merge_fields": {"FNAME": SEEDED_FIRST_NAME, "LNAME": SEEDED_LAST_NAME, "PHONE": ""},
        "last_changed": "2026-01-02T03:04:05+00:00",
    }
    body.update(overrides)
    return body


def page(members: list[dict[str, Any]], total: int | None = None) -> dict[str, Any]:
    return {"members": members, "total_items": len(members) if total is None else total}


def action(kind: str, email: str | None = SEEDED_EMAIL, **fields: Any) -> Action:
    return Action(kind=kind, subject_key="k" * 64, email=email, **fields)  # type: ignore[arg-type]


def subscribe(email: str = SEEDED_EMAIL) -> Action:
    return action("subscribe", email, first_name=SEEDED_FIRST_NAME, last_name=SEEDED_LAST_NAME)


def query(call: Any) -> dict[str, list[str]]:
    return parse_qs(urlsplit(call.request.url).query)


def body_of(call: Any) -> Any:
    return json.loads(call.request.body)




# -- Classification: one table per way of failing ------------------------------------------

EMPTY_429 = {"status": 429, "body": ""}


@pytest.mark.parametrize(
    ("answer", "expectation", "status", "title", "request_id", "reached_server"),
    [
        pytest.param(
            {"json": page([member_json()])}, nullcontext(), None, None, None, None, id="200"
        ),
        pytest.param(
            problem(400, "Invalid Resource"),
            pytest.raises(PermanentError), 400, "Invalid Resource", REQUEST_ID, True,
            id="problem+json-string-text",
        ),
        pytest.param(
            {"status": 400, "json": {"title": "Invalid Resource", "instance": REQUEST_ID}},
            pytest.raises(PermanentError), 400, "Invalid Resource", REQUEST_ID, True,
            id="application/json-dict-text",
        ),
        pytest.param(
            problem(401, "API Key Invalid"),
            pytest.raises(PermanentError), 401, "API Key Invalid", REQUEST_ID, True, id="401",
        ),
        pytest.param(
            problem(404, "Resource Not Found"),
            pytest.raises(PermanentError), 404, "Resource Not Found", REQUEST_ID, True, id="404",
        ),
        pytest.param(
            problem(405, "Method Not Allowed"),
            pytest.raises(PermanentError), 405, "Method Not Allowed", REQUEST_ID, True, id="405",
        ),
        pytest.param(
            EMPTY_429, pytest.raises(RetriableError), 429, None, None, True,
            id="empty-429-returned-as-response",
        ),
        pytest.param(
            {"status": 429, "body": "", "headers": {"Retry-After": "7", "X-Request-Id": "r-9"}},
            pytest.raises(RetriableError), 429, None, "r-9", True,
            id="empty-429-with-headers",
        ),
        pytest.param(
            problem(500, "Internal Server Error"),
            pytest.raises(RetriableError), 500, "Internal Server Error", REQUEST_ID, True,
            id="500",
        ),
        pytest.param(
            problem(503, "Service Unavailable"),
            pytest.raises(RetriableError), 503, "Service Unavailable", REQUEST_ID, True,
            id="503",
        ),
        pytest.param(
            problem(503, "ComplianceRelated"),
            pytest.raises(PermanentError), 503, "ComplianceRelated", REQUEST_ID, True,
            id="503-compliance-related-is-permanent",
        ),
        pytest.param(
            {"status": 502, "body": "<html>bad gateway</html>", "content_type": "text/html"},
            pytest.raises(RetriableError), 502, None, None, True, id="502-html",
        ),
        pytest.param(
            {"body": requests.ConnectionError("refused")},
            pytest.raises(RetriableError), None, "connection_failed", None, False,
            id="connection-refused",
        ),
        pytest.param(
            {"body": requests.ConnectTimeout("connect")},
            pytest.raises(RetriableError), None, "timeout", None, False, id="connect-timeout",
        ),
        pytest.param(
            {"body": requests.ReadTimeout("read")},
            pytest.raises(RetriableError), None, "timeout", None, None, id="read-timeout",
        ),
    ],
)
def test_every_answer_is_classified_in_one_place(
    wire: responses.RequestsMock,
    answer: dict[str, Any],
    expectation: AbstractContextManager[Any],
    status: int | None,
    title: str | None,
    request_id: str | None,
    reached_server: bool | None,
) -> None:
    wire.add(responses.GET, MEMBERS_URL, **answer)
    with expectation as caught:
        list(make_connector(attempts=1).scan())
    if caught is not None:
        error = caught.value
        assert (error.status, error.title, error.request_id, error.reached_server) == (
            status, title, request_id, reached_server
        )
        assert SEEDED_EMAIL not in str(error) and "could not be processed" not in str(error)


def test_a_retry_after_header_on_a_bare_429_is_kept() -> None:
    with responses.RequestsMock() as wire:
        wire.add(responses.GET, MEMBERS_URL, status=429, body="", headers={"Retry-After": "7"})
        with pytest.raises(RetriableError) as caught:
            list(make_connector(attempts=1).scan())
    assert caught.value.retry_after_seconds == 7.0


def test_a_body_the_sdk_cannot_send_is_permanent_and_names_no_address(
    wire: responses.RequestsMock,
) -> None:
    # The SDK json.dumps the body itself (A1.12); a bug of ours must not look like an outage.
    bad = action("clear_extra_fields", fields=(object(),))  # type: ignore[arg-type]
    [outcome] = make_connector().apply([bad])
    assert (outcome.status, outcome.reason, len(wire.calls)) == ("permanent", "request_failed", 0)


ERASE_OK = [(responses.POST, ERASE_URL, {"status": 204, "body": ""})]
LIST_OK = (responses.GET, LIST_URL, {"json": {"id": LIST_ID}})
LIST_GONE = (responses.GET, LIST_URL, problem(404, "Resource Not Found"))


@pytest.mark.parametrize(
    ("todo", "answers", "status", "reason"),
    [
        pytest.param(action("erase"), ERASE_OK, "done", None, id="erase-204"),
        pytest.param(
            action("erase"),
            [(responses.POST, ERASE_URL, problem(404, "Resource Not Found")), LIST_OK],
            "done", "absent", id="erase-404-absent",
        ),
        pytest.param(
            action("erase"),
            [(responses.POST, ERASE_URL, problem(404, "Resource Not Found")), LIST_GONE],
            "permanent", "list_not_found", id="erase-404-but-the-list-is-gone",
        ),
        pytest.param(
            action("erase"),
            [(responses.POST, ERASE_URL, problem(405, "Method Not Allowed"))],
            "permanent", "cannot_delete", id="erase-405",
        ),
        pytest.param(
            subscribe(),
            [(responses.PUT, MEMBER_URL, problem(400, "Member In Compliance State"))],
            "needs_person", "needs_client_resubscribe", id="subscribe-compliance-state",
        ),
        pytest.param(
            subscribe(),
            [(responses.PUT, MEMBER_URL, problem(400, "Forgotten Email Not Subscribed"))],
            "permanent", "forgotten_email", id="subscribe-forgotten",
        ),
        pytest.param(
            action("unsubscribe"),
            [(responses.PATCH, MEMBER_URL, problem(400, "Forgotten Email Not Subscribed"))],
            "done", "forgotten", id="unsubscribe-forgotten",
        ),
        pytest.param(
            action("unsubscribe"),
            [(responses.PATCH, MEMBER_URL, problem(404, "Resource Not Found")), LIST_OK],
            "done", "absent", id="unsubscribe-404-absent",
        ),
        pytest.param(
            action("move_email", new_email=NEW_EMAIL),
            [(responses.PATCH, MEMBER_URL, problem(400, "Member Exists"))],
            "permanent", "email_taken", id="move-to-a-taken-address",
        ),
        pytest.param(
            action("update_names"),
            [(responses.PATCH, MEMBER_URL, problem(401, "API Key Invalid"))],
            "permanent", "api_key_invalid", id="401",
        ),
        pytest.param(
            action("unsubscribe"),
            [(responses.PATCH, MEMBER_URL, problem(503, "Service Unavailable"))],
            "retriable", "service_unavailable", id="503",
        ),
        pytest.param(
            action("unsubscribe"),
            [(responses.PATCH, MEMBER_URL, EMPTY_429)],
            "retriable", "unavailable", id="empty-429",
        ),
        pytest.param(
            action("clear_extra_fields", fields=("PHONE",)),
            [(responses.PATCH, MEMBER_URL, problem(503, "ComplianceRelated"))],
            "permanent", "compliancerelated", id="503-compliance-related",
        ),
        pytest.param(action("withdraw_consent"), [], "permanent", "unsupported_action",
                     id="not-a-mailchimp-action"),
        pytest.param(action("erase", email=None), [], "permanent", "missing_email",
                     id="no-address"),
    ],
)
def test_refusals_become_outcomes_by_problem_title_and_kind(
    wire: responses.RequestsMock,
    todo: Action,
    answers: list[tuple[str, str, dict[str, Any]]],
    status: str,
    reason: str | None,
) -> None:
    for method, url, answer in answers:
        wire.add(method, url, **answer)
    [outcome] = make_connector().apply([todo])
    assert (outcome.action, outcome.status, outcome.reason) == (todo, status, reason)


def test_a_refusal_carries_the_problem_instance_as_request_id(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.PUT, MEMBER_URL, **problem(400, "Member In Compliance State"))
    [outcome] = make_connector().apply([subscribe()])
    assert outcome.request_id == REQUEST_ID


# -- Retries ------------------------------------------------------------------------------


def test_503_503_200_gives_one_done_outcome_after_three_calls(
    script: responses.RequestsMock,
) -> None:
    for answer in (problem(503, "Service Unavailable"), problem(503, "Service Unavailable")):
        script.add(responses.PATCH, MEMBER_URL, **answer)
    script.add(responses.PATCH, MEMBER_URL, json=member_json(status="unsubscribed"))
    sleeps: list[float] = []
    outcomes = make_connector(sleeps=sleeps).apply([action("unsubscribe")])
    assert [(o.status, o.reason) for o in outcomes] == [("done", None)]
    assert len(script.calls) == 3 and len(sleeps) == 2


def test_retries_spent_give_a_retriable_outcome(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, ERASE_URL, **EMPTY_429)
    [outcome] = make_connector(attempts=3).apply([action("erase")])
    assert (outcome.status, len(wire.calls)) == ("retriable", 3)


def test_a_move_that_may_have_landed_is_not_replayed(wire: responses.RequestsMock) -> None:
    wire.add(responses.PATCH, MEMBER_URL, body=requests.ReadTimeout("read"))
    [outcome] = make_connector().apply([action("move_email", new_email=NEW_EMAIL)])
    assert (outcome.status, outcome.reason, len(wire.calls)) == ("retriable", "timeout", 1)


def test_a_move_that_never_left_is_replayed(script: responses.RequestsMock) -> None:
    script.add(responses.PATCH, MEMBER_URL, body=requests.ConnectionError("refused"))
    script.add(responses.PATCH, MEMBER_URL, json=member_json(NEW_EMAIL))
    [outcome] = make_connector().apply([action("move_email", new_email=NEW_EMAIL)])
    assert (outcome.status, len(script.calls)) == ("done", 2)
    assert body_of(script.calls[1]) == {"email_address": NEW_EMAIL}


# -- Reading: scan and changes ----------------------------------------------------------------

FIELDS = (
    "members.email_address,members.status,members.merge_fields,members.last_changed,total_items"
)


def test_scan_pages_by_1000_with_fields_sent_as_one_comma_joined_list(
    wire: responses.RequestsMock,
) -> None:
    first = [member_json(f"p{n}@example.com") for n in range(1000)]
    second = [member_json(f"q{n}@example.com") for n in range(200)]
    wire.add(responses.GET, MEMBERS_URL, json=page(first, total=1200))
    wire.add(responses.GET, MEMBERS_URL, json=page(second, total=1200))
    records = list(make_connector().scan())
    assert len(records) == 1200 and records[-1].email == "q199@example.com"
    sent = [query(call) for call in wire.calls]
    assert [q["offset"] for q in sent] == [["0"], ["1000"]]
    assert all(q["count"] == ["1000"] and q["fields"] == [FIELDS] for q in sent)
    assert all("status" not in q and "since_last_changed" not in q for q in sent)


def test_scan_stops_at_total_items_without_asking_for_an_empty_page(
    wire: responses.RequestsMock,
) -> None:
    members = [member_json(f"p{n}@example.com") for n in range(1000)]
    wire.add(responses.GET, MEMBERS_URL, json=page(members, total=1000))
    assert len(list(make_connector().scan())) == 1000 and len(wire.calls) == 1


def test_scan_names_only_non_blank_merge_fields_beyond_the_name(
    wire: responses.RequestsMock,
) -> None:
    blank_address = {"addr1": "", "city": " ", "zip": ""}
    merges = {
        "FNAME": SEEDED_FIRST_NAME,
        "LNAME": "",
        "PHONE": "  ",
        "ADDRESS": {"addr1": "1 High St", "city": "Cork"},
        "BIRTHDAY": "04/01",
        "USERID": 10,
        "JOINED_AT": "",
        "OLD_ADDRESS": blank_address,
    }
    wire.add(responses.GET, MEMBERS_URL, json=page([member_json(merge_fields=merges)]))
    [record] = make_connector().scan()
    assert record == MemberRecord(
        email=SEEDED_EMAIL,
        status="subscribed",
        first_name=SEEDED_FIRST_NAME,
        last_name="",
        extra_fields=("ADDRESS", "BIRTHDAY", "USERID"),
        last_changed=record.last_changed,
    )
    assert record.last_changed is not None and record.last_changed.isoformat() == (
        "2026-01-02T03:04:05+00:00"
    )


def test_a_page_that_is_not_a_collection_is_permanent(wire: responses.RequestsMock) -> None:
    wire.add(responses.GET, MEMBERS_URL, json={"total_items": 3})
    with pytest.raises(PermanentError, match="not a member collection"):
        list(make_connector().scan())


def test_changes_sends_since_last_changed_with_an_overlap_and_returns_the_newest_time(
    wire: responses.RequestsMock,
) -> None:
    rows = [
        member_json("a@example.com", last_changed="2026-01-02T03:10:00+00:00"),
        member_json("b@example.com", last_changed="2026-01-02T04:00:00+01:00"),  # 03:00 UTC
    ]
    wire.add(responses.GET, MEMBERS_URL, json=page(rows))
    changes = make_connector().changes("2026-01-02T03:04:05+00:00")
    assert query(wire.calls[0])["since_last_changed"] == ["2026-01-02T03:02:05+00:00"]
    assert (len(changes.records), changes.cursor, changes.full) == (
        2, "2026-01-02T03:10:00+00:00", False
    )


def test_changes_with_nothing_new_keeps_the_cursor(wire: responses.RequestsMock) -> None:
    wire.add(responses.GET, MEMBERS_URL, json=page([]))
    changes = make_connector().changes("2026-01-02T03:04:05+00:00")
    assert (changes.records, changes.cursor) == ((), "2026-01-02T03:04:05+00:00")


@pytest.mark.parametrize("cursor", [None, "", "yesterday"], ids=["none", "empty", "garbage"])
def test_changes_without_a_usable_cursor_is_a_full_scan(
    wire: responses.RequestsMock, cursor: str | None
) -> None:
    wire.add(responses.GET, MEMBERS_URL, json=page([member_json()]))
    changes = make_connector().changes(cursor)
    assert (changes.full, changes.cursor) == (True, "2026-01-02T03:04:05+00:00")
    assert "since_last_changed" not in query(wire.calls[0])


# -- Writing ------------------------------------------------------------------------------


def test_1200_subscribes_go_as_three_batches_of_at_most_500_never_pending(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.POST, LIST_URL, json={"new_members": [], "errors": [], "error_count": 0})
    todo = [subscribe(f"p{n}@example.com") for n in range(1200)]
    outcomes = make_connector().apply(todo)
    assert [o.action for o in outcomes] == todo
    assert {o.status for o in outcomes} == {"done"}
    bodies = [body_of(call) for call in wire.calls]
    assert sorted(len(b["members"]) for b in bodies) == [200, 500, 500]
    assert all(b["update_existing"] is True for b in bodies)
    assert all(query(call)["skip_merge_validation"] == ["true"] for call in wire.calls)
    members = [m for b in bodies for m in b["members"]]
    assert {m["status"] for m in members} == {"subscribed"}
    assert all("pending" not in str(call.request.body) for call in wire.calls)
    assert members[0]["merge_fields"] == {"FNAME": SEEDED_FIRST_NAME, "LNAME": SEEDED_LAST_NAME}


def test_batch_errors_are_mapped_back_to_their_actions_by_address(
    wire: responses.RequestsMock,
) -> None:
    def error(email: str, text: str, code: str = "ERROR_GENERIC") -> dict[str, str]:
        return {"email_address": email, "error": text, "error_code": code, "field": ""}

    errors = [
        error("c@example.com", "c@example.com is in a compliance state due to unsubscribe, "
              "bounce, or compliance review and cannot be subscribed."),
        error("F@EXAMPLE.COM", "f@example.com was permanently deleted and cannot be "
              "re-imported. The contact must re-subscribe to get back on the list."),
        error("x@example.com", "x@example.com is already a list member.", "ERROR_CONTACT_EXISTS"),
    ]
    wire.add(responses.POST, LIST_URL, json={"errors": errors, "error_count": 3})
    emails = ["ok@example.com", "c@example.com", "f@example.com", "x@example.com"]
    outcomes = make_connector().apply([subscribe(e) for e in emails])
    assert [(o.status, o.reason) for o in outcomes] == [
        ("done", None),
        ("needs_person", "needs_client_resubscribe"),
        ("permanent", "forgotten_email"),
        ("permanent", "error_contact_exists"),
    ]


def test_1200_unsubscribes_go_as_three_batches_and_no_patch(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.POST, LIST_URL, json={"updated_members": [], "errors": []})
    todo = [action("unsubscribe", f"p{n}@example.com") for n in range(1200)]
    outcomes = make_connector().apply(todo)
    assert [o.action for o in outcomes] == todo
    assert {(o.status, o.reason) for o in outcomes} == {("done", None)}
    assert [(c.request.method, c.request.url.split("?")[0]) for c in wire.calls] == [
        ("POST", LIST_URL)
    ] * 3
    bodies = [body_of(call) for call in wire.calls]
    assert sorted(len(b["members"]) for b in bodies) == [200, 500, 500]
    assert all(b["update_existing"] is True for b in bodies)
    assert all(query(call)["skip_merge_validation"] == ["true"] for call in wire.calls)
    members = [m for b in bodies for m in b["members"]]
    assert members[0] == {"email_address": "p0@example.com", "status": "unsubscribed"}
    assert {m["status"] for m in members} == {"unsubscribed"}
    assert all("pending" not in str(call.request.body) for call in wire.calls)


def test_subscribes_and_unsubscribes_share_a_batch_while_updates_stay_patches(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.POST, LIST_URL, json={"errors": []})
    names, extra = "n@example.com", "e@example.com"
    wire.add(responses.PATCH, f"{MEMBERS_URL}/{md5(names)}", json=member_json(names))
    wire.add(responses.PATCH, f"{MEMBERS_URL}/{md5(extra)}", json=member_json(extra))
    todo = [subscribe("s@example.com"), action("unsubscribe", "u@example.com"),
            action("update_names", names, first_name="Zed", last_name="Q"),
            action("clear_extra_fields", extra, fields=("PHONE",))]
    outcomes = make_connector().apply(todo)
    assert [o.status for o in outcomes] == ["done"] * 4
    [batch] = [c for c in wire.calls if c.request.method == "POST"]
    assert body_of(batch)["members"] == [
        {"email_address": "s@example.com", "status": "subscribed",
         "merge_fields": {"FNAME": SEEDED_FIRST_NAME, "LNAME": SEEDED_LAST_NAME}},
        {"email_address": "u@example.com", "status": "unsubscribed"},
    ]
    patches = sorted(json.dumps(body_of(c)) for c in wire.calls if c.request.method == "PATCH")
    assert patches == sorted(json.dumps({"merge_fields": f}) for f in
                             ({"FNAME": "Zed", "LNAME": "Q"}, {"PHONE": ""}))


def test_batch_errors_are_mapped_back_by_address_and_kind(
    wire: responses.RequestsMock,
) -> None:
    forgotten = ("{} was permanently deleted and cannot be re-imported. The contact must "
                 "re-subscribe to get back on the list.")
    errors = [
        {"email_address": "FU@example.com", "error": forgotten.format("fu@example.com"),
         "error_code": "ERROR_GENERIC"},
        {"email_address": "fs@example.com", "error": forgotten.format("fs@example.com"),
         "error_code": "ERROR_GENERIC"},
        {"email_address": "bad@example.com", "error": "Please provide a valid email address.",
         "error_code": "ERROR_GENERIC"},
    ]
    wire.add(responses.POST, LIST_URL, json={"errors": errors, "error_count": 3})
    todo = [action("unsubscribe", "ok@example.com"), action("unsubscribe", "fu@example.com"),
            subscribe("fs@example.com"), action("unsubscribe", "bad@example.com")]
    outcomes = make_connector().apply(todo)
    assert len(wire.calls) == 1
    assert [(o.action, o.status, o.reason) for o in outcomes] == [
        (todo[0], "done", None),
        (todo[1], "done", "forgotten"),
        (todo[2], "permanent", "forgotten_email"),
        (todo[3], "permanent", "error_generic"),
    ]


def test_a_lone_unsubscribe_is_still_a_patch_and_a_404_is_absent(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.PATCH, MEMBER_URL, **problem(404, "Resource Not Found"))
    wire.add(responses.GET, LIST_URL, json={"id": LIST_ID})
    [outcome] = make_connector().apply([action("unsubscribe")])
    assert (outcome.status, outcome.reason) == ("done", "absent")
    assert [c.request.method for c in wire.calls] == ["PATCH", "GET"]


def test_batched_actions_on_one_address_keep_their_order(wire: responses.RequestsMock) -> None:
    seen: list[list[tuple[str, str]]] = []

    def reply(request: Any) -> tuple[int, dict[str, str], str]:
        members = json.loads(request.body)["members"]
        seen.append(sorted((m["email_address"], m["status"]) for m in members))
        time.sleep(0.02 if len(seen) == 1 else 0)  # a slow first wave: the second must wait
        return 200, {"Content-Type": "application/json"}, json.dumps({"errors": []})

    def put(request: Any) -> tuple[int, dict[str, str], str]:
        seen.append([(json.loads(request.body)["email_address"], "PUT")])
        return 200, {"Content-Type": "application/json"}, "{}"

    wire.add_callback(responses.POST, LIST_URL, callback=reply)
    wire.add_callback(responses.PUT, f"{MEMBERS_URL}/{md5('a@example.com')}", callback=put)
    todo = [subscribe("a@example.com"), subscribe("b@example.com"),
            action("unsubscribe", "a@example.com"), action("unsubscribe", "b@example.com"),
            subscribe("a@example.com"), action("unsubscribe", "c@example.com")]
    outcomes = make_connector().apply(todo)
    assert [o.status for o in outcomes] == ["done"] * 6
    assert seen == [
        [("a@example.com", "subscribed"), ("b@example.com", "subscribed"),
         ("c@example.com", "unsubscribed")],
        [("a@example.com", "unsubscribed"), ("b@example.com", "unsubscribed")],
        [("a@example.com", "PUT")],  # alone in the third wave: a single upsert, last
    ]


def test_a_failed_batch_call_gives_every_action_in_it_the_same_outcome(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.POST, LIST_URL, **problem(500, "Internal Server Error"))
    outcomes = make_connector(attempts=2).apply([subscribe(f"p{n}@example.com") for n in range(3)])
    assert {(o.status, o.reason, o.request_id) for o in outcomes} == {
        ("retriable", "internal_server_error", REQUEST_ID)
    }
    assert len(wire.calls) == 2


def test_a_batch_answer_that_is_not_a_batch_result_is_permanent_for_every_action(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.POST, LIST_URL, json={"errors": "none"})
    outcomes = make_connector().apply([subscribe("a@example.com"), subscribe("b@example.com")])
    assert {(o.status, o.reason) for o in outcomes} == {("permanent", "bad_response")}


def test_a_single_subscribe_is_an_upsert_that_never_asks_for_confirmation(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.PUT, MEMBER_URL, json=member_json())
    [outcome] = make_connector().apply([subscribe()])
    assert outcome.status == "done"
    assert body_of(wire.calls[0]) == {
        "email_address": SEEDED_EMAIL,
        "status_if_new": "subscribed",
        "status": "subscribed",
        "merge_fields": {"FNAME": SEEDED_FIRST_NAME, "LNAME": SEEDED_LAST_NAME},
    }


@pytest.mark.parametrize(
    ("todo", "sent"),
    [
        pytest.param(action("unsubscribe"), {"status": "unsubscribed"}, id="unsubscribe"),
        pytest.param(
            action("update_names", first_name="Zed", last_name="Q"),
            {"merge_fields": {"FNAME": "Zed", "LNAME": "Q"}},
            id="update-names",
        ),
        pytest.param(
            action("clear_extra_fields", fields=("PHONE", "ADDRESS")),
            {"merge_fields": {"PHONE": "", "ADDRESS": ""}},
            id="clear-extra-fields",
        ),
        pytest.param(
            action("move_email", new_email=NEW_EMAIL), {"email_address": NEW_EMAIL}, id="move"
        ),
    ],
)
def test_member_updates_are_patches_of_the_member_at_its_current_hash(
    wire: responses.RequestsMock, todo: Action, sent: dict[str, Any]
) -> None:
    wire.add(responses.PATCH, MEMBER_URL, json=member_json())
    [outcome] = make_connector().apply([todo])
    assert outcome.status == "done"
    assert (wire.calls[0].request.method, body_of(wire.calls[0])) == ("PATCH", sent)


def test_erase_is_delete_permanent_and_a_204_is_done(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, ERASE_URL, status=204, headers={"X-Request-Id": "r-204"})
    [outcome] = make_connector().apply([action("erase")])
    assert (outcome.status, outcome.reason, outcome.request_id) == ("done", None, "r-204")
    assert wire.calls[0].request.url == ERASE_URL


def test_actions_on_one_address_run_in_the_order_given(wire: responses.RequestsMock) -> None:
    finished: list[str] = []

    def answer(status: int, body: str, delay_seconds: float = 0.0) -> Any:
        def reply(request: Any) -> tuple[int, dict[str, str], str]:
            time.sleep(delay_seconds)  # a slow first call: a later one must still wait for it
            finished.append(str(request.method))
            return status, {"Content-Type": "application/json"}, body

        return reply

    wire.add_callback(responses.PUT, MEMBER_URL, callback=answer(200, "{}", 0.05))
    wire.add_callback(responses.PATCH, MEMBER_URL, callback=answer(200, "{}"))
    wire.add_callback(responses.POST, ERASE_URL, callback=answer(204, ""))
    outcomes = make_connector().apply([subscribe(), action("unsubscribe"), action("erase")])
    assert finished == ["PUT", "PATCH", "POST"]
    assert [o.status for o in outcomes] == ["done"] * 3


def test_calls_in_flight_never_exceed_max_connections(wire: responses.RequestsMock) -> None:
    lock, in_flight, peak = threading.Lock(), [0], [0]

    def slow(request: Any) -> tuple[int, dict[str, str], str]:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.01)
        with lock:
            in_flight[0] -= 1
        return 200, {"Content-Type": "application/json"}, json.dumps(member_json())

    emails = [f"p{n}@example.com" for n in range(12)]
    for email in emails:
        wire.add_callback(responses.PATCH, f"{MEMBERS_URL}/{md5(email)}", callback=slow)
    todo = [action("update_names", e, first_name="Zed") for e in emails]  # PATCHes, not a batch
    outcomes = make_connector(max_connections=2).apply(todo)
    assert [o.status for o in outcomes] == ["done"] * 12
    assert peak[0] == 2


def test_dry_run_writes_nothing_and_says_what_it_would_do(
    wire: responses.RequestsMock, captured_log: io.StringIO
) -> None:
    todo = [subscribe(), subscribe("b@example.com"), action("erase")]
    outcomes = make_connector().apply(todo, dry_run=True)
    assert [(o.status, o.reason) for o in outcomes] == [("done", "dry_run")] * 3
    assert len(wire.calls) == 0
    lines = [json.loads(line) for line in captured_log.getvalue().splitlines()]
    said = {(e["event"], e.get("count"), e.get("label")) for e in lines}
    assert {("would_subscribe", 2, "(dry run)"), ("would_erase", 1, "(dry run)")} <= said


# -- check() ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ping", "get_list", "ok", "detail"),
    [
        pytest.param({"json": {"health_status": "Everything's Chimpy!"}},
                     {"json": {"id": LIST_ID, "stats": {"member_count": 3}}},
                     True, "credentials accepted", id="ok"),
        pytest.param(problem(401, "API Key Invalid"), None, False,
                     "credentials refused (401)", id="401"),
        pytest.param({"json": {}}, problem(404, "Resource Not Found"), False,
                     "list not found (404)", id="404"),
        pytest.param({"body": requests.ConnectionError("down")}, None, False, "unreachable",
                     id="unreachable"),
        pytest.param(EMPTY_429, None, False, "unreachable", id="429"),
    ],
)
def test_check_answers_without_raising(
    wire: responses.RequestsMock,
    ping: dict[str, Any],
    get_list: dict[str, Any] | None,
    ok: bool,
    detail: str,
) -> None:
    wire.add(responses.GET, f"{ROOT}/ping", **ping)
    if get_list is not None:
        wire.add(responses.GET, LIST_URL, **get_list)
    result = make_connector().check()
    assert (result.ok, result.detail) == (ok, detail)
    assert len(wire.calls) == (2 if get_list is not None else 1)  # never retried


def test_check_reads_the_list_with_minimal_fields(wire: responses.RequestsMock) -> None:
    wire.add(responses.GET, f"{ROOT}/ping", json={})
    wire.add(responses.GET, LIST_URL, json={"id": LIST_ID, "stats": {"member_count": 3}})
    assert make_connector().check().extra == {"members": "3"}
    assert query(wire.calls[1])["fields"] == ["id,stats.member_count"]


# -- Configuration ------------------------------------------------------------------------


def test_a_base_url_is_used_verbatim_even_with_server_in_its_host_name(
    wire: responses.RequestsMock,
) -> None:
    root = "http://mailchimp-fake-server.test:8080/3.0"  # the SDK would rewrite it (A1.4)
    wire.add(responses.GET, f"{root}/lists/{LIST_ID}/members", json=page([member_json()]))
    assert len(list(make_connector(base_url=root).scan())) == 1
    assert wire.calls[0].request.headers["Authorization"].startswith("Basic ")


def test_the_registry_names_the_connector() -> None:
    assert connectors.load("mailchimp") is MailchimpConnector


# -- Logs and errors hold no personal data ---------------------------------------------------


def exercise_everything(wire: responses.RequestsMock) -> list[ConnectorError]:
    """Scan, poll, write (done, refused, batch errors, dry run) and fail, with seeded data."""
    wire.add(responses.GET, MEMBERS_URL, json=page([member_json()]))
    wire.add(responses.PUT, MEMBER_URL, **problem(400, "Member In Compliance State"))
    wire.add(responses.PATCH, MEMBER_URL, **problem(400, "Forgotten Email Not Subscribed"))
    wire.add(responses.POST, ERASE_URL, **problem(404, "Resource Not Found"))
    wire.add(responses.GET, LIST_URL, json={"id": LIST_ID})
    batch_error = {"email_address": SEEDED_EMAIL, "error": f"{SEEDED_EMAIL} is in a compliance "
                   "state", "error_code": "ERROR_GENERIC"}
    wire.add(responses.POST, LIST_URL, json={"errors": [batch_error]})
    wire.add(responses.GET, f"{ROOT}/ping", json={})
    connector = make_connector(attempts=1)
    list(connector.scan())
    connector.changes("2026-01-01T00:00:00+00:00")
    connector.apply([subscribe(), action("unsubscribe"), action("erase")])
    connector.apply([subscribe(), subscribe("other@example.org")])
    connector.apply([subscribe(), action("move_email", new_email=NEW_EMAIL)], dry_run=True)
    connector.check()
    raised: list[ConnectorError] = []
    wire.replace(responses.GET, MEMBERS_URL, **problem(400, "Invalid Resource"))
    with pytest.raises(ConnectorError) as caught:
        list(connector.scan())
    raised.append(caught.value)
    return raised


def test_logs_never_hold_an_address_or_a_name(
    wire: responses.RequestsMock, captured_log: io.StringIO
) -> None:
    exercise_everything(wire)
    text = captured_log.getvalue()
    assert "mailchimp_refused" in text and "mailchimp_batch" in text
    for value in (*SEEDED, NEW_EMAIL, md5(SEEDED_EMAIL), "is in a compliance", "processed"):
        assert value.lower() not in text.lower()
    # Not even masked by the redaction processor: it was never logged in the first place.
    assert "<email>" not in text and "<redacted>" not in text


def test_errors_never_hold_an_address_or_a_name(wire: responses.RequestsMock) -> None:
    for error in exercise_everything(wire):
        message = f"{error} {error.title} {error.request_id}"
        assert not any(value.lower() in message.lower() for value in SEEDED)
        assert error.__cause__ is None and error.__context__ is None


def test_a_member_url_never_reaches_an_error_message(wire: responses.RequestsMock) -> None:
    wire.add(responses.PATCH, MEMBER_URL, body=requests.ConnectionError(f"{MEMBER_URL} refused"))
    outcomes = make_connector(attempts=1).apply([action("unsubscribe")])
    assert outcomes[0].reason == "connection_failed"
    wire.add(responses.GET, MEMBERS_URL, body=requests.ConnectionError(f"{MEMBERS_URL} refused"))
    with pytest.raises(RetriableError) as caught:
        list(make_connector(attempts=1).scan())
    assert str(caught.value) == "GET /lists/{list_id}/members: ConnectionError"

