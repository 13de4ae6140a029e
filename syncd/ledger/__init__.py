"""The ledger: syncd's durable memory, and the only package with SQL.

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

Layout: :mod:`._db` opens the file, migrates it (:mod:`._schema`) and holds
the plumbing; each area's methods sit in a mixin of their own (tasks, audit,
subjects and suppression, requests, alerts and processor health, commands and
the inbox, retention runs, staff accounts), all returning the records of :mod:`._records`. :class:`Ledger`
combines them and is the one entry point; import everything from here. :class:`Scratch`
(:mod:`._scratch`) is not the ledger: a resync's own temporary store, gone with the run.
"""

from __future__ import annotations

from syncd.ledger._alerts import AlertsMixin
from syncd.ledger._audit import AuditMixin
from syncd.ledger._commands import CommandsMixin
from syncd.ledger._db import (
    BUSY_TIMEOUT_MS,
    CHECKPOINT_BUSY_TIMEOUT_MS,
    ERROR_TEXT_LIMIT_CHARS,
    KEYS_PER_QUERY,
    LEDGER_FILE_MODE,
    WAL_SIZE_LIMIT_BYTES,
    WAL_SWITCH_RETRY_SECONDS,
    Clock,
)
from syncd.ledger._records import (
    COMMAND_FINAL_STATES,
    COMMAND_KINDS,
    FINAL_TASK_STATES,
    IDENTIFIER_KINDS,
    MAX_EXTENSION_MONTHS,
    OPEN_TASK_STATES,
    REQUEST_FINAL_STATES,
    REQUEST_KINDS,
    RETENTION_RUN_STATES,
    STAFF_ROLES,
    TASK_STATES,
    Alert,
    AuditEvent,
    Command,
    InboxEvent,
    ProcessorHealth,
    Request,
    RequestStep,
    RetentionRun,
    StaffMember,
    Subject,
    SubjectFacts,
    Task,
    TaskOutcome,
)
from syncd.ledger._requests import RequestsMixin
from syncd.ledger._retention import RetentionMixin
from syncd.ledger._scratch import Scratch
from syncd.ledger._staff import StaffMixin
from syncd.ledger._schema import MIGRATIONS, SCHEMA_VERSION
from syncd.ledger._subjects import SubjectsMixin
from syncd.ledger._tasks import TasksMixin

__all__ = [
    "BUSY_TIMEOUT_MS", "CHECKPOINT_BUSY_TIMEOUT_MS", "COMMAND_FINAL_STATES", "COMMAND_KINDS",
    "ERROR_TEXT_LIMIT_CHARS", "FINAL_TASK_STATES", "IDENTIFIER_KINDS", "KEYS_PER_QUERY",
    "LEDGER_FILE_MODE", "MAX_EXTENSION_MONTHS", "MIGRATIONS", "OPEN_TASK_STATES", "REQUEST_FINAL_STATES",
    "REQUEST_KINDS", "RETENTION_RUN_STATES", "SCHEMA_VERSION", "STAFF_ROLES", "TASK_STATES", "WAL_SIZE_LIMIT_BYTES",
    "WAL_SWITCH_RETRY_SECONDS", "Alert", "AuditEvent", "Clock", "Command", "InboxEvent",
    "Ledger", "ProcessorHealth", "Request", "RequestStep", "RetentionRun", "Scratch", "StaffMember", "Subject", "SubjectFacts", "Task",
    "TaskOutcome",
]


class Ledger(TasksMixin, AuditMixin, SubjectsMixin, RequestsMixin, AlertsMixin, CommandsMixin,
             RetentionMixin, StaffMixin):
    """One connection to the ledger file. Use :meth:`open`, ideally as a context manager."""
