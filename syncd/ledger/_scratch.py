"""A resync's scratch store: what both systems hold, on disk, for one run only.

A full read of 100,000 clients and members does not fit comfortably in
memory, and a million would not fit at all, so :mod:`syncd.engine` streams
both sides into a :class:`Scratch` keyed by each address's keyed hash and then
plans address by address in key order, a few hundred addresses at a time.

The store is SQLite's *anonymous temporary database* (``sqlite3.connect("")``):
it lives in the page cache (at most :data:`CACHE_KIB`) and spills to a file
in SQLite's temporary directory (``SQLITE_TMPDIR``, else ``TMPDIR``, else
``/var/tmp`` or ``/tmp``) only when it outgrows that. SQLite deletes that file
on Unix as soon as it has opened it, so it has no name on disk: nothing else
can open it, and even a SIGKILL leaves nothing behind; closing the connection
(or the process ending) frees the space. That is why it was chosen over a
named file in the state directory (which a kill would leave holding plain
addresses) or an in-memory database (which would grow with the audience).

Records are stored as the engine packs them (opaque bytes): plain addresses
and names, held only while the run needs them. Only the engine reads them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from syncd.errors import LedgerError
from syncd.ledger._db import KEYS_PER_QUERY

# The page cache of the store: the most memory it takes before it spills to its file.
CACHE_KIB = 16 * 1024

# Host parameters in one statement: SQLite's limit when built with its oldest default.
_PARAMETERS_PER_STATEMENT = 999

# One address: (email key, its client records, its member record or None).
Address = tuple[str, list[bytes], "bytes | None"]

_SCHEMA = (
    # Every Phorest record at an address, newest version per client id. A rowid
    # table and an index, not WITHOUT ROWID: records are kilobytes, and a table
    # ordered by random keys would move them around on every insert.
    "CREATE TABLE client (email_key TEXT NOT NULL, client_id TEXT NOT NULL,"
    " updated REAL NOT NULL, version INTEGER NOT NULL, live INTEGER NOT NULL,"
    " record BLOB NOT NULL)",
    "CREATE UNIQUE INDEX client_at ON client (email_key, client_id)",
    # The Mailchimp member at an address (the last one read).
    "CREATE TABLE member (email_key TEXT PRIMARY KEY, status TEXT NOT NULL,"
    " record BLOB NOT NULL) WITHOUT ROWID",
    # Deleted, merged and forgotten clients by client-id key (the last one read).
    "CREATE TABLE dead (client_key TEXT PRIMARY KEY, record BLOB NOT NULL) WITHOUT ROWID",
    # A member left at a client's previous address, claimed by the client's new one.
    "CREATE TABLE moved (old_key TEXT PRIMARY KEY, new_key TEXT NOT NULL UNIQUE) WITHOUT ROWID",
    # What the engine must learn from a task once it has run (opaque to the store).
    "CREATE TABLE followup (task_id INTEGER PRIMARY KEY, item BLOB NOT NULL)",
)


class Scratch:
    """One run's scratch store (see the module docstring). Use it as a context manager.

    Raises (every method):
        LedgerError: SQLite failed (e.g. the temporary directory is full).
    """

    def __init__(self) -> None:
        try:
            self._conn = sqlite3.connect("", isolation_level=None)
            for pragma in ("journal_mode = OFF", "synchronous = OFF",
                           f"cache_size = -{CACHE_KIB:d}"):
                self._conn.execute(f"PRAGMA {pragma}")
            for statement in _SCHEMA:
                self._conn.execute(statement)
        except sqlite3.Error as error:
            raise LedgerError(f"the resync's scratch store could not be made: {error}") from error

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the store (its file, if it spilled to one, goes with it)."""
        self._conn.close()

    # Writing, a chunk of records at a time.

    def add_clients(self, rows: Iterable[tuple[str, str, float, int, bool, bytes]]) -> None:
        """Store (email key, client id, updated, version, live, record) rows.

        A client id already held at the address is replaced only by a newer
        version (``updated``, a POSIX timestamp, then ``version``); a tie keeps
        the one stored first.
        """
        self._write(
            "INSERT INTO client VALUES {rows} ON CONFLICT (email_key, client_id)"
            " DO UPDATE SET updated = excluded.updated, version = excluded.version,"
            " live = excluded.live, record = excluded.record"
            " WHERE (excluded.updated, excluded.version) > (client.updated, client.version)",
            6, rows)

    def add_members(self, rows: Iterable[tuple[str, str, bytes]]) -> None:
        """Store (email key, status, record) rows; a later member at an address wins."""
        self._write("INSERT OR REPLACE INTO member VALUES {rows}", 3, rows)

    def add_dead(self, rows: Iterable[tuple[str, bytes]]) -> None:
        """Store (client-id key, record) rows of erased clients; a later one wins."""
        self._write("INSERT OR REPLACE INTO dead VALUES {rows}", 2, rows)

    def claim(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Record (old key, new key) moves; an old key already claimed stays with its first claimant."""
        self._write("INSERT OR IGNORE INTO moved VALUES {rows}", 2, pairs)

    def add_followups(self, rows: Iterable[tuple[int, bytes]]) -> None:
        """Store (task id, item) rows; a task id seen again keeps the later item."""
        self._write("INSERT OR REPLACE INTO followup VALUES {rows}", 2, rows)

    # Reading.

    def addresses(self, *, memberless: bool = False,
                  size: int = KEYS_PER_QUERY) -> Iterator[list[Address]]:
        """Every address in key order, ``size`` at a time.

        Args:
            memberless: only addresses with a client and no member (or an absent one).
            size: addresses per batch (at most :data:`KEYS_PER_QUERY`).
        """
        size = min(size, KEYS_PER_QUERY)
        if memberless:
            query = ("SELECT DISTINCT c.email_key FROM client AS c LEFT JOIN member AS m"
                     " ON m.email_key = c.email_key WHERE c.email_key > ?"
                     " AND (m.status IS NULL OR m.status = 'absent') ORDER BY 1 LIMIT ?")
        else:
            query = ("SELECT email_key FROM client WHERE email_key > ?1 UNION"
                     " SELECT email_key FROM member WHERE email_key > ?1 ORDER BY 1 LIMIT ?2")
        after = ""
        while True:
            keys = [row[0] for row in self._read(query, (after, size))]
            if not keys:
                return
            yield self.at(keys)
            after = keys[-1]

    def at(self, email_keys: Sequence[str]) -> list[Address]:
        """The addresses among ``email_keys`` that anything is held at, in key order."""
        clients: dict[str, list[bytes]] = {}
        members: dict[str, bytes] = {}
        for chunk in _chunks(email_keys):
            marks = _marks(chunk)
            for key, record in self._read(
                    f"SELECT email_key, record FROM client WHERE email_key IN ({marks})", chunk):
                clients.setdefault(key, []).append(record)
            members.update(self._read(
                f"SELECT email_key, record FROM member WHERE email_key IN ({marks})", chunk))
        return [(key, clients.get(key, []), members.get(key))
                for key in sorted(set(clients) | set(members))]

    def unclaimed_members(self, email_keys: Sequence[str]) -> set[str]:
        """Those of ``email_keys`` holding a member (not absent) and no client."""
        return self._keys_among(
            "SELECT m.email_key FROM member AS m WHERE m.email_key IN ({marks})"
            " AND m.status != 'absent' AND NOT EXISTS"
            " (SELECT 1 FROM client AS c WHERE c.email_key = m.email_key)", email_keys)

    def live_among(self, email_keys: Sequence[str]) -> set[str]:
        """Those of ``email_keys`` at which a live (not erased) client is held."""
        return self._keys_among(
            "SELECT DISTINCT email_key FROM client WHERE email_key IN ({marks}) AND live",
            email_keys)

    def dead(self, client_key: str) -> bytes | None:
        """The erased client with this client-id key, or None."""
        rows = self._read("SELECT record FROM dead WHERE client_key = ?", (client_key,))
        return rows[0][0] if rows else None

    def dead_batches(self, size: int = KEYS_PER_QUERY) -> Iterator[list[tuple[str, bytes]]]:
        """Every erased client as (client-id key, record), in key order, ``size`` at a time."""
        yield from self._pages("SELECT client_key, record FROM dead WHERE client_key > ?"
                               " ORDER BY client_key LIMIT ?", "", size)

    def moves(self, new_keys: Sequence[str]) -> dict[str, str]:
        """New key -> the old key it claimed, for those of ``new_keys`` that claimed one."""
        found: dict[str, str] = {}
        for chunk in _chunks(new_keys):
            found.update(self._read("SELECT new_key, old_key FROM moved WHERE new_key IN"
                                    f" ({_marks(chunk)})", chunk))
        return found

    def claimed(self, old_keys: Sequence[str]) -> set[str]:
        """Those of ``old_keys`` that a client's new address claimed."""
        return self._keys_among("SELECT old_key FROM moved WHERE old_key IN ({marks})", old_keys)

    def followups(self, size: int = KEYS_PER_QUERY) -> Iterator[list[tuple[int, bytes]]]:
        """Every (task id, item), in task order, ``size`` at a time."""
        yield from self._pages("SELECT task_id, item FROM followup WHERE task_id > ?"
                               " ORDER BY task_id LIMIT ?", -1, size)

    # Plumbing.

    def _pages(self, query: str, start: Any, size: int) -> Iterator[list[tuple[Any, bytes]]]:
        after = start
        while True:
            rows = self._read(query, (after, size))
            if not rows:
                return
            yield rows
            after = rows[-1][0]

    def _keys_among(self, template: str, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(keys):
            found.update(row[0] for row in self._read(template.format(marks=_marks(chunk)), chunk))
        return found

    def _read(self, query: str, params: Sequence[Any]) -> list[Any]:
        try:
            return self._conn.execute(query, params).fetchall()
        except sqlite3.Error as error:
            raise LedgerError(f"the resync's scratch store could not be read: {error}") from error

    def _write(self, template: str, width: int, rows: Iterable[Sequence[Any]]) -> None:
        """Run ``template`` with ``{rows}`` standing for many rows of ``width`` values each.

        Many rows to a statement, not ``executemany``: SQLite's module lets go
        of the GIL for every statement it steps, and while a page reader holds
        it (parsing a page is one long call) each row would wait for it back.
        A statement stays under SQLite's smallest host-parameter limit (999).
        Rows are written in order, exactly as one statement each would write them.
        """
        group = "(" + ", ".join("?" * width) + ")"
        per_statement = _PARAMETERS_PER_STATEMENT // width
        try:
            self._conn.execute("BEGIN")
            try:
                batch: list[Sequence[Any]] = []
                for row in rows:
                    batch.append(row)
                    if len(batch) == per_statement:
                        self._insert(template, group, batch)
                        batch = []
                if batch:
                    self._insert(template, group, batch)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.Error as error:
            raise LedgerError(f"the resync's scratch store could not be written: {error}") from error

    def _insert(self, template: str, group: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.execute(template.format(rows=", ".join([group] * len(rows))),
                           [value for row in rows for value in row])


def _chunks(keys: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(keys), KEYS_PER_QUERY):
        yield keys[start:start + KEYS_PER_QUERY]


def _marks(chunk: Sequence[Any]) -> str:
    return ", ".join("?" * len(chunk))
