"""Staff accounts: argon2id hashes, name/password/role rules, the last manager, login throttling."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from syncd import staff
from syncd.ledger import Ledger
from tests.support import DEFAULT_START

PASSWORD = "correct horse battery"
NOW = DEFAULT_START


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "ledger.sqlite3") as opened:
        yield opened


def _login(ledger: Ledger, name: str, password: str, *, now=NOW, lock_after: int = 3,  # type: ignore[no-untyped-def]
           lock_minutes: int = 15) -> staff.LoginResult:
    return staff.login(ledger, name, password, now=now, lock_after=lock_after,
                       lock_minutes=lock_minutes)


def _actions(ledger: Ledger) -> list[tuple[str, str | None, str | None]]:
    return [(e.action, e.actor, e.detail) for e in ledger.find_audit(limit=1000)]


def test_the_password_is_stored_as_an_argon2id_hash_only(ledger: Ledger) -> None:
    member = staff.add(ledger, "ann", "manager", PASSWORD, by="root")
    assert member.password_hash.startswith("$argon2id$")
    assert PASSWORD not in member.password_hash
    assert PasswordHasher().verify(member.password_hash, PASSWORD)
    assert not PasswordHasher().check_needs_rehash(member.password_hash)
    ledger.close()
    assert PASSWORD.encode() not in Path(ledger.path).read_bytes()


def test_two_accounts_with_one_password_get_different_hashes(ledger: Ledger) -> None:
    first = staff.add(ledger, "ann", "manager", PASSWORD, by=None)
    second = staff.add(ledger, "bob", "reception", PASSWORD, by=None)
    assert first.password_hash != second.password_hash  # salted


@pytest.mark.parametrize("name", ["a", "Ann", "ann.b-c_d9", "a" * 40])
def test_good_names(name: str) -> None:
    assert staff.check_name(name) == name


@pytest.mark.parametrize("name", ["", "9ann", ".ann", "a" * 41, "ann b", "ann@clinic", "ann\n",
                                  "ann/..", "ánn", "ann\x00"])
def test_bad_names_are_refused(ledger: Ledger, name: str) -> None:
    with pytest.raises(staff.StaffError, match="login name"):
        staff.check_name(name)
    with pytest.raises(staff.StaffError):
        staff.add(ledger, name, "reception", PASSWORD, by=None)
    assert ledger.all_staff() == []


@pytest.mark.parametrize(("password", "ok"), [("x" * 9, False), ("x" * 10, True),
                                              ("x" * 256, True), ("x" * 257, False), ("", False)])
def test_password_length_rules(ledger: Ledger, password: str, ok: bool) -> None:
    if ok:
        assert staff.check_password(password) == password
        staff.add(ledger, "ann", "reception", password, by=None)
        assert _login(ledger, "ann", password).member is not None
    else:
        with pytest.raises(staff.StaffError, match="characters"):
            staff.add(ledger, "ann", "reception", password, by=None)
        assert ledger.all_staff() == []


@pytest.mark.parametrize("role", ["admin", "Manager", "", "root"])
def test_unknown_roles_are_refused(ledger: Ledger, role: str) -> None:
    with pytest.raises(staff.StaffError, match="role"):
        staff.add(ledger, "ann", role, PASSWORD, by=None)
    staff.add(ledger, "ann", "manager", PASSWORD, by=None)
    staff.add(ledger, "bob", "manager", PASSWORD, by=None)
    with pytest.raises(staff.StaffError, match="role"):
        staff.set_role(ledger, "ann", role, by=None)


def test_a_taken_name_is_refused_in_any_letter_case(ledger: Ledger) -> None:
    staff.add(ledger, "ann", "reception", PASSWORD, by=None)
    for name in ("ann", "ANN", "Ann"):
        with pytest.raises(staff.StaffError, match="already"):
            staff.add(ledger, name, "manager", PASSWORD, by=None)
    assert [m.name for m in ledger.all_staff()] == ["ann"]


def test_the_last_active_manager_cannot_be_disabled_or_demoted(ledger: Ledger) -> None:
    staff.add(ledger, "ann", "manager", PASSWORD, by=None)
    staff.add(ledger, "bob", "reception", PASSWORD, by=None)
    with pytest.raises(staff.StaffError, match="last active manager"):
        staff.set_active(ledger, "ann", False, by="bob")
    with pytest.raises(staff.StaffError, match="last active manager"):
        staff.set_role(ledger, "ann", "reception", by="bob")
    # A second manager, but disabled: still the last active one.
    staff.add(ledger, "cat", "manager", PASSWORD, by="ann")
    staff.set_active(ledger, "cat", False, by="ann")
    with pytest.raises(staff.StaffError, match="last active manager"):
        staff.set_active(ledger, "ann", False, by="ann")
    member = ledger.staff_member("ann")
    assert member is not None and member.active and member.role == "manager"
    # With another active manager, either may go.
    staff.set_active(ledger, "cat", True, by="ann")
    staff.set_role(ledger, "ann", "reception", by="cat")
    with pytest.raises(staff.StaffError, match="last active manager"):
        staff.set_active(ledger, "cat", False, by="cat")
    assert ledger.count_active_managers() == 1


def test_changes_are_audited_with_who_made_them(ledger: Ledger) -> None:
    staff.add(ledger, "ann", "manager", PASSWORD, by="root")
    staff.add(ledger, "bob", "reception", PASSWORD, by="ann")
    staff.set_role(ledger, "bob", "manager", by="ann")
    staff.set_role(ledger, "bob", "manager", by="ann")  # no change: nothing recorded
    staff.set_active(ledger, "bob", False, by="ann")
    staff.set_active(ledger, "bob", True, by="ann")
    staff.reset_password(ledger, "bob", "another password", by="ann")
    assert _actions(ledger) == [
        ("staff_add", "root", "account ann; role manager"),
        ("staff_add", "ann", "account bob; role reception"),
        ("staff_role", "ann", "account bob; role manager"),
        ("staff_disable", "ann", "account bob"),
        ("staff_enable", "ann", "account bob"),
        ("staff_reset_password", "ann", "account bob"),
    ]
    assert not any(PASSWORD in repr(a) or "another password" in repr(a) for a in _actions(ledger))


def test_changes_to_an_unknown_account_are_refused(ledger: Ledger) -> None:
    for change in (lambda: staff.set_active(ledger, "ghost", False, by=None),
                   lambda: staff.set_role(ledger, "ghost", "manager", by=None),
                   lambda: staff.reset_password(ledger, "ghost", PASSWORD, by=None)):
        with pytest.raises(staff.StaffError, match="no account"):
            change()
    assert ledger.all_staff() == [] and _actions(ledger) == []


def test_login_accepts_the_password_and_refuses_others(ledger: Ledger) -> None:
    staff.add(ledger, "ann", "reception", PASSWORD, by=None)
    accepted = _login(ledger, "ANN", PASSWORD)
    assert accepted.member is not None and accepted.member.name == "ann"
    assert accepted.member.last_login_at is not None
    assert _login(ledger, "ann", PASSWORD.upper()) == staff.LoginResult(None, "bad")
    assert _login(ledger, "nobody", PASSWORD) == staff.LoginResult(None, "bad")
    assert _login(ledger, "not a name!", PASSWORD) == staff.LoginResult(None, "bad")
    assert _login(ledger, "ann", "") == staff.LoginResult(None, "bad")
    assert [a for a, _, _ in _actions(ledger)].count("staff_login") == 1


def test_an_unknown_name_creates_nothing(ledger: Ledger) -> None:
    staff.add(ledger, "ann", "reception", PASSWORD, by=None)
    before = ledger.all_staff()
    for _ in range(5):
        _login(ledger, "nobody", PASSWORD)
    assert ledger.all_staff() == before
    assert [a for a, _, _ in _actions(ledger)] == ["staff_add"]


def test_wrong_passwords_lock_the_account_for_lock_minutes(ledger: Ledger) -> None:
    staff.add(ledger, "ann", "reception", PASSWORD, by=None)
    results = [_login(ledger, "ann", "wrong password") for _ in range(3)]
    # A guesser learns nothing: the locking failure and later wrong guesses read "bad";
    # only the right password is told of the lock.
    assert [r.refusal for r in results] == ["bad", "bad", "bad"]
    assert [r.locked_now for r in results] == [False, False, True]
    assert _login(ledger, "ann", "another wrong one").refusal == "bad"
    assert _login(ledger, "ann", PASSWORD).refusal == "locked"
    assert _login(ledger, "ann", PASSWORD, now=NOW + timedelta(minutes=14)).refusal == "locked"
    locks = [a for a in _actions(ledger) if a[0] == "staff_locked"]
    assert locks == [("staff_locked", None,
                      "account ann; 3 wrong passwords in a row; locked for 15 min")]
    assert _login(ledger, "ann", PASSWORD, now=NOW + timedelta(minutes=16)).member is not None


@pytest.mark.parametrize("lift", ["reset", "enable"])
def test_a_reset_or_enable_lifts_a_lockout(ledger: Ledger, lift: str) -> None:
    staff.add(ledger, "ann", "manager", PASSWORD, by=None)
    staff.add(ledger, "bob", "reception", PASSWORD, by=None)
    for _ in range(3):
        _login(ledger, "bob", "wrong password")
    assert _login(ledger, "bob", PASSWORD).refusal == "locked"
    if lift == "reset":
        staff.reset_password(ledger, "bob", "a new password", by="ann")
        assert _login(ledger, "bob", PASSWORD).refusal == "bad"
        assert _login(ledger, "bob", "a new password").member is not None
    else:
        staff.set_active(ledger, "bob", True, by="ann")
        assert _login(ledger, "bob", PASSWORD).member is not None


def test_a_disabled_account_cannot_log_in_and_failures_are_not_counted(ledger: Ledger) -> None:
    staff.add(ledger, "ann", "manager", PASSWORD, by=None)
    staff.add(ledger, "bob", "reception", PASSWORD, by=None)
    staff.set_active(ledger, "bob", False, by="ann")
    assert _login(ledger, "bob", PASSWORD) == staff.LoginResult(None, "disabled")
    for _ in range(5):
        _login(ledger, "bob", "wrong password")
    assert not any(a == "staff_locked" for a, _, _ in _actions(ledger))


def test_a_success_restarts_the_count(ledger: Ledger) -> None:
    staff.add(ledger, "ann", "reception", PASSWORD, by=None)
    for _ in range(2):  # 2 failures and a success, twice: 4 failures, never 3 in a row
        assert _login(ledger, "ann", "wrong password").refusal == "bad"
        assert _login(ledger, "ann", "wrong password").refusal == "bad"
        assert _login(ledger, "ann", PASSWORD).member is not None


def test_a_hash_with_older_parameters_is_replaced_at_the_next_login(ledger: Ledger) -> None:
    staff.add(ledger, "ann", "reception", PASSWORD, by=None)
    old = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash(PASSWORD)
    ledger.set_staff_password("ann", old)
    assert _login(ledger, "ann", "wrong password").member is None
    member = ledger.staff_member("ann")
    assert member is not None and member.password_hash == old  # a failure rehashes nothing
    changed_at = member.password_changed_at
    assert _login(ledger, "ann", PASSWORD).member is not None
    member = ledger.staff_member("ann")
    assert member is not None and member.password_hash != old
    # The same password hashed anew: the account's console sessions go on.
    assert member.password_changed_at == changed_at
    assert member.password_hash.startswith("$argon2id$")
    assert not PasswordHasher().check_needs_rehash(member.password_hash)
    assert _login(ledger, "ann", PASSWORD).member is not None


def test_a_current_hash_is_kept_at_login(ledger: Ledger) -> None:
    added = staff.add(ledger, "ann", "reception", PASSWORD, by=None)
    assert _login(ledger, "ann", PASSWORD).member is not None
    member = ledger.staff_member("ann")
    assert member is not None and member.password_hash == added.password_hash
    assert member.password_changed_at == added.password_changed_at
