"""The resync engine: one full reconciliation of Phorest and Mailchimp, now.

Reads everything both systems hold, builds one :class:`~syncd.reconcile.SubjectView`
per email address, lets :func:`~syncd.reconcile.plan` decide, and (unless it is a
dry run) queues the actions as ledger tasks and runs them (STYLE 6: the task is
written before the call, the outcome after).

Which Phorest client governs an address: the newest (by ``updatedAt``) active
or archived client holding it; when none is live, the newest deleted,
forgotten or merged one. A dead record whose address a live client also holds
is not a view of its own: the live client governs the member.

Email changes (R6): the ledger keeps, per subject, the keyed hash of the address
its member was last seen at or put under (``synced_email_key``). A consenting
client with no member at their address whose synced key matches a member no
client holds any more gets that member as the view's member, so :func:`plan`
moves it (``move_email``) rather than subscribing a new one and unsubscribing
the old as an orphan. The key moves to the new address once the move is done.

Personal data: addresses and names live only in memory while the engine runs
and in pending task payloads (scrubbed when final). The ledger's subject rows
hold HMAC keys and times; the result holds Phorest client ids, never emails.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from connectors.base import ClientRecord, Connector, MemberRecord
from syncd.errors import IdentifierError
from syncd.identity import SubjectKeys, normalise_email
from syncd.ledger import Ledger, SubjectFacts
from syncd.reconcile import (
    ERASED_CLIENT_STATES,
    OPTED_OUT_STATUSES,
    LedgerFacts,
    Planned,
    SubjectView,
    plan,
)
from syncd.retry import RetryPolicy
from syncd.tasks import RunReport, enqueue, run_due

log = structlog.get_logger(__name__)

PROCESSORS = ("phorest", "mailchimp")
PROGRESS_EVERY_RECORDS = 200
# A refusal the Mailchimp connector reports when only the person can re-subscribe.
RESUBSCRIBE_REFUSED_REASON = "needs_client_resubscribe"

# (stage, records so far): stages are "phorest", "mailchimp", "planned", "applied".
Progress = Callable[[str, int], None]
CountKey = tuple[str, str, str, str]  # processor, action kind, rule, why


@dataclass(frozen=True)
class PlannedRow:
    """One planned action as shown to the operator (no email, no name).

    Attributes:
        client_id: the Phorest client id, or "-" for an address no client holds.
        processor: where the action runs.
        action: the action kind.
        rule: the DESIGN §1 rule it restores.
        why: the machine-readable reason.
    """

    client_id: str
    processor: str
    action: str
    rule: str
    why: str


@dataclass(frozen=True)
class ResyncResult:
    """What one resync planned and, unless a dry run, did.

    Attributes:
        counts: (processor, action, rule, why) -> planned actions.
        rows: one row per planned action, in plan order.
        report: the task runner's report (None in a dry run).
        failed: tasks that failed for good in this run.
        dry_run: nothing was changed anywhere.
        clients: Phorest clients read.
        members: Mailchimp members read.
        unusable_addresses: records whose email is not a plausible address (ignored).
    """

    counts: dict[CountKey, int]
    rows: list[PlannedRow]
    report: RunReport | None
    failed: int
    dry_run: bool
    clients: int = 0
    members: int = 0
    unusable_addresses: int = 0

    @property
    def planned(self) -> int:
        """How many actions were planned."""
        return len(self.rows)

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready summary (client ids, counts and reasons only)."""
        return {
            "dry_run": self.dry_run,
            "clients": self.clients,
            "members": self.members,
            "unusable_addresses": self.unusable_addresses,
            "planned": self.planned,
            "failed": self.failed,
            "counts": [
                {"processor": p, "action": a, "rule": r, "why": w, "count": n}
                for (p, a, r, w), n in sorted(self.counts.items())
            ],
            "rows": [row.__dict__ for row in self.rows],
            "outcomes": self.report.counts if self.report is not None else None,
        }


