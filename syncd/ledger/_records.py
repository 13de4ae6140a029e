"""The rows the ledger returns, and the states and kinds they may hold.

The schema's CHECK constraints allow the same states and kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

OPEN_TASK_STATES = ("pending", "in_flight")
FINAL_TASK_STATES = ("done", "failed", "needs_person", "cancelled")
TASK_STATES = OPEN_TASK_STATES + FINAL_TASK_STATES
IDENTIFIER_KINDS = ("email", "phone", "client_id")
REQUEST_KINDS = ("erase", "restrict", "unrestrict", "export")
REQUEST_FINAL_STATES = ("done", "failed", "cancelled")
STEP_KINDS = ("task", "manual")
STEP_STATES = ("waiting", "done", "failed", "cancelled")
MAX_EXTENSION_MONTHS = 2  # UK GDPR Art. 12(3): "by two further months"
RETENTION_RUN_STATES = ("guarded", "confirmed", "superseded", "filed")
COMMAND_KINDS = ("resync",)
COMMAND_FINAL_STATES = ("done", "failed")


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
    analytics_erased_at: datetime | None = None


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
class TaskOutcome:
    """One claimed task's outcome, for :meth:`Ledger.record_outcomes` (written with others).

    Attributes:
        task_id: the task.
        state: a final state (``finish``) or ``pending`` (``retry_later``).
        error: short text without personal data, for ``last_error`` and the audit.
        vendor_request_id: the processor's request id (final states).
        detail: other evidence for the audit (final states; see ``finish``).
        next_attempt_at: when a ``pending`` task is due again.
        refund_attempt: a ``pending`` task's try did not count (see ``retry_later``).
        suppress_key: an identifier key to put on the suppression list with it.
        subject: ``(subject_key, columns)`` for ``upsert_subject``, written with it.
    """

    task_id: int
    state: str
    error: str | None = None
    vendor_request_id: str | None = None
    detail: str | None = None
    next_attempt_at: datetime | None = None
    refund_attempt: bool = False
    suppress_key: str | None = None
    subject: tuple[str, dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """A data-subject request (erase, restrict, unrestrict, export).

    Attributes:
        subject_key: the person's subject key (their Phorest client-id key, or
            the email key of a person Phorest does not hold).
        source: which identifier the request was filed with (``email``,
            ``phone``, ``client_id``, joined by ``+``), never its value.
        due_at: the statutory deadline, extensions included.
        filed_by: who filed it (staff name as given).
        client_id: the Phorest client id it resolved to, if any.
        extended_months: months added under UK GDPR Art. 12(3) (0 to 2).
        extension_reason: why, as the person who extended it wrote it.
    """

    id: int
    kind: str
    subject_key: str
    source: str
    received_at: datetime
    due_at: datetime
    state: str
    closed_at: datetime | None
    note: str | None
    filed_by: str | None = None
    client_id: str | None = None
    extended_months: int = 0
    extension_reason: str | None = None


@dataclass(frozen=True, slots=True)
class RequestStep:
    """What one processor must do for a request.

    Attributes:
        kind: ``task`` (a ledger task syncd carries out) or ``manual`` (a
            person acts and confirms, or syncd verifies it by polling).
        state: waiting, done, failed or cancelled.
        task_id: the task, for a ``task`` step.
        client_id: the Phorest client the step is about (a Forget step's), if any.
        instructions: what the person must do (client ids only, no personal data).
        confirmed_by: who confirmed a manual step (``syncd`` when verified by polling).
        evidence: the vendor's receipt or how the step was verified.
    """

    id: int
    request_id: int
    processor: str
    kind: str
    state: str
    task_id: int | None
    client_id: str | None
    instructions: str | None
    opened_at: datetime
    closed_at: datetime | None
    confirmed_by: str | None
    evidence: str | None


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
    request_id: int | None = None
    actor: str | None = None


STAFF_ROLES = ("manager", "reception")


@dataclass(frozen=True, slots=True)
class StaffMember:
    """A console account: a login name, a role and an argon2id hash (never a password)."""

    id: int
    name: str
    role: str
    password_hash: str
    active: bool
    failed_logins: int
    locked_until: datetime | None
    password_changed_at: datetime
    last_login_at: datetime | None
    created_at: datetime
    updated_at: datetime


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


@dataclass(frozen=True, slots=True)
class RetentionRun:
    """One retention purge that was not a dry run (client counts only).

    Attributes:
        stale_count: live clients found stale (the requests it would file).
        live_count: live (active or archived) clients in all.
        state: ``guarded`` (held back by the purge guard, waiting for a
            person), ``confirmed`` (a person confirmed it; requests filed),
            ``superseded`` (a later run replaced it) or ``filed``.
        filed_count: erasure requests it filed.
        confirmed_by: who confirmed a guarded run.
    """

    id: int
    created_at: datetime
    stale_count: int
    live_count: int
    state: str
    filed_count: int
    closed_at: datetime | None
    confirmed_by: str | None
