"""Logging in: lockout, the per-address limit, idle sessions, and account changes ending sessions."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from syncd import staff
from tests.syncd.console.conftest import MANAGER, RECEPTION, RECEPTION_PASSWORD, Console

LOCK_AFTER = 3
ADDRESS_FAILURES = 6
WRONG = "wrong-password-0"


@pytest.fixture(scope="module", autouse=True)
def _limits(console: Console) -> None:
    console.set_console(lockout_after=LOCK_AFTER, address_failures=ADDRESS_FAILURES,
                        lockout_minutes=15, idle_minutes=15)


def _add(console: Console, name: str, role: str = "reception") -> str:
    password = f"{name}-password-1"
    with console.ledger() as ledger:
        staff.add(ledger, name, role, password, by=None)
    return password


def _logged_in(console: Console, client) -> bool:  # type: ignore[no-untyped-def]
    answer = client.get("/")
    if answer.status_code == 200:
        return True
    assert answer.status_code == 302 and urlsplit(answer.headers["Location"]).path == "/login"
    return False


def test_wrong_passwords_lock_the_account_until_a_manager_resets_it(console: Console) -> None:
    password = _add(console, "ann")
    client = console.client("10.0.1.1")
    for attempt in range(LOCK_AFTER):
        answer = console.try_login(client, "ann", WRONG)
        assert answer.status_code == 401
        if attempt < LOCK_AFTER - 1:
            assert "Wrong login name or password" in answer.text
    assert "locked" in answer.text
    (locked,) = [e for e in console.audit("staff_locked") if "account ann" in (e.detail or "")]
    assert f"{LOCK_AFTER} wrong passwords" in (locked.detail or "")

    refused = console.try_login(console.client("10.0.1.2"), "ann", password)
    assert refused.status_code == 401 and "locked" in refused.text
    console.clock.advance(minutes=5)  # still inside the lockout
    assert console.try_login(console.client("10.0.1.2"), "ann", password).status_code == 401

    manager = console.manager()
    reset = console.post(manager, "/users/ann/reset", {"password": "ann-new-password"}, "/users")
    assert reset.status_code == 302
    assert console.try_login(console.client("10.0.1.3"), "ann", "ann-new-password").status_code == 302


def test_a_lockout_ends_by_itself_after_lockout_minutes(console: Console) -> None:
    password = _add(console, "bea")
    for _ in range(LOCK_AFTER):
        console.try_login(console.client("10.0.2.1"), "bea", WRONG)
    assert console.try_login(console.client("10.0.2.2"), "bea", password).status_code == 401
    console.clock.advance(minutes=16)
    assert console.try_login(console.client("10.0.2.3"), "bea", password).status_code == 302


def test_a_successful_login_restarts_the_count(console: Console) -> None:
    password = _add(console, "cat")
    for _ in range(3):
        for _ in range(LOCK_AFTER - 1):
            assert console.try_login(console.client("10.0.3.1"), "cat", WRONG).status_code == 401
        assert console.try_login(console.client("10.0.3.2"), "cat", password).status_code == 302
    assert not [e for e in console.audit("staff_locked") if "account cat" in (e.detail or "")]


def test_an_address_with_too_many_failures_gets_429(console: Console) -> None:
    password = _add(console, "dan")
    address = "10.0.4.1"
    names = ["dan", "nobody-here", "x", "dan", "ghost", "nobody-here"]
    for name in names[:ADDRESS_FAILURES]:
        assert console.try_login(console.client(address), name, WRONG).status_code == 401
    blocked = console.try_login(console.client(address), "dan", password)
    assert blocked.status_code == 429
    assert "Too many" in blocked.text
    assert [e for e in console.audit("console_address_throttled")]
    # Another address is not affected; the window passes.
    assert console.try_login(console.client("10.0.4.2"), "eve-unknown", WRONG).status_code == 401
    console.clock.advance(minutes=16)
    assert console.try_login(console.client(address), "dan", password).status_code == 302


def test_unknown_names_are_answered_like_wrong_passwords_and_create_nothing(
    console: Console,
) -> None:
    _add(console, "fay")
    before = console.snapshot()["staff"]
    known = console.try_login(console.client("10.0.5.1"), "fay", WRONG)
    unknown = console.try_login(console.client("10.0.5.2"), "fay-nobody", WRONG)
    bad_name = console.try_login(console.client("10.0.5.3"), "1 not a name!", WRONG)
    assert known.status_code == unknown.status_code == bad_name.status_code == 401
    message = "Wrong login name or password"
    assert message in known.text and message in unknown.text and message in bad_name.text
    assert "fay-nobody" in unknown.text  # re-shown in its own field, nothing else differs
    assert known.text.replace('value="fay"', "") == unknown.text.replace(
        'value="fay-nobody"', "").replace(_token(unknown.text), _token(known.text))
    after = console.snapshot()["staff"]
    assert [row[1] for row in after] == [row[1] for row in before]  # names: none added
    with console.ledger() as ledger:
        assert ledger.staff_member("fay-nobody") is None


def _token(html: str) -> str:
    from tests.syncd.console.conftest import csrf_token

    return csrf_token(html)


def test_a_disabled_account_cannot_log_in(console: Console) -> None:
    password = _add(console, "gus")
    with console.ledger() as ledger:
        staff.set_active(ledger, "gus", False, by=MANAGER)
    answer = console.try_login(console.client("10.0.6.1"), "gus", password)
    assert answer.status_code == 401 and "disabled" in answer.text


def test_an_idle_session_ends_and_an_active_one_lives_on(console: Console) -> None:
    client = console.reception()
    for _ in range(4):  # 4 x 14 minutes: longer than the idle time, but never idle that long
        console.clock.advance(minutes=14)
        assert _logged_in(console, client)
    console.clock.advance(minutes=15, seconds=1)
    answer = client.get("/")
    assert answer.status_code == 302
    follow = client.get(answer.headers["Location"])
    assert "logged out after 15 minutes" in follow.text
    assert not _logged_in(console, client)


def test_disabling_an_account_ends_its_sessions(console: Console) -> None:
    password = _add(console, "hal")
    client = console.login("hal", password, "10.0.7.1")
    assert _logged_in(console, client)
    manager = console.manager()
    assert console.post(manager, "/users/hal/disable", {}, "/users").status_code == 302
    assert not _logged_in(console, client)
    assert console.post(manager, "/users/hal/enable", {}, "/users").status_code == 302
    assert not _logged_in(console, client)  # enabling does not revive the old session
    assert _logged_in(console, console.login("hal", password, "10.0.7.1"))


def test_resetting_a_password_ends_the_accounts_sessions(console: Console) -> None:
    password = _add(console, "ivy")
    first, second = (console.login("ivy", password, "10.0.8.1") for _ in range(2))
    manager = console.manager()
    answer = console.post(manager, "/users/ivy/reset", {"password": "ivy-new-password"}, "/users")
    assert answer.status_code == 302
    assert not _logged_in(console, first) and not _logged_in(console, second)
    assert console.try_login(console.client("10.0.8.2"), "ivy", password).status_code == 401
    assert _logged_in(console, console.login("ivy", "ivy-new-password", "10.0.8.2"))


def test_a_role_change_takes_effect_on_the_next_request(console: Console) -> None:
    password = _add(console, "jon")
    client = console.login("jon", password, "10.0.9.1")
    assert client.get("/users").status_code == 403
    manager = console.manager()
    assert console.post(manager, "/users/jon/role", {"role": "manager"}, "/users").status_code == 302
    assert client.get("/users").status_code == 200
    assert console.post(manager, "/users/jon/role", {"role": "reception"},
                        "/users").status_code == 302
    assert client.get("/users").status_code == 403
    assert _logged_in(console, client)


def test_logging_out_ends_the_session(console: Console) -> None:
    client = console.login(RECEPTION, RECEPTION_PASSWORD, "10.0.10.1")
    token = console.token(client, "/requests/new")
    answer = client.post("/logout", data={"csrf_token": token})
    assert answer.status_code == 302
    assert not _logged_in(console, client)
    (out,) = [e for e in console.audit("staff_logout") if e.actor == RECEPTION]
    assert out.detail == f"account {RECEPTION}"


def test_the_last_manager_cannot_be_disabled_or_demoted_from_the_console(console: Console) -> None:
    with console.ledger() as ledger:
        managers = [m.name for m in ledger.all_staff() if m.role == "manager" and m.active]
    assert managers == [MANAGER]
    manager = console.manager()
    for path, data in ((f"/users/{MANAGER}/disable", {}),
                       (f"/users/{MANAGER}/role", {"role": "reception"})):
        answer = console.post(manager, path, data, "/users")
        assert answer.status_code == 302
        assert "last active manager" in manager.get("/users").text
    with console.ledger() as ledger:
        member = ledger.staff_member(MANAGER)
    assert member is not None and member.active and member.role == "manager"
    assert _logged_in(console, manager)
