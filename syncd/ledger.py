"""The ledger: syncd's durable memory, and the only module with SQL.

An embedded SQLite file (WAL) holds subjects, identifier keys, the suppression
list, tasks, data-subject requests, the audit trail, change-feed cursors and
alerts. Tasks follow "insert before the call, outcome after": a worker claims a
task with a compare-and-set update, calls the processor, then records the
outcome with :meth:`Ledger.finish` or :meth:`Ledger.retry_later`, so a restart
loses nothing.

Threads: one :class:`Ledger` is one ``sqlite3`` connection and belongs to the
thread that opened it. Each thread opens its own ``Ledger`` on the same file;
SQLite's locking (``BEGIN IMMEDIATE`` plus a busy timeout) serialises writers.

Times are stored as fixed-width UTC text (``2026-11-24T19:40:05.123456Z``) so
that comparing strings orders them. The schema uses plain types so that a
PostgreSQL backend stays possible.

Personal data: a pending task may carry identifiers in ``payload``, and an
inbox event the address it names; reaching a final state scrubs them, and
``secure_delete`` zeroes the old bytes in the file. ``secure_delete`` does not
reach the WAL, whose older frames still hold the page as it was before the
scrub, so the connection that scrubbed calls :meth:`Ledger.flush_scrubbed`
(the task runner after each batch, the daemon at every loop turn, and
:meth:`Ledger.close`) to checkpoint and truncate the WAL.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, TypeVar

from syncd.errors import LedgerError

BUSY_TIMEOUT_MS = 5000
# How long a checkpoint that empties the WAL waits for readers on an old
# snapshot before giving up until the next try (the daemon's loop must not stall).
CHECKPOINT_BUSY_TIMEOUT_MS = 50
# After a complete checkpoint, the next commit cuts the WAL down to what it
# wrote: frames from before the checkpoint (old page versions, possibly with
# scrubbed payloads) do not linger at the end of a reused file.
WAL_SIZE_LIMIT_BYTES = 0
WAL_SWITCH_RETRY_SECONDS = 0.01
LEDGER_FILE_MODE = 0o600
ERROR_TEXT_LIMIT_CHARS = 500
KEYS_PER_QUERY = 500  # stays far below SQLite's host-parameter limit

OPEN_TASK_STATES = ("pending", "in_flight")
FINAL_TASK_STATES = ("done", "failed", "needs_person", "cancelled")
TASK_STATES = OPEN_TASK_STATES + FINAL_TASK_STATES
IDENTIFIER_KINDS = ("email", "phone", "client_id")
REQUEST_KINDS = ("erase", "restrict", "unrestrict", "export")
REQUEST_FINAL_STATES = ("done", "failed", "cancelled")
COMMAND_KINDS = ("resync",)
COMMAND_FINAL_STATES = ("done", "failed")

Clock = Callable[[], datetime]

# Migrations are history: never edit one that has shipped, append a new one.
# Each runs in one transaction together with its user_version bump.
_V1_INITIAL = """
CREATE TABLE subjects (
    subject_key TEXT PRIMARY KEY,
    consent     INTEGER CHECK (consent IN (0, 1)),
    consent_at  TEXT,
    restricted  INTEGER NOT NULL DEFAULT 0 CHECK (restricted IN (0, 1)),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE identifiers (
    identifier_key TEXT PRIMARY KEY,
    kind           TEXT NOT NULL CHECK (kind IN ('email', 'phone', 'client_id')),
    subject_key    TEXT NOT NULL REFERENCES subjects (subject_key) ON DELETE CASCADE,
    created_at     TEXT NOT NULL
);
CREATE INDEX identifiers_by_subject ON identifiers (subject_key);

CREATE TABLE subject_state (
    subject_key TEXT NOT NULL REFERENCES subjects (subject_key) ON DELETE CASCADE,
    processor   TEXT NOT NULL,
    digest      TEXT NOT NULL,
    observed_at TEXT NOT NULL,
    PRIMARY KEY (subject_key, processor)
);

CREATE TABLE requests (
    id          INTEGER PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('erase', 'restrict', 'unrestrict', 'export')),
    subject_key TEXT NOT NULL,
    source      TEXT NOT NULL,
    received_at TEXT NOT NULL,
    due_at      TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'open'
                CHECK (state IN ('open', 'done', 'failed', 'cancelled')),
    closed_at   TEXT,
    note        TEXT
);
CREATE INDEX requests_by_state_due ON requests (state, due_at);

