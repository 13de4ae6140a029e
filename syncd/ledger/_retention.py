"""Retention purge runs (R4): what each run found, and the purge guard's held-back runs."""

from __future__ import annotations

from collections.abc import Sequence

from syncd.ledger._db import LedgerBase, _columns, _from_row, _short
from syncd.ledger._records import RETENTION_RUN_STATES, RetentionRun


class RetentionMixin(LedgerBase):
    """Recording, confirming and superseding retention runs."""

    def add_retention_run(self, stale_count: int, live_count: int, state: str) -> int:
        """Record a run that happened now.

        Returns:
            The run's id.

        Raises:
            ValueError: ``state`` is not one of ``RETENTION_RUN_STATES``.
            LedgerError: SQLite failed.
        """
        if state not in RETENTION_RUN_STATES:
            raise ValueError(f"unknown retention run state {state!r}")
        cursor = self._run(
            "INSERT INTO retention_runs (created_at, stale_count, live_count, state)"
            " VALUES (?, ?, ?, ?)",
            (self._now(), stale_count, live_count, state),
        )
        return int(cursor.lastrowid or 0)

    def retention_run(self, run_id: int) -> RetentionRun | None:
        """The run with this id, or None.

        Raises:
            LedgerError: SQLite failed.
        """
        return self._row(RetentionRun, "retention_runs", "id", run_id)

    def guarded_retention_runs(self) -> list[RetentionRun]:
        """Runs the purge guard holds back, oldest first.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = (f"SELECT {_columns(RetentionRun)} FROM retention_runs WHERE state = 'guarded'"
               " ORDER BY id")
        return [_from_row(RetentionRun, row) for row in self._run(sql)]

    def close_retention_run(self, run_id: int, state: str, *, filed_count: int = 0,
                            confirmed_by: str | None = None,
                            from_states: Sequence[str] = ("guarded",)) -> bool:  # fmt: skip
        """Move a run on (compare-and-set on its current state).

        Returns:
            False if the run was not in one of ``from_states``.

        Raises:
            ValueError: ``state`` is not one of ``RETENTION_RUN_STATES``.
            LedgerError: SQLite failed.
        """
        if state not in RETENTION_RUN_STATES:
            raise ValueError(f"unknown retention run state {state!r}")
        marks = ", ".join("?" for _ in from_states)
        cursor = self._run(
            "UPDATE retention_runs SET state = ?, filed_count = ?, closed_at = ?,"
            f" confirmed_by = COALESCE(?, confirmed_by) WHERE id = ? AND state IN ({marks})",
            (state, filed_count, self._now(), _short(confirmed_by), run_id, *from_states),
        )
        return cursor.rowcount == 1

    def requested_client_ids(self, kind: str, *, states: Sequence[str],
                             source: str | None = None) -> set[str]:  # fmt: skip
        """Phorest client ids of the requests of ``kind`` in ``states`` (and ``source``).

        Raises:
            LedgerError: SQLite failed.
        """
        marks = ", ".join("?" for _ in states)
        sql = (f"SELECT DISTINCT client_id FROM requests WHERE kind = ? AND state IN ({marks})"
               " AND client_id IS NOT NULL")
        params: list[str] = [kind, *states]
        if source is not None:
            sql += " AND source = ?"
            params.append(source)
        return {row["client_id"] for row in self._run(sql, params)}
