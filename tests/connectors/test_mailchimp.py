"""Tests for connectors.mailchimp, faked at the wire with ``responses`` (STYLE item 14).

The real ``mailchimp-marketing`` SDK makes every request, so each SDK quirk (reference A1)
is met as it is on the wire: problem+json errors, empty-bodied answers, network errors.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

import connectors
from connectors import mailchimp
from connectors.base import Action, MemberRecord
from connectors.mailchimp import EXPORT_FIELDS, MailchimpConnector
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
    *, attempts: int = 3, sleeps: list[float] | None = None, time_: FakeTime | None = None,
    **settings: Any
) -> MailchimpConnector:
    """A connector on the test settings; waits are recorded in ``sleeps``, never slept, or
    pass through ``time_``, whose clock they advance."""
    values: dict[str, Any] = {"api_key": KEY, "list_id": LIST_ID, "timeout_seconds": 7}
    values.update(settings)
    sink = sleeps if sleeps is not None else []
    timing: dict[str, Any] = {"sleep": sink.append}
    if time_ is not None:
        timing = {"sleep": time_.sleep, "clock": time_.clock}
    return MailchimpConnector(
        MailchimpSettings(**values), retry=RetryPolicy(attempts=attempts), **timing
    )


class FakeTime:
    """A monotonic clock that moves only when the connector sleeps: deadlines pass at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


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


# -- POST /batches, faked at the wire ------------------------------------------------------

BATCHES_URL = f"{ROOT}/batches"
# The real response_body_url is a pre-signed S3 URL (A2.9): no credentials are sent to it.
RESULTS_ROOT = "https://mailchimp-api-batch.s3.amazonaws.com"
JSON = {"Content-Type": "application/json; charset=utf-8"}
Answer = Callable[[dict[str, Any]], "tuple[int, str] | None"]