CREATE TABLE suppression (
    identifier_key TEXT PRIMARY KEY,
    reason         TEXT NOT NULL,
    request_id     INTEGER REFERENCES requests (id),
    created_at     TEXT NOT NULL
);

-- The last CHECK makes "no payload once final" a property of the file, not
-- only of the code that writes it.
CREATE TABLE tasks (
    id                INTEGER PRIMARY KEY,
    subject_key       TEXT NOT NULL,
    processor         TEXT NOT NULL,
    action            TEXT NOT NULL,
    reason            TEXT NOT NULL,
    payload           TEXT,
    state             TEXT NOT NULL DEFAULT 'pending' CHECK (state IN
                      ('pending', 'in_flight', 'done', 'failed', 'needs_person', 'cancelled')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    last_error        TEXT,
    vendor_request_id TEXT,
    request_id        INTEGER REFERENCES requests (id),
    dedupe_key        TEXT UNIQUE,
    CHECK (state IN ('pending', 'in_flight') OR (payload IS NULL AND dedupe_key IS NULL))
);
CREATE INDEX tasks_by_state_due ON tasks (state, next_attempt_at);
CREATE INDEX tasks_by_subject ON tasks (subject_key);
CREATE INDEX tasks_by_request ON tasks (request_id);

-- Append-only evidence (R11). No foreign keys: evidence must outlive the
-- subjects and tasks it mentions.
CREATE TABLE audit (
    id                INTEGER PRIMARY KEY,
    at                TEXT NOT NULL,
    subject_key       TEXT,
    processor         TEXT,
    action            TEXT NOT NULL,
    reason            TEXT,
    outcome           TEXT NOT NULL,
    vendor_request_id TEXT,
    task_id           INTEGER,
    detail            TEXT
);
CREATE INDEX audit_by_subject ON audit (subject_key, at);
CREATE INDEX audit_by_time ON audit (at);

CREATE TABLE cursors (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE alerts (
    id               INTEGER PRIMARY KEY,
    problem_key      TEXT NOT NULL,
    kind             TEXT NOT NULL,
    summary          TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'resolved')),
    created_at       TEXT NOT NULL,
    last_notified_at TEXT,
    notify_count     INTEGER NOT NULL DEFAULT 0,
    resolved_at      TEXT
);
CREATE UNIQUE INDEX alerts_one_open_per_problem ON alerts (problem_key) WHERE state = 'open';
"""

# Events pushed to syncd (Mailchimp webhooks), recorded before they are
# answered and processed later. ``payload`` carries the identifiers the event
# names until it is processed, then it is scrubbed; ``dedupe_key`` makes a
# replayed delivery a no-op.
_V2_INBOX = """
CREATE TABLE inbox (
    id           INTEGER PRIMARY KEY,
    source       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    occurred_at  TEXT NOT NULL,
    received_at  TEXT NOT NULL,
    payload      TEXT,
    dedupe_key   TEXT NOT NULL UNIQUE,
    processed_at TEXT,
    outcome      TEXT,
    CHECK (processed_at IS NULL OR payload IS NULL)
);
CREATE INDEX inbox_pending ON inbox (processed_at, id);
"""

# What a full resync learns about a subject's opt-outs and opt-ins (R2), stamped
# with the processor's own times, and whether Mailchimp refused a re-subscribe.
_V3_SUBJECT_OPT_TIMES = """
ALTER TABLE subjects ADD COLUMN opted_out_at TEXT;
ALTER TABLE subjects ADD COLUMN opted_in_at TEXT;
ALTER TABLE subjects ADD COLUMN resubscribe_refused INTEGER NOT NULL DEFAULT 0
    CHECK (resubscribe_refused IN (0, 1));
