"""Tasks: one action on one processor for one subject, durable across restarts.

A task is written before its call and its outcome after; a worker claims it
with a compare-and-set update (:meth:`TasksMixin.claim`), and a final outcome
scrubs its payload and writes the audit entry in the same transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from syncd.errors import LedgerError
from syncd.ledger._audit import AuditMixin
from syncd.ledger._db import KEYS_PER_QUERY, _columns, _from_row, _from_text, _short, _to_text
from syncd.ledger._records import FINAL_TASK_STATES, TASK_STATES, Task, TaskOutcome
from syncd.ledger._subjects import SubjectsMixin


class TasksMixin(AuditMixin, SubjectsMixin):
    """The task queue (a final outcome writes its evidence through :class:`AuditMixin`)."""

    def add_task(
        self,
        subject_key: str,
        processor: str,
        action: str,
        reason: str,
        payload: Mapping[str, Any] | None = None,
        dedupe_key: str | None = None,
        request_id: int | None = None,
        next_attempt_at: datetime | None = None,
    ) -> int:
        """Queue a task before calling the processor.

        Returns:
            The new task's id or, when an open task has the same ``dedupe_key``,
            that task's id (nothing is added).

        Raises:
            LedgerError: e.g. ``request_id`` names no request.
        """
        now = self._now()
        with self.transaction():
            if dedupe_key is not None:
                row = self._run("SELECT id FROM tasks WHERE dedupe_key = ?", (dedupe_key,))
                if existing := row.fetchone():
                    return int(existing[0])
            cursor = self._run(
                "INSERT INTO tasks (subject_key, processor, action, reason, payload, state,"
                " attempts, next_attempt_at, created_at, updated_at, request_id, dedupe_key)"
                " VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?, ?)",
                (subject_key, processor, action, reason,
                 None if payload is None else json.dumps(payload, sort_keys=True),
                 now if next_attempt_at is None else _to_text(next_attempt_at),
                 now, now, request_id, dedupe_key),
            )  # fmt: skip
            return int(cursor.lastrowid or 0)

    def attach_task(self, task_id: int, request_id: int) -> bool:
        """Make an open task that serves no request yet serve ``request_id`` (evidence).

        Returns:
            False when the task already serves a request or is final.

        Raises:
            LedgerError: SQLite failed.
        """
        cursor = self._run(
            "UPDATE tasks SET request_id = ? WHERE id = ? AND request_id IS NULL"
            " AND state IN ('pending', 'in_flight')",
            (request_id, task_id),
        )
        return cursor.rowcount == 1

    def claim(self, task_id: int, expected_state: str = "pending") -> bool:
        """Mark a task in flight if it is still in ``expected_state`` (compare-and-set).

        Returns:
            True for exactly one of several workers racing for the same task.

        Raises:
            LedgerError: SQLite failed.
        """
        cursor = self._run(
            "UPDATE tasks SET state = 'in_flight', attempts = attempts + 1, updated_at = ?"
            " WHERE id = ? AND state = ?",
            (self._now(), task_id, expected_state),
        )
        return cursor.rowcount == 1

    def due_tasks(self, limit: int, processor: str | None = None) -> list[Task]:
        """Pending tasks whose ``next_attempt_at`` has come, oldest first.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = f"SELECT {_columns(Task)} FROM tasks WHERE state = 'pending' AND next_attempt_at <= ?"
        params: list[Any] = [self._now()]
        if processor is not None:
            sql += " AND processor = ?"
            params.append(processor)
        rows = self._run(sql + " ORDER BY next_attempt_at, id LIMIT ?", (*params, limit))
        return [_from_row(Task, row) for row in rows]

    def finish(
        self,
        task_id: int,
        state: str,
        *,
        error: str | None = None,
        vendor_request_id: str | None = None,
        detail: str | None = None,
    ) -> bool:
        """Record a final outcome: scrub the payload, free the dedupe key, write audit.

        Args:
            task_id: the task.
            state: one of ``FINAL_TASK_STATES``.
            error: short text without personal data, for ``last_error`` and the audit.
            vendor_request_id: the processor's request id, for the evidence.
            detail: other evidence for the audit (e.g. GA's ``deletionRequestTime``);
                the audit's detail is ``error`` when this is not given.

        Returns:
            False if the task was already final (nothing written).

        Raises:
            ValueError: ``state`` is not final.
            LedgerError: no such task, or SQLite failed.
        """
        if state not in FINAL_TASK_STATES:
            raise ValueError(f"{state!r} is not a final task state")
        now, error = self._now(), _short(error)
        with self.transaction():
            cursor = self._run(
                "UPDATE tasks SET state = ?, payload = NULL, dedupe_key = NULL, updated_at = ?,"
                " last_error = COALESCE(?, last_error),"
                " vendor_request_id = COALESCE(?, vendor_request_id)"
                " WHERE id = ? AND state IN ('pending', 'in_flight')",
                (state, now, error, vendor_request_id, task_id),
            )
            task = self.task(task_id)
            if task is None:
                raise LedgerError(f"{self.path}: no task {task_id}")
            if cursor.rowcount != 1:
                return False
            self._scrubbed = True
            self.add_audit(
                task.subject_key, task.processor, task.action, task.reason, state,
                vendor_request_id=task.vendor_request_id, task_id=task_id,
                detail=_short(detail) if detail is not None else error,
                request_id=task.request_id,
            )  # fmt: skip
            return True

    def retry_later(
        self, task_id: int, next_attempt_at: datetime, error: str, *, refund_attempt: bool = False
    ) -> bool:
        """Put a claimed task back to pending until ``next_attempt_at``.

        Args:
            task_id: the task.
            next_attempt_at: when it is due again.
            error: short text without personal data, for ``last_error``.
            refund_attempt: the try did not count (a vendor's daily quota was
                spent): give back the attempt the claim took.

        Returns:
            False if the task was already final.

        Raises:
            LedgerError: SQLite failed.
        """
        refund = 1 if refund_attempt else 0
        cursor = self._run(
            "UPDATE tasks SET state = 'pending', next_attempt_at = ?, last_error = ?,"
            " attempts = MAX(attempts - ?, 0), updated_at = ?"
            " WHERE id = ? AND state IN ('pending', 'in_flight')",
            (_to_text(next_attempt_at), _short(error), refund, self._now(), task_id),
        )
        return cursor.rowcount == 1

    def record_outcomes(self, outcomes: Sequence[TaskOutcome]) -> list[bool]:
        """Record the outcomes of one applied batch in one transaction.

        Each outcome is written exactly as its own call would write it: a final
        state as :meth:`finish` (payload scrubbed, dedupe key freed, audit entry),
        ``pending`` as :meth:`retry_later`; its ``suppress_key`` and ``subject``
        columns go with it. All or nothing: should the process die or SQLite fail
        before the commit, every task stays in flight, and the next writer lock
        holder releases it (:meth:`release_in_flight`).

        Returns:
            Per outcome, False when its task was already final (nothing written for it).

        Raises:
            ValueError: a state that is neither final nor ``pending``, a ``pending``
                outcome without ``next_attempt_at``, or a task named twice (nothing is
                written).
            LedgerError: no such task, or SQLite failed (nothing is written).
        """
        ids = [item.task_id for item in outcomes]
        if len(set(ids)) != len(ids):
            raise ValueError("a task has two outcomes in one batch")
        for item in outcomes:
            if item.state != "pending" and item.state not in FINAL_TASK_STATES:
                raise ValueError(f"{item.state!r} is neither final nor pending")
            if item.state == "pending" and item.next_attempt_at is None:
                raise ValueError(f"task {item.task_id}: pending without next_attempt_at")
        now = self._now()
        with self.transaction():
            found: dict[int, str] = {}
            unique = sorted(ids)
            for start in range(0, len(unique), KEYS_PER_QUERY):
                batch = unique[start : start + KEYS_PER_QUERY]
                marks = ", ".join("?" * len(batch))
                rows = self._run(f"SELECT id, state FROM tasks WHERE id IN ({marks})", batch)
                found.update((int(row[0]), str(row[1])) for row in rows)
            if missing := [i for i in ids if i not in found]:
                raise LedgerError(f"{self.path}: no task {missing[0]}")
            written = [found[i] in ("pending", "in_flight") for i in ids]
            for item in outcomes:
                if item.suppress_key is not None:
                    self.suppress(item.suppress_key, "forgotten")
            finals = [(item, _short(item.error)) for item, ok in zip(outcomes, written)
                      if ok and item.state != "pending"]
            self._run_many(
                "UPDATE tasks SET state = ?, payload = NULL, dedupe_key = NULL, updated_at = ?,"
                " last_error = COALESCE(?, last_error),"
                " vendor_request_id = COALESCE(?, vendor_request_id)"
                " WHERE id = ? AND state IN ('pending', 'in_flight')",
                [(item.state, now, error, item.vendor_request_id, item.task_id)
                 for item, error in finals],
            )  # fmt: skip
            # The audit entry of each, as finish writes it (add_audit's columns, in order).
            self._run_many(
                "INSERT INTO audit (at, subject_key, processor, action, reason, outcome,"
                " vendor_request_id, task_id, detail, request_id, actor)"
                " SELECT ?, subject_key, processor, action, reason, state,"
                " vendor_request_id, id, ?, request_id, NULL FROM tasks WHERE id = ?",
                [(now, _short(_short(item.detail) if item.detail is not None else error),
                  item.task_id) for item, error in finals],
            )  # fmt: skip
            if finals:
                self._scrubbed = True
            self._run_many(
                "UPDATE tasks SET state = 'pending', next_attempt_at = ?, last_error = ?,"
                " attempts = MAX(attempts - ?, 0), updated_at = ?"
                " WHERE id = ? AND state IN ('pending', 'in_flight')",
                [(_to_text(cast(datetime, item.next_attempt_at)), _short(item.error or ""),
                  1 if item.refund_attempt else 0, now, item.task_id)
                 for item, ok in zip(outcomes, written) if ok and item.state == "pending"],
            )  # fmt: skip
            for item in outcomes:
                if item.subject is not None:
                    subject_key, columns = item.subject
                    self.upsert_subject(subject_key, **columns)
        return written

    def release_in_flight(self) -> int:
        """Return every in-flight task to pending, due now.

        Call it only holding the writer lock (:func:`syncd.lock.writer_ledger`
        does, on taking it): the lock proves that no other process is working
        on a task, so whatever is in flight was left by one that died. Its call
        may have reached the processor, so only idempotent actions are safe to
        replay blindly; ``attempts`` already counts it.

        Returns:
            How many tasks were released.

        Raises:
            LedgerError: SQLite failed.
        """
        now = self._now()
        cursor = self._run(
            "UPDATE tasks SET state = 'pending', updated_at = ?,"
            " next_attempt_at = MIN(next_attempt_at, ?),"
            " last_error = 'released: in flight when syncd stopped'"
            " WHERE state = 'in_flight'",
            (now, now),
        )
        return cursor.rowcount

    def count_open(self, task_ids: Sequence[int]) -> int:
        """How many of these tasks (each counted once) are still pending or in flight.

        Raises:
            LedgerError: SQLite failed.
        """
        unique = sorted(set(task_ids))
        open_count = 0
        for start in range(0, len(unique), KEYS_PER_QUERY):
            batch = unique[start : start + KEYS_PER_QUERY]
            marks = ", ".join("?" * len(batch))
            sql = (f"SELECT COUNT(*) FROM tasks WHERE id IN ({marks})"
                   " AND state IN ('pending', 'in_flight')")
            open_count += int(self._run(sql, batch).fetchone()[0])
        return open_count

    def task(self, task_id: int) -> Task | None:
        """The task with this id, or None.

        Raises:
            LedgerError: SQLite failed.
        """
        return self._row(Task, "tasks", "id", task_id)

    def tasks_for_request(self, request_id: int) -> list[Task]:
        """Every task serving a request, oldest first.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = f"SELECT {_columns(Task)} FROM tasks WHERE request_id = ? ORDER BY id"
        return [_from_row(Task, row) for row in self._run(sql, (request_id,))]

    def oldest_pending_task_at(self) -> datetime | None:
        """When the oldest pending task was created, or None when none is pending.

        Raises:
            LedgerError: SQLite failed.
        """
        row = self._run("SELECT MIN(created_at) FROM tasks WHERE state = 'pending'").fetchone()
        return _from_text(row[0]) if row and row[0] else None

    def count_tasks_by_state(self, processor: str | None = None) -> dict[str, int]:
        """Number of tasks in every state (zeros included), optionally for one processor.

        Raises:
            LedgerError: SQLite failed.
        """
        sql, params = "SELECT state, COUNT(*) FROM tasks", list[str]()
        if processor is not None:
            sql, params = sql + " WHERE processor = ?", [processor]
        counts = dict.fromkeys(TASK_STATES, 0)
        counts.update({row[0]: row[1] for row in self._run(sql + " GROUP BY state", params)})
        return counts

    # -- task summaries for status -----------------------------------------

    def oldest_failing_task(self) -> Task | None:
        """The oldest task that failed for good, or is retrying after an error.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = (f"SELECT {_columns(Task)} FROM tasks WHERE state = 'failed'"
               " OR (state IN ('pending', 'in_flight') AND last_error IS NOT NULL)"
               " ORDER BY created_at, id LIMIT 1")
        row = self._run(sql).fetchone()
        return None if row is None else _from_row(Task, row)

    def tasks_in_state(self, state: str, limit: int = 20) -> list[Task]:
        """Up to ``limit`` tasks in ``state``, oldest first (e.g. the manual steps).

        Raises:
            ValueError: ``state`` is not a task state.
            LedgerError: SQLite failed.
        """
        if state not in TASK_STATES:
            raise ValueError(f"unknown task state {state!r}")
        sql = (f"SELECT {_columns(Task)} FROM tasks WHERE state = ?"
               " ORDER BY created_at, id LIMIT ?")
        return [_from_row(Task, row) for row in self._run(sql, (state, limit))]
