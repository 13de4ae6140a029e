"""Work handed to the daemon from outside: operator commands and pushed events.

A command (``syncd resync`` while the daemon holds the writer lock) is queued
here, claimed by the daemon and closed with its result. A pushed event (a
Mailchimp webhook) is recorded in the inbox before it is answered, processed
later, and its payload scrubbed once processed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from syncd.ledger._db import LedgerBase, _columns, _from_row, _short, _to_text
from syncd.ledger._records import COMMAND_FINAL_STATES, COMMAND_KINDS, Command, InboxEvent


class CommandsMixin(LedgerBase):
    """The command queue and the inbox of pushed events."""

    # -- commands -----------------------------------------------------------

    def add_command(self, kind: str, options: Mapping[str, Any]) -> int:
        """Queue work for the running daemon.

        Returns:
            The command's id.

        Raises:
            ValueError: ``kind`` is not one of ``COMMAND_KINDS``.
            LedgerError: SQLite failed.
        """
        if kind not in COMMAND_KINDS:
            raise ValueError(f"unknown command kind {kind!r}")
        cursor = self._run(
            "INSERT INTO commands (kind, options, state, requested_at) VALUES (?, ?, 'queued', ?)",
            (kind, json.dumps(dict(options), sort_keys=True), self._now()),
        )
        return int(cursor.lastrowid or 0)

    def command(self, command_id: int) -> Command | None:
        """The command with this id, or None.

        Raises:
            LedgerError: SQLite failed.
        """
        return self._row(Command, "commands", "id", command_id)

    def next_command(self) -> Command | None:
        """The oldest queued command, or None.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = f"SELECT {_columns(Command)} FROM commands WHERE state = 'queued' ORDER BY id LIMIT 1"
        row = self._run(sql).fetchone()
        return None if row is None else _from_row(Command, row)

    def active_commands(self) -> list[Command]:
        """Commands queued or running, oldest first.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = (f"SELECT {_columns(Command)} FROM commands WHERE state IN ('queued', 'running')"
               " ORDER BY id")
        return [_from_row(Command, row) for row in self._run(sql)]

    def start_command(self, command_id: int) -> bool:
        """Claim a queued command (compare-and-set). False if it was not queued.

        Raises:
            LedgerError: SQLite failed.
        """
        cursor = self._run(
            "UPDATE commands SET state = 'running', started_at = ? WHERE id = ? AND state = 'queued'",
            (self._now(), command_id),
        )
        return cursor.rowcount == 1

    def command_progress(self, command_id: int, progress: Mapping[str, Any]) -> None:
        """Record how far a running command has got.

        Raises:
            LedgerError: SQLite failed.
        """
        self._run("UPDATE commands SET progress = ? WHERE id = ? AND state = 'running'",
                  (json.dumps(dict(progress), sort_keys=True), command_id))

    def finish_command(self, command_id: int, state: str, *,
                       result: Mapping[str, Any] | None = None, error: str | None = None) -> bool:
        """Close a running command as done or failed.

        Returns:
            False if it was not running.

        Raises:
            ValueError: ``state`` is not one of ``COMMAND_FINAL_STATES``.
            LedgerError: SQLite failed.
        """
        if state not in COMMAND_FINAL_STATES:
            raise ValueError(f"{state!r} is not a final command state")
        cursor = self._run(
            "UPDATE commands SET state = ?, finished_at = ?, result = ?, error = ?"
            " WHERE id = ? AND state = 'running'",
            (state, self._now(), None if result is None else json.dumps(dict(result)),
             _short(error), command_id),
        )
        return cursor.rowcount == 1

    def fail_abandoned_commands(self, reason: str) -> int:
        """Fail every command left running by a process that is gone (call holding the lock).

        Returns:
            How many were failed.

        Raises:
            LedgerError: SQLite failed.
        """
        cursor = self._run(
            "UPDATE commands SET state = 'failed', finished_at = ?, error = ?"
            " WHERE state = 'running'",
            (self._now(), _short(reason)),
        )
        return cursor.rowcount

    # -- inbox (pushed events) -----------------------------------------------

    def add_inbox_event(
        self,
        source: str,
        kind: str,
        occurred_at: datetime,
        payload: Mapping[str, Any],
        dedupe_key: str,
    ) -> bool:
        """Record a pushed event before answering its sender.

        Returns:
            True if recorded; False if an event with this ``dedupe_key`` was
            already recorded (a replay), in which case nothing changes.

        Raises:
            LedgerError: SQLite failed.
        """
        cursor = self._run(
            "INSERT INTO inbox (source, kind, occurred_at, received_at, payload, dedupe_key)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (dedupe_key) DO NOTHING",
            (source, kind, _to_text(occurred_at), self._now(), json.dumps(dict(payload)), dedupe_key),
        )
        return cursor.rowcount == 1

    def pending_inbox(self, limit: int = 100) -> list[InboxEvent]:
        """Unprocessed events, oldest first by when they happened.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = (
            f"SELECT {_columns(InboxEvent)} FROM inbox WHERE processed_at IS NULL"
            " ORDER BY occurred_at, id LIMIT ?"
        )
        return [_from_row(InboxEvent, row) for row in self._run(sql, (limit,)).fetchall()]

    def finish_inbox_event(self, event_id: int, outcome: str) -> bool:
        """Mark an event processed and scrub its payload.

        Returns:
            False if it was already processed.

        Raises:
            LedgerError: SQLite failed.
        """
        cursor = self._run(
            "UPDATE inbox SET processed_at = ?, outcome = ?, payload = NULL"
            " WHERE id = ? AND processed_at IS NULL",
            (self._now(), _short(outcome), event_id),
        )
        if cursor.rowcount == 1:
            self._scrubbed = True
        return cursor.rowcount == 1