"""

# synced_email_key: the keyed hash of the address the subject's Mailchimp member was
# last seen or put under, so an email change in Phorest moves that member (R6).
# client_seen: which version of the Phorest record syncd last reconciled (version,
# updatedAt and state; no personal data), so a poll skips changes already handled.
_V4_SUBJECT_SYNC_STATE = """
ALTER TABLE subjects ADD COLUMN synced_email_key TEXT;
ALTER TABLE subjects ADD COLUMN client_seen TEXT;
"""

# processor_health: what the daemon last learned about each processor, kept so
# that ``syncd status`` (another process) and a restarted daemon can see it.
# commands: work an operator asked the running daemon to do (``syncd resync``
# while the daemon holds the writer lock), with its progress and outcome.
# alerts.recovery_notified_at: when the manager was told a problem cleared.
_V5_DAEMON_STATE = """
CREATE TABLE processor_health (
    processor      TEXT PRIMARY KEY,
    last_ok_at     TEXT,
    last_error     TEXT,
    last_error_at  TEXT,
    credentials_ok INTEGER CHECK (credentials_ok IN (0, 1)),
    down_since     TEXT,
    updated_at     TEXT NOT NULL
);

CREATE TABLE commands (
    id           INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL CHECK (kind IN ('resync')),
    options      TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'running', 'done', 'failed')),
    requested_at TEXT NOT NULL,
    started_at   TEXT,
    finished_at  TEXT,
    progress     TEXT,
    result       TEXT,
    error        TEXT
);
CREATE INDEX commands_by_state ON commands (state, id);

ALTER TABLE alerts ADD COLUMN recovery_notified_at TEXT;
"""

# unsubscribed_by_syncd: syncd itself set the subject's member unsubscribed, so
# that status is not a new opt-out by the person and withdraws nobody's consent
# (at a shared address, one client without consent unsubscribes the member).
_V6_OWN_UNSUBSCRIBE = """
ALTER TABLE subjects ADD COLUMN unsubscribed_by_syncd INTEGER NOT NULL DEFAULT 0
    CHECK (unsubscribed_by_syncd IN (0, 1));
"""

MIGRATIONS: tuple[str, ...] = (
    _V1_INITIAL, _V2_INBOX, _V3_SUBJECT_OPT_TIMES, _V4_SUBJECT_SYNC_STATE, _V5_DAEMON_STATE,
    _V6_OWN_UNSUBSCRIBE,
)
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True, slots=True)
class Subject:
    """One person known to syncd (``consent`` is None while unknown)."""

    subject_key: str
    consent: bool | None
    consent_at: datetime | None
    restricted: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class SubjectFacts:
    """What the ledger knows about a subject's marketing state (see :meth:`Ledger.subject_facts`)."""

    subject_key: str
    consent: bool | None
    restricted: bool
    opted_out_at: datetime | None
    opted_in_at: datetime | None
    resubscribe_refused: bool
    synced_email_key: str | None = None
    client_seen: str | None = None
    unsubscribed_by_syncd: bool = False


@dataclass(frozen=True, slots=True)
class Task:
    """One action on one processor for one subject."""

    id: int
    subject_key: str
    processor: str
    action: str
    reason: str
    payload: dict[str, Any] | None
    state: str
    attempts: int
    next_attempt_at: datetime
    created_at: datetime
    updated_at: datetime
    last_error: str | None
    vendor_request_id: str | None
    request_id: int | None
    dedupe_key: str | None


