"""Tests for connectors.phorest, faked at the wire with ``responses`` (STYLE item 14)."""

from __future__ import annotations

import base64
import bisect
import io
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

import pytest
import requests
import responses
import structlog
from responses import matchers
from urllib3.exceptions import ProtocolError

from connectors.base import Action, ClientRecord, Record
from connectors.phorest import MAX_CONCURRENT_WRITES, PhorestConnector, RateLimiter
from syncd.config import PhorestSettings
from syncd.errors import ConnectorError, PermanentError, RetriableError
from syncd.retry import RetryPolicy
from syncd.sandbox.http import SandboxServer, Traffic
from syncd.sandbox.phorest import PhorestEmulator

BASE_URL = "https://phorest.test/third-party-api-server"
BUSINESS = "biz-1"
USERNAME = "global/gérante@example.com"
PASSWORD = "pässwörd"
CLIENTS_URL = f"{BASE_URL}/api/business/{BUSINESS}/client"
CLIENT_ID = "AbCdEfGhIjKlMnOpQrStUv"
CLIENT_URL = f"{CLIENTS_URL}/{CLIENT_ID}"
PAGE_SIZE = 2
LIST_FLAGS = {"includeArchived": "true", "includeDeleted": "true"}

SEEDED_EMAIL = "zelda.quimby@example.org"
SEEDED_FIRST_NAME = "Zelda"
SEEDED_LAST_NAME = "Quimby"
SEEDED_MOBILE = "447700900123"
SEEDED = (SEEDED_EMAIL, SEEDED_FIRST_NAME, SEEDED_LAST_NAME, SEEDED_MOBILE, PASSWORD)


def client_json(client_id: str = CLIENT_ID, **overrides: Any) -> dict[str, Any]:
    """A client as Phorest returns it (the emulator's field set)."""
    body: dict[str, Any] = {
        "clientId": client_id,
        "version": 4,
        "createdAt": "2024-03-01T10:00:00.000Z",
        "updatedAt": "2026-01-02T03:04:05.000Z",
        "firstName": SEEDED_FIRST_NAME,
        "lastName": SEEDED_LAST_NAME,
        "email": SEEDED_EMAIL,
        "mobile": SEEDED_MOBILE,
        "landLine": None,
        "smsMarketingConsent": True,
        "emailMarketingConsent": True,
        "smsReminderConsent": True,
        "emailReminderConsent": False,
        "archived": False,
        "banned": False,
        "deleted": False,
        "mergedToClientId": None,
        "lastVisit": "2025-10-21",
        "notes": "prefers mornings",
        "address": {"streetAddress1": "1 High St", "city": "Cork"},
    }
    body.update(overrides)
    return body


def envelope(
    rows: list[dict[str, Any]] | None,
    *,
    number: int = 0,
    total: int | None = None,
    total_pages: int = 1,
    size: int = PAGE_SIZE,
) -> dict[str, Any]:
    """A list answer; ``rows=None`` leaves ``_embedded`` out, as Spring HATEOAS does."""
    body: dict[str, Any] = {}
    if rows is not None:
        body["_embedded"] = {"clients": rows}
    count = len(rows or []) if total is None else total
    body["page"] = {
        "size": size,
        "totalElements": count,
        "totalPages": total_pages,
        "number": number,
    }
    return body


@dataclass
class FakeTime:
    """A monotonic clock that moves one second per reading; sleeping records and advances."""

    now: float = 1000.0
    tick_seconds: float = 1.0
    sleeps: list[float] = field(default_factory=list)

    def clock(self) -> float:
        self.now += self.tick_seconds
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class SharedFakeTime:
    """A fake monotonic clock many threads can share.

    Each reading moves it on by ``tick_seconds``. Sleeping only records: with
    several threads waiting at once, no single clock could follow them all, and
    the limiter under test reports the slot each caller waited for anyway.
    """

    now: float = 1000.0
    tick_seconds: float = 0.0
    sleeps: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clock(self) -> float:
        with self.lock:
            self.now += self.tick_seconds
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.sleeps.append(seconds)


def make_settings(**overrides: Any) -> PhorestSettings:
    values: dict[str, Any] = {
        "base_url": BASE_URL,
        "business_id": BUSINESS,
        "username": USERNAME,
        "password": PASSWORD,
        "page_size": PAGE_SIZE,
        "max_requests_per_second": 20,
        "timeout_seconds": 7,
    }
    values.update(overrides)
    return PhorestSettings(**values)


def make_connector(
    time: FakeTime | SharedFakeTime, *, attempts: int = 3, **settings: Any
) -> PhorestConnector:
    return PhorestConnector(
        make_settings(**settings),
        retry=RetryPolicy(attempts=attempts),
        session=requests.Session(),
        clock=time.clock,
        sleep=time.sleep,
    )


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


def action(kind: str = "withdraw_consent", client_id: str | None = CLIENT_ID) -> Action:
    return Action(kind=kind, subject_key="k" * 64, client_id=client_id)  # type: ignore[arg-type]


def client_ids(records: Iterable[Record]) -> list[str]:
    return [record.client_id for record in records if isinstance(record, ClientRecord)]


def methods(mock: responses.RequestsMock) -> list[str]:
    return [str(call.request.method) for call in mock.calls]


# -- Classification --------------------------------------------------------------

ONE_PAGE = envelope([client_json()])


@pytest.mark.parametrize(
    ("answer", "expectation", "title", "reached_server"),
    [
        pytest.param({"status": 200, "json": ONE_PAGE}, nullcontext(), None, None, id="200"),
        pytest.param(
            {"status": 401}, pytest.raises(PermanentError), "unauthorized", None, id="401"
        ),
        pytest.param(
            {"status": 403}, pytest.raises(PermanentError), "unauthorized", None, id="403"
        ),
        pytest.param({"status": 404}, pytest.raises(PermanentError), "not_found", None, id="404"),
        pytest.param(
            {"status": 409}, pytest.raises(PermanentError), "stale_version", None, id="409"
        ),
        pytest.param({"status": 400}, pytest.raises(PermanentError), "rejected", None, id="400"),
        pytest.param(
            {"status": 429}, pytest.raises(RetriableError), "rate_limited", True, id="429"
        ),
        pytest.param(
            {"status": 500}, pytest.raises(RetriableError), "server_error", True, id="500"
        ),
        pytest.param(
            {"status": 503}, pytest.raises(RetriableError), "server_error", True, id="503"
        ),
        pytest.param(
            {"body": requests.ConnectionError("refused")},
            pytest.raises(RetriableError),
            "connection_failed",
            False,
            id="connection-refused",
        ),
        pytest.param(
            {"body": requests.ConnectionError(ProtocolError("Connection aborted."))},
            pytest.raises(RetriableError),
            "connection_failed",
            None,
            id="connection-dropped-after-sending",
        ),
        pytest.param(
            {"body": requests.ConnectTimeout()},
            pytest.raises(RetriableError),
            "timeout",
            False,
            id="connect-timeout",
        ),
        pytest.param(
            {"body": requests.ReadTimeout()},
            pytest.raises(RetriableError),
            "timeout",
            None,
            id="read-timeout",
        ),
        pytest.param(
            {"status": 200, "body": "<html>gateway</html>"},
            pytest.raises(PermanentError),
            "bad_response",
            None,
            id="malformed-json",
        ),
        pytest.param(
            {"status": 200, "json": {"clients": []}},
            pytest.raises(PermanentError),
            "bad_response",
            None,
            id="malformed-envelope",
        ),
        pytest.param(
            {"status": 200, "json": envelope([{"firstName": "No id"}])},
            pytest.raises(PermanentError),
            "bad_response",
            None,
            id="client-without-id",
        ),
    ],
)
def test_every_answer_is_classified_in_one_place(
    wire: responses.RequestsMock,
    fake_time: FakeTime,
    answer: dict[str, Any],
    expectation: AbstractContextManager[Any],
    title: str | None,
    reached_server: bool | None,
) -> None:
    wire.add(responses.GET, CLIENTS_URL, **answer)
    connector = make_connector(fake_time, attempts=1)
    with expectation as raised:
        records = list(connector.scan())
    if title is None:
        assert [r.client_id for r in records] == [CLIENT_ID]
        return
    error = raised.value
    assert error.title == title
    assert error.reached_server is reached_server
    if answer.get("status", 200) != 200:
        assert error.status == answer["status"]
    # The message names the call by template: no host, no query string, no body.
    assert str(error).startswith("GET /api/business/{business_id}/client")
    assert "?" not in str(error) and "phorest.test" not in str(error)
    assert "gateway" not in str(error)


