"""Subjects and their identifier keys, the suppression list, digests and cursors.

Subjects and identifiers are known only by their keys (:mod:`syncd.identity`):
each identifier key (email, phone, client id) points at one subject, and the
suppression list holds identifier keys that are never marketed to again. A
digest remembers what a processor last held for a subject; a cursor is a
change feed's high-water mark.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from datetime import datetime
from typing import Any

from syncd.ledger._db import KEYS_PER_QUERY, LedgerBase, _columns, _from_row, _to_text
from syncd.ledger._records import IDENTIFIER_KINDS, Subject, SubjectFacts

_KEEP: Any = object()  # "leave this column as it is" in upsert_subject
_SUBJECT_COLUMNS = frozenset({
    "consent", "consent_at", "restricted", "opted_out_at", "opted_in_at", "resubscribe_refused",
    "synced_email_key", "client_seen", "unsubscribed_by_syncd", "analytics_erased_at",
})
# What a subject created by an upsert holds in the columns not set.
_NEW_SUBJECT: dict[str, Any] = {
    "restricted": False, "resubscribe_refused": False, "unsubscribed_by_syncd": False}


class SubjectsMixin(LedgerBase):
    """Subjects, identifier keys, the suppression list, per-processor digests and cursors."""

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
        analytics_erased_at: datetime | None = _KEEP,
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
            "analytics_erased_at": analytics_erased_at,
        }  # fmt: skip
        given = {name: value for name, value in given.items() if value is not _KEEP}
        self.upsert_subjects({subject_key: given})

    def upsert_subjects(self, changes: Mapping[str, Mapping[str, Any]]) -> None:
        """:meth:`upsert_subject` for many subjects: one statement per set of columns set.

        Call it inside :meth:`transaction` to make the whole write one commit.

        Args:
            changes: subject key -> the columns to set (any of :meth:`upsert_subject`'s
                keyword arguments; an empty mapping only creates a missing subject).

        Raises:
            ValueError: a column :meth:`upsert_subject` does not take.
            LedgerError: SQLite failed.
        """
        # (columns set, defaults a new row takes) -> rows: one statement each.
        groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[tuple[Any, ...]]] = {}
        now = self._now()
        for subject_key, given in changes.items():
            unknown = set(given) - _SUBJECT_COLUMNS
            if unknown:
                raise ValueError(f"unknown subject columns {sorted(unknown)}")
            defaults = tuple(name for name in _NEW_SUBJECT if name not in given)
            values = (*given.values(), *(_NEW_SUBJECT[name] for name in defaults))
            groups.setdefault((tuple(given), defaults), []).append(
                (subject_key, *(_to_text(v) if isinstance(v, datetime) else v for v in values),
                 now, now))
        with self.transaction() if len(groups) > 1 else nullcontext():
            for (names, defaults), rows in groups.items():
                # Column names are literals from this module, never input.
                columns = ", ".join((*names, *defaults))
                updates = "".join(f"{name} = excluded.{name}, " for name in names)
                self._run_many(
                    f"INSERT INTO subjects (subject_key, {columns}, created_at, updated_at)"
                    f" VALUES ({', '.join('?' * (len(names) + len(defaults) + 3))})"
                    f" ON CONFLICT (subject_key) DO UPDATE SET {updates}"
                    "updated_at = excluded.updated_at",
                    rows,
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

    def link_identifiers(self, links: Sequence[tuple[str, str, str]]) -> None:
        """:meth:`link_identifier` for many (identifier key, kind, subject key) at once.

        Unlike :meth:`link_identifier` it does not say what each identifier pointed
        at before. Call it inside :meth:`transaction` to make it one commit.

        Raises:
            ValueError: a kind is not one of ``IDENTIFIER_KINDS``.
            LedgerError: SQLite failed.
        """
        unknown = {kind for _, kind, _ in links} - set(IDENTIFIER_KINDS)
        if unknown:
            raise ValueError(f"unknown identifier kinds {sorted(unknown)}")
        if not links:
            return
        now = self._now()
        with self.transaction():
            self._run_many(
                "INSERT INTO subjects (subject_key, restricted, created_at, updated_at)"
                " VALUES (?, 0, ?, ?) ON CONFLICT (subject_key) DO NOTHING",
                [(subject_key, now, now) for _, _, subject_key in links],
            )
            self._run_many(
                "INSERT INTO identifiers (identifier_key, kind, subject_key, created_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (identifier_key) DO UPDATE SET"
                " kind = excluded.kind, subject_key = excluded.subject_key",
                [(identifier_key, kind, subject_key, now)
                 for identifier_key, kind, subject_key in links],
            )

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

    def suppress(self, identifier_key: str, reason: str, request_id: int | None = None) -> bool:
        """Put an identifier key on the suppression list.

        Only :meth:`lift_suppression` removes entries: those of an erasure
        request cancelled before any processor erased anything.

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

    def suppression_size(self, reason: str | None = None) -> int:
        """How many identifier keys are suppressed (for ``reason`` only, when given).

        Raises:
            LedgerError: SQLite failed.
        """
        if reason is None:
            return int(self._run("SELECT COUNT(*) FROM suppression").fetchone()[0])
        return int(self._run("SELECT COUNT(*) FROM suppression WHERE reason = ?",
                             (reason,)).fetchone()[0])

    def lift_suppression(self, request_id: int) -> int:
        """Remove the suppression entries a request added (it was cancelled unexecuted).

        Returns:
            How many entries were removed.

        Raises:
            LedgerError: SQLite failed.
        """
        cursor = self._run("DELETE FROM suppression WHERE request_id = ?", (request_id,))
        return cursor.rowcount

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