@dataclass
class _Address:
    """What both systems hold at one normalised address (only what planning needs)."""

    live: ClientRecord | None = None
    dead: ClientRecord | None = None
    member: MemberRecord | None = None


@dataclass
class _Subject:
    """One view plus the ledger facts it would write back."""

    view: SubjectView
    stored: SubjectFacts | None
    consent: bool | None
    consent_at: datetime | None
    link_email_key: str | None = None
    synced_email_key: str | None = None


def resync(
    settings: Any,
    ledger: Ledger,
    connectors: Mapping[str, Connector],
    keys: SubjectKeys,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    progress: Progress | None = None,
    processors: Collection[str] | None = None,
    policy: RetryPolicy | None = None,
) -> ResyncResult:
    """Reconcile every address Phorest or Mailchimp holds, now.

    Args:
        settings: the loaded configuration (reserved for per-run options).
        ledger: the ledger (facts are read from it; written unless ``dry_run``).
        connectors: ``"phorest"`` and ``"mailchimp"`` connectors, both required.
        keys: turns identifiers into subject keys.
        dry_run: plan only: no task, no call, no ledger write.
        now: the current time for retry scheduling (default: the system clock).
        progress: called with (stage, count) as the work advances.
        processors: apply only actions on these processors (default: all).
        policy: the persisted retry policy for the task runner.

    Returns:
        What was planned and done.

    Raises:
        ConnectorError: a full scan could not be read.
        LedgerError: SQLite failed.
    """
    del settings  # the engine has no options of its own yet
    now = now or datetime.now(UTC)
    report_progress = progress or (lambda _stage, _count: None)
    wanted = set(processors) if processors is not None else set(PROCESSORS)

    addresses, dead_by_key, stats = _read(connectors, keys, report_progress)
    subjects = _views(addresses, dead_by_key, ledger, keys)
    planned: list[Planned] = []
    for subject in subjects:
        planned.extend(p for p in plan(subject.view) if p.processor in wanted)
    report_progress("planned", len(planned))

    counts = Counter((p.processor, p.action.kind, p.rule, p.why) for p in planned)
    rows = [
        PlannedRow(p.action.client_id or "-", p.processor, p.action.kind, p.rule, p.why)
        for p in planned
    ]
    log.info("resync_planned", planned=len(planned), dry_run=dry_run, **stats)
    if dry_run:
        return ResyncResult(dict(counts), rows, None, 0, True, **stats)

    _store_facts(ledger, subjects)
    task_ids = enqueue(ledger, planned)
    runners = {name: connectors[name] for name in PROCESSORS if name in wanted}
    report = run_due(ledger, runners, policy or RetryPolicy(), keys, now=now)
    report_progress("applied", len(planned))
    _record_results(ledger, planned, task_ids, keys)
    log.info("resync_done", planned=len(planned), failed=report.failed, counts=report.counts)
    return ResyncResult(dict(counts), rows, report, report.failed, False, **stats)


def _read(
    connectors: Mapping[str, Connector], keys: SubjectKeys, progress: Progress
) -> tuple[dict[str, _Address], dict[str, ClientRecord], dict[str, int]]:
    """Scan both systems, keeping per address only the records that can govern it."""
    addresses: dict[str, _Address] = {}
    # Dead clients by client-id key: a forgotten client's blanked record no
    # longer shows its address, but the ledger linked that address to it.
    dead_by_key: dict[str, ClientRecord] = {}
    clients = members = unusable = 0
    for client in connectors["phorest"].scan():
        assert isinstance(client, ClientRecord)
        clients += 1
        if clients % PROGRESS_EVERY_RECORDS == 0:
            progress("phorest", clients)
        dead = client.state in ERASED_CLIENT_STATES
        if dead:
            dead_by_key[keys.client_id(client.client_id)] = client
        if not client.email:
            continue
        email = _normalised(client.email)
        if email is None:
            unusable += 1
            continue
        slot = addresses.setdefault(email, _Address())
        if dead:
            slot.dead = _newest(slot.dead, client)
        else:
            slot.live = _newest(slot.live, client)
    progress("phorest", clients)
    for member in connectors["mailchimp"].scan():
        assert isinstance(member, MemberRecord)
        members += 1
        if members % PROGRESS_EVERY_RECORDS == 0:
            progress("mailchimp", members)
        email = _normalised(member.email)
        if email is None:
            unusable += 1
            continue
        addresses.setdefault(email, _Address()).member = member
    progress("mailchimp", members)
    stats = {"clients": clients, "members": members, "unusable_addresses": unusable}
    return addresses, dead_by_key, stats