@pytest.mark.parametrize(
    ("answer", "status", "reason", "retry_after"),
    [
        pytest.param({"status": 404}, "permanent", "not_found", None, id="404"),
        pytest.param({"status": 401}, "permanent", "unauthorized", None, id="401"),
        pytest.param({"status": 503}, "retriable", "server_error", None, id="503"),
        pytest.param(
            {"status": 429, "headers": {"Retry-After": "12"}},
            "retriable",
            "rate_limited",
            12.0,
            id="429-retry-after",
        ),
        pytest.param(
            {"body": requests.ConnectionError("refused")},
            "retriable",
            "connection_failed",
            None,
            id="connection-refused",
        ),
        pytest.param(
            {"status": 200, "json": [client_json()]},
            "permanent",
            "bad_response",
            None,
            id="not-an-object",
        ),
        pytest.param(
            {"status": 200, "body": "not json"},
            "permanent",
            "bad_response",
            None,
            id="malformed-json",
        ),
    ],
)
def test_apply_turns_failures_into_outcomes_not_exceptions(
    wire: responses.RequestsMock,
    fake_time: FakeTime,
    answer: dict[str, Any],
    status: str,
    reason: str,
    retry_after: float | None,
) -> None:
    wire.add(responses.GET, CLIENT_URL, **answer)
    [outcome] = make_connector(fake_time).apply([action()])
    assert (outcome.status, outcome.reason) == (status, reason)
    assert outcome.retry_after_seconds == retry_after
    assert "PUT" not in methods(wire)


# -- Retries -----------------------------------------------------------------------


def test_a_page_read_survives_two_503s(script: responses.RequestsMock, fake_time: FakeTime) -> None:
    script.add(responses.GET, CLIENTS_URL, status=503)
    script.add(responses.GET, CLIENTS_URL, status=503)
    script.add(responses.GET, CLIENTS_URL, json=ONE_PAGE)
    records = list(make_connector(fake_time).scan())
    assert [r.client_id for r in records] == [CLIENT_ID]
    assert len(script.calls) == 3
    assert len(fake_time.sleeps) == 2  # injected: the test never really slept


def test_three_503s_give_up_with_a_retriable_error(
    script: responses.RequestsMock, fake_time: FakeTime
) -> None:
    for _ in range(3):
        script.add(responses.GET, CLIENTS_URL, status=503)
    with pytest.raises(RetriableError):
        list(make_connector(fake_time).scan())
    assert len(script.calls) == 3


@pytest.mark.parametrize(
    ("header", "wait"),
    [pytest.param("7", 7.0, id="honoured"), pytest.param("3600", 60.0, id="capped")],
)
def test_a_429_waits_as_long_as_retry_after_says_up_to_the_cap(
    script: responses.RequestsMock, fake_time: FakeTime, header: str, wait: float
) -> None:
    script.add(responses.GET, CLIENTS_URL, status=429, headers={"Retry-After": header})
    script.add(responses.GET, CLIENTS_URL, json=ONE_PAGE)
    list(make_connector(fake_time).scan())
    assert fake_time.sleeps == [wait]


def test_a_permanent_error_is_not_retried(
    script: responses.RequestsMock, fake_time: FakeTime
) -> None:
    script.add(responses.GET, CLIENTS_URL, status=400)
    with pytest.raises(PermanentError):
        list(make_connector(fake_time).scan())
    assert len(script.calls) == 1
    assert fake_time.sleeps == []


def test_requests_are_spaced_by_the_client_side_rate_limit(wire: responses.RequestsMock) -> None:
    wire.add(responses.GET, CLIENTS_URL, json=envelope([], total=0))
    still = FakeTime(tick_seconds=0.0)  # no time passes between requests
    connector = make_connector(still, max_requests_per_second=4)
    connector.check()
    connector.check()
    connector.check()
    assert still.sleeps == [0.25, 0.25]


@pytest.mark.parametrize(
    ("rate", "threads", "each", "tick"),
    [
        pytest.param(10, 8, 25, 0.003, id="8-threads-faster-than-the-limit"),
        pytest.param(90, 8, 50, 0.001, id="90-per-second"),
        pytest.param(4, 3, 7, 0.0, id="still-clock"),
        pytest.param(10, 8, 25, 0.07, id="clock-sometimes-past-the-next-slot"),
        pytest.param(90, 4, 20, 0.02, id="clock-slower-than-the-limit"),
    ],
)
def test_the_rate_limiter_schedules_at_most_rate_starts_in_any_second_across_threads(
    rate: int, threads: int, each: int, tick: float
) -> None:
    time = SharedFakeTime(tick_seconds=tick)
    limiter = RateLimiter(rate, clock=time.clock, sleep=time.sleep)
    start = threading.Barrier(threads)
    slots_by_thread: list[list[float]] = [[] for _ in range(threads)]

    def take(mine: list[float]) -> None:
        start.wait()
        for _ in range(each):
            mine.append(limiter.acquire())

    workers = [threading.Thread(target=take, args=(mine,)) for mine in slots_by_thread]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    slots = sorted(slot for mine in slots_by_thread for slot in mine)
    assert len(slots) == threads * each
    assert all(mine == sorted(mine) for mine in slots_by_thread)
    epsilon = 1e-9  # slots are sums of floats
    for i, slot in enumerate(slots):
        in_window = bisect.bisect_left(slots, slot + 1.0 - epsilon) - i
        assert in_window <= rate, f"{in_window} starts in the second from {slot}"
    gaps = [later - earlier for earlier, later in zip(slots, slots[1:])]
    assert min(gaps) >= 1.0 / rate - epsilon
    if tick * threads * each < len(slots) / rate / 2:
        # The clock never catches up: every slot follows the last by exactly one interval.
        assert slots[-1] - slots[0] == pytest.approx((len(slots) - 1) / rate)
    assert all(seconds > 0 for seconds in time.sleeps)


def test_the_rate_limiter_refuses_a_rate_that_is_not_positive() -> None:
    with pytest.raises(ValueError):
        RateLimiter(0)


# -- Wire format -------------------------------------------------------------------


