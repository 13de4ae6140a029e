"""Tests for the call observers of connectors.base, through both connectors at the wire.

Every HTTP request a connector makes, retries included, must be reported once as
``(vendor, status)``: the reports are compared with the calls ``responses`` saw.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

import pytest
import requests
import responses
from urllib3.exceptions import ProtocolError

import connectors.mailchimp
from connectors.base import (
    NO_ANSWER_STATUSES,
    Action,
    add_call_observer,
    remove_call_observer,
    report_call,
)
from connectors.mailchimp import MailchimpConnector
from connectors.phorest import MAX_CONCURRENT_WRITES, PhorestConnector
from syncd.config import MailchimpSettings, PhorestSettings
from syncd.errors import ConnectorError, RetriableError
from syncd.retry import RetryPolicy

SEEDED_EMAIL = "zelda.quimby@example.org"

PHOREST_ROOT = "https://phorest.test/third-party-api-server"
CLIENTS_URL = f"{PHOREST_ROOT}/api/business/biz-1/client"
CLIENT_ID = "AbCdEfGhIjKlMnOpQrStUv"
CLIENT_URL = f"{CLIENTS_URL}/{CLIENT_ID}"

MAILCHIMP_KEY = "0123456789abcdef0123456789abcdef-us6"
LIST_ID = "a1b2c3d4e5"
MAILCHIMP_ROOT = "https://us6.api.mailchimp.com/3.0"
LIST_URL = f"{MAILCHIMP_ROOT}/lists/{LIST_ID}"
MEMBERS_URL = f"{LIST_URL}/members"
BATCHES_URL = f"{MAILCHIMP_ROOT}/batches"
RESULTS_URL = "https://mailchimp-api-batch.s3.amazonaws.com/b1.tar.gz"
PROBLEM_JSON = "application/problem+json; charset=utf-8"

# What a request that raised must be reported as, by the exception responses raised.
WIRE_FAILURES: dict[type[BaseException], str] = {
    requests.ReadTimeout: "timeout",
    requests.ConnectTimeout: "timeout",
    requests.ConnectionError: "connection_error",
    requests.exceptions.ChunkedEncodingError: "connection_error",
    requests.exceptions.ContentDecodingError: "invalid_response",
}


class Reports:
    """A call observer that keeps every ``(vendor, status)`` it is told, and the thread."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, str]] = []
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def __call__(self, vendor: str, status: str) -> None:
        with self._lock:
            self.heard.append((vendor, status))
            self.threads.add(threading.get_ident())

    def counted(self) -> Counter[tuple[str, str]]:
        with self._lock:
            return Counter(self.heard)


@pytest.fixture
def reports() -> Iterator[Reports]:
    """A registered :class:`Reports`, removed again after the test."""
    observer = Reports()
    add_call_observer(observer)
    yield observer
    remove_call_observer(observer)


def on_the_wire(mock: responses.RequestsMock, vendor: str) -> Counter[tuple[str, str]]:
    """What each call ``responses`` saw should have been reported as."""
    seen: Counter[tuple[str, str]] = Counter()
    for call in mock.calls:
        answer = call.response
        if isinstance(answer, BaseException):
            seen[(vendor, WIRE_FAILURES[type(answer)])] += 1
        else:
            seen[(vendor, str(answer.status_code))] += 1
    return seen


def expect(vendor: str, *statuses: str) -> Counter[tuple[str, str]]:
    return Counter((vendor, status) for status in statuses)


# -- Building the connectors ------------------------------------------------------------------


def make_phorest(*, attempts: int = 3) -> PhorestConnector:
    settings = PhorestSettings(
        base_url=PHOREST_ROOT, business_id="biz-1", username="global/owner@example.com",
        password="secret", page_size=2, max_requests_per_second=100, timeout_seconds=7,
    )
    return PhorestConnector(settings, retry=RetryPolicy(attempts=attempts),
                            session=requests.Session(), clock=time.monotonic,
                            sleep=lambda _seconds: None)


def make_mailchimp(*, attempts: int = 3) -> MailchimpConnector:
    settings = MailchimpSettings(api_key=MAILCHIMP_KEY, list_id=LIST_ID, timeout_seconds=7)
    return MailchimpConnector(settings, retry=RetryPolicy(attempts=attempts),
                              sleep=lambda _seconds: None)


