"""The audit trail: append-only evidence of what syncd did, without personal data."""

from __future__ import annotations

from syncd.ledger._db import LedgerBase, _columns, _from_row, _short
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
    ) -> int:
        """Append one evidence entry. ``detail`` must hold no personal data.

        Returns:
            The entry's id.

        Raises:
            LedgerError: SQLite failed.
        """
        cursor = self._run(
            "INSERT INTO audit (at, subject_key, processor, action, reason, outcome,"
            " vendor_request_id, task_id, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self._now(), subject_key, processor, action, reason, outcome,
             vendor_request_id, task_id, _short(detail)),
        )  # fmt: skip
        return int(cursor.lastrowid or 0)

    def audit_events(self, subject_key: str | None = None, limit: int = 100) -> list[AuditEvent]:
        """The most recent evidence entries, newest first, optionally for one subject.

        Raises:
            LedgerError: SQLite failed.
        """
        where, params = "", list[str]()
        if subject_key is not None:
            where, params = "WHERE subject_key = ?", [subject_key]
        rows = self._run(
            f"SELECT {_columns(AuditEvent)} FROM audit {where} ORDER BY at DESC, id DESC LIMIT ?",
            (*params, limit),
        )
        return [_from_row(AuditEvent, row) for row in rows]