@dataclass(frozen=True, slots=True)
class Request:
    """A data-subject request (erase, restrict, unrestrict, export)."""

    id: int
    kind: str
    subject_key: str
    source: str
    received_at: datetime
    due_at: datetime
    state: str
    closed_at: datetime | None
    note: str | None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One entry of the append-only evidence trail."""

    id: int
    at: datetime
    subject_key: str | None
    processor: str | None
    action: str
    reason: str | None
    outcome: str
    vendor_request_id: str | None
    task_id: int | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class Alert:
    """A problem the manager has been, or will be, told about."""

    id: int
    problem_key: str
    kind: str
    summary: str
    state: str
    created_at: datetime
    last_notified_at: datetime | None
    notify_count: int
    resolved_at: datetime | None
    recovery_notified_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ProcessorHealth:
    """What the daemon last learned about one processor (no personal data).

    Attributes:
        processor: the connector's name.
        last_ok_at: the last successful contact.
        last_error: the last problem, one line.
        last_error_at: when it was seen.
        credentials_ok: False when the processor refused the credentials,
            True once they worked, None before any contact.
        down_since: when the current run of failed contacts began (None while up).
        updated_at: when this row was last written.
    """

    processor: str
    last_ok_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    credentials_ok: bool | None
    down_since: datetime | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Command:
    """Work an operator asked the running daemon to do.

    Attributes:
        options: the command's arguments (e.g. ``{"processor": "mailchimp"}``).
        progress: the latest ``{"stage", "done", "total"}`` while it runs.
        result: the outcome summary once done.
        error: one line when it failed.
    """

    id: int
    kind: str
    options: dict[str, Any]
    state: str
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None


@dataclass(frozen=True, slots=True)
class InboxEvent:
    """One pushed event waiting to be (or already) processed."""

    id: int
    source: str
    kind: str
    occurred_at: datetime
    received_at: datetime
    payload: dict[str, Any] | None
    dedupe_key: str
    processed_at: datetime | None
    outcome: str | None


_Row = TypeVar("_Row", Subject, SubjectFacts, Task, Request, AuditEvent, Alert, InboxEvent,
               ProcessorHealth, Command)
_KEEP: Any = object()  # "leave this column as it is" in upsert_subject


def _to_text(moment: datetime) -> str:
    """Fixed-width UTC text; raises ValueError for a naive datetime."""
    if moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment!r}: the ledger needs aware times")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _from_text(text: str) -> datetime:
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)


def _columns(cls: type[_Row]) -> str:
    return ", ".join(field.name for field in fields(cls))


def _from_row(cls: type[_Row], row: sqlite3.Row) -> _Row:
    values: dict[str, Any] = {}
    for field in fields(cls):
        value = row[field.name]
        if value is not None:
            if field.name in ("at", "down_since") or field.name.endswith("_at"):
                value = _from_text(value)
            elif field.name in ("consent", "restricted", "resubscribe_refused", "credentials_ok",
                                "unsubscribed_by_syncd"):
                value = bool(value)
            elif field.name in ("payload", "options", "progress", "result"):
                value = json.loads(value)
        values[field.name] = value
    return cls(**values)


def _short(text: str | None) -> str | None:
    return None if text is None else text[:ERROR_TEXT_LIMIT_CHARS]


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into single statements (execute() takes one)."""
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        # complete_statement knows about strings, comments and trigger bodies.
        if sqlite3.complete_statement(buffer):
            if buffer.strip().strip(";").strip():
                yield buffer
            buffer = ""


