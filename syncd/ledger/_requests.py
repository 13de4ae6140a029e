"""Data-subject requests (erase, restrict, unrestrict, export) and their due dates."""

from __future__ import annotations

from datetime import datetime

from syncd.ledger._db import LedgerBase, _columns, _from_row, _to_text
from syncd.ledger._records import REQUEST_FINAL_STATES, REQUEST_KINDS, Request


class RequestsMixin(LedgerBase):
    """Recording, closing and listing requests."""

    def add_request(
        self, kind: str, subject_key: str, source: str, due_at: datetime, note: str | None = None
    ) -> int:
        """Record a data-subject request received now.

        Returns:
            The request's id.

        Raises:
            ValueError: ``kind`` is not one of ``REQUEST_KINDS``.
            LedgerError: SQLite failed.
        """
        if kind not in REQUEST_KINDS:
            raise ValueError(f"unknown request kind {kind!r}")
        cursor = self._run(
            "INSERT INTO requests (kind, subject_key, source, received_at, due_at, state, note)"
            " VALUES (?, ?, ?, ?, ?, 'open', ?)",
            (kind, subject_key, source, self._now(), _to_text(due_at), note),
        )
        return int(cursor.lastrowid or 0)

    def close_request(self, request_id: int, state: str, note: str | None = None) -> bool:
        """Close an open request as done, failed or cancelled.

        Returns:
            False if it was not open.

        Raises:
            ValueError: ``state`` is not one of ``REQUEST_FINAL_STATES``.
            LedgerError: SQLite failed.
        """
        if state not in REQUEST_FINAL_STATES:
            raise ValueError(f"{state!r} is not a final request state")
        cursor = self._run(
            "UPDATE requests SET state = ?, closed_at = ?, note = COALESCE(?, note)"
            " WHERE id = ? AND state = 'open'",
            (state, self._now(), note, request_id),
        )
        return cursor.rowcount == 1

    def request(self, request_id: int) -> Request | None:
        """The request with this id, or None.

        Raises:
            LedgerError: SQLite failed.
        """
        return self._row(Request, "requests", "id", request_id)

    def open_requests(self) -> list[Request]:
        """Every open request, soonest due first.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = f"SELECT {_columns(Request)} FROM requests WHERE state = 'open' ORDER BY due_at, id"
        return [_from_row(Request, row) for row in self._run(sql)]
