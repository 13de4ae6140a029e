"""Phorest branches and booked appointments: windows, pages, what counts as booked (R4)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from connectors.phorest import (
    APPOINTMENT_PAGE_SIZE,
    APPOINTMENT_WINDOW_DAYS,
    PhorestConnector,
    appointment_windows,
)
from syncd.errors import PermanentError
from syncd.retry import RetryPolicy
from syncd.sandbox.http import SandboxServer, Traffic
from syncd.sandbox.phorest import PhorestEmulator
from tests.connectors.test_phorest import BASE_URL, BUSINESS, PASSWORD, USERNAME, make_settings

BRANCHES_URL = f"{BASE_URL}/api/business/{BUSINESS}/branch"
TODAY = date(2026, 12, 3)


def connector(**settings: Any) -> PhorestConnector:
    return PhorestConnector(make_settings(**settings), retry=RetryPolicy(attempts=1),
                            session=requests.Session(), sleep=lambda _s: None)


def paged(key: str, rows: list[dict[str, Any]], *, number: int = 0, total_pages: int = 1,
          total: int | None = None) -> dict[str, Any]:  # fmt: skip
    return {"_embedded": {key: rows}, "page": {"size": 100, "number": number,
            "totalPages": total_pages, "totalElements": len(rows) if total is None else total}}


def appointment(client_id: str, **overrides: Any) -> dict[str, Any]:
    return {"appointmentId": f"a-{client_id}", "clientId": client_id, "branchId": "b1",
            "appointmentDate": "2026-12-10", "activationState": "ACTIVE", "deleted": False,
            **overrides}


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (1, [(0, 0)]),
        (31, [(0, 30)]),
        (32, [(0, 30), (31, 31)]),
        (181, [(0, 30), (31, 61), (62, 92), (93, 123), (124, 154), (155, 180)]),
    ],
    ids=["one-day", "exactly-one-window", "one-day-over", "180-day-lookahead"],
)
def test_a_range_is_cut_into_windows_of_at_most_31_days_both_ends_included(
    days: int, expected: list[tuple[int, int]]
) -> None:
    windows = appointment_windows(TODAY, TODAY + timedelta(days=days - 1))
    assert [((a - TODAY).days, (b - TODAY).days) for a, b in windows] == expected
    assert all((b - a).days + 1 <= APPOINTMENT_WINDOW_DAYS for a, b in windows)


def test_bookings_are_read_per_branch_and_window_in_pages_of_100_never_per_client(
    wire: responses.RequestsMock,
) -> None:
    wire.get(BRANCHES_URL, json=paged("branches", [{"branchId": "b1"}, {"branchId": "b2"}]))
    seen: list[tuple[str, dict[str, list[str]]]] = []

    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        import json

        parts = urlsplit(request.url)
        query = parse_qs(parts.query)
        branch = parts.path.split("/")[-2]
        seen.append((branch, query))
        page = int(query["page"][0])
        if branch == "b1" and query["from_date"] == [TODAY.isoformat()]:
            rows = ([appointment("kept-1"), appointment("cancelled", activationState="CANCELED"),
                     appointment("deleted", deleted=True)] if page == 0
                    else [appointment("kept-2", activationState="RESERVED")])
            return 200, {}, json.dumps(paged("appointments", rows, number=page, total_pages=2))
        return 200, {}, json.dumps(paged("appointments", [], number=page, total_pages=0))

    for branch in ("b1", "b2"):
        wire.add_callback(responses.GET, f"{BRANCHES_URL}/{branch}/appointment", callback=answer)
    bookings = connector().booked_clients(TODAY, 40)
    # Cancelled and deleted rows Phorest sent anyway do not count; RESERVED does.
    assert bookings.client_ids == {"kept-1", "kept-2"}
    assert [(w.branch_id, w.first, w.last, w.pages) for w in bookings.windows] == [
        ("b1", TODAY, TODAY + timedelta(days=30), 2),
        ("b1", TODAY + timedelta(days=31), TODAY + timedelta(days=39), 1),
        ("b2", TODAY, TODAY + timedelta(days=30), 1),
        ("b2", TODAY + timedelta(days=31), TODAY + timedelta(days=39), 1),
    ]
    assert bookings.calls == 5 == len(seen)
    for _branch, query in seen:
        assert query["size"] == [str(APPOINTMENT_PAGE_SIZE)]
        assert query["fetch_canceled"] == ["false"] and query["fetch_deleted"] == ["false"]
        assert "client_id" not in query and "includeArchived" not in query


def test_a_branch_without_an_id_is_a_bad_response(wire: responses.RequestsMock) -> None:
    wire.get(BRANCHES_URL, json=paged("branches", [{"name": "Soho"}]))
    with pytest.raises(PermanentError, match="without branchId"):
        connector().branches()


def test_a_lookahead_below_one_day_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        connector().booked_clients(TODAY, 0)


@pytest.fixture
def emulated() -> Iterator[tuple[PhorestEmulator, PhorestConnector]]:
    phorest = PhorestEmulator("biz-emulated", USERNAME, PASSWORD, max_requests_per_second=None)
    server = SandboxServer(("127.0.0.1", 0), [phorest], Traffic())
    server.start()
    try:
        yield phorest, PhorestConnector(
            make_settings(base_url=f"{server.base_url}/third-party-api-server",
                          business_id="biz-emulated", max_requests_per_second=100),
            retry=RetryPolicy(attempts=1), sleep=lambda _s: None)  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()


def test_the_emulator_accepts_every_window_and_only_booked_future_appointments_count(
    emulated: tuple[PhorestEmulator, PhorestConnector],
) -> None:
    phorest, phorest_api = emulated
    branches = [phorest.add_branch(name, branch_id=name)["branchId"] for name in ("b1", "b2")]
    ids = {name: phorest.add_client(firstName="C", lastName=name)["clientId"]
           for name in ("edge", "second", "cancelled", "deleted", "past", "beyond")}  # fmt: skip

    def book(branch: str, who: str, days: int, **extra: Any) -> None:
        fields = {"state": "BOOKED", "activationState": "ACTIVE", **extra}
        phorest.add_appointment(branch, clientId=ids[who], startTime="10:00:00",
                                appointmentDate=(TODAY + timedelta(days=days)).isoformat(),
                                **fields)

    book("b1", "edge", 180)  # the look-ahead's last day
    book("b2", "second", 31)  # the second window, the other branch
    book("b1", "cancelled", 5, activationState="CANCELED")
    book("b1", "deleted", 5, deleted=True)
    book("b1", "past", -1)
    book("b2", "beyond", 181)
    for n in range(150):  # pages: 150 bookings of one client in one window
        book("b1", "second", n % 31)
    bookings = phorest_api.booked_clients(TODAY, 181)
    assert bookings.client_ids == {ids["edge"], ids["second"]}
    assert phorest_api.branches() == branches
    assert len(bookings.windows) == 12  # 2 branches x 6 windows
    assert bookings.windows[0].pages == 2 and bookings.windows[0].rows == 150