def test_every_call_sends_utf8_basic_auth_json_accept_and_a_timeout(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.add(responses.GET, CLIENTS_URL, json=envelope([], total=0))
    make_connector(fake_time).check()
    request = wire.calls[0].request
    scheme, _, token = str(request.headers["Authorization"]).partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(token).decode("utf-8") == f"{USERNAME}:{PASSWORD}"
    assert request.headers["Accept"] == "application/json"
    assert request.req_kwargs["timeout"] == 7  # type: ignore[attr-defined]


def test_client_ids_are_url_encoded_in_the_path(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    odd_id = "ab/cd=="
    wire.add(
        responses.GET,
        f"{CLIENTS_URL}/ab%2Fcd%3D%3D",
        json=client_json(odd_id, emailMarketingConsent=False),
    )
    [outcome] = make_connector(fake_time).apply([action(client_id=odd_id)])
    assert (outcome.status, outcome.reason) == ("done", "already")


# -- check() ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "ok", "detail"),
    [
        pytest.param(
            {"json": envelope([client_json()], total=42)}, True, "credentials accepted", id="200"
        ),
        pytest.param({"status": 401}, False, "credentials refused (401)", id="401"),
        pytest.param({"status": 403}, False, "credentials refused (403)", id="403"),
        pytest.param({"status": 503}, False, "unreachable: GET", id="503"),
        pytest.param(
            {"body": requests.ConnectionError("refused")}, False, "unreachable: GET", id="network"
        ),
        pytest.param({"status": 404}, False, "refused: GET", id="unknown-business"),
    ],
)
def test_check_reports_instead_of_raising_and_makes_one_call(
    wire: responses.RequestsMock, fake_time: FakeTime, answer: dict[str, Any], ok: bool, detail: str
) -> None:
    wire.add(responses.GET, CLIENTS_URL, **answer)
    result = make_connector(fake_time).check()
    assert result.ok is ok
    assert result.detail.startswith(detail)
    assert result.credentials_refused is detail.startswith("credentials refused")
    assert len(wire.calls) == 1
    if ok:
        assert result.extra == {"clients": "42"}


# -- scan() -------------------------------------------------------------------------


def page_query(number: int, **extra: str) -> Any:
    return matchers.query_param_matcher(
        {**LIST_FLAGS, **extra, "page": str(number), "size": str(PAGE_SIZE)}
    )


def pages_asked(wire: responses.RequestsMock) -> list[int]:
    """The page numbers of the list calls made, in the order they were sent."""
    return [int(call.request.params["page"]) for call in wire.calls]


def test_scan_pages_until_an_empty_page_without_embedded(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    # totalPages overstates: the third page is empty and Spring leaves _embedded out.
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(0)],
        json=envelope([client_json("a"), client_json("b")], total=4, total_pages=4),
    )
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(1)],
        json=envelope([client_json("c")], number=1, total=4, total_pages=4),
    )
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(2)],
        json=envelope(None, number=2, total=4, total_pages=4),
    )
    # Read ahead, page 3 may be asked for before page 2 is seen empty: never past it.
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(3)],
        json=envelope(None, number=3, total=4, total_pages=4),
    )
    assert [r.client_id for r in make_connector(fake_time).scan()] == ["a", "b", "c"]
    assert set(pages_asked(wire)) <= {0, 1, 2, 3}


def test_scan_stops_at_the_last_page_without_asking_for_more(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(0)],
        json=envelope([client_json("a"), client_json("b")], total=3, total_pages=2),
    )
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(1)],
        json=envelope([client_json("c")], number=1, total=3, total_pages=2),
    )
    assert [r.client_id for r in make_connector(fake_time).scan()] == ["a", "b", "c"]
    assert len(wire.calls) == 2


def test_scan_streams_one_page_at_a_time(wire: responses.RequestsMock, fake_time: FakeTime) -> None:
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(0)],
        json=envelope([client_json("a"), client_json("b")], total=3, total_pages=2),
    )
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(1)],
        json=envelope([client_json("c")], number=1, total=3, total_pages=2),
    )
    records = make_connector(fake_time).scan()
    assert next(records).client_id == "a"
    assert len(wire.calls) == 1


def test_scan_refuses_a_page_number_phorest_did_not_honour(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.add(
        responses.GET,
        CLIENTS_URL,
        json=envelope([client_json("a"), client_json("b")], total=4, total_pages=2),
    )
    with pytest.raises(PermanentError) as raised:
        list(make_connector(fake_time).scan())
    assert raised.value.title == "bad_response"
    assert len(wire.calls) == 2


# -- changes() ----------------------------------------------------------------------

CURSOR = "2026-01-02T03:04:05.000Z"
SENT_UPDATED_AFTER = "2026-01-02T03:02:05.000Z"  # the cursor minus the 2-minute overlap
UNFILTERED_COUNT = matchers.query_param_matcher({**LIST_FLAGS, "size": "1"})


def test_changes_asks_from_the_cursor_minus_the_overlap_and_returns_the_newest_update(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    rows = [
        client_json("a", updatedAt="2026-01-02T03:03:00.000Z"),
        client_json("b", updatedAt="2026-01-02T03:10:00.123Z"),
    ]
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(0, updatedAfter=SENT_UPDATED_AFTER)],
        json=envelope(rows),
    )
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[UNFILTERED_COUNT],
        json=envelope([client_json()], total=500, size=1),
    )
    changes = make_connector(fake_time).changes(CURSOR)
    assert client_ids(changes.records) == ["a", "b"]
    assert changes.cursor == "2026-01-02T03:10:00.123Z"
    assert changes.full is False


def test_changes_keeps_the_cursor_when_only_the_overlap_came_back(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    rows = [client_json("a", updatedAt="2026-01-02T03:03:00.000Z")]
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(0, updatedAfter=SENT_UPDATED_AFTER)],
        json=envelope(rows),
    )
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[UNFILTERED_COUNT],
        json=envelope([client_json()], total=500, size=1),
    )
    assert make_connector(fake_time).changes(CURSOR).cursor == CURSOR


def test_changes_with_nothing_new_keeps_the_cursor_and_skips_the_count(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(0, updatedAfter=SENT_UPDATED_AFTER)],
        json=envelope([], total=0),
    )
    changes = make_connector(fake_time).changes(CURSOR)
    assert (changes.records, changes.cursor, changes.full) == ((), CURSOR, False)
    assert len(wire.calls) == 1


def test_changes_flags_a_full_answer_when_phorest_ignored_the_filter(
    wire: responses.RequestsMock, fake_time: FakeTime, captured_log: io.StringIO
) -> None:
    rows = [
        client_json("old", updatedAt="2020-01-01T00:00:00.000Z"),
        client_json("new", updatedAt="2026-01-02T03:10:00.000Z"),
    ]
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(0, updatedAfter=SENT_UPDATED_AFTER)],
        json=envelope(rows, total=2),
    )
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[UNFILTERED_COUNT],
        json=envelope([client_json()], total=2, size=1),
    )
    changes = make_connector(fake_time).changes(CURSOR)
    assert changes.full is True
    assert client_ids(changes.records) == ["old", "new"]
    assert "phorest_filter_ignored" in captured_log.getvalue()


def test_changes_where_every_client_really_changed_is_not_flagged_full(
    wire: responses.RequestsMock, fake_time: FakeTime, captured_log: io.StringIO
) -> None:
    rows = [client_json("a", updatedAt="2026-01-02T03:10:00.000Z")]
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(0, updatedAfter=SENT_UPDATED_AFTER)],
        json=envelope(rows, total=1),
    )
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[UNFILTERED_COUNT],
        json=envelope([client_json()], total=1, size=1),
    )
    changes = make_connector(fake_time).changes(CURSOR)
    assert (client_ids(changes.records), changes.full) == (["a"], False)
    assert "phorest_filter_ignored" not in captured_log.getvalue()


@pytest.mark.parametrize("cursor", [None, "", "yesterday"], ids=["none", "empty", "garbage"])
def test_changes_without_a_usable_cursor_is_a_full_scan(
    wire: responses.RequestsMock, fake_time: FakeTime, cursor: str | None
) -> None:
    wire.add(
        responses.GET,
        CLIENTS_URL,
        match=[page_query(0)],
        json=envelope([client_json("a", updatedAt="2026-01-02T03:10:00.000+0000")]),
    )
    changes = make_connector(fake_time).changes(cursor)
    assert changes.full is True
    assert changes.cursor == "2026-01-02T03:10:00.000Z"
    assert "updatedAfter" not in str(wire.calls[0].request.url)


# -- Record mapping -----------------------------------------------------------------

FORGOTTEN = {
    "firstName": "Anonymous",
    "lastName": "",
    "email": None,
    "mobile": None,
    "emailMarketingConsent": False,
}