def client_json(client_id: str = CLIENT_ID, *, consent: bool = True) -> dict[str, Any]:
    return {"clientId": client_id, "version": 4, "updatedAt": "2026-01-02T03:04:05.000Z",
            "firstName": "Zelda", "lastName": "Quimby", "email": SEEDED_EMAIL,
            "emailMarketingConsent": consent}


def envelope(rows: list[dict[str, Any]], *, number: int = 0, pages: int = 1) -> dict[str, Any]:
    return {"_embedded": {"clients": rows},
            "page": {"size": 2, "totalElements": len(rows), "totalPages": pages,
                     "number": number}}


def withdraw(client_id: str = CLIENT_ID) -> Action:
    return Action("withdraw_consent", "k" * 64, client_id=client_id)


def md5(email: str) -> str:
    return hashlib.md5(email.strip().lower().encode()).hexdigest()  # noqa: S324


def member_json(email: str = SEEDED_EMAIL) -> dict[str, Any]:
    return {"email_address": email, "status": "subscribed",
            "merge_fields": {"FNAME": "Zelda", "LNAME": "Quimby"},
            "last_changed": "2026-01-02T03:04:05+00:00"}


def problem(status: int, title: str) -> dict[str, Any]:
    """A Mailchimp refusal as ``responses`` kwargs; its detail names the address."""
    body = {"title": title, "status": status, "detail": f"{SEEDED_EMAIL} is refused",
            "instance": "r-1"}
    return {"status": status, "body": json.dumps(body), "content_type": PROBLEM_JSON}


def mailchimp_action(kind: str, email: str, **fields: Any) -> Action:
    return Action(kind=kind, subject_key="k" * 64, email=email, **fields)  # type: ignore[arg-type]


