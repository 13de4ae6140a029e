"""Staff accounts for the console: names, roles, password hashes and login throttling."""

from __future__ import annotations

from datetime import datetime

from syncd.ledger._db import LedgerBase, _columns, _from_row, _to_text
from syncd.ledger._records import STAFF_ROLES, StaffMember


class StaffMixin(LedgerBase):
    """Adding, changing and reading staff accounts; counting failed logins."""

    def add_staff(self, name: str, role: str, password_hash: str) -> int:
        """Create an active account.

        Returns:
            The account's id.

        Raises:
            ValueError: ``role`` is not one of ``STAFF_ROLES``.
            LedgerError: SQLite failed, or the name is taken (any letter case).
        """
        if role not in STAFF_ROLES:
            raise ValueError(f"unknown role {role!r}")
        now = self._now()
        cursor = self._run(
            "INSERT INTO staff (name, role, password_hash, password_changed_at, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (name, role, password_hash, now, now, now),
        )
        return int(cursor.lastrowid or 0)

    def staff_member(self, name: str) -> StaffMember | None:
        """The account called ``name`` (any letter case), or None.

        Raises:
            LedgerError: SQLite failed.
        """
        return self._row(StaffMember, "staff", "name", name)

    def all_staff(self) -> list[StaffMember]:
        """Every account, active first, then by name.

        Raises:
            LedgerError: SQLite failed.
        """
        rows = self._run(f"SELECT {_columns(StaffMember)} FROM staff"
                         " ORDER BY active DESC, name COLLATE NOCASE").fetchall()
        return [_from_row(StaffMember, row) for row in rows]

    def count_active_managers(self) -> int:
        """How many active manager accounts there are.

        Raises:
            LedgerError: SQLite failed.
        """
        row = self._run("SELECT COUNT(*) FROM staff WHERE role = 'manager' AND active = 1")
        return int(row.fetchone()[0])

    def set_staff_role(self, name: str, role: str) -> bool:
        """Change an account's role. Returns False when there is no such account.

        Raises:
            ValueError: ``role`` is not one of ``STAFF_ROLES``.
            LedgerError: SQLite failed.
        """
        if role not in STAFF_ROLES:
            raise ValueError(f"unknown role {role!r}")
        return self._update(name, "role = ?", [role])

    def set_staff_active(self, name: str, active: bool) -> bool:
        """Enable or disable an account (enabling also clears its lockout).

        Returns False when there is no such account.

        Raises:
            LedgerError: SQLite failed.
        """
        if active:
            return self._update(name, "active = 1, failed_logins = 0, locked_until = NULL", [])
        return self._update(name, "active = 0", [])

    def set_staff_password(self, name: str, password_hash: str, *,
                           keep_sessions: bool = False) -> bool:
        """Replace an account's password hash; clears its lockout and ends its sessions.

        ``keep_sessions``: the same password hashed anew (stronger parameters):
        nothing else changes, and the account's sessions go on.

        Returns False when there is no such account.

        Raises:
            LedgerError: SQLite failed.
        """
        if keep_sessions:
            return self._update(name, "password_hash = ?", [password_hash])
        return self._update(name, "password_hash = ?, password_changed_at = ?,"
                            " failed_logins = 0, locked_until = NULL",
                            [password_hash, self._now()])

    def record_login_failure(self, name: str, *, lock_after: int,
                             locked_until: datetime) -> StaffMember | None:
        """Count one failed login; the ``lock_after``-th in a row locks the account.

        Returns:
            The account as it is now (``locked_until`` set when this failure
            locked it), or None when there is no such account.

        Raises:
            LedgerError: SQLite failed.
        """
        with self.transaction():
            self._run("UPDATE staff SET failed_logins = failed_logins + 1, updated_at = ?"
                      " WHERE name = ?", (self._now(), name))
            self._run("UPDATE staff SET locked_until = ?, failed_logins = 0"
                      " WHERE name = ? AND failed_logins >= ?",
                      (_to_text(locked_until), name, lock_after))
            return self.staff_member(name)

    def record_login(self, name: str) -> None:
        """A successful login: the failure count restarts.

        Raises:
            LedgerError: SQLite failed.
        """
        now = self._now()
        self._update(name, "failed_logins = 0, locked_until = NULL, last_login_at = ?", [now])

    def _update(self, name: str, assignments: str, params: list[object]) -> bool:
        # ``assignments`` is a literal from this module, never input.
        cursor = self._run(f"UPDATE staff SET {assignments}, updated_at = ? WHERE name = ?",
                           (*params, self._now(), name))
        return cursor.rowcount > 0