@pytest.mark.parametrize(
    ("overrides", "state", "merged_into"),
    [
        pytest.param({}, "active", None, id="active"),
        pytest.param({"archived": True}, "archived", None, id="archived"),
        pytest.param({"deleted": True, "archived": True}, "deleted", None, id="deleted"),
        pytest.param(
            {"mergedToClientId": "Survivor", "deleted": True},
            "merged",
            "Survivor",
            id="merged-wins",
        ),
        pytest.param(FORGOTTEN, "forgotten", None, id="forgotten"),
        pytest.param(
            {**FORGOTTEN, "archived": True}, "forgotten", None, id="forgotten-while-archived"
        ),
        pytest.param({**FORGOTTEN, "firstName": ""}, "forgotten", None, id="forgotten-blank"),
        pytest.param({"email": None, "mobile": None}, "active", None, id="named-without-contact"),
        pytest.param(
            {**FORGOTTEN, "email": SEEDED_EMAIL}, "active", None, id="anonymous-with-email"
        ),
    ],
)
def test_records_map_phorest_states(
    wire: responses.RequestsMock,
    fake_time: FakeTime,
    overrides: dict[str, Any],
    state: str,
    merged_into: str | None,
) -> None:
    wire.add(responses.GET, CLIENTS_URL, json=envelope([client_json(**overrides)]))
    [record] = make_connector(fake_time).scan()
    assert record.state == state
    assert record.merged_into == merged_into


def test_a_record_carries_identity_consent_version_and_dates(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.add(responses.GET, CLIENTS_URL, json=envelope([client_json(email="")]))
    [record] = make_connector(fake_time).scan()
    assert record == ClientRecord(
        client_id=CLIENT_ID,
        email=None,  # Phorest's "" means no address
        mobile=SEEDED_MOBILE,
        first_name=SEEDED_FIRST_NAME,
        last_name=SEEDED_LAST_NAME,
        email_consent=True,
        state="active",
        version=4,
        updated_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        created_at=datetime(2024, 3, 1, 10, 0, tzinfo=UTC),
        last_visit=date(2025, 10, 21),
    )


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"version": None}, id="no-version"),
        pytest.param({"version": "4"}, id="string-version"),
        pytest.param({"updatedAt": "last tuesday"}, id="bad-updated-at"),
        pytest.param({"clientId": ""}, id="blank-id"),
    ],
)
def test_a_client_we_cannot_key_or_order_is_a_bad_response(
    wire: responses.RequestsMock, fake_time: FakeTime, overrides: dict[str, Any]
) -> None:
    wire.add(responses.GET, CLIENTS_URL, json=envelope([client_json(**overrides)]))
    with pytest.raises(PermanentError) as raised:
        list(make_connector(fake_time).scan())
    assert raised.value.title == "bad_response"