def _views(
    addresses: Mapping[str, _Address],
    dead_by_key: Mapping[str, ClientRecord],
    ledger: Ledger,
    keys: SubjectKeys,
) -> list[_Subject]:
    """One subject per address, with the ledger's facts brought up to date in memory."""
    governed: list[tuple[str, str, ClientRecord | None, MemberRecord | None]] = []
    for email, slot in addresses.items():
        email_key = keys.email(email)
        client = slot.live or slot.dead
        if client is None and slot.member is not None:
            # An address no client shows any more: it may be a forgotten client's.
            client = dead_by_key.get(ledger.subject_for(email_key) or "")
        governed.append((email, email_key, client, slot.member))

    subject_keys = [keys.client_id(c.client_id) if c else ek for _, ek, c, _ in governed]
    stored_by_key = ledger.subject_facts(subject_keys)
    suppressed = ledger.suppressed_among(
        [ek for _, ek, _, _ in governed] + [sk for sk, (_, _, c, _) in
                                             zip(subject_keys, governed) if c]
    )
    moved = _moved_members(governed, subject_keys, stored_by_key)
    subjects: list[_Subject] = []
    for index, (subject_key, (email, email_key, client, member)) in enumerate(
        zip(subject_keys, governed)
    ):
        if index in moved.values():
            continue  # the member of a client whose address changed: that client's view
        stored = stored_by_key.get(subject_key)
        live = client is not None and client.state not in ERASED_CLIENT_STATES
        synced_email = synced_key = None
        if index in moved:
            member = governed[moved[index]][3]
            synced_email = member.email if member else None
            synced_key = stored.synced_email_key if stored else None
        elif live and member is not None and member.status != "absent":
            synced_key = email_key
        opted_in_at = stored.opted_in_at if stored else None
        refused = stored.resubscribe_refused if stored else False
        if live and client.email_consent and stored is not None and stored.consent is False:
            # Consent switched on in Phorest since the ledger last looked (R2: a
            # fresh opt-in, dated by Phorest). A past refusal no longer applies.
            opted_in_at, refused = client.updated_at, False
        opted_out_at = stored.opted_out_at if stored else None
        if member is not None and member.status in OPTED_OUT_STATUSES and member.last_changed:
            if opted_out_at is None or member.last_changed > opted_out_at:
                opted_out_at = member.last_changed
        facts = LedgerFacts(
            suppressed=email_key in suppressed or (client is not None and subject_key in suppressed),
            restricted=stored.restricted if stored else False,
            opted_out_at=opted_out_at,
            opted_in_at=opted_in_at,
            synced_email=synced_email,
            resubscribe_refused=refused,
        )
        view = SubjectView(subject_key, client, member, facts, address_shared=False)
        subjects.append(_Subject(
            view, stored,
            consent=client.email_consent if live else None,
            consent_at=client.updated_at if live else None,
            link_email_key=email_key if live else None,
            synced_email_key=synced_key,
        ))  # fmt: skip
    return subjects


