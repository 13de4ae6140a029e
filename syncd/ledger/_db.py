"""The ledger's connection: opening and migrating the file, transactions, the WAL.

:class:`LedgerBase` holds one ``sqlite3`` connection and the plumbing every
area of the ledger uses (:meth:`LedgerBase._run`, :meth:`LedgerBase.transaction`);
the helpers below turn rows into the records of :mod:`syncd.ledger._records`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, Self, TypeVar

from syncd.errors import LedgerError
from syncd.ledger._records import (
    Alert,
    AuditEvent,
    Command,
    InboxEvent,
    ProcessorHealth,
    Request,
    Subject,
    SubjectFacts,
    Task,
)
from syncd.ledger._schema import MIGRATIONS

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

Clock = Callable[[], datetime]

_Row = TypeVar("_Row", Subject, SubjectFacts, Task, Request, AuditEvent, Alert, InboxEvent,
               ProcessorHealth, Command)


def _to_text(moment: datetime) -> str:
    """Fixed-width UTC text; raises ValueError for a naive datetime."""
    if moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment!r}: the ledger needs aware times")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _from_text(text: str) -> datetime:
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)


def _columns(cls: type[_Row]) -> str:
    return ", ".join(field.name for field in fields(cls))


def _converter(name: str) -> Callable[[Any], Any] | None:
    """How a column's stored value becomes the record's (None: as stored)."""
    if name in ("at", "down_since", "locked_until") or name.endswith("_at"):
        return _from_text
    if name in ("consent", "restricted", "resubscribe_refused", "credentials_ok",
                "unsubscribed_by_syncd", "active"):
        return bool
    if name in ("payload", "options", "progress", "result"):
        return json.loads
    return None


# Each record class's fields and their converters, worked out once: pages and
# reports read thousands of rows, and deciding this per row was most of the cost.
_PLANS: dict[type, tuple[tuple[str, Callable[[Any], Any] | None], ...]] = {}


def _from_row(cls: type[_Row], row: sqlite3.Row) -> _Row:
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = tuple((f.name, _converter(f.name)) for f in fields(cls))
    values: dict[str, Any] = {}
    for name, convert in plan:
        value = row[name]
        if value is not None and convert is not None:
            value = convert(value)
        values[name] = value
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


class LedgerBase:
    """One connection to the ledger file; :class:`syncd.ledger.Ledger` adds the areas' methods."""

    def __init__(self, conn: sqlite3.Connection, path: str, clock: Clock) -> None:
        """Wrap an open, migrated connection; call :meth:`open` instead."""
        self.path = path
        self._conn = conn
        self._clock = clock
        self._depth = 0
        # Personal data was scrubbed since the WAL was last emptied (see flush_scrubbed).
        self._scrubbed = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, clock: Clock | None = None) -> Self:
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

    def another(self) -> Self:
        """A second connection to the same file with the same clock (for another thread).

        Raises:
            LedgerError: the file cannot be opened.
        """
        return self.open(self.path, clock=self._clock)

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------

    def _run(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._call(self._conn.execute, sql, params)

    def _run_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        """One statement for many rows (``executemany``)."""
        return self._call(self._conn.executemany, sql, rows)

    def _call(self, method: Callable[[str, Any], sqlite3.Cursor], sql: str,
              arguments: Any) -> sqlite3.Cursor:
        try:
            return method(sql, arguments)
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
