"""Alerts for the manager, and what the daemon last learned about each processor."""

from __future__ import annotations

from syncd.ledger._db import LedgerBase, _columns, _from_row, _short
from syncd.ledger._records import Alert, ProcessorHealth


class AlertsMixin(LedgerBase):
    """Open and resolved alerts, and processor health."""

    # -- alerts -------------------------------------------------------------

    def raise_alert(self, problem_key: str, kind: str, summary: str) -> Alert:
        """Open an alert for a problem, unless one is open already.

        Args:
            problem_key: identifies the problem, e.g. ``processor_down:mailchimp``.
            kind: the alert's category.
            summary: one line for the manager, without personal data.

        Returns:
            The open alert for ``problem_key`` (the existing one, if any).

        Raises:
            LedgerError: SQLite failed.
        """
        sql = f"SELECT {_columns(Alert)} FROM alerts WHERE problem_key = ? AND state = 'open'"
        with self.transaction():
            if (row := self._run(sql, (problem_key,)).fetchone()) is None:
                self._run(
                    "INSERT INTO alerts (problem_key, kind, summary, state, created_at,"
                    " notify_count) VALUES (?, ?, ?, 'open', ?, 0)",
                    (problem_key, kind, summary, self._now()),
                )
                row = self._run(sql, (problem_key,)).fetchone()
        return _from_row(Alert, row)

    def resolve_alert(self, problem_key: str) -> bool:
        """Close the open alert for a problem.

        Returns:
            True if one was open (the caller then sends the recovery notice).

        Raises:
            LedgerError: SQLite failed.
        """
        cursor = self._run(
            "UPDATE alerts SET state = 'resolved', resolved_at = ?"
            " WHERE problem_key = ? AND state = 'open'",
            (self._now(), problem_key),
        )
        return cursor.rowcount == 1

    def open_alerts(self) -> list[Alert]:
        """Every open alert, oldest first.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = f"SELECT {_columns(Alert)} FROM alerts WHERE state = 'open' ORDER BY created_at, id"
        return [_from_row(Alert, row) for row in self._run(sql)]

    def mark_notified(self, alert_id: int) -> None:
        """Record that the manager was just told about this alert.

        Raises:
            LedgerError: SQLite failed.
        """
        self._run(
            "UPDATE alerts SET last_notified_at = ?, notify_count = notify_count + 1"
            " WHERE id = ?",
            (self._now(), alert_id),
        )

    def alerts_recovered(self) -> list[Alert]:
        """Resolved alerts the manager was told about but not yet told had cleared.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = (f"SELECT {_columns(Alert)} FROM alerts WHERE state = 'resolved'"
               " AND notify_count > 0 AND recovery_notified_at IS NULL ORDER BY resolved_at, id")
        return [_from_row(Alert, row) for row in self._run(sql)]

    def mark_recovery_notified(self, alert_id: int) -> None:
        """Record that the manager was told this alert's problem cleared.

        Raises:
            LedgerError: SQLite failed.
        """
        self._run("UPDATE alerts SET recovery_notified_at = ? WHERE id = ?",
                  (self._now(), alert_id))

    # -- processor health ---------------------------------------------------

    def record_contact(self, processor: str, *, ok: bool, error: str | None = None,
                       credentials_ok: bool | None = None) -> None:
        """Record one contact with a processor: a success, or a failure and why.

        A success clears ``down_since``; the first failure after a success sets it.
        ``credentials_ok`` None leaves the stored value as it is (a success sets True).

        Args:
            processor: the connector's name.
            ok: the processor answered as expected.
            error: one line, no personal data (failures only).
            credentials_ok: whether the credentials were accepted, when known.

        Raises:
            LedgerError: SQLite failed.
        """
        now = self._now()
        if ok:
            self._run(
                "INSERT INTO processor_health (processor, last_ok_at, credentials_ok, updated_at)"
                " VALUES (?, ?, 1, ?) ON CONFLICT (processor) DO UPDATE SET"
                " last_ok_at = excluded.last_ok_at, credentials_ok = 1, down_since = NULL,"
                " updated_at = excluded.updated_at",
                (processor, now, now),
            )
            return
        creds = None if credentials_ok is None else int(credentials_ok)
        self._run(
            "INSERT INTO processor_health (processor, last_error, last_error_at, credentials_ok,"
            " down_since, updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (processor) DO UPDATE"
            " SET last_error = excluded.last_error, last_error_at = excluded.last_error_at,"
            " credentials_ok = COALESCE(excluded.credentials_ok, credentials_ok),"
            " down_since = COALESCE(down_since, excluded.down_since),"
            " updated_at = excluded.updated_at",
            (processor, _short(error), now, creds, now, now),
        )

    def processor_health(self) -> dict[str, ProcessorHealth]:
        """What is known about every processor contacted so far, by name.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = f"SELECT {_columns(ProcessorHealth)} FROM processor_health ORDER BY processor"
        return {row["processor"]: _from_row(ProcessorHealth, row) for row in self._run(sql)}