def test_unparseable_optional_dates_are_left_out(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.add(
        responses.GET, CLIENTS_URL, json=envelope([client_json(createdAt=None, lastVisit="never")])
    )
    [record] = make_connector(fake_time).scan()
    assert (record.created_at, record.last_visit) == (None, None)


# -- apply(): withdraw_consent -------------------------------------------------------


def test_withdraw_consent_puts_back_the_whole_client_with_only_the_flag_flipped(
    script: responses.RequestsMock, fake_time: FakeTime
) -> None:
    stored = client_json()
    expected_put = {**stored, "emailMarketingConsent": False}
    script.add(responses.GET, CLIENT_URL, json=stored)
    script.add(
        responses.PUT,
        CLIENT_URL,
        match=[matchers.json_params_matcher(expected_put)],
        json={**expected_put, "version": 5},
    )
    script.add(responses.GET, CLIENT_URL, json={**expected_put, "version": 5})
    [outcome] = make_connector(fake_time).apply([action()])
    assert (outcome.status, outcome.reason) == ("done", "withdrawn")
    assert methods(script) == ["GET", "PUT", "GET"]
    put = script.calls[1].request
    assert (
        json.loads(cast(bytes, put.body)) == expected_put
    )  # version 4 travels back, SMS consent untouched
    assert put.headers["Content-Type"] == "application/json"


def test_withdraw_consent_does_nothing_when_already_withdrawn(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.add(responses.GET, CLIENT_URL, json=client_json(emailMarketingConsent=False))
    [outcome] = make_connector(fake_time).apply([action()])
    assert (outcome.status, outcome.reason) == ("done", "already")
    assert methods(wire) == ["GET"]


def test_a_stale_version_is_reread_and_retried_once(
    script: responses.RequestsMock, fake_time: FakeTime
) -> None:
    script.add(responses.GET, CLIENT_URL, json=client_json(version=4))
    script.add(responses.PUT, CLIENT_URL, status=409)
    script.add(responses.GET, CLIENT_URL, json=client_json(version=5, notes="edited by staff"))
    script.add(
        responses.PUT,
        CLIENT_URL,
        match=[
            matchers.json_params_matcher(
                client_json(version=5, notes="edited by staff", emailMarketingConsent=False)
            )
        ],
        json=client_json(version=6, emailMarketingConsent=False),
    )
    script.add(responses.GET, CLIENT_URL, json=client_json(version=6, emailMarketingConsent=False))
    [outcome] = make_connector(fake_time).apply([action()])
    assert (outcome.status, outcome.reason) == ("done", "withdrawn")
    assert methods(script) == ["GET", "PUT", "GET", "PUT", "GET"]


def test_a_second_stale_version_is_permanent(
    script: responses.RequestsMock, fake_time: FakeTime
) -> None:
    for version in (4, 5):
        script.add(responses.GET, CLIENT_URL, json=client_json(version=version))
        script.add(responses.PUT, CLIENT_URL, status=409)
    [outcome] = make_connector(fake_time).apply([action()])
    assert (outcome.status, outcome.reason) == ("permanent", "stale_version")
    assert methods(script) == ["GET", "PUT", "GET", "PUT"]


def test_a_replayed_put_that_meets_its_own_write_ends_as_already(
    script: responses.RequestsMock, fake_time: FakeTime
) -> None:
    # The first PUT landed but its answer was lost; the replay finds a new version.
    script.add(responses.GET, CLIENT_URL, json=client_json(version=4))
    script.add(responses.PUT, CLIENT_URL, body=requests.ReadTimeout())
    script.add(responses.PUT, CLIENT_URL, status=409)
    script.add(responses.GET, CLIENT_URL, json=client_json(version=5, emailMarketingConsent=False))
    [outcome] = make_connector(fake_time).apply([action()])
    assert (outcome.status, outcome.reason) == ("done", "already")


def test_a_put_that_did_not_stick_fails_verification(
    script: responses.RequestsMock, fake_time: FakeTime
) -> None:
    script.add(responses.GET, CLIENT_URL, json=client_json())
    script.add(responses.PUT, CLIENT_URL, json=client_json(version=5))
    script.add(responses.GET, CLIENT_URL, json=client_json(version=5))
    [outcome] = make_connector(fake_time).apply([action()])
    assert (outcome.status, outcome.reason) == ("permanent", "verify_failed")


def test_dry_run_reads_but_sends_no_put(
    wire: responses.RequestsMock, fake_time: FakeTime, captured_log: io.StringIO
) -> None:
    wire.add(responses.GET, CLIENT_URL, json=client_json())
    [outcome] = make_connector(fake_time).apply([action()], dry_run=True)
    assert (outcome.status, outcome.reason) == ("done", "dry_run")
    assert methods(wire) == ["GET"]
    line = next(
        line for line in captured_log.getvalue().splitlines() if "would_withdraw_consent" in line
    )
    assert "(dry run)" in line


@pytest.mark.parametrize(
    ("bad_action", "reason"),
    [
        pytest.param(action(kind="unsubscribe"), "unsupported_action", id="mailchimp-kind"),
        pytest.param(action(kind="erase"), "unsupported_action", id="erase"),
        pytest.param(action(client_id=None), "missing_client_id", id="no-client-id"),
    ],
)
def test_actions_phorest_cannot_do_are_permanent_without_a_call(
    wire: responses.RequestsMock, fake_time: FakeTime, bad_action: Action, reason: str
) -> None:
    [outcome] = make_connector(fake_time).apply([bad_action])
    assert (outcome.status, outcome.reason) == ("permanent", reason)
    assert len(wire.calls) == 0


def test_apply_answers_every_action_in_order(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.add(responses.GET, f"{CLIENTS_URL}/gone", status=404)
    wire.add(
        responses.GET, f"{CLIENTS_URL}/done", json=client_json("done", emailMarketingConsent=False)
    )
    actions = [action(client_id="gone"), action(kind="subscribe"), action(client_id="done")]
    outcomes = make_connector(fake_time).apply(actions)
    assert [o.action for o in outcomes] == actions
    assert [o.reason for o in outcomes] == ["not_found", "unsupported_action", "already"]


# -- apply(): concurrent withdrawals ---------------------------------------------------

WITHDRAWN = client_json(version=5, emailMarketingConsent=False)

# How one client answers (per method, in order; the last answer repeats), the
# outcome expected, and the requests it takes (503s: the first try and 2 retries).
SCENARIOS: dict[str, tuple[dict[str, list[dict[str, Any]]], tuple[str, str], list[str]]] = {
    "withdrawn": (
        {"GET": [{"json": client_json()}, {"json": WITHDRAWN}], "PUT": [{"json": WITHDRAWN}]},
        ("done", "withdrawn"),
        ["GET", "PUT", "GET"],
    ),
    "already": (
        {"GET": [{"json": client_json(emailMarketingConsent=False)}]},
        ("done", "already"),
        ["GET"],
    ),
    "not-found": ({"GET": [{"status": 404}]}, ("permanent", "not_found"), ["GET"]),
    "stale-once": (
        {
            "GET": [{"json": client_json()}, {"json": client_json(version=5)}, {"json": WITHDRAWN}],
            "PUT": [{"status": 409}, {"json": WITHDRAWN}],
        },
        ("done", "withdrawn"),
        ["GET", "PUT", "GET", "PUT", "GET"],
    ),
    "stale-twice": (
        {
            "GET": [{"json": client_json()}, {"json": client_json(version=5)}],
            "PUT": [{"status": 409}, {"status": 409}],
        },
        ("permanent", "stale_version"),
        ["GET", "PUT", "GET", "PUT"],
    ),
    "read-5xx": ({"GET": [{"status": 503}]}, ("retriable", "server_error"), ["GET"] * 3),
    "write-5xx": (
        {"GET": [{"json": client_json()}], "PUT": [{"status": 500}]},
        ("retriable", "server_error"),
        ["GET"] + ["PUT"] * 3,
    ),
    "not-stuck": (
        {"GET": [{"json": client_json()}], "PUT": [{"json": client_json(version=5)}]},
        ("permanent", "verify_failed"),
        ["GET", "PUT", "GET"],
    ),
}


def script_clients(wire: responses.RequestsMock, names: list[str]) -> list[str]:
    """Register each client's scenario at its own URL; returns the client ids."""
    ids = [f"client-{n:02d}-{name}" for n, name in enumerate(names)]
    for client_id, name in zip(ids, names):
        answers, _outcome, _calls = SCENARIOS[name]
        for method, sequence in answers.items():
            for answer in sequence:  # several at one URL: served in order, the last repeats
                wire.add(method, f"{CLIENTS_URL}/{client_id}", **answer)
    return ids


def calls_by_client(wire: responses.RequestsMock) -> dict[str, list[str]]:
    made: dict[str, list[str]] = {}
    for call in wire.calls:
        client_id = str(call.request.url).rpartition("/")[2]
        made.setdefault(client_id, []).append(str(call.request.method))
    return made


def test_fifty_concurrent_withdrawals_answer_in_input_order_each_with_its_own_outcome(
    wire: responses.RequestsMock,
) -> None:
    names = [list(SCENARIOS)[n % len(SCENARIOS)] for n in range(50)]
    ids = script_clients(wire, names)
    actions = [
        Action("withdraw_consent", f"{n:064d}", client_id=client_id)
        for n, client_id in enumerate(ids)
    ]
    outcomes = make_connector(SharedFakeTime()).apply(actions)
    assert [o.action for o in outcomes] == actions
    assert [(o.status, o.reason) for o in outcomes] == [SCENARIOS[name][1] for name in names]
    made = calls_by_client(wire)
    assert {client_id: made[client_id] for client_id in ids} == {
        client_id: SCENARIOS[name][2] for client_id, name in zip(ids, names)
    }


def test_refused_actions_keep_their_place_among_concurrent_withdrawals(
    wire: responses.RequestsMock,
) -> None:
    ids = script_clients(wire, ["withdrawn", "not-found", "already"])
    actions = [
        action(client_id=ids[0]),
        action(kind="erase"),
        action(client_id=ids[1]),
        action(client_id=None),
        action(client_id=ids[2]),
    ]
    outcomes = make_connector(SharedFakeTime()).apply(actions)
    assert [o.action for o in outcomes] == actions
    assert [o.reason for o in outcomes] == [
        "withdrawn", "unsupported_action", "not_found", "missing_client_id", "already"
    ]


def test_a_concurrent_dry_run_reads_and_writes_nothing(wire: responses.RequestsMock) -> None:
    ids = script_clients(wire, ["withdrawn", "already", "not-found"] * 4)
    outcomes = make_connector(SharedFakeTime()).apply(
        [action(client_id=client_id) for client_id in ids], dry_run=True
    )
    assert [o.reason for o in outcomes] == ["dry_run", "already", "not_found"] * 4
    assert set(methods(wire)) == {"GET"}
    assert len(wire.calls) == len(ids)


def test_concurrent_withdrawals_share_one_rate_limit(wire: responses.RequestsMock) -> None:
    # The clock stands still and sleeping records only, so whatever the interleaving,
    # the n-th request must have waited n intervals: no thread gets a slot of its own.
    ids = script_clients(wire, ["withdrawn"] * 20)
    time = SharedFakeTime()
    connector = make_connector(time, max_requests_per_second=20)
    outcomes = connector.apply([action(client_id=client_id) for client_id in ids])
    assert {o.reason for o in outcomes} == {"withdrawn"}
    assert len(wire.calls) == 60
    assert sorted(time.sleeps) == pytest.approx([n / 20 for n in range(1, 60)])


def test_an_unexpected_failure_is_that_actions_outcome_and_the_others_go_on(
    wire: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = script_clients(wire, ["withdrawn", "withdrawn", "withdrawn"])
    connector = make_connector(SharedFakeTime())
    withdraw = connector._withdraw_consent

    def broken_for_the_second(client_id: str, dry_run: bool) -> str:
        if client_id == ids[1]:
            raise KeyError(SEEDED_EMAIL)
        return withdraw(client_id, dry_run)

    monkeypatch.setattr(connector, "_withdraw_consent", broken_for_the_second)
    with structlog.testing.capture_logs() as events:
        outcomes = connector.apply([action(client_id=client_id) for client_id in ids])
    assert [(o.status, o.reason) for o in outcomes] == [
        ("done", "withdrawn"), ("retriable", "unexpected_error"), ("done", "withdrawn")
    ]
    assert SEEDED_EMAIL not in repr(events)


class FakePhorest:
    """Clients kept in memory behind ``responses``: PUT checks the version like Phorest.

    Every request is recorded (client id, method, sending thread) and announced on
    ``arrived`` before ``hold`` runs and the answer is made.
    """

    def __init__(self, wire: responses.RequestsMock, client_ids: Iterable[str]) -> None:
        self.clients = {cid: client_json(cid) for cid in client_ids}
        self.requests: list[tuple[str, str, str]] = []
        self.arrived = threading.Condition(threading.RLock())
        self.hold: Callable[[str], None] = lambda _client_id: None
        pattern = re.compile(re.escape(CLIENTS_URL) + r"/([^/?]+)$")
        for method in (responses.GET, responses.PUT):
            wire.add_callback(method, pattern, callback=self.answer)

    def answer(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        client_id, method = str(request.url).rpartition("/")[2], str(request.method)
        with self.arrived:
            self.requests.append((client_id, method, threading.current_thread().name))
            self.arrived.notify_all()
        self.hold(client_id)
        with self.arrived:
            stored = self.clients[client_id]
            if method == "PUT":
                sent = json.loads(cast(bytes, request.body))
                if sent["version"] != stored["version"]:
                    return 409, {}, json.dumps({"errorCode": "CONFLICT"})
                stored = self.clients[client_id] = {**sent, "version": stored["version"] + 1}
            return 200, {}, json.dumps(stored)

    def made(self, client_id: str) -> list[tuple[str, str]]:
        """(method, thread) of each request for ``client_id``, in arrival order."""
        with self.arrived:
            return [(method, thread) for cid, method, thread in self.requests if cid == client_id]


def test_two_actions_on_one_client_run_in_order_never_at_the_same_time(
    wire: responses.RequestsMock,
) -> None:
    twice, others = "twice", ["a", "b", "c", "d"]
    fake = FakePhorest(wire, [twice, *others])
    seen: list[tuple[bool, int]] = []  # (released by the others, requests for "twice" then)

    def hold(client_id: str) -> None:
        # The first request for "twice" waits until every other client is withdrawn:
        # a second action on "twice" started meanwhile would show up here.
        if client_id != twice or len(fake.made(twice)) > 1:
            return
        with fake.arrived:
            released = fake.arrived.wait_for(
                lambda: all(len(fake.made(other)) == 3 for other in others), timeout=10
            )
            seen.append((released, len(fake.made(twice))))

    fake.hold = hold
    clients = [twice, "a", "b", twice, "c", "d"]
    outcomes = make_connector(SharedFakeTime()).apply([action(client_id=c) for c in clients])

    assert seen == [(True, 1)]  # the others went on meanwhile; "twice" waited alone
    assert [o.reason for o in outcomes] == ["withdrawn"] * 3 + ["already"] + ["withdrawn"] * 2
    made = fake.made(twice)
    assert [method for method, _thread in made] == ["GET", "PUT", "GET", "GET"]
    assert len({thread for _method, thread in made}) == 1
    assert fake.clients[twice]["emailMarketingConsent"] is False


# -- apply() against the sandbox emulator, over real HTTP ---------------------------------

EMULATOR_BUSINESS = "emulated-business"


@pytest.fixture
def emulator() -> Iterator[tuple[PhorestEmulator, SandboxServer]]:
    """The sandbox's Phorest emulator on 127.0.0.1, without its own rate limit."""
    phorest = PhorestEmulator(EMULATOR_BUSINESS, USERNAME, PASSWORD, max_requests_per_second=None)
    server = SandboxServer(("127.0.0.1", 0), [phorest], Traffic())
    server.traffic.faults["phorest"].latency_ms = 2
    server.start()
    try:
        yield phorest, server
    finally:
        server.shutdown()
        server.server_close()


def test_two_hundred_withdrawals_in_one_apply_all_stick_on_the_emulator(
    emulator: tuple[PhorestEmulator, SandboxServer], caplog: pytest.LogCaptureFixture
) -> None:
    phorest, server = emulator
    ids = [
        phorest.add_client(
            firstName="Client", lastName=f"N{n}", email=f"client{n}@example.org",
            emailMarketingConsent=True,
        )["clientId"]
        for n in range(200)
    ]
    peak = 0
    enter = server.traffic.enter

    def counting_enter(vendor: str) -> int:
        nonlocal peak
        in_flight = enter(vendor)
        peak = max(peak, in_flight)
        return in_flight

    server.traffic.enter = counting_enter  # type: ignore[method-assign]
    connector = PhorestConnector(
        make_settings(
            base_url=f"{server.base_url}/third-party-api-server",
            business_id=EMULATOR_BUSINESS,
            page_size=200,
            max_requests_per_second=100,
        ),
        retry=RetryPolicy(attempts=1),
        sleep=lambda _seconds: None,  # the limiter hands out slots but nobody waits
    )
    actions = [
        Action("withdraw_consent", f"{n:064d}", client_id=client_id)
        for n, client_id in enumerate(ids)
    ]
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        outcomes = connector.apply(actions)

    assert [o.action for o in outcomes] == actions
    assert {(o.status, o.reason) for o in outcomes} == {("done", "withdrawn")}
    # Every worker finds a pooled connection to reuse: none is opened and thrown away.
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]
    routes = server.traffic.summary()["phorest"]["routes"]
    assert sum(sum(by_status.values()) for by_status in routes.values()) == 600
    assert 1 < peak <= MAX_CONCURRENT_WRITES
    consent = {record.client_id: record.email_consent for record in connector.scan()}
    assert consent == dict.fromkeys(ids, False)


# -- Logs hold no personal data -------------------------------------------------------




def exercise_everything(wire: responses.RequestsMock, fake_time: FakeTime) -> None:
    """Scan, poll, withdraw (done, dry run, not found) and fail, all with seeded data."""
    wire.add(responses.GET, CLIENTS_URL, json=envelope([client_json()], total=1))
    wire.add(
        responses.GET,
        f"{CLIENTS_URL}/gone",
        status=404,
        json={"errorCode": "NOT_FOUND", "message": f"Client {SEEDED_EMAIL} not found"},
    )
    wire.add(responses.GET, CLIENT_URL, json=client_json())
    wire.add(responses.PUT, CLIENT_URL, json=client_json(emailMarketingConsent=False))
    wire.add(responses.GET, CLIENT_URL, json=client_json(emailMarketingConsent=False))
    connector = make_connector(fake_time)
    list(connector.scan())
    connector.changes(CURSOR)
    connector.apply([action(), action(client_id="gone")])
    connector.apply([action()], dry_run=True)
    connector.check()


def test_a_seeded_email_or_name_never_reaches_the_rendered_log(
    wire: responses.RequestsMock, fake_time: FakeTime, captured_log: io.StringIO
) -> None:
    exercise_everything(wire, fake_time)
    output = captured_log.getvalue()
    assert "phorest_page" in output and "phorest_put" in output
    for value in SEEDED:
        assert value not in output


def test_the_connector_itself_logs_no_personal_data_before_redaction(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    # Redaction is the last line of defence; the events must be clean without it.
    with structlog.testing.capture_logs() as events:
        exercise_everything(wire, fake_time)
    assert events
    for value in SEEDED:
        assert value not in repr(events)


def test_errors_raised_to_the_caller_carry_no_personal_data(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.add(
        responses.GET,
        CLIENTS_URL,
        status=400,
        json={"errorCode": "BAD_REQUEST", "message": f"bad {SEEDED_EMAIL}"},
    )
    with pytest.raises(ConnectorError) as raised:
        make_connector(fake_time, attempts=1).changes(CURSOR)
    assert SEEDED_EMAIL not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__context__ is None


def test_find_by_email_keeps_only_rows_whose_address_matches(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    """Phorest ignores filters it does not know, so a row with another address is dropped."""
    rows = [client_json("c1", email=SEEDED_EMAIL.upper()), client_json("c2", email="x@example.com")]
    wire.get(CLIENTS_URL, json=envelope(rows))
    found = make_connector(fake_time).find_by_email(SEEDED_EMAIL)
    assert [record.client_id for record in found] == ["c1"]
    assert wire.calls[0].request.params["email"] == SEEDED_EMAIL


@pytest.mark.parametrize(("rate", "size"), [(20, 100), (100, 500), (1, 8)])
def test_an_apply_is_sized_to_last_about_five_seconds_at_the_rate_limit(
    rate: float, size: int
) -> None:
    connector = PhorestConnector(make_settings(max_requests_per_second=rate))
    assert connector.apply_batch_size == size


# -- client() and find_by_phone() -----------------------------------------------------


def test_client_reads_one_client_by_id(wire: responses.RequestsMock, fake_time: FakeTime) -> None:
    wire.get(CLIENT_URL, json=client_json(deleted=True))

    found = make_connector(fake_time).client(CLIENT_ID)

    assert found is not None and (found.client_id, found.state) == (CLIENT_ID, "deleted")
    assert [call.request.method for call in wire.calls] == ["GET"]


def test_client_answers_none_for_an_id_phorest_does_not_know(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.get(CLIENT_URL, status=404, json={"errorCode": "NOT_FOUND"})

    assert make_connector(fake_time).client(CLIENT_ID) is None
    assert len(wire.calls) == 1  # a 404 is an answer, not retried


def test_client_still_raises_when_phorest_refuses_the_credentials(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.get(CLIENT_URL, status=401)
    with pytest.raises(PermanentError):
        make_connector(fake_time).client(CLIENT_ID)


def test_client_fields_returns_what_phorest_holds_without_the_record_version_or_logging_it(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.get(CLIENT_URL, json=client_json())

    with structlog.testing.capture_logs() as events:
        fields = make_connector(fake_time).client_fields(CLIENT_ID)

    expected = client_json()
    del expected["version"]
    assert fields == expected
    assert SEEDED_EMAIL not in repr(events) and SEEDED_LAST_NAME not in repr(events)


def test_client_fields_answers_none_for_an_id_phorest_does_not_know_and_raises_on_refusal(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.get(CLIENT_URL, status=404, json={"errorCode": "NOT_FOUND"})
    wire.get(f"{CLIENTS_URL}/other", status=401)
    connector = make_connector(fake_time, attempts=1)

    assert connector.client_fields(CLIENT_ID) is None
    with pytest.raises(PermanentError):
        connector.client_fields("other")


def test_find_by_phone_asks_each_spelling_once_and_keeps_each_client_once(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    e164, spellings = "+447700900123", ["447700900123", "07700 900123", "+447700900123"]
    answers = {
        "+447700900123": [client_json("c1", mobile="+447700900123")],
        "447700900123": [client_json("c2", mobile="447700900123")],
        # Phorest ignored the filter here: every client, most with other numbers.
        "07700 900123": [client_json("c3", mobile="07700 900123"),
                         client_json("c1", mobile="+447700900123"),
                         client_json("c4", mobile="07700 900999"),
                         client_json("c5", mobile=None),
                         client_json("c6", mobile="900123")],
    }  # fmt: skip
    for spelling, rows in answers.items():
        wire.get(CLIENTS_URL, json=envelope(rows), match=[page_query(0, phone=spelling)])

    found = make_connector(fake_time).find_by_phone(e164, spellings)

    assert [record.client_id for record in found] == ["c1", "c2", "c3"]
    asked = [call.request.params["phone"] for call in wire.calls]
    assert asked == ["+447700900123", "447700900123", "07700 900123"]  # E.164 first, no repeat


def test_find_by_phone_keeps_a_number_ending_in_the_same_nine_digits_for_the_caller_to_judge(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    # The connector compares the last nine digits; rights.resolve compares numbers exactly.
    wire.get(CLIENTS_URL, json=envelope([client_json("c-us", mobile="+1 770 090 0123")]))
    found = make_connector(fake_time).find_by_phone("+447700900123")
    assert [record.client_id for record in found] == ["c-us"]


@pytest.mark.parametrize(
    ("stored", "same"),
    [("07700 900123", True), ("+44 (0)7700 900-123", True), ("447700900123", True),
     ("07700 900124", False), ("900123", False), ("", False)],
    ids=["national", "punctuated", "bare-international", "other-number", "too-short", "empty"],
)
def test_same_number_compares_the_last_nine_digits(stored: str, same: bool) -> None:
    from connectors.phorest import _same_number

    assert _same_number(stored, "+447700900123") is same


# -- apply(): one PUT from the record the action carries -----------------------------

READ_AT = datetime(2026, 1, 2, 3, 10, tzinfo=UTC)


def carried(client: dict[str, Any] | None = None, *, read_at: datetime = READ_AT) -> Action:
    """A withdrawal carrying the client's whole record as the scan read it."""
    return Action(
        "withdraw_consent", "k" * 64, client_id=CLIENT_ID,
        record=json.dumps(client or client_json()), read_at=read_at.isoformat(),
    )


def connector_at(
    time: FakeTime, now: datetime = READ_AT + timedelta(seconds=30), **settings: Any
) -> PhorestConnector:
    """A connector whose wall clock reads ``now`` (30 s after the record was read)."""
    return PhorestConnector(
        make_settings(**settings), retry=RetryPolicy(attempts=3), session=requests.Session(),
        clock=time.clock, sleep=time.sleep, now=lambda: now,
    )


def test_a_carried_record_is_put_back_once_and_checked_from_the_answer(
    script: responses.RequestsMock, fake_time: FakeTime
) -> None:
    expected_put = {**client_json(), "emailMarketingConsent": False}
    script.add(
        responses.PUT, CLIENT_URL, match=[matchers.json_params_matcher(expected_put)],
        json={**expected_put, "version": 5},
    )
    [outcome] = connector_at(fake_time).apply([carried()])
    assert (outcome.status, outcome.reason) == ("done", "withdrawn")
    assert methods(script) == ["PUT"]  # version 4 travels back, everything else untouched


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param({"json": client_json(version=5)}, id="answer-still-shows-consent"),
        pytest.param({"json": client_json(version=9, emailMarketingConsent=False)},
                     id="version-moved-by-more-than-our-write"),
        pytest.param({"json": client_json(version=4, emailMarketingConsent=False)},
                     id="version-did-not-move"),
        pytest.param({"json": client_json("someone-else", version=5,
                                          emailMarketingConsent=False)}, id="another-client"),
        pytest.param({"body": "OK", "content_type": "text/plain"}, id="answer-not-json"),
    ],
)
def test_an_accepted_put_whose_answer_leaves_doubt_is_settled_by_a_re_read(
    script: responses.RequestsMock, fake_time: FakeTime, answer: dict[str, Any]
) -> None:
    script.add(responses.PUT, CLIENT_URL, **answer)
    script.add(responses.GET, CLIENT_URL, json=client_json(version=9, emailMarketingConsent=False))
    [outcome] = connector_at(fake_time).apply([carried()])
    assert (outcome.status, outcome.reason) == ("done", "withdrawn")
    assert methods(script) == ["PUT", "GET"]


def test_an_accepted_put_that_did_not_stick_falls_back_to_get_put_get(
    script: responses.RequestsMock, fake_time: FakeTime
) -> None:
    script.add(responses.PUT, CLIENT_URL, json=client_json(version=5))
    script.add(responses.GET, CLIENT_URL, json=client_json(version=5))
    script.add(responses.PUT, CLIENT_URL,
               match=[matchers.json_params_matcher(
                   client_json(version=5, emailMarketingConsent=False))],
               json=client_json(version=6, emailMarketingConsent=False))
    script.add(responses.GET, CLIENT_URL, json=client_json(version=6, emailMarketingConsent=False))
    [outcome] = connector_at(fake_time).apply([carried()])
    assert (outcome.status, outcome.reason) == ("done", "withdrawn")
    assert methods(script) == ["PUT", "GET", "PUT", "GET"]


@pytest.mark.parametrize(
    "refusal",
    [
        pytest.param({"status": 409}, id="409"),
        pytest.param({"status": 412}, id="412"),
        pytest.param({"status": 400, "json": {"message": "Version 4 is out of date"}},
                     id="400-naming-the-version"),
    ],
)
def test_a_put_refused_as_maybe_stale_falls_back_to_get_put_get(
    script: responses.RequestsMock, fake_time: FakeTime, refusal: dict[str, Any]
) -> None:
    edited = client_json(version=5, notes="edited by staff")
    script.add(responses.PUT, CLIENT_URL, **refusal)
    script.add(responses.GET, CLIENT_URL, json=edited)
    script.add(responses.PUT, CLIENT_URL,
               match=[matchers.json_params_matcher({**edited, "emailMarketingConsent": False})],
               json={**edited, "version": 6, "emailMarketingConsent": False})
    script.add(responses.GET, CLIENT_URL,
               json={**edited, "version": 6, "emailMarketingConsent": False})
    [outcome] = connector_at(fake_time).apply([carried()])
    assert (outcome.status, outcome.reason) == ("done", "withdrawn")
    assert methods(script) == ["PUT", "GET", "PUT", "GET"]


def test_a_400_that_does_not_name_the_version_is_permanent_without_a_re_read(
    script: responses.RequestsMock, fake_time: FakeTime
) -> None:
    script.add(responses.PUT, CLIENT_URL, status=400,
               json={"message": "firstName must not be empty"})
    [outcome] = connector_at(fake_time).apply([carried()])
    assert (outcome.status, outcome.reason) == ("permanent", "rejected")
    assert methods(script) == ["PUT"]


@pytest.mark.parametrize(
    ("action_", "now"),
    [
        pytest.param(carried(), READ_AT + timedelta(minutes=2, seconds=1),
                     id="read-longer-ago-than-the-overlap"),
        pytest.param(Action("withdraw_consent", "k" * 64, client_id=CLIENT_ID,
                            record=json.dumps(client_json())), READ_AT, id="no-read-time"),
        pytest.param(carried(client_json(version=None)), READ_AT, id="no-version"),
        pytest.param(carried(client_json("another")), READ_AT, id="another-clients-record"),
        pytest.param(carried(client_json(emailMarketingConsent=False)), READ_AT,
                     id="record-without-consent"),
        pytest.param(Action("withdraw_consent", "k" * 64, client_id=CLIENT_ID,
                            record="{not json", read_at=READ_AT.isoformat()), READ_AT,
                     id="record-unreadable"),
    ],
)
def test_a_record_in_doubt_is_not_put_blindly(
    script: responses.RequestsMock, fake_time: FakeTime, action_: Action, now: datetime
) -> None:
    script.add(responses.GET, CLIENT_URL, json=client_json(version=7))
    script.add(responses.PUT, CLIENT_URL,
               match=[matchers.json_params_matcher(
                   client_json(version=7, emailMarketingConsent=False))],
               json=client_json(version=8, emailMarketingConsent=False))
    script.add(responses.GET, CLIENT_URL, json=client_json(version=8, emailMarketingConsent=False))
    [outcome] = connector_at(fake_time, now=now).apply([action_])
    assert (outcome.status, outcome.reason) == ("done", "withdrawn")
    assert methods(script) == ["GET", "PUT", "GET"]


def test_a_dry_run_with_a_carried_record_still_reads_and_writes_nothing(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    wire.add(responses.GET, CLIENT_URL, json=client_json())
    [outcome] = connector_at(fake_time).apply([carried()], dry_run=True)
    assert (outcome.status, outcome.reason) == ("done", "dry_run")
    assert methods(wire) == ["GET"]


def test_a_scan_keeps_the_whole_record_of_consenting_clients_only(
    wire: responses.RequestsMock, fake_time: FakeTime
) -> None:
    rows = [client_json(), client_json("no-consent", emailMarketingConsent=False)]
    wire.add(responses.GET, CLIENTS_URL, json=envelope(rows, total=2))
    consenting, other = connector_at(fake_time).scan()
    assert consenting.raw is not None and json.loads(consenting.raw) == client_json()
    assert other.raw is None
    assert consenting.read_at == other.read_at == READ_AT + timedelta(seconds=30)


def test_a_scanned_record_withdraws_in_one_call_on_the_emulator_and_a_stale_one_ends_right(
    emulator: tuple[PhorestEmulator, SandboxServer],
) -> None:
    phorest, server = emulator
    quiet, edited = (
        phorest.add_client(firstName="Client", lastName=f"N{n}", email=f"c{n}@example.org",
                           emailMarketingConsent=True, notes="first")["clientId"]
        for n in range(2)
    )
    connector = PhorestConnector(
        make_settings(base_url=f"{server.base_url}/third-party-api-server",
                      business_id=EMULATOR_BUSINESS, page_size=200, max_requests_per_second=100),
        retry=RetryPolicy(attempts=1), sleep=lambda _seconds: None,
    )
    by_id = {record.client_id: record for record in connector.scan()}
    phorest.edit_client(edited, notes="changed by staff after the scan")  # a new version
    actions = [
        Action("withdraw_consent", f"{n:064d}", client_id=record.client_id, record=record.raw,
               read_at=record.read_at.isoformat() if record.read_at else None)
        for n, record in enumerate((by_id[quiet], by_id[edited]))
    ]
    server.traffic.reset_counts()
    outcomes = connector.apply(actions)

    assert {(o.status, o.reason) for o in outcomes} == {("done", "withdrawn")}
    routes = server.traffic.summary()["phorest"]["routes"]
    put_route = next(route for route in routes if route.startswith("PUT"))
    get_route = next(route for route in routes if route.startswith("GET"))
    # Fresh: one PUT. Stale: a PUT refused (409), then GET, PUT, GET.
    assert routes[put_route] == {"200": 2, "409": 1}
    assert routes[get_route] == {"200": 2}
    after = {record.client_id: record for record in connector.scan()}
    assert not after[quiet].email_consent and not after[edited].email_consent
    assert phorest.client(edited)["notes"] == "changed by staff after the scan"  # kept


# -- One back-off for every lane --------------------------------------------------------


def test_a_pause_holds_back_every_later_slot_from_any_thread() -> None:
    time = SharedFakeTime()
    limiter = RateLimiter(10, clock=time.clock, sleep=time.sleep)
    first = limiter.acquire()
    limiter.pause(3.0)
    slots: list[float] = []
    others = [threading.Thread(target=lambda: slots.append(limiter.acquire())) for _ in range(3)]
    for thread in others:
        thread.start()
    for thread in others:
        thread.join()
    assert sorted(slots) == pytest.approx([first + 3.0, first + 3.1, first + 3.2])


def test_a_pause_never_shortens_one_in_force() -> None:
    time = SharedFakeTime()
    limiter = RateLimiter(10, clock=time.clock, sleep=time.sleep)
    limiter.pause(5.0)
    limiter.pause(1.0)
    assert limiter.acquire() == pytest.approx(time.now + 5.0)


@pytest.mark.parametrize(
    ("headers", "pause"),
    [
        pytest.param({"Retry-After": "4"}, 4.0, id="retry-after"),
        pytest.param({}, 1.0, id="no-retry-after"),
    ],
)
def test_a_429_seen_by_one_lane_pauses_the_other_lanes(
    script: responses.RequestsMock, headers: dict[str, str], pause: float
) -> None:
    time = SharedFakeTime()
    waits: dict[str, list[float]] = {}

    def sleep(seconds: float) -> None:
        waits.setdefault(threading.current_thread().name, []).append(seconds)

    connector = PhorestConnector(
        make_settings(max_requests_per_second=100), retry=RetryPolicy(attempts=2),
        session=requests.Session(), clock=time.clock, sleep=sleep,
    )
    script.add(responses.GET, CLIENT_URL, status=429, headers=headers)
    script.add(responses.GET, CLIENT_URL, json=client_json())
    script.add(responses.GET, f"{CLIENTS_URL}/other", json=client_json("other"))
    told = threading.Thread(target=connector.client, args=(CLIENT_ID,), name="told")
    told.start()
    told.join()
    other = threading.Thread(target=connector.client, args=("other",), name="other")
    other.start()
    other.join()
    assert methods(script) == ["GET", "GET", "GET"]
    # The lane that was never told waits out the pause too (the clock stood still; the
    # told lane's own retry took the first slot after the pause).
    assert max(waits["other"]) >= pause


def test_a_retry_after_on_a_server_error_pauses_every_lane_too(
    script: responses.RequestsMock,
) -> None:
    time = SharedFakeTime()
    connector = PhorestConnector(
        make_settings(max_requests_per_second=100), retry=RetryPolicy(attempts=2),
        session=requests.Session(), clock=time.clock, sleep=time.sleep,
    )
    script.add(responses.GET, CLIENT_URL, status=503, headers={"Retry-After": "2"})
    script.add(responses.GET, CLIENT_URL, json=client_json())
    told_at = time.now
    connector.client(CLIENT_ID)
    assert connector._limiter.acquire() >= told_at + 2.0