def results_archive(rows: list[dict[str, Any]]) -> bytes:
    """A ``response_body_url`` download: a gzipped tar holding one JSON array of results."""
    data = json.dumps(rows).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("b1/0.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# -- Every kind of answer, one call each --------------------------------------------------------

# One call's answer as responses kwargs, and the status it must be reported as.
ANSWERS = [
    pytest.param({"status": 200, "json": {}}, "200", id="200"),
    pytest.param({"status": 204, "body": ""}, "204", id="204"),
    pytest.param({"status": 401, "body": ""}, "401", id="401"),
    pytest.param({"status": 404, "body": ""}, "404", id="404"),
    pytest.param({"status": 429, "body": ""}, "429", id="429"),
    pytest.param({"status": 500, "body": ""}, "500", id="500"),
    pytest.param({"status": 503, "body": "<html>down</html>", "content_type": "text/html"},
                 "503", id="503-html"),
    pytest.param({"body": requests.ConnectionError("refused")}, "connection_error",
                 id="connection-refused"),
    pytest.param({"body": requests.ConnectionError(ProtocolError("Connection aborted."))},
                 "connection_error", id="dropped-after-sending"),
    pytest.param({"body": requests.exceptions.ChunkedEncodingError("cut short")},
                 "connection_error", id="body-cut-short"),
    pytest.param({"body": requests.ConnectTimeout("connect")}, "timeout", id="connect-timeout"),
    pytest.param({"body": requests.ReadTimeout("read")}, "timeout", id="read-timeout"),
    pytest.param({"body": requests.exceptions.ContentDecodingError("bad gzip")},
                 "invalid_response", id="undecodable"),
]


def phorest_once(mock: responses.RequestsMock, answer: dict[str, Any]) -> None:
    """check(): one list call, never retried."""
    mock.add(responses.GET, CLIENTS_URL, **answer)
    make_phorest().check()


def mailchimp_once(mock: responses.RequestsMock, answer: dict[str, Any]) -> None:
    """One members page, not retried."""
    mock.add(responses.GET, MEMBERS_URL, **answer)
    with suppress(ConnectorError):
        list(make_mailchimp(attempts=1).scan())


ONCE: dict[str, Callable[[responses.RequestsMock, dict[str, Any]], None]] = {
    "phorest": phorest_once,
    "mailchimp": mailchimp_once,
}


@pytest.mark.parametrize("vendor", sorted(ONCE))
@pytest.mark.parametrize(("answer", "status"), ANSWERS)
def test_each_answer_is_reported_once_as_its_status_or_kind_of_failure(
    wire: responses.RequestsMock, reports: Reports, vendor: str, answer: dict[str, Any],
    status: str,
) -> None:
    ONCE[vendor](wire, answer)
    assert reports.heard == [(vendor, status)]
    assert len(wire.calls) == 1


def test_the_statuses_of_calls_without_an_answer_are_a_small_fixed_set() -> None:
    assert NO_ANSWER_STATUSES == {"timeout", "connection_error", "invalid_response"}
    assert set(WIRE_FAILURES.values()) == NO_ANSWER_STATUSES


@pytest.mark.parametrize("vendor", sorted(ONCE))
def test_a_report_holds_no_url_message_or_address(
    wire: responses.RequestsMock, reports: Reports, vendor: str
) -> None:
    error = requests.ConnectionError(f"refused for {SEEDED_EMAIL} at {CLIENTS_URL}")
    ONCE[vendor](wire, {"body": error})
    assert reports.heard == [(vendor, "connection_error")]


# -- Phorest: pages, retries, withdrawals -------------------------------------------------------


def test_phorest_reports_every_page_and_every_retry_of_a_scan(
    script: responses.RequestsMock, reports: Reports
) -> None:
    script.add(responses.GET, CLIENTS_URL, json=envelope([client_json("c1")], pages=2))
    script.add(responses.GET, CLIENTS_URL, status=429)
    script.add(responses.GET, CLIENTS_URL, status=503)
    script.add(responses.GET, CLIENTS_URL, json=envelope([client_json("c2")], number=1, pages=2))
    assert [r.client_id for r in make_phorest().scan()] == ["c1", "c2"]
    assert reports.counted() == expect("phorest", "200", "429", "503", "200")
    assert reports.counted() == on_the_wire(script, "phorest")


def test_phorest_reports_a_withdrawal_get_put_get_with_its_timeouts_and_dropped_calls(
    script: responses.RequestsMock, reports: Reports
) -> None:
    script.add(responses.GET, CLIENT_URL, body=requests.ReadTimeout("read"))
    script.add(responses.GET, CLIENT_URL, json=client_json())
    script.add(responses.PUT, CLIENT_URL, body=requests.ConnectTimeout("connect"))
    script.add(responses.PUT, CLIENT_URL,
               body=requests.ConnectionError(ProtocolError("Connection aborted.")))
    script.add(responses.PUT, CLIENT_URL, json=client_json(consent=False))
    script.add(responses.GET, CLIENT_URL, json=client_json(consent=False))
    [outcome] = make_phorest().apply([withdraw()])
    assert (outcome.status, outcome.reason) == ("done", "withdrawn")
    assert reports.counted() == expect(
        "phorest", "timeout", "200", "timeout", "connection_error", "200", "200")
    assert reports.counted() == on_the_wire(script, "phorest")


def test_phorest_reports_refused_and_failed_withdrawals_on_concurrent_lanes(
    wire: responses.RequestsMock, reports: Reports
) -> None:
    # Several URLs registered alike are served in registration order, the last one repeating.
    wire.add(responses.GET, f"{CLIENTS_URL}/gone", status=404)
    wire.add(responses.GET, f"{CLIENTS_URL}/down", status=503)
    wire.add(responses.GET, f"{CLIENTS_URL}/busy", status=429)
    wire.add(responses.GET, f"{CLIENTS_URL}/busy", json=client_json("busy"))
    wire.add(responses.GET, f"{CLIENTS_URL}/busy", json=client_json("busy", consent=False))
    wire.add(responses.PUT, f"{CLIENTS_URL}/busy", json=client_json("busy", consent=False))
    outcomes = make_phorest().apply([withdraw("gone"), withdraw("down"), withdraw("busy")])
    assert [(o.status, o.reason) for o in outcomes] == [
        ("permanent", "not_found"), ("retriable", "server_error"), ("done", "withdrawn")]
    assert reports.counted() == expect(
        "phorest", "404", "503", "503", "503", "429", "200", "200", "200")
    assert reports.counted() == on_the_wire(wire, "phorest")


def test_phorest_reports_each_redirect_it_follows_as_a_call_of_its_own(
    script: responses.RequestsMock, reports: Reports
) -> None:
    moved = f"{PHOREST_ROOT}/moved/client"
    script.add(responses.GET, CLIENTS_URL, status=302, headers={"Location": moved})
    script.add(responses.GET, moved, json=envelope([client_json()]))
    assert make_phorest().check().ok
    assert reports.counted() == expect("phorest", "302", "200")
    assert reports.counted() == on_the_wire(script, "phorest")


def test_no_report_is_lost_across_phorests_concurrent_lanes(
    wire: responses.RequestsMock, reports: Reports
) -> None:
    # Every client answers its first GET with a 503, then holds the consent until the PUT.
    ids = [f"c{n:03d}" for n in range(120)]
    lock = threading.Lock()
    asked: Counter[str] = Counter()
    withdrawn: set[str] = set()

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        client_id = str(request.url).rpartition("/")[2]
        with lock:
            asked[client_id] += 1
            if request.method == "PUT":
                withdrawn.add(client_id)
            first, consent = asked[client_id] == 1, client_id not in withdrawn
        time.sleep(0.001)  # long enough for the lanes to overlap
        if first:
            return 503, {}, ""
        return 200, {}, json.dumps(client_json(client_id, consent=consent))

    pattern = re.compile(re.escape(CLIENTS_URL) + r"/c\d+$")
    wire.add_callback(responses.GET, pattern, callback=answer)
    wire.add_callback(responses.PUT, pattern, callback=answer)
    outcomes = make_phorest().apply([withdraw(client_id) for client_id in ids])
    assert {o.reason for o in outcomes} == {"withdrawn"}
    assert len(wire.calls) == 4 * len(ids)  # 503, GET, PUT, GET
    assert reports.counted() == expect("phorest", *["503"] * 120, *["200"] * 360)
    assert reports.counted() == on_the_wire(wire, "phorest")
    assert 1 < len(reports.threads) <= MAX_CONCURRENT_WRITES


# -- Mailchimp: pages, member(), apply with a /batches job ---------------------------------------


def test_mailchimp_reports_every_page_and_every_retry_of_a_scan(
    script: responses.RequestsMock, reports: Reports
) -> None:
    full = [member_json(f"m{n}@example.org") for n in range(1000)]
    script.add(responses.GET, MEMBERS_URL, json={"members": full, "total_items": 1001})
    script.add(responses.GET, MEMBERS_URL, status=429, body="")
    script.add(responses.GET, MEMBERS_URL, **problem(503, "Service Unavailable"))
    script.add(responses.GET, MEMBERS_URL, json={"members": [member_json()], "total_items": 1001})
    assert len(list(make_mailchimp().scan())) == 1001
    assert reports.counted() == expect("mailchimp", "200", "429", "503", "200")
    assert reports.counted() == on_the_wire(script, "mailchimp")


def test_mailchimp_reports_a_member_read_through_timeouts_and_dropped_connections(
    script: responses.RequestsMock, reports: Reports
) -> None:
    member_url = f"{MEMBERS_URL}/{md5(SEEDED_EMAIL)}"
    script.add(responses.GET, member_url, body=requests.ReadTimeout("read"))
    script.add(responses.GET, member_url, body=requests.ConnectionError("refused"))
    script.add(responses.GET, member_url, json=member_json())
    found = make_mailchimp().member(SEEDED_EMAIL)
    assert found is not None and found.email == SEEDED_EMAIL
    assert reports.counted() == expect("mailchimp", "timeout", "connection_error", "200")
    assert reports.counted() == on_the_wire(script, "mailchimp")


def test_mailchimp_reports_a_missing_member_and_the_list_check_it_leads_to(
    script: responses.RequestsMock, reports: Reports
) -> None:
    script.add(responses.GET, f"{MEMBERS_URL}/{md5(SEEDED_EMAIL)}",
               **problem(404, "Resource Not Found"))
    script.add(responses.GET, LIST_URL, json={"id": LIST_ID})
    assert make_mailchimp().member(SEEDED_EMAIL) is None
    assert reports.counted() == expect("mailchimp", "404", "200")
    assert reports.counted() == on_the_wire(script, "mailchimp")


def test_mailchimp_reports_every_call_of_an_apply_with_a_batches_job_and_its_retries(
    wire: responses.RequestsMock, reports: Reports, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One wave: two subscribes (POST /lists/{id}), two updates and an erase (/batches: submit,
    # poll, download), a move (PATCH, 404, then the list check). Each first try fails.
    # Batches of 4 keep the subscribes out of the batch (they would fill it otherwise).
    monkeypatch.setattr(connectors.mailchimp, "BATCH_OPERATIONS", 4)
    actions = [
        mailchimp_action("subscribe", "a@example.org", first_name="A"),
        mailchimp_action("subscribe", "b@example.org", first_name="B"),
        mailchimp_action("update_names", "c@example.org", first_name="C"),
        mailchimp_action("update_names", "d@example.org", first_name="D"),
        mailchimp_action("erase", "e@example.org"),
        mailchimp_action("move_email", "f@example.org", new_email="g@example.org"),
    ]
    wire.add(responses.POST, LIST_URL, **problem(503, "Service Unavailable"))
    wire.add(responses.POST, LIST_URL, json={"new_members": [], "errors": []})
    wire.add(responses.POST, BATCHES_URL, body=requests.ConnectTimeout("connect"))
    wire.add(responses.POST, BATCHES_URL, json={"id": "b1", "status": "pending"})
    wire.add(responses.GET, f"{BATCHES_URL}/b1", status=429, body="")
    wire.add(responses.GET, f"{BATCHES_URL}/b1",
             json={"id": "b1", "status": "finished", "response_body_url": RESULTS_URL})
    results = [{"status_code": 200, "operation_id": "2", "response": "{}"},
               {"status_code": 200, "operation_id": "3", "response": "{}"},
               {"status_code": 204, "operation_id": "4", "response": ""}]
    wire.add(responses.GET, RESULTS_URL, body=requests.ReadTimeout("read"))
    wire.add(responses.GET, RESULTS_URL, body=results_archive(results),
             content_type="application/gzip")
    wire.add(responses.PATCH, f"{MEMBERS_URL}/{md5('f@example.org')}",
             **problem(404, "Resource Not Found"))
    wire.add(responses.GET, LIST_URL, json={"id": LIST_ID})
    outcomes = make_mailchimp().apply(actions)
    assert [(o.status, o.reason) for o in outcomes] == [
        ("done", None), ("done", None), ("done", None), ("done", None), ("done", None),
        ("done", "absent")]
    assert reports.counted() == expect(
        "mailchimp",
        "503", "200",  # POST /lists/{id}
        "timeout", "200",  # POST /batches
        "429", "200",  # GET /batches/b1
        "timeout", "200",  # GET response_body_url
        "404", "200",  # the move, then the list check
    )
    assert reports.counted() == on_the_wire(wire, "mailchimp")


def test_mailchimp_reports_an_erase_answered_204_and_a_spent_retry(
    wire: responses.RequestsMock, reports: Reports
) -> None:
    wire.add(responses.POST, f"{MEMBERS_URL}/{md5('e@example.org')}/actions/delete-permanent",
             status=204, body="")
    wire.add(responses.PATCH, f"{MEMBERS_URL}/{md5('u@example.org')}",
             **problem(500, "Internal Server Error"))
    outcomes = make_mailchimp().apply([
        mailchimp_action("erase", "e@example.org"),
        mailchimp_action("unsubscribe", "u@example.org"),
    ])
    assert [o.status for o in outcomes] == ["done", "retriable"]
    assert reports.counted() == expect("mailchimp", "204", "500", "500", "500")
    assert reports.counted() == on_the_wire(wire, "mailchimp")


def test_a_body_the_sdk_cannot_encode_makes_no_call_and_no_report(
    wire: responses.RequestsMock, reports: Reports
) -> None:
    bad = mailchimp_action("clear_extra_fields", SEEDED_EMAIL, fields=(object(),))
    [outcome] = make_mailchimp().apply([bad])
    assert (outcome.status, outcome.reason) == ("permanent", "request_failed")
    assert reports.heard == [] and len(wire.calls) == 0


def test_mailchimps_check_reports_the_ping_and_the_list_read(
    script: responses.RequestsMock, reports: Reports
) -> None:
    script.add(responses.GET, f"{MAILCHIMP_ROOT}/ping", json={"health_status": "Chimpy"})
    script.add(responses.GET, LIST_URL, json={"id": LIST_ID, "stats": {"member_count": 3}})
    assert make_mailchimp().check().ok
    assert reports.counted() == expect("mailchimp", "200", "200")


# -- The observers themselves -------------------------------------------------------------------


@pytest.mark.parametrize("vendor", sorted(ONCE))
def test_an_observer_that_raises_neither_breaks_the_call_nor_silences_the_others(
    wire: responses.RequestsMock, reports: Reports, captured_log: io.StringIO, vendor: str
) -> None:
    def broken(_vendor: str, _status: str) -> None:
        raise RuntimeError(f"cannot count {SEEDED_EMAIL}")

    add_call_observer(broken)
    try:
        ONCE[vendor](wire, {"status": 200, "json": {"members": [], "total_items": 0}
                            if vendor == "mailchimp" else envelope([])})
    finally:
        remove_call_observer(broken)
    assert reports.heard == [(vendor, "200")]
    failures = [json.loads(line) for line in captured_log.getvalue().splitlines()
                if "call_observer_failed" in line]
    assert [(f["vendor"], f["error"], f["level"]) for f in failures] == [
        (vendor, "RuntimeError", "debug")]
    assert SEEDED_EMAIL not in captured_log.getvalue()


def test_a_phorest_call_still_succeeds_when_every_observer_raises(
    wire: responses.RequestsMock,
) -> None:
    def broken(_vendor: str, _status: str) -> None:
        raise ValueError("observer bug")

    add_call_observer(broken)
    try:
        wire.add(responses.GET, CLIENTS_URL, json=envelope([client_json()]))
        result = make_phorest().check()
    finally:
        remove_call_observer(broken)
    assert (result.ok, result.extra) == (True, {"clients": "1"})


@pytest.mark.parametrize("vendor", sorted(ONCE))
def test_a_removed_observer_hears_no_more_calls(
    wire: responses.RequestsMock, vendor: str
) -> None:
    observer = Reports()
    add_call_observer(observer)
    try:
        ONCE[vendor](wire, {"status": 429, "body": ""})
    finally:
        remove_call_observer(observer)
    ONCE[vendor](wire, {"status": 503, "body": ""})
    assert observer.heard == [(vendor, "429")]
    assert len(wire.calls) == 2


def test_an_observer_added_twice_hears_each_call_once_and_removing_a_stranger_is_harmless(
    reports: Reports,
) -> None:
    add_call_observer(reports)
    remove_call_observer(Reports())
    report_call("phorest", "200")
    assert reports.heard == [("phorest", "200")]


def test_a_bound_method_is_removed_by_an_equal_bound_method() -> None:
    observer = Reports()
    add_call_observer(observer.__call__)
    remove_call_observer(observer.__call__)  # a new, equal, bound-method object
    report_call("mailchimp", "200")
    assert observer.heard == []


def test_an_observer_removing_itself_mid_report_costs_the_others_nothing(
    reports: Reports,
) -> None:
    # Observers are told from a snapshot: one leaving must not shift the others out of the
    # loop, nor wait on a lock the report holds (which would hang: hence the thread).
    remove_call_observer(reports)

    def once_only(_vendor: str, _status: str) -> None:
        remove_call_observer(once_only)

    add_call_observer(once_only)
    add_call_observer(reports)
    sender = threading.Thread(target=lambda: [report_call("phorest", s) for s in ("1", "2")])
    sender.start()
    sender.join(timeout=5)
    assert not sender.is_alive()
    assert reports.heard == [("phorest", "1"), ("phorest", "2")]


REPORTS_PER_LANE = 500


def test_observers_added_and_removed_while_lanes_report_lose_no_report(
    reports: Reports,
) -> None:
    # Others come and go ahead of the one that counts, as a scrape registry might.
    stop = threading.Event()
    strangers = [Reports() for _ in range(20)]
    for stranger in strangers:
        add_call_observer(stranger)
    remove_call_observer(reports)
    add_call_observer(reports)

    def churn() -> None:
        while not stop.is_set():
            for stranger in strangers:
                remove_call_observer(stranger)
                add_call_observer(stranger)

    churner = threading.Thread(target=churn)
    churner.start()
    def lane() -> None:
        for _ in range(REPORTS_PER_LANE):
            report_call("phorest", "200")

    lanes = [threading.Thread(target=lane) for _ in range(MAX_CONCURRENT_WRITES)]
    try:
        for lane in lanes:
            lane.start()
        for lane in lanes:
            lane.join()
    finally:
        stop.set()
        churner.join()
        for stranger in strangers:
            remove_call_observer(stranger)
    sent = REPORTS_PER_LANE * MAX_CONCURRENT_WRITES
    assert reports.counted() == Counter({("phorest", "200"): sent})


def test_a_retriable_failure_is_still_raised_after_being_reported(
    script: responses.RequestsMock, reports: Reports
) -> None:
    for _ in range(3):
        script.add(responses.GET, CLIENTS_URL, body=requests.ReadTimeout("read"))
    with pytest.raises(RetriableError) as caught:
        list(make_phorest().scan())
    assert caught.value.title == "timeout"
    assert reports.counted() == expect("phorest", "timeout", "timeout", "timeout")
