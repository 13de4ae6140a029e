"""The audit trail: append-only evidence of what syncd did, without personal data."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from syncd.ledger._db import KEYS_PER_QUERY, LedgerBase, _columns, _from_row, _short, _to_text
from syncd.ledger._records import AuditEvent


class AuditMixin(LedgerBase):
    """Writing and reading the evidence entries."""

    def add_audit(
        self,
        subject_key: str | None,
        processor: str | None,
        action: str,
        reason: str | None,
        outcome: str,
        *,
        vendor_request_id: str | None = None,
        task_id: int | None = None,
        detail: str | None = None,
        request_id: int | None = None,
        actor: str | None = None,
    ) -> int:
        """Append one evidence entry. ``detail`` must hold no personal data.

        ``actor`` is the staff login name when a person did it (console or
        command line), None for syncd's own work.

        Returns:
            The entry's id.

        Raises:
            LedgerError: SQLite failed.
        """
        cursor = self._run(
            "INSERT INTO audit (at, subject_key, processor, action, reason, outcome,"
            " vendor_request_id, task_id, detail, request_id, actor)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self._now(), subject_key, processor, action, reason, outcome,
             vendor_request_id, task_id, _short(detail), request_id, actor),
        )  # fmt: skip
        return int(cursor.lastrowid or 0)

    def audit_events(self, subject_key: str | None = None, limit: int = 100) -> list[AuditEvent]:
        """The most recent evidence entries, newest first, optionally for one subject.

        Raises:
            LedgerError: SQLite failed.
        """
        keys = None if subject_key is None else [subject_key]
        return self.find_audit(subject_keys=keys, limit=limit, newest_first=True)

    def task_evidence(self, task_id: int) -> AuditEvent | None:
        """The latest evidence entry a task's outcome wrote, or None.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = (f"SELECT {_columns(AuditEvent)} FROM audit WHERE task_id = ?"
               " ORDER BY id DESC LIMIT 1")
        row = self._run(sql, (task_id,)).fetchone()
        return None if row is None else _from_row(AuditEvent, row)

    def find_audit(
        self,
        *,
        subject_keys: Sequence[str] | None = None,
        request_id: int | None = None,
        since: datetime | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[AuditEvent]:
        """Evidence entries matching every filter given, oldest first by default.

        Args:
            subject_keys: entries about any of these subjects (an empty list matches none).
            request_id: entries written for this request.
            since: entries at or after this time.
            limit: at most this many.
            newest_first: order newest first.

        Raises:
            LedgerError: SQLite failed.
        """
        if subject_keys is not None and not subject_keys:
            return []
        where: list[str] = []
        params: list[Any] = []
        if subject_keys is not None:
            keys = list(dict.fromkeys(subject_keys))[:KEYS_PER_QUERY]
            where.append(f"subject_key IN ({', '.join('?' * len(keys))})")
            params += keys
        if request_id is not None:
            where.append("request_id = ?")
            params.append(request_id)
        if since is not None:
            where.append("at >= ?")
            params.append(_to_text(since))
        sql = f"SELECT {_columns(AuditEvent)} FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        order = "DESC" if newest_first else "ASC"
        sql += f" ORDER BY at {order}, id {order}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_from_row(AuditEvent, row) for row in self._run(sql, params)]