def tar_gz(*files: Any, names: list[str] | None = None) -> bytes:
    """A ``response_body_url`` body: a gzipped tar whose files hold these JSON values."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        folder = tarfile.TarInfo("b1")  # a directory entry: only files hold results
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for n, content in enumerate(files):
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            info = tarfile.TarInfo(names[n] if names else f"b1/{n}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def problem_text(status: int, title: str) -> str:
    """The ``response`` of a failed operation: the problem+json a single call gets, a string."""
    return problem(status, title)["body"]


def all_done(operation: dict[str, Any]) -> tuple[int, str]:
    if operation["method"] == "POST":  # delete-permanent: 204, nothing to say
        return 204, ""
    return 200, json.dumps(member_json())


class Batches:
    """Mailchimp's ``/batches`` at the wire: submit, status, and the results archive.

    Every batch finishes at its first status poll unless ``statuses`` says otherwise;
    ``answer`` gives each operation's ``(status_code, response)``, or None to leave it out
    of the results; results are spread over files of ``per_file``.
    """

    def __init__(self, wire: responses.RequestsMock, answer: Answer = all_done, *,
                 per_file: int = 100, statuses: tuple[str, ...] = ("finished",),
                 progress: float = 0.0) -> None:
        self.submitted: list[list[dict[str, Any]]] = []
        self.answer, self.per_file, self.statuses = answer, per_file, statuses
        self.progress = progress  # the share of operations a running batch shows finished
        self.polls: Counter[str] = Counter()
        wire.add_callback(responses.POST, BATCHES_URL, callback=self.start)
        wire.add_callback(responses.GET, re.compile(rf"{BATCHES_URL}/b\d+"), callback=self.status)
        wire.add_callback(responses.GET, re.compile(rf"{RESULTS_ROOT}/b\d+\.tar\.gz"),
                          callback=self.results)

    def start(self, request: Any) -> tuple[int, dict[str, str], str]:
        self.submitted.append(json.loads(request.body)["operations"])
        batch_id = f"b{len(self.submitted)}"
        return 200, JSON, json.dumps({"id": batch_id, "status": "pending",
                                    "total_operations": len(self.submitted[-1])})

    def status(self, request: Any) -> tuple[int, dict[str, str], str]:
        batch_id = request.url.rsplit("/", 1)[1].split("?")[0]
        self.polls[batch_id] += 1
        status = self.statuses[min(self.polls[batch_id], len(self.statuses)) - 1]
        url = f"{RESULTS_ROOT}/{batch_id}.tar.gz?X-Amz-Signature=s" if status == "finished" else ""
        total = len(self.submitted[int(batch_id[1:]) - 1])
        done = total if status == "finished" else int(total * self.progress)
        return 200, JSON, json.dumps({"id": batch_id, "status": status,
                                    "total_operations": total, "finished_operations": done,
                                    "response_body_url": url})

    def results(self, request: Any) -> tuple[int, dict[str, str], bytes]:
        batch_id = request.url.rsplit("/", 1)[1].split(".")[0]
        rows = []
        for operation in self.submitted[int(batch_id[1:]) - 1]:
            answered = self.answer(operation)
            if answered is not None:
                rows.append({"status_code": answered[0],
                             "operation_id": operation["operation_id"],
                             "response": answered[1]})
        files = [rows[n:n + self.per_file] for n in range(0, len(rows), self.per_file)]
        return 200, {"Content-Type": "application/gzip"}, tar_gz(*reversed(files))

    def operations(self) -> list[dict[str, Any]]:
        return [op for batch in self.submitted for op in batch]




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


def test_member_reads_one_member_by_its_hash(wire: responses.RequestsMock) -> None:
    wire.add(responses.GET, MEMBER_URL, json=member_json(status="unsubscribed"))
    record = make_connector().member(SEEDED_EMAIL.upper())
    assert record is not None and (record.email, record.status) == (SEEDED_EMAIL, "unsubscribed")
    assert query(wire.calls[0])["fields"] == [
        "email_address,status,merge_fields,last_changed"]


def test_member_fields_asks_for_the_export_fields_and_returns_them_as_mailchimp_holds_them(
    wire: responses.RequestsMock,
) -> None:
    held = member_json(timestamp_signup="2025-05-01T09:00:00+00:00", ip_signup="192.0.2.1",
                       tags=[{"id": 1, "name": "vip"}])  # fmt: skip
    wire.add(responses.GET, MEMBER_URL, json={**held, "stats": {"avg_open_rate": 0}})

    fields = make_connector().member_fields(SEEDED_EMAIL)

    assert fields == held  # what Mailchimp answered, less what is not about the person
    assert query(wire.calls[0])["fields"] == [",".join(EXPORT_FIELDS)]


def test_member_fields_is_none_for_an_address_the_audience_does_not_hold(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.GET, MEMBER_URL, **problem(404, "Resource Not Found"))
    wire.add(responses.GET, LIST_URL, json={"id": LIST_ID})
    assert make_connector(attempts=1).member_fields(SEEDED_EMAIL) is None


@pytest.mark.parametrize(
    ("list_answer", "expected"),
    [
        ({"json": {"id": LIST_ID}}, None),
        (problem(404, "Resource Not Found"), PermanentError),
        (problem(503, "Service Unavailable"), RetriableError),
    ],
    ids=["member-absent", "list-missing", "list-unverifiable"],
)
def test_member_tells_an_absent_member_from_a_missing_list(
    wire: responses.RequestsMock, list_answer: dict[str, Any], expected: type[Exception] | None
) -> None:
    wire.add(responses.GET, MEMBER_URL, **problem(404, "Resource Not Found"))
    wire.add(responses.GET, LIST_URL, **list_answer)
    connector = make_connector(attempts=1)
    if expected is None:
        assert connector.member(SEEDED_EMAIL) is None
    else:
        with pytest.raises(expected):
            connector.member(SEEDED_EMAIL)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (problem(401, "API Key Invalid"), PermanentError),
        (problem(500, "Internal Server Error"), RetriableError),
        ({"json": {"status": "subscribed"}}, PermanentError),
    ],
    ids=["refused", "server-error", "not-a-member"],
)
def test_member_raises_what_cannot_be_read(
    wire: responses.RequestsMock, answer: dict[str, Any], expected: type[Exception]
) -> None:
    wire.add(responses.GET, MEMBER_URL, **answer)
    with pytest.raises(expected):
        make_connector(attempts=1).member(SEEDED_EMAIL)


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


def test_a_batch_success_carries_the_call_request_id_as_evidence(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.POST, LIST_URL, json={"new_members": [], "errors": [], "error_count": 0},
             headers={"X-Request-Id": "batch-1"})
    wire.add(responses.POST, LIST_URL, json={"new_members": [], "errors": [], "error_count": 0},
             headers={"X-Request-Id": "batch-2"})
    outcomes = make_connector().apply([subscribe(f"p{n}@example.com") for n in range(600)])
    assert {o.status for o in outcomes} == {"done"}
    assert sorted({o.request_id for o in outcomes}) == ["batch-1", "batch-2"]
    assert sum(o.request_id == "batch-1" for o in outcomes) == 500  # each batch its own id


def test_a_patch_success_carries_its_request_id_and_none_without_the_header(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.PATCH, MEMBER_URL, json=member_json(), headers={"X-Request-Id": "p-1"})
    wire.add(responses.PATCH, MEMBER_URL, json=member_json())
    connector = make_connector()
    [first] = connector.apply([action("unsubscribe")])
    [second] = connector.apply([action("unsubscribe")])
    assert (first.status, first.request_id) == ("done", "p-1")
    assert (second.status, second.request_id) == ("done", None)  # not the previous call's id


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


def test_subscribes_and_unsubscribes_share_a_batch_that_never_carries_updates(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.POST, LIST_URL, json={"errors": []})
    names, moved = "n@example.com", "m@example.com"
    wire.add(responses.PATCH, f"{MEMBERS_URL}/{md5(names)}", json=member_json(names))
    wire.add(responses.PATCH, f"{MEMBERS_URL}/{md5(moved)}", json=member_json(NEW_EMAIL))
    todo = [subscribe("s@example.com"), action("unsubscribe", "u@example.com"),
            action("update_names", names, first_name="Zed", last_name="Q"),
            action("move_email", moved, new_email=NEW_EMAIL)]
    outcomes = make_connector().apply(todo)
    assert [o.status for o in outcomes] == ["done"] * 4
    [batch] = [c for c in wire.calls if c.request.method == "POST"]
    assert body_of(batch)["members"] == [
        {"email_address": "s@example.com", "status": "subscribed",
         "merge_fields": {"FNAME": SEEDED_FIRST_NAME, "LNAME": SEEDED_LAST_NAME}},
        {"email_address": "u@example.com", "status": "unsubscribed"},
    ]
    patches = sorted(json.dumps(body_of(c)) for c in wire.calls if c.request.method == "PATCH")
    assert patches == sorted(json.dumps(b) for b in
                             ({"merge_fields": {"FNAME": "Zed", "LNAME": "Q"}},
                              {"email_address": NEW_EMAIL}))


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

    def slow(body: bytes | Any, content_type: str = "application/json") -> Any:
        def reply(request: Any) -> tuple[int, dict[str, str], Any]:
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            time.sleep(0.01)
            with lock:
                in_flight[0] -= 1
            return 200, {"Content-Type": content_type}, body() if callable(body) else body

        return reply

    wire.add_callback(responses.POST, BATCHES_URL, callback=slow(
        lambda: json.dumps({"id": "b1", "status": "pending"})))
    wire.add_callback(responses.GET, f"{BATCHES_URL}/b1", callback=slow(json.dumps(
        {"id": "b1", "status": "finished", "response_body_url": f"{RESULTS_ROOT}/b1.tar.gz"})))
    emails = [f"p{n}@example.com" for n in range(12)]
    for email in emails:
        wire.add_callback(responses.PATCH, f"{MEMBERS_URL}/{md5(email)}",
                          callback=slow(json.dumps(member_json(email))))
    names = [action("update_names", f"n{n}@example.com", first_name="Zed") for n in range(3)]
    results = tar_gz([{"status_code": 200, "operation_id": str(12 + n), "response": "{}"}
                      for n in range(3)])
    wire.add_callback(responses.GET, f"{RESULTS_ROOT}/b1.tar.gz",
                      callback=slow(results, "application/gzip"))
    # Moves are always single PATCHes; the update_names go through /batches, whose submit,
    # status poll and results download take a connection slot like any call (next test).
    todo = [action("move_email", e, new_email=f"new.{e}") for e in emails] + names
    outcomes = make_connector(max_connections=2).apply(todo)
    assert [o.status for o in outcomes] == ["done"] * 15
    assert peak[0] == 2
    assert [c.request.url for c in wire.calls].count(f"{RESULTS_ROOT}/b1.tar.gz") == 1


def test_the_results_download_holds_a_connection_slot(wire: responses.RequestsMock) -> None:
    connector = make_connector(max_connections=1)
    held: list[bool] = []

    def download(request: Any) -> tuple[int, dict[str, str], bytes]:
        free = connector._slots.acquire(blocking=False)
        if free:
            connector._slots.release()
        held.append(not free)
        rows = [{"status_code": 204, "operation_id": str(n), "response": ""} for n in (0, 1)]
        return 200, {"Content-Type": "application/gzip"}, tar_gz(rows)

    wire.add(responses.POST, BATCHES_URL, json={"id": "b1", "status": "pending"})
    wire.add(responses.GET, f"{BATCHES_URL}/b1", json={
        "id": "b1", "status": "finished", "response_body_url": f"{RESULTS_ROOT}/b1.tar.gz"})
    wire.add_callback(responses.GET, f"{RESULTS_ROOT}/b1.tar.gz", callback=download)
    outcomes = connector.apply([action("erase"), action("erase", "b@example.com")])
    assert [o.status for o in outcomes] == ["done", "done"] and held == [True]


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


# -- Writing through POST /batches: update_names, clear_extra_fields, erase --------------------


def names(email: str, first: str = "Zed") -> Action:
    return action("update_names", email, first_name=first, last_name="Q")


def test_updates_clears_and_erases_go_as_one_batch_of_the_single_calls(
    wire: responses.RequestsMock,
) -> None:
    batches = Batches(wire)
    todo = [subscribe("s@example.com"), names("a@example.com"),
            action("clear_extra_fields", "B@example.com", fields=("PHONE", "ADDRESS")),
            action("move_email", "m@example.com", new_email=NEW_EMAIL),
            action("erase", " c@example.com ")]
    wire.add(responses.PUT, f"{MEMBERS_URL}/{md5('s@example.com')}", json=member_json())
    wire.add(responses.PATCH, f"{MEMBERS_URL}/{md5('m@example.com')}", json=member_json())
    sleeps: list[float] = []
    outcomes = make_connector(sleeps=sleeps).apply(todo)
    assert [(o.action, o.status, o.reason) for o in outcomes] == [(a, "done", None) for a in todo]
    path = f"/lists/{LIST_ID}/members"
    assert batches.submitted == [[
        {"method": "PATCH", "path": f"{path}/{md5('a@example.com')}",
         "params": {"skip_merge_validation": "true"}, "operation_id": "1",
         "body": json.dumps({"merge_fields": {"FNAME": "Zed", "LNAME": "Q"}})},
        {"method": "PATCH", "path": f"{path}/{md5('b@example.com')}",
         "params": {"skip_merge_validation": "true"}, "operation_id": "2",
         "body": json.dumps({"merge_fields": {"PHONE": "", "ADDRESS": ""}})},
        {"method": "POST", "path": f"{path}/{md5('c@example.com')}/actions/delete-permanent",
         "operation_id": "4"},
        # The lone subscribe fills the batch as its single call: the upsert, never pending.
        {"method": "PUT", "path": f"{path}/{md5('s@example.com')}",
         "params": {"skip_merge_validation": "true"}, "operation_id": "0",
         "body": json.dumps({"email_address": "s@example.com", "status_if_new": "subscribed",
                             "status": "subscribed",
                             "merge_fields": {"FNAME": SEEDED_FIRST_NAME,
                                              "LNAME": SEEDED_LAST_NAME}})},
    ]]
    singles = sorted(c.request.method for c in wire.calls if "/members/" in c.request.url)
    assert singles == ["PATCH"]  # the move
    download = next(c for c in wire.calls if c.request.url.startswith(RESULTS_ROOT))
    assert "Authorization" not in download.request.headers  # pre-signed: no API key
    assert download.request.req_kwargs["timeout"] == 7
    # One wait before the first status poll, which finds the batch finished.
    assert len(sleeps) == 1 and 0 < sleeps[0] <= mailchimp.OPERATIONS_FIRST_POLL_SECONDS


@pytest.mark.parametrize(
    ("todo", "status", "title", "list_answer", "expected"),
    [
        pytest.param(action("erase"), 404, "Resource Not Found", LIST_OK, ("done", "absent"),
                     id="erase-404-absent"),
        pytest.param(action("erase"), 404, "Resource Not Found", LIST_GONE,
                     ("permanent", "list_not_found"), id="erase-404-but-the-list-is-gone"),
        pytest.param(action("erase"), 405, "Method Not Allowed", None,
                     ("permanent", "cannot_delete"), id="erase-405"),
        pytest.param(action("erase"), 400, "Forgotten Email Not Subscribed", None,
                     ("done", "forgotten"), id="erase-forgotten"),
        pytest.param(names(SEEDED_EMAIL), 400, "Forgotten Email Not Subscribed", None,
                     ("done", "forgotten"), id="names-forgotten"),
        pytest.param(names(SEEDED_EMAIL), 404, "Resource Not Found", LIST_OK,
                     ("done", "absent"), id="names-404-absent"),
        pytest.param(action("clear_extra_fields", fields=("PHONE",)), 404, "Resource Not Found",
                     LIST_OK, ("done", "absent"), id="clear-404-absent"),
        pytest.param(names(SEEDED_EMAIL), 400, "Member In Compliance State", None,
                     ("needs_person", "needs_client_resubscribe"), id="names-compliance-state"),
        pytest.param(names(SEEDED_EMAIL), 400, "Invalid Resource", None,
                     ("permanent", "invalid_resource"), id="names-invalid-resource"),
        pytest.param(names(SEEDED_EMAIL), 401, "API Key Invalid", None,
                     ("permanent", "api_key_invalid"), id="401"),
        pytest.param(action("clear_extra_fields", fields=("PHONE",)), 429, "TooManyRequests",
                     None, ("retriable", "toomanyrequests"), id="429"),
        pytest.param(action("erase"), 500, "Internal Server Error", None,
                     ("retriable", "internal_server_error"), id="500"),
        pytest.param(names(SEEDED_EMAIL), 503, "Service Unavailable", None,
                     ("retriable", "service_unavailable"), id="503"),
        pytest.param(action("clear_extra_fields", fields=("PHONE",)), 503, "ComplianceRelated",
                     None, ("permanent", "compliancerelated"), id="503-compliance-related"),
    ],
)
def test_an_operation_result_is_classified_exactly_as_its_single_call(
    wire: responses.RequestsMock,
    todo: Action,
    status: int,
    title: str,
    list_answer: tuple[str, str, dict[str, Any]] | None,
    expected: tuple[str, str],
) -> None:
    if list_answer is not None:
        wire.add(list_answer[0], list_answer[1], **list_answer[2])
    single_url = ERASE_URL if todo.kind == "erase" else MEMBER_URL
    wire.add(responses.POST if todo.kind == "erase" else responses.PATCH, single_url,
             **problem(status, title))
    [single] = make_connector(attempts=1).apply([todo])

    def answer(operation: dict[str, Any]) -> tuple[int, str]:
        if operation["path"].split("/")[4] == md5(SEEDED_EMAIL):
            return status, problem_text(status, title)
        return all_done(operation)

    batches = Batches(wire, answer)
    other = names("other@example.com")
    batched = make_connector(attempts=1).apply([other, todo])
    assert len(batches.submitted) == 1
    assert (batched[1].action, batched[1].status, batched[1].reason) == (todo, *expected)
    assert (single.status, single.reason) == expected
    assert batched[1].request_id == single.request_id == REQUEST_ID
    assert (batched[0].status, batched[0].reason) == ("done", None)


def test_results_spread_over_files_in_any_order_are_all_read(
    wire: responses.RequestsMock,
) -> None:
    def answer(operation: dict[str, Any]) -> tuple[int, str]:
        if int(operation["operation_id"]) % 7 == 0:
            return 400, problem_text(400, "Member In Compliance State")
        return all_done(operation)

    batches = Batches(wire, answer, per_file=30)  # 8 files, the last one first
    todo = [names(f"p{n}@example.com") for n in range(230)]
    outcomes = make_connector().apply(todo)
    assert [o.action for o in outcomes] == todo
    assert [o.status for o in outcomes] == [
        "needs_person" if n % 7 == 0 else "done" for n in range(230)]
    assert len(batches.submitted) == 1


def test_operations_missing_from_the_results_are_retriable(
    wire: responses.RequestsMock,
) -> None:
    Batches(wire, lambda op: None if op["operation_id"] in {"1", "3"} else all_done(op))
    outcomes = make_connector().apply([names(f"p{n}@example.com") for n in range(4)])
    assert [(o.status, o.reason) for o in outcomes] == [
        ("done", None), ("retriable", "batch_result_missing"),
        ("done", None), ("retriable", "batch_result_missing")]


def test_a_batch_unfinished_at_the_deadline_is_retriable_and_polled_at_backed_off_intervals(
    wire: responses.RequestsMock,
) -> None:
    batches = Batches(wire, statuses=("pending", "preprocessing", "started"))
    fake = FakeTime()
    outcomes = make_connector(time_=fake).apply([names("a@example.com"), action("erase")])
    assert {(o.status, o.reason) for o in outcomes} == {("retriable", "batch_unfinished")}
    # Polled 2 s after the submit, then at 3x, then doubling the time it has run, at most
    # a minute apart: 19 status calls in 15 minutes (94 with the old 0.5 s doubling to 10 s).
    assert fake.sleeps[:6] == [2.0, 6.0, 8.0, 16.0, 32.0, 60.0]
    assert set(fake.sleeps[5:-1]) == {60.0} and fake.sleeps[-1] <= 60.0
    assert sum(fake.sleeps) == mailchimp.OPERATIONS_DEADLINE_SECONDS == 15 * 60
    assert batches.polls["b1"] == len(fake.sleeps) == 19
    assert not any(c.request.url.startswith(RESULTS_ROOT) for c in wire.calls)


def test_the_deadline_can_be_shortened(
    wire: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mailchimp, "OPERATIONS_DEADLINE_SECONDS", 3.0)
    Batches(wire, statuses=("started",))
    fake = FakeTime()
    outcomes = make_connector(time_=fake).apply([names("a@example.com"), action("erase")])
    assert {o.reason for o in outcomes} == {"batch_unfinished"}
    assert fake.sleeps == [2.0, 1.0]


def test_batches_still_running_are_polled_together_until_each_finishes(
    wire: responses.RequestsMock,
) -> None:
    batches = Batches(wire, statuses=("pending", "started", "finalizing", "finished"))
    fake = FakeTime()
    outcomes = make_connector(time_=fake).apply([names(f"p{n}@example.com") for n in range(501)])
    assert {o.status for o in outcomes} == {"done"}
    assert fake.sleeps == [2.0, 6.0, 8.0, 16.0]
    assert dict(batches.polls) == {"b1": 4, "b2": 4}


@pytest.mark.parametrize(("progress", "sleeps"), [
    pytest.param(0.0, [2.0, 6.0], id="no-progress-shown"),
    # 100 of 500 done in 2 s: 8 s more, stretched by 1.5.
    pytest.param(0.2, [2.0, 12.0], id="from-progress"),
])  # fmt: skip
def test_a_batch_that_runs_past_the_first_poll_costs_three_calls(
    wire: responses.RequestsMock, progress: float, sleeps: list[float]
) -> None:
    batches = Batches(wire, statuses=("started", "finished"), progress=progress)
    fake = FakeTime()
    todo = [names(f"p{n}@example.com") for n in range(1000)]
    outcomes = make_connector(time_=fake).apply(todo)
    assert {o.status for o in outcomes} == {"done"}
    assert fake.sleeps == sleeps
    # Per batch: the submit, one poll while it runs, the one that finds it finished.
    api = [c for c in wire.calls if not c.request.url.startswith(RESULTS_ROOT)]
    assert len(batches.submitted) == 2 and len(api) == 2 * 3
    assert dict(batches.polls) == {"b1": 2, "b2": 2}


def test_a_status_poll_that_fails_for_now_is_asked_again(script: responses.RequestsMock) -> None:
    script.add(responses.POST, BATCHES_URL, json={"id": "b1", "status": "pending"})
    script.add(responses.GET, f"{BATCHES_URL}/b1", **problem(503, "Service Unavailable"))
    script.add(responses.GET, f"{BATCHES_URL}/b1", json={
        "id": "b1", "status": "finished", "response_body_url": f"{RESULTS_ROOT}/b1.tar.gz"})
    results = [{"status_code": 200, "operation_id": str(n), "response": "{}"} for n in (0, 1)]
    script.add(responses.GET, f"{RESULTS_ROOT}/b1.tar.gz", body=tar_gz(results))
    outcomes = make_connector(attempts=1).apply([names("a@example.com"), names("b@example.com")])
    assert [o.status for o in outcomes] == ["done", "done"]


def test_a_batch_whose_status_is_refused_is_retriable(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, BATCHES_URL, json={"id": "b1", "status": "pending"})
    wire.add(responses.GET, f"{BATCHES_URL}/b1", **problem(404, "Resource Not Found"))
    outcomes = make_connector().apply([names("a@example.com"), action("erase")])
    assert {(o.status, o.reason) for o in outcomes} == {("retriable", "batch_status_refused")}
    assert len(wire.calls) == 2  # not polled again, and no list check: not a member's 404


@pytest.mark.parametrize(
    ("answer", "calls"),
    [
        pytest.param(problem(500, "Internal Server Error"), 2, id="500-retried-in-call"),
        pytest.param(problem(503, "Service Unavailable"), 2, id="503-retried-in-call"),
        pytest.param({"body": requests.ReadTimeout("read")}, 2, id="read-timeout"),
        pytest.param(problem(404, "Resource Not Found"), 1, id="404-no-list-check"),
        pytest.param(problem(400, "Invalid Resource"), 1, id="400"),
        pytest.param({"json": {"status": "pending"}}, 1, id="no-batch-id"),
    ],
)
def test_a_failed_submit_makes_every_operation_in_it_retriable(
    wire: responses.RequestsMock, answer: dict[str, Any], calls: int
) -> None:
    wire.add(responses.POST, BATCHES_URL, **answer)
    todo = [names("a@example.com"), action("erase"), action("clear_extra_fields", "c@example.com",
                                                           fields=("PHONE",))]
    outcomes = make_connector(attempts=2).apply(todo)
    assert [(o.action, o.status, o.reason) for o in outcomes] == [
        (a, "retriable", "batch_submit_failed") for a in todo]
    assert len(wire.calls) == calls  # nothing else: no poll, no list check


def test_one_failed_submit_leaves_the_other_batches_of_the_wave_alone(
    wire: responses.RequestsMock,
) -> None:
    batches = Batches(wire)
    refused = iter([True, False, False])

    def start(request: Any) -> tuple[int, dict[str, str], str]:
        if next(refused):
            return 503, {"Content-Type": PROBLEM_JSON}, problem_text(503, "Service Unavailable")
        return batches.start(request)

    wire.remove(responses.POST, BATCHES_URL)
    wire.add_callback(responses.POST, BATCHES_URL, callback=start)
    outcomes = make_connector(attempts=1).apply([names(f"p{n}@example.com") for n in range(1001)])
    assert Counter((o.status, o.reason) for o in outcomes) == {
        ("retriable", "batch_submit_failed"): 500, ("done", None): 501}


@pytest.mark.parametrize(
    ("download", "reason"),
    [
        pytest.param({"body": b"<html>AccessDenied</html>"}, "batch_results_unreadable",
                     id="not-gzip"),
        pytest.param({"body": tar_gz([])[:40]}, "batch_results_unreadable", id="truncated"),
        pytest.param({"body": gzip.compress(b"not a tar")},
                     "batch_results_unreadable", id="gzip-but-not-tar"),
        pytest.param({"status": 403, "body": "<Error>Request has expired</Error>"},
                     "batch_results_unreadable", id="expired-link-403"),
        pytest.param({"body": requests.ConnectionError("reset")}, "batch_results_unreadable",
                     id="connection-failed"),
        pytest.param({"body": tar_gz(b"{not json", {"status_code": 200})},
                     "batch_result_missing", id="files-that-are-not-result-arrays"),
        pytest.param({"body": tar_gz([{"status_code": "200", "operation_id": "0"},
                                      {"operation_id": "1", "response": ""}])},
                     "batch_result_missing", id="results-without-a-status-code"),
    ],
)
def test_results_that_cannot_be_read_are_retriable(
    wire: responses.RequestsMock, download: dict[str, Any], reason: str
) -> None:
    wire.add(responses.POST, BATCHES_URL, json={"id": "b1", "status": "pending"})
    wire.add(responses.GET, f"{BATCHES_URL}/b1", json={
        "id": "b1", "status": "finished", "response_body_url": f"{RESULTS_ROOT}/b1.tar.gz"})
    wire.add(responses.GET, f"{RESULTS_ROOT}/b1.tar.gz", **download)
    outcomes = make_connector(attempts=1).apply([names("a@example.com"), action("erase")])
    assert {(o.status, o.reason) for o in outcomes} == {("retriable", reason)}


def test_a_finished_batch_without_a_results_url_is_retriable(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.POST, BATCHES_URL, json={"id": "b1", "status": "pending"})
    wire.add(responses.GET, f"{BATCHES_URL}/b1", json={"id": "b1", "status": "finished",
                                                       "response_body_url": ""})
    outcomes = make_connector().apply([names("a@example.com"), action("erase")])
    assert {o.reason for o in outcomes} == {"batch_results_unreadable"}


def test_a_results_download_that_fails_for_now_is_retried(script: responses.RequestsMock) -> None:
    script.add(responses.POST, BATCHES_URL, json={"id": "b1", "status": "pending"})
    script.add(responses.GET, f"{BATCHES_URL}/b1", json={
        "id": "b1", "status": "finished", "response_body_url": f"{RESULTS_ROOT}/b1.tar.gz"})
    script.add(responses.GET, f"{RESULTS_ROOT}/b1.tar.gz", status=503, body="SlowDown")
    results = [{"status_code": 204, "operation_id": str(n), "response": ""} for n in (0, 1)]
    script.add(responses.GET, f"{RESULTS_ROOT}/b1.tar.gz", body=tar_gz(results))
    outcomes = make_connector().apply([action("erase"), action("erase", "b@example.com")])
    assert [o.status for o in outcomes] == ["done", "done"]


def test_1001_updates_go_as_three_batches_of_at_most_500(wire: responses.RequestsMock) -> None:
    batches = Batches(wire)
    todo = [names(f"p{n}@example.com", first=f"N{n}") for n in range(1001)]
    outcomes = make_connector().apply(todo)
    assert [o.action for o in outcomes] == todo and {o.status for o in outcomes} == {"done"}
    assert [len(b) for b in batches.submitted] == [500, 500, 1]
    operations = batches.operations()
    assert [op["operation_id"] for op in operations] == [str(n) for n in range(1001)]
    assert json.loads(operations[1000]["body"]) == {"merge_fields": {"FNAME": "N1000",
                                                                     "LNAME": "Q"}}
    assert len(wire.calls) == 3 * 3  # submit, one poll and one download per batch
    assert all("pending" not in op.get("body", "") and '"status"' not in op.get("body", "")
               for op in operations)


def write_calls(wire: responses.RequestsMock) -> Counter[str]:
    """The write calls made, by route: POST /lists/{id} ("members"), POST /batches, singles."""
    counts: Counter[str] = Counter()
    for call in wire.calls:
        url, method = call.request.url.split("?")[0], call.request.method
        if method == "POST" and url == LIST_URL:
            counts["members"] += 1
        elif method == "POST" and url == BATCHES_URL:
            counts["batches"] += 1
        elif method != "GET":
            counts["single"] += 1
    return counts


def test_a_wave_of_10000_mixed_writes_costs_exactly_20_write_calls(
    wire: responses.RequestsMock,
) -> None:
    wire.add(responses.POST, LIST_URL, json={"errors": []})
    batches = Batches(wire)
    # As a resync plans them: mostly unsubscribes, some subscribes, a fifth of updates.
    kinds = ["unsubscribe"] * 7 + ["subscribe", "update_names", "clear_extra_fields"]
    todo = [action(kinds[n % 10], f"p{n}@example.com", first_name="A", last_name="B",
                   fields=("PHONE",)) for n in range(10_000)]
    outcomes = make_connector(time_=FakeTime()).apply(todo)
    assert {(o.status, o.reason) for o in outcomes} == {("done", None)}
    # 8,000 members: 16 full calls; 2,000 updates: 4 full batches. Nothing to fill.
    assert write_calls(wire) == {"members": 16, "batches": 4}

    wire.calls.reset()
    batches.submitted.clear()
    batches.polls.clear()
    todo = todo[:9_700] + [names(f"q{n}@example.com") for n in range(300)]
    outcomes = make_connector(time_=FakeTime()).apply(todo)
    assert {(o.status, o.reason) for o in outcomes} == {("done", None)}
    # 7,760 members and 2,240 updates: 15 full member calls, the other 260 members fill the
    # fifth batch (240 updates): 20 write calls, as for 10,000 writes of one kind.
    assert write_calls(wire) == {"members": 15, "batches": 5}
    assert [len(b) for b in batches.submitted] == [500] * 5
    riders = [op for op in batches.submitted[-1] if not op["body"].startswith('{"merge')]
    assert len(riders) == 260
    assert {op["method"] for op in riders} == {"PATCH", "PUT"}
    assert all("pending" not in op["body"] for op in riders)
    # Per batch: the submit and the poll that finds it finished.
    assert set(batches.polls.values()) == {1}


def test_members_fill_a_batch_only_when_they_fit_in_it(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, LIST_URL, json={"errors": []})
    Batches(wire)
    todo = [action("unsubscribe", f"u{n}@example.com") for n in range(400)]
    todo += [names(f"p{n}@example.com") for n in range(300)]
    make_connector(time_=FakeTime()).apply(todo)
    assert write_calls(wire) == {"members": 1, "batches": 1}  # 700: two calls either way


def test_an_unsubscribe_riding_in_a_batch_answers_as_its_single_patch(
    wire: responses.RequestsMock,
) -> None:
    absent, refused = "gone@example.com", "kept@example.com"

    def answer(operation: dict[str, Any]) -> tuple[int, str]:
        if operation["path"].endswith(md5(absent)):
            return 404, problem_text(404, "Resource Not Found")
        if operation["path"].endswith(md5(refused)):
            return 400, problem_text(400, "Member In Compliance State")
        return 200, "{}"

    Batches(wire, answer)
    wire.add(responses.GET, LIST_URL, json={"id": LIST_ID})
    todo = [names("a@example.com"), names("b@example.com"), action("unsubscribe", absent),
            subscribe(refused)]
    outcomes = make_connector(time_=FakeTime()).apply(todo)
    assert [(o.status, o.reason) for o in outcomes] == [
        ("done", None), ("done", None), ("done", "absent"),
        ("needs_person", "needs_client_resubscribe")]
    assert write_calls(wire) == {"batches": 1}


def test_a_lone_update_in_its_wave_is_still_a_patch(wire: responses.RequestsMock) -> None:
    batches = Batches(wire)
    wire.add(responses.POST, LIST_URL, json={"errors": []})
    wire.add(responses.PATCH, MEMBER_URL, json=member_json())
    wire.add(responses.PATCH, f"{MEMBERS_URL}/{md5('m@example.com')}", json=member_json())
    # Two updates of one address fall in two waves: each alone in its wave, each a PATCH.
    todo = [names(SEEDED_EMAIL, "One"), subscribe("s@example.com"), subscribe("t@example.com"),
            action("move_email", "m@example.com", new_email=NEW_EMAIL), names(SEEDED_EMAIL, "Two")]
    outcomes = make_connector().apply(todo)
    assert [o.status for o in outcomes] == ["done"] * 5
    assert batches.submitted == []
    patched = [body_of(c) for c in wire.calls if c.request.url.split("?")[0] == MEMBER_URL]
    assert patched == [{"merge_fields": {"FNAME": f, "LNAME": "Q"}} for f in ("One", "Two")]


def test_waves_of_operations_on_one_address_run_one_batch_after_the_other(
    wire: responses.RequestsMock,
) -> None:
    batches = Batches(wire)
    todo = [names("a@example.com"), names("b@example.com"),
            action("erase", "a@example.com"), action("erase", "b@example.com")]
    outcomes = make_connector().apply(todo)
    assert [o.status for o in outcomes] == ["done"] * 4
    assert [[(op["method"], op["operation_id"]) for op in b] for b in batches.submitted] == [
        [("PATCH", "0"), ("PATCH", "1")], [("POST", "2"), ("POST", "3")]]
    urls = [c.request.url.split("?")[0] for c in wire.calls]
    assert urls.index(f"{RESULTS_ROOT}/b1.tar.gz") < urls.index(BATCHES_URL, 1)


def test_an_operation_whose_body_cannot_be_encoded_is_permanent_alone(
    wire: responses.RequestsMock,
) -> None:
    batches = Batches(wire)
    unencodable = (object(),)
    bad = action("clear_extra_fields", "x@example.com", fields=unencodable)
    outcomes = make_connector().apply([names("a@example.com"), bad, action("erase")])
    assert [(o.status, o.reason) for o in outcomes] == [
        ("done", None), ("permanent", "request_failed"), ("done", None)]
    assert [op["operation_id"] for op in batches.operations()] == ["0", "2"]


def test_dry_run_submits_no_batch(wire: responses.RequestsMock) -> None:
    outcomes = make_connector().apply([names("a@example.com"), action("erase")], dry_run=True)
    assert [o.reason for o in outcomes] == ["dry_run"] * 2 and len(wire.calls) == 0


def test_batch_operations_log_counts_and_batch_ids_never_an_address(
    wire: responses.RequestsMock, captured_log: io.StringIO
) -> None:
    def answer(operation: dict[str, Any]) -> tuple[int, str]:
        if operation["method"] == "POST":
            return 400, problem_text(400, "Forgotten Email Not Subscribed")
        return 400, problem_text(400, "Member In Compliance State")

    Batches(wire, answer)
    outcomes = make_connector().apply([names(SEEDED_EMAIL, SEEDED_FIRST_NAME),
                                       action("erase", NEW_EMAIL)])
    assert [o.reason for o in outcomes] == ["needs_client_resubscribe", "forgotten"]
    text = captured_log.getvalue()
    events = {e["event"]: e for e in map(json.loads, text.splitlines())}
    assert events["mailchimp_operations_submitted"]["batch_id"] == "b1"
    assert events["mailchimp_operations_results"]["statuses"] == {"400": 2}
    for value in (*SEEDED, NEW_EMAIL, md5(SEEDED_EMAIL), md5(NEW_EMAIL), "could not be processed",
                  "X-Amz-Signature"):
        assert value.lower() not in text.lower()


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
    assert result.credentials_refused is detail.startswith("credentials refused")
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

