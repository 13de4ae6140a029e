"""Staff accounts: who may use the console, with which role, and how they log in.

Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's low-memory
profile) and never stored or logged; a hash made with older parameters is
replaced at the next successful login. Roles (policy 7.3, "more senior staff
members have greater access"):

- ``reception`` files requests and sees the overview, the requests and their
  progress;
- ``manager`` may also confirm manual steps (paper records are the manager's
  only, policy 7.2), extend or cancel requests, confirm a guarded purge,
  download exports and manage accounts.

Failed logins are counted per account in the ledger: the ``lock_after``-th in a
row locks the account for ``lock_minutes`` (audited); a manager's reset or
enable lifts it. The console also throttles per address (in memory). There is
no default account: the first manager is made with ``syncd user add``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from syncd.errors import SyncdError
from syncd.ledger import STAFF_ROLES, Ledger, StaffMember

log = structlog.get_logger(__name__)

MIN_PASSWORD_CHARS = 10
MAX_PASSWORD_CHARS = 256
NAME_PATTERN = re.compile(r"\A[A-Za-z][A-Za-z0-9._-]{0,39}\Z")  # not $: it allows a final "\n"
ROLES = STAFF_ROLES

_hasher = PasswordHasher()
# Verifying an unknown name costs the same as a known one: no timing oracle.
_DUMMY_HASH = _hasher.hash("not a password of anyone's")


class StaffError(SyncdError):
    """An account change was refused (bad name, weak password, the last manager)."""


@dataclass(frozen=True)
class LoginResult:
    """The outcome of one login attempt: the account when accepted, else why not."""

    member: StaffMember | None
    # "bad" (wrong name or password, also of a locked or disabled account), "locked"
    # or "disabled" (the right password of a locked or disabled account)
    refusal: str | None = None
    locked_now: bool = False


def check_name(name: str) -> str:
    """The login name, or StaffError: a letter then up to 39 letters, digits, ``.``, ``_``, ``-``."""
    if not NAME_PATTERN.match(name or ""):
        raise StaffError("a login name is a letter followed by up to 39 letters, digits, "
                         "'.', '_' or '-'")
    return name


def check_password(password: str) -> str:
    """The password, or StaffError when it is too short or too long."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise StaffError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise StaffError(f"a password may have at most {MAX_PASSWORD_CHARS} characters")
    return password


def check_role(role: str) -> str:
    """The role, or StaffError."""
    if role not in ROLES:
        raise StaffError(f"the role is one of: {', '.join(ROLES)}")
    return role


def add(ledger: Ledger, name: str, role: str, password: str, *, by: str | None) -> StaffMember:
    """Create an account (audited).

    Raises:
        StaffError: a bad name, role or password, or the name is taken.
    """
    check_name(name)
    check_role(role)
    check_password(password)
    if ledger.staff_member(name) is not None:
        raise StaffError(f"there is already an account called {name!r}")
    with ledger.transaction():
        ledger.add_staff(name, role, _hasher.hash(password))
        _audit(ledger, "staff_add", name, by, f"role {role}")
    member = ledger.staff_member(name)
    assert member is not None
    return member


def reset_password(ledger: Ledger, name: str, password: str, *, by: str | None) -> None:
    """Set a new password; lifts a lockout and ends the account's console sessions.

    Raises:
        StaffError: no such account, or a bad password.
    """
    check_password(password)
    _existing(ledger, name)
    with ledger.transaction():
        ledger.set_staff_password(name, _hasher.hash(password))
        _audit(ledger, "staff_reset_password", name, by)


def set_active(ledger: Ledger, name: str, active: bool, *, by: str | None) -> None:
    """Enable (lifting a lockout) or disable an account; the last active manager stays.

    Raises:
        StaffError: no such account, or it is the last active manager.
    """
    member = _existing(ledger, name)
    if not active and member.active and member.role == "manager":
        _keep_a_manager(ledger)
    with ledger.transaction():
        ledger.set_staff_active(name, active)
        _audit(ledger, "staff_enable" if active else "staff_disable", name, by)


def set_role(ledger: Ledger, name: str, role: str, *, by: str | None) -> None:
    """Change an account's role; the last active manager stays a manager.

    Raises:
        StaffError: no such account, a bad role, or it is the last active manager.
    """
    check_role(role)
    member = _existing(ledger, name)
    if member.role == role:
        return
    if member.active and member.role == "manager":
        _keep_a_manager(ledger)
    with ledger.transaction():
        ledger.set_staff_role(name, role)
        _audit(ledger, "staff_role", name, by, f"role {role}")


def login(ledger: Ledger, name: str, password: str, *, now: datetime, lock_after: int,
          lock_minutes: int) -> LoginResult:
    """Check a login; count a failure, lock on the ``lock_after``-th in a row (audited).

    The same work is done for an unknown name as for a known one.
    """
    member = ledger.staff_member(name) if NAME_PATTERN.match(name or "") else None
    stored = member.password_hash if member is not None else _DUMMY_HASH
    try:
        matched = _hasher.verify(stored, password[:MAX_PASSWORD_CHARS])
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        matched = False
    if member is None:
        return LoginResult(None, "bad")
    if not member.active:
        return LoginResult(None, "disabled" if matched else "bad")
    if member.locked_until is not None and member.locked_until > now:
        # Only the right password learns of the lock: a guesser cannot tell a locked
        # account from a wrong password, nor a real name from an unknown one.
        return LoginResult(None, "locked" if matched else "bad")
    if not matched:
        after = ledger.record_login_failure(
            member.name, lock_after=lock_after,
            locked_until=now + timedelta(minutes=lock_minutes))
        locked_now = after is not None and after.locked_until is not None and (
            after.locked_until > now)
        if locked_now:
            _audit(ledger, "staff_locked", member.name, None,
                   f"{lock_after} wrong passwords in a row; locked for {lock_minutes} min")
            log.warning("console_account_locked", minutes=lock_minutes)
        return LoginResult(None, "bad", locked_now=locked_now)
    with ledger.transaction():
        if _hasher.check_needs_rehash(member.password_hash):
            ledger.set_staff_password(member.name, _hasher.hash(password), keep_sessions=True)
        ledger.record_login(member.name)
        _audit(ledger, "staff_login", member.name, member.name)
    return LoginResult(ledger.staff_member(member.name))


def _existing(ledger: Ledger, name: str) -> StaffMember:
    member = ledger.staff_member(name)
    if member is None:
        raise StaffError(f"no account called {name!r} (see syncd user list)")
    return member


def _keep_a_manager(ledger: Ledger) -> None:
    if ledger.count_active_managers() <= 1:
        raise StaffError("this is the last active manager: add or promote another first")


def _audit(ledger: Ledger, action: str, name: str, by: str | None,
           detail: str | None = None) -> None:
    text = f"account {name}" + (f"; {detail}" if detail else "")
    ledger.add_audit(None, None, action, "staff", "done", detail=text, actor=by)
