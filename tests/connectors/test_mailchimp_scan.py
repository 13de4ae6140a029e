"""Tests for the read-ahead of connectors.mailchimp's full scan, faked at the wire (STYLE 14).

The real SDK sends every request; a ``responses`` callback answers by ``offset`` and records
what was asked. Assertions are on what was yielded and asked for, never on timing: a
callback's sleep only makes answers arrive out of order or overlap.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from connectors.mailchimp import PAGE_COUNT, SCAN_PREFETCH_PAGES
from syncd.errors import PermanentError
from tests.connectors.conftest import pool_threads
from tests.connectors.test_mailchimp import (
    JSON,
    MEMBERS_URL,
    make_connector,
    member_json,
    problem,
)

POOL_PREFIX = "mailchimp-scan"
Answer = tuple[int, dict[str, str], str]


def emails(first: int, count: int) -> list[str]:
    return [f"m{n}@example.com" for n in range(first, first + count)]


def page_body(offset: int, total: int, rows: int | None = None) -> str:
    rows = min(PAGE_COUNT, max(0, total - offset)) if rows is None else rows
    members = [member_json(email) for email in emails(offset, rows)]
    return json.dumps({"members": members, "total_items": total})


class Members:
    """An audience of ``total`` members served by callback, recording the offsets asked for.

    ``answer(offset, attempt)`` answers the ``attempt``-th request (from 1) for ``offset``;
    by default every page is what an audience of ``total`` holds. ``peak`` is the most
    requests seen in progress at once.
    """

    def __init__(self, wire: responses.RequestsMock, total: int,
                 answer: Callable[[int, int], Answer] | None = None) -> None:
        self.total = total
        self.asked: list[int] = []
        self.peak = 0
        self._in_progress = 0
        self._lock = threading.Lock()
        self._answer = answer or (lambda offset, _attempt: self.ok(offset))
        wire.add_callback(responses.GET, MEMBERS_URL, callback=self._serve)

    def ok(self, offset: int, total: int | None = None, rows: int | None = None) -> Answer:
        return 200, JSON, page_body(offset, self.total if total is None else total, rows)

    def _serve(self, request: requests.PreparedRequest) -> Answer:
        offset = int(parse_qs(urlsplit(str(request.url)).query)["offset"][0])
        with self._lock:
            self.asked.append(offset)
            attempt = self.asked.count(offset)
            self._in_progress += 1
            self.peak = max(self.peak, self._in_progress)
        try:
            return self._answer(offset, attempt)
        finally:
            with self._lock:
                self._in_progress -= 1


def test_a_scan_yields_every_member_in_offset_order_even_when_later_pages_answer_first(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    def later_pages_first(offset: int, _attempt: int) -> Answer:
        time.sleep(0.01 * (7 - offset // PAGE_COUNT))
        return audience.ok(offset)

    audience = Members(wire, 6500, later_pages_first)
    records = [record.email for record in make_connector().scan()]
    assert records == emails(0, 6500)
    assert sorted(audience.asked) == [n * PAGE_COUNT for n in range(7)]


def test_pages_in_flight_never_exceed_max_connections(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    def slow(offset: int, _attempt: int) -> Answer:
        time.sleep(0.01)
        return audience.ok(offset)

    audience = Members(wire, 8000, slow)
    assert len(list(make_connector(max_connections=2).scan())) == 8000
    assert audience.peak <= 2
    assert len(audience.asked) == 8


def test_an_error_on_page_3_is_raised_after_pages_0_to_2_and_no_page_past_the_window_is_asked(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    def page_3_refused(offset: int, _attempt: int) -> Answer:
        if offset == 3 * PAGE_COUNT:
            refused = problem(400, "Invalid Resource")
            return 400, {"Content-Type": refused["content_type"]}, refused["body"]
        return audience.ok(offset)

    audience = Members(wire, 20_000, page_3_refused)
    seen: list[str] = []
    with pytest.raises(PermanentError) as raised:
        for record in make_connector().scan():
            seen.append(record.email)
    assert raised.value.status == 400
    assert seen == emails(0, 3 * PAGE_COUNT)
    assert max(audience.asked) <= (3 + SCAN_PREFETCH_PAGES - 1) * PAGE_COUNT
    assert Counter(audience.asked)[3 * PAGE_COUNT] == 1


def test_a_429_on_one_page_is_retried_and_the_scan_still_reads_every_member_once(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    def page_2_rate_limited_once(offset: int, attempt: int) -> Answer:
        if offset == 2 * PAGE_COUNT and attempt == 1:
            limited = problem(429, "Too Many Requests")
            return 429, {"Content-Type": limited["content_type"], "Retry-After": "1"}, (
                limited["body"])
        return audience.ok(offset)

    audience = Members(wire, 5000, page_2_rate_limited_once)
    records = [record.email for record in make_connector().scan()]
    assert records == emails(0, 5000)
    assert Counter(audience.asked) == {0: 1, 1000: 1, 2000: 2, 3000: 1, 4000: 1}


def test_closing_a_scan_early_stops_its_threads_and_asks_for_nothing_more(
    wire: responses.RequestsMock,
) -> None:
    def slow_after_page_1(offset: int, _attempt: int) -> Answer:
        if offset > PAGE_COUNT:
            time.sleep(0.02)  # still in flight when the scan is closed
        return audience.ok(offset)

    audience = Members(wire, 50_000, slow_after_page_1)
    records = make_connector().scan()
    taken = [next(records).email for _ in range(PAGE_COUNT + 1)]
    assert taken[-1] == emails(PAGE_COUNT, 1)[0]
    records.close()
    assert pool_threads(POOL_PREFIX) == []
    asked = list(audience.asked)
    assert max(asked) <= (1 + SCAN_PREFETCH_PAGES) * PAGE_COUNT
    assert sorted(asked) == sorted(set(asked))
    time.sleep(0.05)  # a request still to come would have been made by now
    assert audience.asked == asked


def test_a_prefetched_page_that_is_not_a_collection_is_refused_at_its_turn(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    def page_2_broken(offset: int, _attempt: int) -> Answer:
        if offset == 2 * PAGE_COUNT:
            return 200, JSON, json.dumps({"total_items": 5000})
        return audience.ok(offset)

    audience = Members(wire, 5000, page_2_broken)
    seen: list[str] = []
    with pytest.raises(PermanentError, match="not a member collection"):
        for record in make_connector().scan():
            seen.append(record.email)
    assert seen == emails(0, 2 * PAGE_COUNT)


def test_a_short_page_ends_a_prefetched_scan(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    # The first page counts 5000 members; by offset 2000 only 2500 are left.
    def shrunk(offset: int, _attempt: int) -> Answer:
        return audience.ok(offset, total=5000 if offset == 0 else 2500)

    audience = Members(wire, 5000, shrunk)
    assert [record.email for record in make_connector().scan()] == emails(0, 2500)
    assert max(audience.asked) <= 4 * PAGE_COUNT  # never past what the first page counted


def test_members_added_during_a_scan_are_read_one_page_at_a_time_after_the_known_ones(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    # The first page counts 2500 members; by offset 2000 there are 3500.
    def growing(offset: int, _attempt: int) -> Answer:
        return audience.ok(offset, total=2500 if offset < 2000 else 3500)

    audience = Members(wire, 3500, growing)
    assert [record.email for record in make_connector().scan()] == emails(0, 3500)
    assert sorted(audience.asked) == [0, 1000, 2000, 3000]
    assert audience.asked[-1] == 3000
