"""Data-subject requests (erase, restrict, unrestrict, export), their steps and due dates.

A request has one step per processor: a ``task`` step follows a ledger task
syncd carries out (Mailchimp, GA), a ``manual`` step waits for a person
(Phorest's Forget, paper forms) and is closed by a confirmation or by syncd
seeing the result. The request is done when every step is.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from syncd.ledger._db import KEYS_PER_QUERY, LedgerBase, _columns, _from_row, _short, _to_text
from syncd.ledger._records import (
    MAX_EXTENSION_MONTHS,
    REQUEST_FINAL_STATES,
    REQUEST_KINDS,
    STEP_KINDS,
    STEP_STATES,
    Request,
    RequestStep,
)


class RequestsMixin(LedgerBase):
    """Recording, stepping, extending, closing and listing requests."""

    def add_request(
        self,
        kind: str,
        subject_key: str,
        source: str,
        due_at: datetime,
        note: str | None = None,
        *,
        filed_by: str | None = None,
        client_id: str | None = None,
        received_at: datetime | None = None,
    ) -> int:
        """Record a data-subject request received at ``received_at`` (default: now).

        Give the moment its ``due_at`` was counted from, so that the deadline is
        exactly the promised months after receipt.

        Returns:
            The request's id.

        Raises:
            ValueError: ``kind`` is not one of ``REQUEST_KINDS``.
            LedgerError: SQLite failed.
        """
        if kind not in REQUEST_KINDS:
            raise ValueError(f"unknown request kind {kind!r}")
        cursor = self._run(
            "INSERT INTO requests (kind, subject_key, source, received_at, due_at, state, note,"
            " filed_by, client_id) VALUES (?, ?, ?, ?, ?, 'open', ?, ?, ?)",
            (kind, subject_key, source,
             _to_text(received_at) if received_at is not None else self._now(),
             _to_text(due_at), _short(note),
             _short(filed_by), client_id),
        )  # fmt: skip
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
            (state, self._now(), _short(note), request_id),
        )
        return cursor.rowcount == 1

    def extend_request(self, request_id: int, months: int, due_at: datetime, reason: str) -> bool:
        """Record an extension: ``months`` added in all, the new due date and why.

        Returns:
            False if the request is not open.

        Raises:
            ValueError: ``months`` is not between 1 and ``MAX_EXTENSION_MONTHS``.
            LedgerError: SQLite failed.
        """
        if not 1 <= months <= MAX_EXTENSION_MONTHS:
            raise ValueError(f"an extension is 1 to {MAX_EXTENSION_MONTHS} months in all")
        cursor = self._run(
            "UPDATE requests SET extended_months = ?, due_at = ?, extension_reason = ?"
            " WHERE id = ? AND state = 'open'",
            (months, _to_text(due_at), _short(reason), request_id),
        )
        return cursor.rowcount == 1

    def request(self, request_id: int) -> Request | None:
        """The request with this id, or None.

        Raises:
            LedgerError: SQLite failed.
        """
        return self._row(Request, "requests", "id", request_id)

    def requests_by_id(self, request_ids: Iterable[int]) -> dict[int, Request]:
        """The requests with these ids, by id (ids that name no request are left out).

        Raises:
            LedgerError: SQLite failed.
        """
        wanted = list(dict.fromkeys(request_ids))
        found: dict[int, Request] = {}
        for first in range(0, len(wanted), KEYS_PER_QUERY):
            chunk = wanted[first:first + KEYS_PER_QUERY]
            sql = (f"SELECT {_columns(Request)} FROM requests"
                   f" WHERE id IN ({', '.join('?' * len(chunk))})")
            for row in self._run(sql, chunk):
                request = _from_row(Request, row)
                found[request.id] = request
        return found

    def open_requests(self, limit: int | None = None, offset: int = 0) -> list[Request]:
        """Every open request, soonest due first (or ``limit`` of them, skipping ``offset``).

        Raises:
            LedgerError: SQLite failed.
        """
        sql = f"SELECT {_columns(Request)} FROM requests WHERE state = 'open' ORDER BY due_at, id"
        params: tuple[int, ...] = ()
        if limit is not None:
            sql, params = sql + " LIMIT ? OFFSET ?", (limit, offset)
        return [_from_row(Request, row) for row in self._run(sql, params)]

    def count_open_requests(self) -> int:
        """How many requests are open.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = "SELECT COUNT(*) FROM requests WHERE state = 'open'"
        return int(self._run(sql).fetchone()[0])

    def all_requests(self, limit: int = 1000, offset: int = 0) -> list[Request]:
        """The most recent requests in any state, newest first (skipping ``offset``).

        Raises:
            LedgerError: SQLite failed.
        """
        sql = f"SELECT {_columns(Request)} FROM requests ORDER BY id DESC LIMIT ? OFFSET ?"
        return [_from_row(Request, row) for row in self._run(sql, (limit, offset))]

    def count_requests(self) -> int:
        """How many requests there are, in any state.

        Raises:
            LedgerError: SQLite failed.
        """
        return int(self._run("SELECT COUNT(*) FROM requests").fetchone()[0])

    # -- steps --------------------------------------------------------------

    def add_step(
        self,
        request_id: int,
        processor: str,
        kind: str,
        *,
        task_id: int | None = None,
        client_id: str | None = None,
        instructions: str | None = None,
    ) -> int:
        """Open a step of the request on ``processor``.

        Returns:
            The step's id.

        Raises:
            ValueError: ``kind`` is not one of ``STEP_KINDS``.
            LedgerError: SQLite failed.
        """
        if kind not in STEP_KINDS:
            raise ValueError(f"unknown step kind {kind!r}")
        cursor = self._run(
            "INSERT INTO request_steps (request_id, processor, kind, state, task_id, client_id,"
            " instructions, opened_at) VALUES (?, ?, ?, 'waiting', ?, ?, ?, ?)",
            (request_id, processor, kind, task_id, client_id, _short(instructions), self._now()),
        )
        return int(cursor.lastrowid or 0)

    def close_step(
        self,
        step_id: int,
        state: str,
        *,
        confirmed_by: str | None = None,
        evidence: str | None = None,
    ) -> bool:
        """Close a waiting step (``done``, ``failed`` or ``cancelled``), with its evidence.

        A failed step may close again as done (a person finished the work by hand).

        Returns:
            False if it was not waiting (or failed, for ``done``).

        Raises:
            ValueError: ``state`` is not a closing state.
            LedgerError: SQLite failed.
        """
        if state not in STEP_STATES or state == "waiting":
            raise ValueError(f"{state!r} does not close a step")
        from_states = "('waiting', 'failed')" if state in ("done", "cancelled") else "('waiting')"
        cursor = self._run(
            "UPDATE request_steps SET state = ?, closed_at = ?, confirmed_by = ?, evidence = ?"
            f" WHERE id = ? AND state IN {from_states}",
            (state, self._now(), _short(confirmed_by), _short(evidence), step_id),
        )
        return cursor.rowcount == 1

    def steps(self, request_id: int) -> list[RequestStep]:
        """The request's steps, in the order they were opened.

        Raises:
            LedgerError: SQLite failed.
        """
        # Naming every state (the column's CHECK allows no other) lets SQLite seek
        # request_steps_by_state (state, request_id) once per state; on request_id
        # alone it scans the whole table, once per request a page lists.
        states = ", ".join(f"'{s}'" for s in STEP_STATES)  # literals from _records
        sql = (f"SELECT {_columns(RequestStep)} FROM request_steps"
               f" WHERE state IN ({states}) AND request_id = ? ORDER BY id")
        return [_from_row(RequestStep, row) for row in self._run(sql, (request_id,))]

    def open_steps(self, kind: str | None = None) -> list[RequestStep]:
        """Every waiting or failed step of an open request, oldest first.

        Raises:
            LedgerError: SQLite failed.
        """
        where, params = "s.state IN ('waiting', 'failed')", list[object]()
        if kind is not None:
            where, params = where + " AND s.kind = ?", [kind]
        return self._steps_of_open_requests(where, params)

    def finished_task_steps(self) -> list[RequestStep]:
        """Waiting task steps of open requests whose task reached a final state.

        Raises:
            LedgerError: SQLite failed.
        """
        return self._steps_of_open_requests(
            "s.state = 'waiting' AND t.state NOT IN ('pending', 'in_flight')", [],
            join=" JOIN tasks t ON t.id = s.task_id")

    def waiting_manual_steps(self, processor: str, *, after_id: int = 0,
                             limit: int | None = None) -> list[RequestStep]:  # fmt: skip
        """Waiting manual steps of open requests on ``processor``, by id, after ``after_id``.

        Raises:
            LedgerError: SQLite failed.
        """
        return self._steps_of_open_requests(
            "s.state = 'waiting' AND s.kind = 'manual' AND s.processor = ? AND s.id > ?",
            [processor, after_id], limit=limit)

    def _steps_of_open_requests(self, where: str, params: list[object], *, join: str = "",
                                limit: int | None = None) -> list[RequestStep]:  # fmt: skip
        """Steps of open requests matching ``where`` (over ``s``, the steps), oldest first."""
        # ``where`` and ``join`` are literals from this class, never input.
        columns = ", ".join("s." + c for c in _columns(RequestStep).split(", "))
        sql = (f"SELECT {columns} FROM request_steps s JOIN requests r ON r.id = s.request_id"
               f"{join} WHERE r.state = 'open' AND {where} ORDER BY s.id")
        if limit is not None:
            sql, params = sql + " LIMIT ?", [*params, limit]
        return [_from_row(RequestStep, row) for row in self._run(sql, params)]
