"""Every staff action through the console lands in the audit trail with the login name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.syncd.console.conftest import (
    MANAGER,
    PAPER_FORMS,
    RECEPTION,
    RECEPTION_PASSWORD,
    Console,
    clients_of,
)


def _new_events(console: Console, act: Callable[[], Any]) -> list[Any]:
    before = {e.id for e in console.audit()}
    act()
    return [e for e in console.audit() if e.id not in before]


def _one(events: list[Any], action: str, **expected: Any) -> Any:
    found = [e for e in events if e.action == action and all(
        getattr(e, k) == v for k, v in expected.items())]
    assert len(found) == 1, (action, expected, [(e.action, e.actor, e.outcome) for e in events])
    return found[0]


@pytest.fixture(scope="module")
def erasure(console: Console) -> int:
    person = clients_of(console.sandbox)[10]
    answer = console.file(console.reception(), "erase", email=person["email"])
    assert answer.status_code == 302
    return int(answer.headers["Location"].rsplit("/", 1)[1])


def test_filing_is_audited_with_who_filed(console: Console) -> None:
    person = clients_of(console.sandbox)[11]
    client = console.reception()
    events = _new_events(console, lambda: console.file(client, "restrict",
                                                       client_id=person["clientId"]))
    event = _one(events, "request_restrict", outcome="filed")
    assert event.actor == RECEPTION and event.request_id is not None


def test_confirm_extend_and_cancel_are_audited_with_the_manager(console: Console,
                                                                 erasure: int) -> None:
    client = console.manager()
    page = f"/requests/{erasure}"
    confirmed = _new_events(console, lambda: console.post(
        client, f"{page}/confirm", {"processor": PAPER_FORMS, "back": "request"}, page))
    assert _one(confirmed, "manual_step", processor=PAPER_FORMS).actor == MANAGER

    extended = _new_events(console, lambda: console.post(
        client, f"{page}/extend", {"months": "2", "reason": "complex request"}, page))
    event = _one(extended, "extend_request", request_id=erasure)
    assert event.actor == MANAGER and "+2 month(s)" in (event.detail or "")

    cancelled = _new_events(console, lambda: console.post(
        client, f"{page}/cancel", {"reason": "withdrawn by the person"}, page))
    assert _one(cancelled, "request_erase", outcome="cancelled").actor == MANAGER
    shown = client.get(page).text
    assert "cancelled" in shown and "withdrawn by the person" in shown


ACCOUNT_CHANGES = [
    ("/users", {"name": "kim", "role": "reception", "password": "kim-password-1"}, "staff_add"),
    ("/users/kim/disable", {}, "staff_disable"),
    ("/users/kim/enable", {}, "staff_enable"),
    ("/users/kim/reset", {"password": "kim-password-2"}, "staff_reset_password"),
    ("/users/kim/role", {"role": "manager"}, "staff_role"),
]


def test_account_changes_are_audited_with_the_manager(console: Console) -> None:
    client = console.manager()
    for path, data, action in ACCOUNT_CHANGES:
        events = _new_events(console, lambda: console.post(client, path, data, "/users"))
        event = _one(events, action)
        assert event.actor == MANAGER and (event.detail or "").startswith("account kim"), action
    assert "kim-password" not in repr(console.snapshot())


def test_login_and_lockout_are_audited(console: Console) -> None:
    console.set_console(lockout_after=2)
    events = _new_events(console, lambda: console.login(RECEPTION, RECEPTION_PASSWORD))
    assert _one(events, "staff_login").actor == RECEPTION

    def fail_twice() -> None:
        for _ in range(2):
            console.try_login(console.client("10.1.0.1"), "kim", "not-kims-password")

    locked = _one(_new_events(console, fail_twice), "staff_locked")
    assert (locked.detail or "").startswith("account kim") and "2 wrong passwords" in (
        locked.detail or "")
    assert "not-kims-password" not in repr(console.snapshot())
