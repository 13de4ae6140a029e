"""Tests for the read-ahead of connectors.phorest's full scan, faked at the wire (STYLE item 14).

Answers come from ``responses`` callbacks on the pool's threads; the rate limiter runs on a
shared fake clock, so nothing waits for it. Assertions are on what was yielded and asked
for, never on timing: a callback's sleep only makes answers arrive out of order.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import requests
import responses

from connectors.phorest import SCAN_PREFETCH_PAGES, PhorestConnector
from syncd.errors import PermanentError
from syncd.retry import RetryPolicy
from tests.connectors.conftest import pool_threads
from tests.connectors.test_phorest import (
    CLIENTS_URL,
    SharedFakeTime,
    client_json,
    envelope,
    make_settings,
)

POOL_PREFIX = "phorest-scan"
ROWS_PER_PAGE = 2  # the test settings' page_size
Answer = tuple[int, dict[str, str], str]


def ids_of(page: int) -> list[str]:
    return [f"p{page}-{row}" for row in range(ROWS_PER_PAGE)]


def every_id(pages: int) -> list[str]:
    return [client_id for page in range(pages) for client_id in ids_of(page)]


def page_body(number: int, total_pages: int, *, rows: bool = True, said: int | None = None) -> str:
    clients = [client_json(client_id) for client_id in ids_of(number)] if rows else None
    body = envelope(clients, number=number if said is None else said,
                    total=total_pages * ROWS_PER_PAGE, total_pages=total_pages)
    return json.dumps(body)


class Pages:
    """A Phorest client listing served by callback, recording which pages were asked for.

    ``answer(number, attempt)`` gives the answer to the ``attempt``-th request (from 1) for
    page ``number``; by default every page of ``total_pages`` is full and answered at once.
    """

    def __init__(self, wire: responses.RequestsMock, total_pages: int,
                 answer: Callable[[int, int], Answer] | None = None) -> None:
        self.total_pages = total_pages
        self.asked: list[int] = []
        self._lock = threading.Lock()
        self._answer = answer or (lambda number, _attempt: self.ok(number))
        wire.add_callback(responses.GET, CLIENTS_URL, callback=self._serve)

    def ok(self, number: int, **kwargs: Any) -> Answer:
        return 200, {}, page_body(number, self.total_pages, **kwargs)

    def _serve(self, request: requests.PreparedRequest) -> Answer:
        number = int(request.params["page"])  # type: ignore[attr-defined]
        with self._lock:
            self.asked.append(number)
            attempt = self.asked.count(number)
        return self._answer(number, attempt)


def make_connector(**settings: Any) -> PhorestConnector:
    fake = SharedFakeTime()
    return PhorestConnector(make_settings(**settings), retry=RetryPolicy(attempts=3),
                            session=requests.Session(), clock=fake.clock, sleep=fake.sleep)


def test_a_scan_yields_every_page_in_order_even_when_later_pages_answer_first(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    def later_pages_first(number: int, _attempt: int) -> Answer:
        time.sleep(0.01 * (7 - number))  # page 1 answers last of its window
        return pages.ok(number)

    pages = Pages(wire, 7, later_pages_first)
    records = [record.client_id for record in make_connector().scan()]
    assert records == every_id(7)
    assert sorted(pages.asked) == list(range(7))


def test_an_error_on_page_3_is_raised_after_pages_0_to_2_and_no_page_past_the_window_is_asked(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    def page_3_refused(number: int, _attempt: int) -> Answer:
        return (400, {}, "{}") if number == 3 else pages.ok(number)

    pages = Pages(wire, 20, page_3_refused)
    seen: list[str] = []
    with pytest.raises(PermanentError) as raised:
        for record in make_connector().scan():
            seen.append(record.client_id)
    assert raised.value.status == 400
    assert seen == every_id(3)
    # Pages 4.. may have been in flight with page 3, but none started after it failed.
    assert max(pages.asked) <= 3 + SCAN_PREFETCH_PAGES - 1
    assert Counter(pages.asked)[3] == 1  # a permanent error is not retried


def test_a_429_on_one_page_pauses_and_the_scan_still_reads_every_record_once(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    def page_2_rate_limited_once(number: int, attempt: int) -> Answer:
        if number == 2 and attempt == 1:
            return 429, {"Retry-After": "1"}, "{}"
        return pages.ok(number)

    pages = Pages(wire, 7, page_2_rate_limited_once)
    records = [record.client_id for record in make_connector().scan()]
    assert records == every_id(7)
    assert Counter(pages.asked) == {0: 1, 1: 1, 2: 2, 3: 1, 4: 1, 5: 1, 6: 1}


def test_closing_a_scan_early_stops_its_threads_and_asks_for_nothing_more(
    wire: responses.RequestsMock,
) -> None:
    def slow_after_page_1(number: int, _attempt: int) -> Answer:
        if number > 1:
            time.sleep(0.02)  # still in flight when the scan is closed
        return pages.ok(number)

    pages = Pages(wire, 50, slow_after_page_1)
    records = make_connector().scan()
    first_of_page_1 = [next(records).client_id for _ in range(ROWS_PER_PAGE + 1)][-1]
    assert first_of_page_1 == ids_of(1)[0]
    records.close()
    assert pool_threads(POOL_PREFIX) == []
    asked = list(pages.asked)
    # Page 0, then page 1 and the window behind it: nothing further.
    assert max(asked) <= 1 + SCAN_PREFETCH_PAGES
    assert sorted(asked) == sorted(set(asked))
    time.sleep(0.05)  # a request still to come would have been made by now
    assert pages.asked == asked


def test_a_prefetched_page_phorest_did_not_honour_is_refused_at_its_turn(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    def page_4_repeats_page_0(number: int, _attempt: int) -> Answer:
        return pages.ok(number, said=0) if number == 4 else pages.ok(number)

    pages = Pages(wire, 7, page_4_repeats_page_0)
    seen: list[str] = []
    with pytest.raises(PermanentError) as raised:
        for record in make_connector().scan():
            seen.append(record.client_id)
    assert raised.value.title == "bad_response"
    assert seen == every_id(4)


def test_an_empty_page_ends_a_prefetched_scan(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    def empty_from_page_3(number: int, _attempt: int) -> Answer:
        return pages.ok(number, rows=number < 3)

    pages = Pages(wire, 7, empty_from_page_3)
    assert [record.client_id for record in make_connector().scan()] == every_id(3)
    assert max(pages.asked) <= 6  # never past the last page page 0 announced


def test_pages_added_during_a_scan_are_read_one_by_one_after_the_known_ones(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    # Page 0 announces 3 pages; by page 2, clients were added and there are 5.
    def growing(number: int, _attempt: int) -> Answer:
        return 200, {}, page_body(number, 3 if number < 2 else 5)

    pages = Pages(wire, 3, growing)
    assert [record.client_id for record in make_connector().scan()] == every_id(5)
    assert sorted(pages.asked) == [0, 1, 2, 3, 4]
    assert pages.asked[-2:] == [3, 4]  # after the known pages, in turn


def test_a_page_announcing_fewer_pages_does_not_end_the_scan_before_an_empty_page(
    wire: responses.RequestsMock, no_pool_left: None
) -> None:
    # Page 0 announces 5 pages; clients went and the later pages say 2, but pages 2 and 3
    # still hold clients (rows moved towards the front); page 4 is empty.
    def shrinking(number: int, _attempt: int) -> Answer:
        return 200, {}, page_body(number, 5 if number == 0 else 2, rows=number < 4)

    Pages(wire, 5, shrinking)
    assert [record.client_id for record in make_connector().scan()] == every_id(4)
