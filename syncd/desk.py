"""What staff do with requests, shared by the command line and the console.

Filing resolves the person through Phorest, plans what each processor must do
and records the request (:func:`file_request`); :func:`describe` is one
request as both show it (state, deadline, each processor's steps and their
evidence, optionally the audit trail); :func:`audit_keys` turns an identifier
typed by a person into the keys its audit entries are filed under. Nothing
here returns an address, a number or a name of a client: client ids, request
ids, staff names, states and times only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from syncd import engine, rights
from syncd.errors import IdentifierError, SyncdError
from syncd.ledger import AuditEvent, Ledger

IDENTIFIER_KINDS = ("email", "phone", "client_id")


def file_request(ledger: Ledger, settings: Any, built: Any, keys: Any, kind: str,
                 person: rights.Person, *, filed_by: str | None, note: str | None,
                 now: datetime) -> int:  # fmt: skip
    """Plan and record an erasure, restriction or unrestriction (see :func:`rights.file`)."""
    queue = engine.plan_addresses(ledger, built, keys, person.own_emails, person.holders)
    return rights.file(ledger, settings, keys, kind, person, queue, filed_by=filed_by, note=note,
                       now=now, analytics=built.get(engine.ANALYTICS))


def describe(ledger: Ledger, request_id: int, now: datetime, *, audit: bool = False,
             warning_days: int | None = None) -> dict[str, Any]:
    """One request as JSON-ready data; ``deadline`` too when ``warning_days`` is given.

    Raises:
        SyncdError: there is no such request.
    """
    request = ledger.request(request_id)
    if request is None:
        raise SyncdError(f"no request #{request_id} (see syncd requests --all)")
    steps = ledger.steps(request_id)
    shown: dict[str, Any] = {
        "id": request.id, "kind": request.kind, "state": request.state,
        "client_id": request.client_id, "source": request.source,
        "received_at": iso(request.received_at), "due_at": iso(request.due_at),
        "days_left": rights.days_left(request, now), "closed_at": iso(request.closed_at),
        "filed_by": request.filed_by, "note": request.note,
        "extended_months": request.extended_months,
        "extension_reason": request.extension_reason,
        "processors": rights.processor_states(steps),
        "steps": [{
            "processor": s.processor, "kind": s.kind, "state": s.state,
            "client_id": s.client_id, "task_id": s.task_id, "instructions": s.instructions,
            "evidence": s.evidence, "confirmed_by": s.confirmed_by,
            "opened_at": iso(s.opened_at), "closed_at": iso(s.closed_at),
        } for s in steps],
    }  # fmt: skip
    if warning_days is not None:
        shown["deadline"] = deadline(shown, warning_days)
    if audit:
        shown["audit"] = [audit_entry(e) for e in ledger.find_audit(request_id=request_id)]
    return shown


def audit_entry(event: AuditEvent) -> dict[str, Any]:
    """One audit entry as JSON-ready data."""
    return {"at": iso(event.at), "processor": event.processor, "action": event.action,
            "reason": event.reason, "outcome": event.outcome,
            "vendor_request_id": event.vendor_request_id, "detail": event.detail,
            "request_id": event.request_id, "task_id": event.task_id,
            "actor": event.actor}  # fmt: skip


def audit_keys(ledger: Ledger, settings: Any, kind: str, value: str) -> list[str]:
    """The keys an identifier's audit entries are filed under (its subject's too).

    Raises:
        SyncdError: ``kind`` is unknown or ``value`` is not a valid identifier of that kind.
    """
    if kind not in IDENTIFIER_KINDS:
        raise SyncdError(f"unknown identifier kind {kind!r}")
    keys = engine.subject_keys(settings)
    try:
        key = keys.key(kind, value)  # type: ignore[arg-type]
    except IdentifierError:
        raise SyncdError(f"not a valid {kind.replace('_', ' ')}") from None
    subject = ledger.subject_for(key)
    found = [key, *([subject] if subject else [])]
    if subject:
        for id_kind in IDENTIFIER_KINDS:
            found += ledger.identifier_keys(subject, id_kind)
    return found


def deadline(shown: dict[str, Any], warning_days: int) -> str:
    """``OVERDUE``, ``DUE SOON (…)``, the days left, or ``-`` once closed."""
    if shown["state"] != "open":
        return "-"
    left = shown["days_left"]
    if left < 0:
        return "OVERDUE"
    return f"DUE SOON ({days_text(left)})" if left < warning_days else days_text(left)


def days_text(days: int) -> str:
    """``3 day(s) left``, ``due today`` or ``overdue by 2 day(s)``."""
    if days < 0:
        return f"overdue by {-days} day(s)"
    return "due today" if days == 0 else f"{days} day(s) left"


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 to the second, or None."""
    return moment.isoformat(timespec="seconds") if moment is not None else None