def _moved_members(
    governed: list[tuple[str, str, ClientRecord | None, MemberRecord | None]],
    subject_keys: list[str],
    stored_by_key: Mapping[str, SubjectFacts],
) -> dict[int, int]:
    """Live clients whose member is still at their previous address (R6).

    Returns:
        governed index of the client -> governed index of the member no client
        holds, matched through the subject's ``synced_email_key``.
    """
    unclaimed = {ek: i for i, (_, ek, client, member) in enumerate(governed)
                 if client is None and member is not None and member.status != "absent"}
    moved: dict[int, int] = {}
    for index, (_, email_key, client, member) in enumerate(governed):
        if client is None or client.state in ERASED_CLIENT_STATES:
            continue
        if member is not None and member.status != "absent":
            continue
        stored = stored_by_key.get(subject_keys[index])
        old_key = stored.synced_email_key if stored else None
        if old_key and old_key != email_key and old_key in unclaimed:
            moved[index] = unclaimed.pop(old_key)
    return moved


def _store_facts(ledger: Ledger, subjects: Iterable[_Subject]) -> None:
    """Write back what changed about each subject (keys and times only)."""
    written = 0
    with ledger.transaction():
        for subject in subjects:
            view, stored, facts = subject.view, subject.stored, subject.view.facts
            changes: dict[str, Any] = {}
            if subject.consent is not None and (stored is None or stored.consent != subject.consent):
                changes.update(consent=subject.consent, consent_at=subject.consent_at)
            if facts.opted_out_at != (stored.opted_out_at if stored else None):
                changes["opted_out_at"] = facts.opted_out_at
            if facts.opted_in_at != (stored.opted_in_at if stored else None):
                changes["opted_in_at"] = facts.opted_in_at
            if facts.resubscribe_refused != (stored.resubscribe_refused if stored else False):
                changes["resubscribe_refused"] = facts.resubscribe_refused
            if subject.synced_email_key is not None and subject.synced_email_key != (
                stored.synced_email_key if stored else None
            ):
                changes["synced_email_key"] = subject.synced_email_key
            if changes or (stored is None and view.client is not None):
                ledger.upsert_subject(view.subject_key, **changes)
                written += 1
            if subject.link_email_key is not None and stored is None:
                ledger.link_identifier(subject.link_email_key, "email", view.subject_key)
    log.info("resync_facts_stored", subjects=written)


def _record_results(
    ledger: Ledger, planned: list[Planned], task_ids: list[int], keys: SubjectKeys
) -> None:
    """Learn from the finished Mailchimp tasks what the next run must know.

    A ``subscribe`` or ``move_email`` that is done puts the member under the
    client's address: that address becomes the subject's synced one (R6). A
    ``subscribe`` Mailchimp refused (compliance state) waits for the person (R2).
    """
    with ledger.transaction():
        for item, task_id in zip(planned, task_ids):
            action = item.action
            if action.kind not in ("subscribe", "move_email"):
                continue
            task = ledger.task(task_id)
            if task is None:
                continue
            if task.state == "done":
                address = action.new_email if action.kind == "move_email" else action.email
                email_key = _email_key(keys, address)
                if email_key is not None:
                    ledger.upsert_subject(action.subject_key, synced_email_key=email_key)
                    ledger.link_identifier(email_key, "email", action.subject_key)
            elif task.state == "needs_person" and task.last_error == RESUBSCRIBE_REFUSED_REASON:
                ledger.upsert_subject(action.subject_key, resubscribe_refused=True)


def _email_key(keys: SubjectKeys, address: str | None) -> str | None:
    """The keyed hash of an address, or None when it is not a usable one."""
    email = _normalised(address) if address else None
    return keys.email(email) if email else None


def _newest(current: ClientRecord | None, candidate: ClientRecord) -> ClientRecord:
    """The more recently updated of two clients (the first seen wins a tie)."""
    if current is None or candidate.updated_at > current.updated_at:
        return candidate
    return current


def _normalised(email: str) -> str | None:
    """The normalised address, or None when it is not a plausible one."""
    try:
        return normalise_email(email)
    except IdentifierError:
        return None