def _create_private(path: str) -> None:
    """Create the file 0600 whatever the umask; leave an existing file's mode alone."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, LEDGER_FILE_MODE)
    except FileExistsError:
        return
    except FileNotFoundError as exc:
        folder = os.path.dirname(os.path.abspath(path))
        raise LedgerError(f"{path}: cannot create the ledger: no directory {folder}") from exc
    except OSError as exc:
        raise LedgerError(f"{path}: cannot create the ledger: {exc.strerror}") from exc
    try:
        os.fchmod(fd, LEDGER_FILE_MODE)
    finally:
        os.close(fd)


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _enable_wal(conn: sqlite3.Connection) -> None:
    # Switching a new file to WAL needs an exclusive lock, and SQLite answers
    # "database is locked" at once (without the busy handler) when another
    # connection is opening the same file; wait and retry like the handler would.
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(WAL_SWITCH_RETRY_SECONDS)


def _migrate(conn: sqlite3.Connection, path: str) -> None:
    known = len(MIGRATIONS)  # read at call time so tests can extend MIGRATIONS
    while (version := _user_version(conn)) != known:
        if version > known:
            raise LedgerError(
                f"{path}: ledger schema version {version} is newer than this syncd "
                f"understands ({known}); upgrade syncd"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another thread or process opening
            # the same file may have migrated it while we waited.
            version = _user_version(conn)
            if version < known:
                for statement in _statements(MIGRATIONS[version]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1:d}")
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise LedgerError(
                f"{path}: migrating the ledger to schema version {version + 1} failed: {exc}"
            ) from exc


class Ledger:
    """One connection to the ledger file. Use :meth:`open`, ideally as a context manager."""

    def __init__(self, conn: sqlite3.Connection, path: str, clock: Clock) -> None:
        """Wrap an open, migrated connection; call :meth:`open` instead."""
        self.path = path
        self._conn = conn
        self._clock = clock
        self._depth = 0
        # Personal data was scrubbed since the WAL was last emptied (see flush_scrubbed).
        self._scrubbed = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, clock: Clock | None = None) -> Ledger:
        """Open (creating and migrating as needed) the ledger at ``path``.

        Args:
            path: the SQLite file; its directory must exist.
            clock: returns the current aware UTC time; defaults to the system clock.

        Raises:
            LedgerError: the directory is missing, the file is not a database,
                its schema is newer than this syncd, or a migration failed.
        """
        path = os.fspath(path)
        _create_private(path)
        conn: sqlite3.Connection | None = None
        try:
            # timeout sets SQLite's busy timeout: wait for another writer, do not fail.
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            conn.row_factory = sqlite3.Row
            _enable_wal(conn)
            # NORMAL in WAL mode survives a process crash; only a power cut may
            # lose the last commits, which replay as retries of idempotent calls.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # Zero freed bytes so scrubbed payloads do not linger in the file.
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES:d}")
            _migrate(conn, path)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise LedgerError(f"{path}: cannot open the ledger: {exc}") from exc
            raise
        return cls(conn, path, clock or (lambda: datetime.now(UTC)))

    def close(self) -> None:
        """Close the connection; uncommitted work is rolled back.

        What this connection scrubbed is flushed from the WAL first (when no
        reader prevents it), since other connections may keep the WAL alive.
        """
        try:
            self.flush_scrubbed()
        except (LedgerError, sqlite3.ProgrammingError):
            pass  # closing must not fail; the next writer's flush catches up
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------

    def _run(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, params)
        except sqlite3.ProgrammingError:
            raise  # misuse (wrong thread, closed ledger): a bug, not a ledger problem
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: {exc}") from exc

    def _row(self, cls: type[_Row], table: str, key_column: str, key: Any) -> _Row | None:
        # Table and column names are literals from this module, never input.
        sql = f"SELECT {_columns(cls)} FROM {table} WHERE {key_column} = ?"
        row = self._run(sql, (key,)).fetchone()
        return None if row is None else _from_row(cls, row)

    def _now(self) -> str:
        return _to_text(self._clock())

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Make every ledger call inside the block one atomic write.

        Nested use becomes a savepoint, so an inner failure that the caller
        catches undoes only the inner block.

        Raises:
            LedgerError: the transaction could not start or commit.
        """
        depth = self._depth
        savepoint = f"nested_{depth}"
        self._run("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {savepoint}")
        self._depth = depth + 1
        try:
            yield
            self._run("COMMIT" if depth == 0 else f"RELEASE {savepoint}")
        except BaseException:
            if self._conn.in_transaction:
                try:
                    if depth == 0:
                        self._conn.execute("ROLLBACK")
                    else:
                        self._conn.execute(f"ROLLBACK TO {savepoint}")
                        self._conn.execute(f"RELEASE {savepoint}")
                except sqlite3.Error:
                    pass  # never mask the error that made us roll back
            raise
        finally:
            self._depth = depth

    def checkpoint(self) -> bool:
        """Copy the WAL into the file and truncate it (drops old page versions).

        Returns:
            True when complete; False when readers kept part of the WAL alive.

        Raises:
            LedgerError: SQLite refused.
        """
        return self._run("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0

    def flush_scrubbed(self, *, always: bool = False) -> bool:
        """Empty the WAL if personal data was scrubbed since it was last emptied.

        ``secure_delete`` zeroes scrubbed bytes in the database file, but the
        WAL keeps every page version written since the last checkpoint, the
        ones from before the scrub included. A ``TRUNCATE`` checkpoint copies
        the WAL into the file and cuts the WAL to zero bytes. It cannot finish
        while another connection reads an older snapshot; it then waits at most
        :data:`CHECKPOINT_BUSY_TIMEOUT_MS` and gives up, and the next call (the
        daemon's next loop turn) tries again. Inside a transaction nothing is
        done: the scrub is not committed yet.

        Args:
            always: checkpoint even if this connection scrubbed nothing (e.g. a
                process that died may have left scrubbed pages in the WAL).

        Returns:
            True when no scrubbed data waits in the WAL any more (or none did).

        Raises:
            LedgerError: SQLite failed.
        """
        if always:
            self._scrubbed = True
        if not self._scrubbed:
            return True
        if self._conn.in_transaction:
            return False
        self._run(f"PRAGMA busy_timeout = {CHECKPOINT_BUSY_TIMEOUT_MS:d}")
        try:
            done = self.checkpoint()
        finally:
            self._run(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
        self._scrubbed = not done
        return done

    def integrity_problems(self) -> list[str]:
        """Run SQLite's integrity check. Returns problems; empty when the file is sound.

        Raises:
            LedgerError: SQLite could not run the check.
        """
        rows = [row[0] for row in self._run("PRAGMA integrity_check")]
        return [] if rows == ["ok"] else rows

    # -- tasks --------------------------------------------------------------

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
    ) -> bool:
        """Record a final outcome: scrub the payload, free the dedupe key, write audit.

        Args:
            task_id: the task.
            state: one of ``FINAL_TASK_STATES``.
            error: short text without personal data, for ``last_error`` and the audit.
            vendor_request_id: the processor's request id, for the evidence.

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
                vendor_request_id=task.vendor_request_id, task_id=task_id, detail=error,
            )  # fmt: skip
            return True

    def retry_later(self, task_id: int, next_attempt_at: datetime, error: str) -> bool:
        """Put a claimed task back to pending until ``next_attempt_at``.

        Returns:
            False if the task was already final.

        Raises:
            LedgerError: SQLite failed.
        """
        cursor = self._run(
            "UPDATE tasks SET state = 'pending', next_attempt_at = ?, last_error = ?,"
            " updated_at = ? WHERE id = ? AND state IN ('pending', 'in_flight')",
            (_to_text(next_attempt_at), _short(error), self._now(), task_id),
        )
        return cursor.rowcount == 1

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

    # -- audit --------------------------------------------------------------

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

    # -- subjects and identifiers -------------------------------------------

    def upsert_subject(
        self,
        subject_key: str,
        *,
        consent: bool | None = _KEEP,
        consent_at: datetime | None = _KEEP,
        restricted: bool = _KEEP,
        opted_out_at: datetime | None = _KEEP,
        opted_in_at: datetime | None = _KEEP,
        resubscribe_refused: bool = _KEEP,
        synced_email_key: str | None = _KEEP,
        client_seen: str | None = _KEEP,
        unsubscribed_by_syncd: bool = _KEEP,
    ) -> None:
        """Create the subject or update the columns passed (others keep their value).

        Raises:
            LedgerError: SQLite failed.
        """
        given = {
            "consent": consent, "consent_at": consent_at, "restricted": restricted,
            "opted_out_at": opted_out_at, "opted_in_at": opted_in_at,
            "resubscribe_refused": resubscribe_refused, "synced_email_key": synced_email_key,
            "client_seen": client_seen, "unsubscribed_by_syncd": unsubscribed_by_syncd,
        }  # fmt: skip
        given = {name: value for name, value in given.items() if value is not _KEEP}
        for name, value in given.items():
            if isinstance(value, datetime):
                given[name] = _to_text(value)
        row = {"restricted": False, "resubscribe_refused": False,
               "unsubscribed_by_syncd": False, **given}
        # Column names are literals from this method, never input.
        names = list(row)
        updates = "".join(f"{name} = excluded.{name}, " for name in given)
        now = self._now()
        self._run(
            f"INSERT INTO subjects (subject_key, {', '.join(names)}, created_at, updated_at)"
            f" VALUES ({', '.join('?' * (len(names) + 3))}) ON CONFLICT (subject_key) DO UPDATE"
            f" SET {updates}updated_at = excluded.updated_at",
            (subject_key, *row.values(), now, now),
        )

    def subject_facts(self, subject_keys: Sequence[str]) -> dict[str, SubjectFacts]:
        """The marketing facts of every known subject among ``subject_keys``.

        Raises:
            LedgerError: SQLite failed.
        """
        found: dict[str, SubjectFacts] = {}
        for start in range(0, len(subject_keys), KEYS_PER_QUERY):
            batch = list(subject_keys[start : start + KEYS_PER_QUERY])
            marks = ", ".join("?" * len(batch))
            sql = f"SELECT {_columns(SubjectFacts)} FROM subjects WHERE subject_key IN ({marks})"
            for row in self._run(sql, batch):
                facts = _from_row(SubjectFacts, row)
                found[facts.subject_key] = facts
        return found

    def suppressed_among(self, identifier_keys: Sequence[str]) -> set[str]:
        """Which of ``identifier_keys`` are on the suppression list.

        Raises:
            LedgerError: SQLite failed.
        """
        found: set[str] = set()
        for start in range(0, len(identifier_keys), KEYS_PER_QUERY):
            batch = list(identifier_keys[start : start + KEYS_PER_QUERY])
            marks = ", ".join("?" * len(batch))
            sql = f"SELECT identifier_key FROM suppression WHERE identifier_key IN ({marks})"
            found.update(str(row[0]) for row in self._run(sql, batch))
        return found

    def subject(self, subject_key: str) -> Subject | None:
        """The subject with this key, or None.

        Raises:
            LedgerError: SQLite failed.
        """
        return self._row(Subject, "subjects", "subject_key", subject_key)

    def link_identifier(self, identifier_key: str, kind: str, subject_key: str) -> str | None:
        """Point an identifier key at a subject, creating the subject if needed.

        Returns:
            The subject the identifier pointed at before, if it was another one
            (e.g. after a merge in Phorest), else None.

        Raises:
            ValueError: ``kind`` is not one of ``IDENTIFIER_KINDS``.
            LedgerError: SQLite failed.
        """
        if kind not in IDENTIFIER_KINDS:
            raise ValueError(f"unknown identifier kind {kind!r}")
        now = self._now()
        with self.transaction():
            previous = self.subject_for(identifier_key)
            self._run(
                "INSERT INTO subjects (subject_key, restricted, created_at, updated_at)"
                " VALUES (?, 0, ?, ?) ON CONFLICT (subject_key) DO NOTHING",
                (subject_key, now, now),
            )
            self._run(
                "INSERT INTO identifiers (identifier_key, kind, subject_key, created_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (identifier_key) DO UPDATE SET"
                " kind = excluded.kind, subject_key = excluded.subject_key",
                (identifier_key, kind, subject_key, now),
            )
        return previous if previous != subject_key else None

    def subject_for(self, identifier_key: str) -> str | None:
        """The subject key an identifier key belongs to, or None.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = "SELECT subject_key FROM identifiers WHERE identifier_key = ?"
        row = self._run(sql, (identifier_key,)).fetchone()
        return None if row is None else str(row[0])

    def identifier_keys(self, subject_key: str, kind: str) -> list[str]:
        """The identifier keys of one kind linked to a subject, oldest first.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = ("SELECT identifier_key FROM identifiers WHERE subject_key = ? AND kind = ?"
               " ORDER BY created_at, identifier_key")
        return [str(row[0]) for row in self._run(sql, (subject_key, kind))]

    def subjects_for(self, identifier_keys: Sequence[str]) -> dict[str, str]:
        """Identifier key -> subject key, for those of ``identifier_keys`` that are linked.

        Raises:
            LedgerError: SQLite failed.
        """
        found: dict[str, str] = {}
        for start in range(0, len(identifier_keys), KEYS_PER_QUERY):
            batch = list(identifier_keys[start : start + KEYS_PER_QUERY])
            marks = ", ".join("?" * len(batch))
            sql = ("SELECT identifier_key, subject_key FROM identifiers"
                   f" WHERE identifier_key IN ({marks})")
            found.update((str(row[0]), str(row[1])) for row in self._run(sql, batch))
        return found

    def set_digest(self, subject_key: str, processor: str, digest: str) -> None:
        """Remember the digest of what ``processor`` last held for the subject.

        Raises:
            LedgerError: the subject does not exist, or SQLite failed.
        """
        self._run(
            "INSERT INTO subject_state (subject_key, processor, digest, observed_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (subject_key, processor) DO UPDATE SET"
            " digest = excluded.digest, observed_at = excluded.observed_at",
            (subject_key, processor, digest, self._now()),
        )

    def digest(self, subject_key: str, processor: str) -> str | None:
        """The digest stored by :meth:`set_digest`, or None.

        Raises:
            LedgerError: SQLite failed.
        """
        sql = "SELECT digest FROM subject_state WHERE subject_key = ? AND processor = ?"
        row = self._run(sql, (subject_key, processor)).fetchone()
        return None if row is None else str(row[0])

    # -- suppression --------------------------------------------------------

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

    def suppress(self, identifier_key: str, reason: str, request_id: int | None = None) -> bool:
        """Put an identifier key on the suppression list (never removed).

        Returns:
            True if newly suppressed; False if it already was (first reason kept).

        Raises:
            LedgerError: SQLite failed.
        """
        cursor = self._run(
            "INSERT INTO suppression (identifier_key, reason, request_id, created_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (identifier_key) DO NOTHING",
            (identifier_key, reason, request_id, self._now()),
        )
        return cursor.rowcount == 1

    def is_suppressed(self, *identifier_keys: str) -> bool:
        """Whether any of these identifier keys is suppressed.

        Raises:
            LedgerError: SQLite failed.
        """
        for start in range(0, len(identifier_keys), KEYS_PER_QUERY):
            batch = identifier_keys[start : start + KEYS_PER_QUERY]
            marks = ", ".join("?" * len(batch))
            sql = f"SELECT 1 FROM suppression WHERE identifier_key IN ({marks}) LIMIT 1"
            if self._run(sql, batch).fetchone():
                return True
        return False

    # -- cursors ------------------------------------------------------------

    def get_cursor(self, name: str) -> str | None:
        """The stored high-water mark called ``name``, or None.

        Raises:
            LedgerError: SQLite failed.
        """
        row = self._run("SELECT value FROM cursors WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_cursor(self, name: str, value: str) -> None:
        """Store a high-water mark.

        Raises:
            LedgerError: SQLite failed.
        """
        self._run(
            "INSERT INTO cursors (name, value, updated_at) VALUES (?, ?, ?) ON CONFLICT (name)"
            " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (name, value, self._now()),
        )

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

    # -- requests -----------------------------------------------------------

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
