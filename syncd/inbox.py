"""Processing of pushed events: the Mailchimp webhooks that :mod:`syncd.web` recorded.

The intake answers Mailchimp within milliseconds and leaves each event in the
ledger's inbox (deduplicated by its dedupe key). :func:`process_inbox` works
through the pending events, oldest first:

- ``unsubscribe`` and ``cleaned`` (R2, an opt-out anywhere wins): every live
  Phorest client holding the address (:attr:`syncd.reconcile.Governance.live`,
  archived included: the mailbox's owner said stop and nobody can tell which
  client clicked) gets its subject's ``opted_out_at`` moved to the event's
  time when that is newer than what the ledger holds, and every one of them whose
  ``emailMarketingConsent`` is still on gets a ``withdraw_consent`` task. The
  tasks run later through :func:`syncd.tasks.run_due`.
- ``upemail``: noted, nothing else. Phorest is the system of record for
  addresses; the member move is reconciled from Phorest (R6).
- ``profile``: ignored. Names only flow Phorest -> Mailchimp (R6).

Each event is finished (its payload, the only personal data, scrubbed) in the
same ledger transaction that queues its tasks and records its facts: a crash
before the commit leaves the event pending and nothing queued, a crash after it
leaves the tasks queued and the event done. Phorest is only read *before* that
transaction, so no write lock is held across the network.

Subjects are keyed as the engine keys them: ``keys.client_id(client_id)`` for
an address a client governs, and the address's email key is linked to the
primary record's subject (:func:`syncd.reconcile.govern`, the same rule as
the engine's) when the ledger had not linked it yet.

Events caused by syncd's own unsubscribes are not told apart from the person's
(Mailchimp's payload does not say who acted), so the webhook must be created
without the ``api`` source (README). Were one to arrive anyway, it errs on the
safe side: an opt-out recorded for every client at the address.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

import structlog

from connectors.base import Action, ClientRecord
from connectors.phorest import PhorestConnector
from syncd.errors import ConnectorError, IdentifierError
from syncd.events import WebhookEvent
from syncd.identity import SubjectKeys, normalise_email
from syncd.ledger import InboxEvent, Ledger
from syncd.reconcile import Planned, govern
from syncd.tasks import enqueue

log = structlog.get_logger(__name__)

SOURCE = "mailchimp"
OPT_OUT_KINDS = frozenset({"unsubscribe", "cleaned"})
WHY = {"unsubscribe": "unsubscribed_in_mailchimp", "cleaned": "cleaned_in_mailchimp"}

# Outcomes written to the inbox row and counted in the result.
QUEUED = "consent_withdrawal_queued"  # at least one withdraw_consent task queued
ALREADY = "consent_already_off"  # clients found, none consenting: opt-out time recorded
NO_CLIENT = "no_client"
NOTED = "noted"
IGNORED = "ignored"
MALFORMED = "malformed"
DEFERRED = "deferred"  # Phorest could not be read: left pending for the next run (count only)
RACED = "already_processed"  # another worker finished it first (count only)

def recorder(
    ledger_path: str | os.PathLike[str], after: Callable[[], None] | None = None
) -> Callable[[WebhookEvent], bool]:
    """What the webhook app calls to keep an event: the ledger's inbox, durably, first.

    Each call opens its own ledger connection (the web server serves each request
    on a thread of its own; SQLite connections stay on the thread that made them).

    Args:
        ledger_path: the ledger file.
        after: called once the event is stored (e.g. to wake the worker).

    Returns:
        ``record(event) -> bool``: True when the event was new, False for a replay.
    """

    def record(event: WebhookEvent) -> bool:
        with Ledger.open(ledger_path) as own:
            added = own.add_inbox_event(SOURCE, event.kind, event.occurred_at, event.payload,
                                        event.dedupe_key)
        if after is not None:
            after()
        return added

    return record


# email -> the Phorest clients holding that address (dead ones are filtered out here).
Lookup = Callable[[str], Sequence[ClientRecord]]


def process_inbox(
    ledger: Ledger,
    phorest: PhorestConnector,
    keys: SubjectKeys,
    *,
    now: datetime,
    limit: int = 200,
) -> dict[str, int]:
    """Process up to ``limit`` pending Mailchimp events, oldest first.

    Args:
        ledger: the ledger holding the inbox; tasks are queued there.
        phorest: the Phorest connector; clients are found by its ``find_by_email``.
        keys: turns identifiers into subject keys.
        now: the current time; an event dated later is recorded as of ``now``,
            so a skewed ``fired_at`` cannot make an opt-out outrank a later opt-in.
        limit: the most events to take in this call.

    Returns:
        Counts by outcome (``consent_withdrawal_queued``, ``consent_already_off``,
        ``no_client``, ``noted``, ``ignored``, ``malformed``, ``deferred``,
        ``already_processed``); absent outcomes are left out.

    Raises:
        PermanentError: Phorest refused the lookup for good (e.g. credentials);
            the event stays pending.
        LedgerError: SQLite failed; the event being processed stays pending.
    """
    find: Lookup = phorest.find_by_email
    counts: Counter[str] = Counter()
    for event in ledger.pending_inbox(limit):
        if event.source != SOURCE:
            continue  # another intake's events are not ours to finish
        try:
            outcome = _process_one(ledger, event, find, keys, now)
        except ConnectorError as error:
            log.warning("inbox_deferred", event_id=event.id, kind=event.kind,
                        reason=error.title, permanent=error.permanent)  # fmt: skip
            if error.permanent:
                raise
            counts[DEFERRED] += 1
            break  # keep the order: later events wait until Phorest answers again
        counts[outcome] += 1
    if counts:
        log.info("inbox_processed", counts=dict(counts))
    return dict(counts)


def _process_one(
    ledger: Ledger, event: InboxEvent, find: Lookup, keys: SubjectKeys, now: datetime
) -> str:
    """Decide and record one event. Returns its outcome."""
    payload = event.payload or {}
    if event.kind not in OPT_OUT_KINDS:
        outcome = NOTED if event.kind == "upemail" else IGNORED
        return _finish(ledger, event, outcome, [], [], None)
    try:
        email = normalise_email(str(payload.get("email", "")))
    except IdentifierError:
        return _finish(ledger, event, MALFORMED, [], [], None)
    # Read Phorest before taking the write lock.
    governance = govern(c for c in find(email) if c.email and _same_address(c.email, email))
    live, primary = governance.live, governance.primary
    if not live or primary is None:
        return _finish(ledger, event, NO_CLIENT, [], [], None)
    opted_out_at = min(event.occurred_at, now)
    why = WHY[event.kind]
    planned = [
        Planned("phorest", Action("withdraw_consent", keys.client_id(c.client_id),
                                  client_id=c.client_id, record=c.raw,
                                  read_at=c.read_at.isoformat() if c.read_at else None),
                "R2", why)
        for c in live if c.email_consent
    ]  # fmt: skip
    link = (keys.email(email), keys.client_id(primary.client_id))
    subjects = [keys.client_id(c.client_id) for c in live]
    return _finish(ledger, event, QUEUED if planned else ALREADY, planned,
                   [(s, opted_out_at) for s in subjects], link)  # fmt: skip


def _finish(
    ledger: Ledger,
    event: InboxEvent,
    outcome: str,
    planned: Sequence[Planned],
    opt_outs: Iterable[tuple[str, datetime]],
    link: tuple[str, str] | None,
) -> str:
    """Finish the event, queue its tasks and record its facts in one transaction."""
    with ledger.transaction():
        if not ledger.finish_inbox_event(event.id, outcome):
            return RACED  # nothing else written: the other worker did it
        opt_outs = list(opt_outs)
        stored = ledger.subject_facts([subject for subject, _ in opt_outs])
        for subject, at in opt_outs:
            facts = stored.get(subject)
            if facts is None or facts.opted_out_at is None or at > facts.opted_out_at:
                ledger.upsert_subject(subject, opted_out_at=at)
        if link is not None and ledger.subject_for(link[0]) is None:
            ledger.link_identifier(link[0], "email", link[1])
        task_ids = dict(zip((p.action.subject_key for p in planned),
                            enqueue(ledger, planned) if planned else []))  # fmt: skip
        for subject, _at in opt_outs:
            # R11 evidence: the opt-out was received, and what it led to.
            ledger.add_audit(subject, SOURCE, f"webhook_{event.kind}", f"R2:{WHY[event.kind]}",
                             QUEUED if subject in task_ids else ALREADY,
                             task_id=task_ids.get(subject))  # fmt: skip
    log.info("inbox_event", event_id=event.id, kind=event.kind, outcome=outcome,
             tasks=len(planned))  # fmt: skip
    return outcome


def _same_address(held: str, wanted: str) -> bool:
    try:
        return normalise_email(held) == wanted
    except IdentifierError:
        return False
