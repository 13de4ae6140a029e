"""Data-subject requests: erasure (R3), restriction (R7), their steps and evidence (R11).

Filing a request (``syncd request erase|restrict|unrestrict``):

1. :func:`resolve` finds the person in Phorest from an email, a phone number
   or a client id (any combination): every record of theirs (a merged-away
   duplicate counts as the same person) and every identifier those records
   hold. Two people behind the identifiers is refused with the client ids to
   choose from, never guessed.
2. :func:`syncd.engine.plan_addresses` reads the person's addresses in
   Mailchimp (outside any transaction).
3. :func:`file` writes, in one transaction: the request (due one calendar
   month later, ``[policy] request_deadline_months``), the person's identifier
   keys (linked to their subject, and for an erasure put on the suppression
   list), or the restriction flag; then the engine plans the person's
   addresses as they now stand (an erasure plans Mailchimp ``erase``, a
   restriction ``unsubscribe``, lifting it whatever consent now asks for) and
   every planned task becomes a step of the request. An erasure also gets one
   GA deletion per client id (or address, with ``identity = "email"``), a
   Phorest step per record ("Client actions › Forget": Phorest has no API for
   it) and one step per ``[[manual_processors]]`` entry.

Then :func:`advance` (the daemon, every few seconds; the CLI after running the
tasks itself) closes task steps whose task is final, verifies the Phorest steps
by reading the client (forgotten, deleted or gone closes the step; syncd is
the one that confirms it), and completes a request once every step is done.
A person closes manual steps with :func:`confirm`; :func:`extend` and
:func:`cancel` do what their names say. Every step's evidence (the vendor's
request id, GA's deletion time, who confirmed) goes to the audit trail with
the request's id.

Personal data: identifiers live in memory while a request is filed and in the
pending tasks' payloads; the ledger keeps their keyed hashes, Phorest client
ids, request ids and staff names. Errors name client ids, never an address,
a number or a name.
"""

from __future__ import annotations

import calendar
import getpass
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from connectors.base import Action, ClientRecord
from syncd.errors import IdentifierError, SyncdError
from syncd.identity import SubjectKeys, normalise_client_id, normalise_email, normalise_phone
from syncd.ledger import MAX_EXTENSION_MONTHS, Ledger, Request, RequestStep
from syncd.reconcile import ERASED_CLIENT_STATES, ERASURE_SUPPRESSION, Planned
from syncd.tasks import enqueue

log = structlog.get_logger(__name__)

REQUEST_ACTIONS = ("erase", "restrict", "unrestrict")
PHOREST = "phorest"
MAILCHIMP = "mailchimp"
ANALYTICS = "google_analytics"
PHOREST_FORGET = "Client actions › Forget"
# Who confirms a step syncd verified itself by reading Phorest.
VERIFIED_BY = "syncd (verified in Phorest)"
RULES = {"erase": "R3", "restrict": "R7", "unrestrict": "R7", "export": "R8"}
# Closed Phorest states in which the client's personal data is gone.
FORGOTTEN_STATES = frozenset({"forgotten", "deleted"})


class RequestError(SyncdError):
    """A request cannot be filed or changed as asked (one line, no personal data)."""


@dataclass(frozen=True)
class Person:
    """Who a request is about, as Phorest knows them.

    Attributes:
        subject_key: the primary record's client-id key, or the address's key
            for a person Phorest does not hold.
        source: which identifiers the request was filed with (``email+phone``).
        clients: the person's Phorest records, the surviving one first.
        emails: every normalised address of theirs (given or on a record).
        phones: every E.164 number of theirs.
        shared_emails: those of ``emails`` another live Phorest client also
            uses: they are not suppressed or erased (the other client's member
            stays), the request notes it.
        holders: address -> every Phorest client holding it, as read while
            resolving (so filing need not ask Phorest again).
    """

    subject_key: str
    source: str
    clients: tuple[ClientRecord, ...] = ()
    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    shared_emails: tuple[str, ...] = ()
    holders: Mapping[str, tuple[ClientRecord, ...]] = field(default_factory=dict)

    @property
    def primary(self) -> ClientRecord | None:
        """The surviving Phorest record, or None."""
        return self.clients[0] if self.clients else None

    @property
    def own_emails(self) -> tuple[str, ...]:
        """The addresses that are the person's alone."""
        return tuple(e for e in self.emails if e not in self.shared_emails)


def resolve(
    phorest: Any,
    keys: SubjectKeys,
    *,
    email: str | None = None,
    phone: str | None = None,
    client_id: str | None = None,
) -> Person:
    """Find the one person the identifiers name, through Phorest.

    Args:
        phorest: the Phorest connector (``client``, ``find_by_email``, ``find_by_phone``).
        keys: the subject keys (and the default phone region).
        email / phone / client_id: what the request was filed with (at least one).

    Returns:
        The person. An email Phorest does not hold names a person without records.

    Raises:
        RequestError: an identifier is malformed, a client id or phone number
            is unknown to Phorest, the identifiers name two different clients,
            or one names several.
        ConnectorError: Phorest could not be read.
    """
    if not (email or phone or client_id):
        raise RequestError("give --email, --phone or --client-id")
    given_email = _parsed(normalise_email, email, "--email: not a valid email address")
    given_phone = _parsed(lambda v: normalise_phone(v, keys.default_phone_region), phone,
                          "--phone: not a valid phone number")  # fmt: skip
    given_id = _parsed(normalise_client_id, client_id, "--client-id: empty")
    found: dict[str, set[str]] = {}
    records: dict[str, ClientRecord] = {}

    def keep(kind: str, matches: Iterable[ClientRecord]) -> None:
        roots = found.setdefault(kind, set())
        for record in matches:
            records[record.client_id] = record
            roots.add(_root(record))

    if given_id is not None:
        record = phorest.client(given_id)
        if record is None:
            raise RequestError(f"no Phorest client has id {given_id}")
        keep("client_id", [record])
    by_email: list[ClientRecord] = []
    if given_email is not None:
        by_email = phorest.find_by_email(given_email)
        keep("email", by_email)
    if given_phone is not None:
        spellings = [*_spellings(given_phone), (phone or "").strip()]
        keep("phone", [r for r in phorest.find_by_phone(given_phone, spellings)
                       if _same_phone(r.mobile, given_phone, keys)])  # fmt: skip
    named = {kind: roots for kind, roots in found.items() if roots}
    chosen = _one_person(named)
    source = "+".join(kind for kind in ("email", "phone", "client_id") if kind in found)
    if chosen is None:
        if given_email is None:
            raise RequestError("no Phorest client has this phone number")
        return Person(keys.email(given_email), source, emails=(given_email,),
                      phones=(given_phone,) if given_phone else (),
                      holders={given_email: tuple(by_email)})
    if chosen not in records:
        survivor = phorest.client(chosen)
        if survivor is not None:
            records[chosen] = survivor
    mine = sorted((r for r in records.values() if _root(r) == chosen),
                  key=lambda r: (r.client_id != chosen, r.client_id))
    emails = _unique([given_email, *(_email_of(r) for r in mine)])
    phones = _unique([given_phone, *(_phone_of(r, keys) for r in mine)])
    shared = []
    held: dict[str, tuple[ClientRecord, ...]] = {}
    for address in emails:
        holders = by_email if address == given_email else phorest.find_by_email(address)
        held[address] = tuple(r for r in holders if _email_of(r) == address)
        if any(_root(r) != chosen and r.state not in ERASED_CLIENT_STATES
               for r in held[address]):
            shared.append(address)
    return Person(keys.client_id(chosen), source, tuple(mine), tuple(emails), tuple(phones),
                  tuple(shared), held)


def person_of(
    record: ClientRecord,
    keys: SubjectKeys,
    *,
    source: str,
    holders: Mapping[str, Sequence[ClientRecord]],
    merged: Sequence[ClientRecord] = (),
    leaving: Collection[str] = (),
) -> Person:
    """The person one Phorest record stands for, from records already read (no calls).

    What :func:`resolve` finds by asking Phorest, built from a full client scan
    instead (the retention purge reads every client anyway): the record, the
    duplicates merged into it, their addresses and numbers, and which
    addresses another live client shares.

    Args:
        record: the person's surviving record.
        keys: the subject keys (and the default phone region).
        source: what the request is filed from (``retention``).
        holders: normalised address -> every record of the scan at it
            (archived, deleted and merged ones included).
        merged: the records merged into ``record``.
        leaving: client ids erased in the same run: an address only they share
            with the person is not kept for them.
    """
    mine = [record, *sorted((r for r in merged if r.merged_into == record.client_id),
                            key=lambda r: r.client_id)]  # fmt: skip
    emails = _unique([_email_of(r) for r in mine])
    phones = _unique([_phone_of(r, keys) for r in mine])
    held = {address: tuple(r for r in holders.get(address, ()) if _email_of(r) == address)
            for address in emails}  # fmt: skip
    shared = [address for address in emails
              if any(_root(r) != record.client_id and r.state not in ERASED_CLIENT_STATES
                     and _root(r) not in leaving for r in held[address])]  # fmt: skip
    return Person(keys.client_id(record.client_id), source, tuple(mine), tuple(emails),
                  tuple(phones), tuple(shared), held)


def email_of(record: ClientRecord) -> str | None:
    """The record's address, normalised, or None (none, or not a usable address)."""
    return _email_of(record)


def _one_person(named: Mapping[str, set[str]]) -> str | None:
    """The one root client id every identifier that matched agrees on, or None if none matched.

    Raises:
        RequestError: two identifiers name different clients, or one names several.
    """
    if not named:
        return None
    kinds = list(named)
    common = set.intersection(*named.values())
    if not common:
        described = "; ".join(f"the {_label(k)} is client {', '.join(sorted(named[k]))}"
                              for k in kinds)  # fmt: skip
        raise RequestError(f"the identifiers belong to different Phorest clients ({described}); "
                           "check them with the person")
    if len(common) > 1:
        what = " and ".join(_label(k) for k in kinds)
        raise RequestError(f"the {what} matches {len(common)} Phorest clients "
                           f"({', '.join(sorted(common))}); choose one with --client-id")
    return next(iter(common))


def file(
    ledger: Ledger,
    settings: Any,
    keys: SubjectKeys,
    kind: str,
    person: Person,
    queue: Callable[[], list[tuple[Planned, int]]],
    *,
    filed_by: str | None = None,
    note: str | None = None,
    now: datetime,
    analytics: Any = None,
) -> int:
    """Record a request and everything it sets in motion, in one transaction.

    Args:
        ledger: the ledger.
        settings: the configuration (``[policy]``, ``[[manual_processors]]``).
        keys: the subject keys.
        kind: ``erase``, ``restrict`` or ``unrestrict``.
        person: from :func:`resolve`.
        queue: from :func:`syncd.engine.plan_addresses` over ``person.own_emails``.
        filed_by: who filed it (default: the login name).
        note: free text kept with the request.
        now: the time received.
        analytics: the GA connector when GA is configured (its ``identity``).

    Returns:
        The request's id.

    Raises:
        RequestError: ``kind`` is not a request syncd files this way.
        LedgerError: SQLite failed (nothing is written).
    """
    if kind not in REQUEST_ACTIONS:
        raise RequestError(f"unknown request kind {kind!r}")
    filed_by = filed_by or _login()
    primary = person.primary
    due = add_months(now, settings.policy.request_deadline_months)
    with ledger.transaction():
        request_id = ledger.add_request(kind, person.subject_key, person.source, due, note,
                                        filed_by=filed_by, received_at=now,
                                        client_id=primary.client_id if primary else None)
        ledger.add_audit(person.subject_key, None, f"request_{kind}", f"{RULES[kind]}:request",
                         "filed", request_id=request_id, actor=filed_by,
                         detail=f"filed with {person.source}; shared addresses kept: "
                                f"{len(person.shared_emails)}")  # fmt: skip
        identifiers = _identifier_keys(keys, person)
        for key, id_kind in identifiers:
            ledger.link_identifier(key, id_kind, person.subject_key)
        if kind == "erase":
            for key, _ in identifiers:
                ledger.suppress(key, ERASURE_SUPPRESSION, request_id)
        else:
            for subject_key in {person.subject_key, *(k for k, t in identifiers if t != "phone")}:
                ledger.upsert_subject(subject_key, restricted=kind == "restrict")
        planned = queue()
        steps = 0
        for item, task_id in planned:
            ledger.attach_task(task_id, request_id)
            if kind == "unrestrict":
                # Lifting the flag is the request; what the person's consent then asks
                # for is ordinary sync work (a refused re-subscribe is R2's, see plan()).
                continue
            ledger.add_step(request_id, item.processor, "task", task_id=task_id,
                            client_id=item.action.client_id)
            steps += 1
        if kind == "erase":
            steps += _erasure_steps(ledger, settings, keys, person, request_id, planned, analytics)
        if not steps:
            done = ("restriction lifted; consent decides from now on" if kind == "unrestrict"
                    else "nothing to change anywhere")
            ledger.add_audit(person.subject_key, None, f"request_{kind}", f"{RULES[kind]}:request",
                             "done", request_id=request_id, detail=done)
            ledger.close_request(request_id, "done")
        else:
            _complete(ledger, [request_id], Advanced())
    log.info("request_filed", request_id=request_id, kind=kind, source=person.source,
             steps=steps, clients=len(person.clients))
    return request_id


def _erasure_steps(
    ledger: Ledger,
    settings: Any,
    keys: SubjectKeys,
    person: Person,
    request_id: int,
    planned: Sequence[tuple[Planned, int]],
    analytics: Any,
) -> int:
    """Open an erasure's GA, Mailchimp, Phorest and manual steps; returns how many."""
    opened = 0
    if not any(item.processor == MAILCHIMP for item, _ in planned):
        # Nothing in the audience at the person's addresses: done, and said so.
        step = ledger.add_step(request_id, MAILCHIMP, "task")
        ledger.close_step(step, "done", evidence="no member at the person's addresses")
        opened += 1
    if analytics is not None:
        deletions = _analytics_actions(keys, person, getattr(analytics, "identity", "user_id"))
        ids = enqueue(ledger, [Planned(ANALYTICS, action, "R3", "erasure_request")
                               for action in deletions], request_id=request_id)  # fmt: skip
        for action, task_id in zip(deletions, ids):
            ledger.attach_task(task_id, request_id)  # a task queued earlier (R5) serves it too
            ledger.add_step(request_id, ANALYTICS, "task", task_id=task_id,
                            client_id=action.client_id)
            opened += 1
        if not deletions:
            step = ledger.add_step(request_id, ANALYTICS, "task")
            if person.clients:  # identity email, and every address is shared with a client
                ledger.close_step(step, "failed", evidence="no address of the person's own to "
                                  "name them in GA; delete by hand, then confirm")
            else:  # GA knows people by Phorest client id, and this person has none
                ledger.close_step(step, "done", evidence="not a Phorest client: GA holds "
                                  f"nothing under {analytics.identity} for the person")
            opened += 1
    for client in person.clients:
        step = ledger.add_step(request_id, PHOREST, "manual", client_id=client.client_id,
                               instructions=forget_instructions(client.client_id))
        if client.state in FORGOTTEN_STATES:
            ledger.close_step(step, "done", confirmed_by=VERIFIED_BY,
                              evidence=f"client {client.client_id} already {client.state}")
        opened += 1
    client_id = person.primary.client_id if person.primary else None
    for processor in settings.manual_processors:
        who = f"client id {client_id}" if client_id else "the person (not in Phorest)"
        ledger.add_step(request_id, processor.name, "manual", client_id=client_id,
                        instructions=f"{processor.instructions} ({who}, request #{request_id})")
        opened += 1
    return opened


def forget_instructions(client_id: str) -> str:
    """What staff must do in Phorest for one client."""
    return f"In Phorest, open client {client_id} and use {PHOREST_FORGET}"


def _analytics_actions(keys: SubjectKeys, person: Person, identity: str) -> list[Action]:
    """The GA deletions that name the person: one per client id, or per own address."""
    if identity == "email":
        return [Action("erase", keys.email(email), email=email) for email in person.own_emails]
    return [Action("erase", keys.client_id(c.client_id), client_id=c.client_id)
            for c in person.clients]  # fmt: skip


@dataclass
class Advanced:
    """What one :func:`advance` changed.

    Attributes:
        closed_steps: steps closed (done or failed).
        verified: Phorest steps closed because Phorest shows the client forgotten.
        completed: requests completed.
        last_verified: where a rotation resumes (``verify_after``) next time: the
            id of the last Forget step read, or 0 when this call read to the end
            (the next starts again from the first, so a rotation never skips a turn).
    """

    closed_steps: int = 0
    verified: int = 0
    completed: list[int] = field(default_factory=list)
    last_verified: int = 0


def advance(
    ledger: Ledger, *, phorest: Any = None, now: datetime,
    on_read: Callable[[], None] | None = None,
    verify_after: int = 0, verify_limit: int | None = None,
) -> Advanced:  # fmt: skip
    """Close the steps whose work is over and complete the requests whose steps all are.

    Cheap without ``phorest`` (the daemon calls it every second): only task
    steps whose task is final are read. With ``phorest``, each waiting Forget
    step's client is read (one call each): forgotten, deleted or gone closes it.

    Args:
        ledger: the ledger.
        phorest: the Phorest connector, to verify Forget steps (None: not this time).
        now: the current time (unused by the ledger, kept for the log).
        on_read: called after each Phorest read. Reads add up (a thousand open
            steps: a minute at Phorest's pace), so the daemon shows its watchdog
            the job moves, and may stop here: each step closes in its own
            transaction, and the next call completes what this one verified.
        verify_after: verify only Forget steps with a larger id (a rotation:
            see :attr:`Advanced.last_verified`).
        verify_limit: verify at most this many Forget steps (None: all).

    Raises:
        ConnectorError: Phorest could not be read (task steps were still closed).
        LedgerError: SQLite failed.
        Exception: whatever ``on_read`` raised.
    """
    del now
    progress = Advanced()
    touched: set[int] = set()
    for step in ledger.finished_task_steps():
        progress.closed_steps += _close_task_step(ledger, step)
        touched.add(step.request_id)
    _complete(ledger, touched, progress)
    if phorest is not None:
        forgets = ledger.waiting_manual_steps(PHOREST, after_id=verify_after, limit=verify_limit)
        for step in forgets:
            progress.last_verified = step.id
            if not step.client_id:
                continue
            client = phorest.client(step.client_id)
            if on_read is not None:
                on_read()
            state = "gone" if client is None else client.state
            if client is not None and state not in FORGOTTEN_STATES:
                continue
            with ledger.transaction():
                if ledger.close_step(step.id, "done", confirmed_by=VERIFIED_BY,
                                     evidence=f"Phorest shows client {step.client_id} {state}"):
                    _step_audit(ledger, step, "done", f"verified: client {state} in Phorest")
                    progress.verified += 1
        _complete(ledger, {s.request_id for s in forgets}, progress)
        if verify_limit is None or len(forgets) < verify_limit:
            progress.last_verified = 0  # read to the end: start from the first next time
    if progress.closed_steps or progress.verified or progress.completed:
        log.info("requests_advanced", closed_steps=progress.closed_steps,
                 verified=progress.verified, completed=len(progress.completed))
    return progress


def _close_task_step(ledger: Ledger, step: RequestStep) -> int:
    task = ledger.task(step.task_id) if step.task_id is not None else None
    if task is None or task.state in ("pending", "in_flight"):
        return 0
    evidence = ledger.task_evidence(task.id)
    receipt = "; ".join(part for part in (
        f"request id {task.vendor_request_id}" if task.vendor_request_id else None,
        evidence.detail if evidence is not None and task.state == "done" else None,
    ) if part) or task.state  # fmt: skip
    state = "done" if task.state == "done" else "failed"
    if state == "failed":
        receipt = f"task {task.id} {task.state}: {task.last_error or 'no reason given'}"
    return int(ledger.close_step(step.id, state, evidence=receipt))


def _complete(ledger: Ledger, request_ids: Iterable[int], progress: Advanced) -> None:
    for request_id in sorted(set(request_ids)):
        request = ledger.request(request_id)
        if request is None or request.state != "open":
            continue
        steps = ledger.steps(request_id)
        if not steps or any(s.state != "done" for s in steps):
            continue
        with ledger.transaction():
            if ledger.close_request(request_id, "done"):
                ledger.add_audit(request.subject_key, None, f"request_{request.kind}",
                                 f"{RULES.get(request.kind, 'R11')}:request", "done",
                                 request_id=request_id,
                                 detail=f"all {len(steps)} step(s) done")  # fmt: skip
                progress.completed.append(request_id)


def confirm(
    ledger: Ledger, settings: Any, request_id: int, processor: str, *, by: str | None,
    now: datetime,
) -> Advanced:  # fmt: skip
    """A person confirms that ``processor``'s step of a request is done.

    A manual step (Phorest's Forget, a manual processor) is closed; so is a
    task step that failed (the work was finished by hand). A task step syncd
    is still carrying out is not a person's to close.

    Raises:
        RequestError: no such open request, no step for the processor, the
            step is syncd's to finish, already done, or ``by`` may not confirm it.
        LedgerError: SQLite failed.
    """
    request = open_request(ledger, request_id)
    steps = [s for s in ledger.steps(request_id) if s.processor == processor]
    if not steps:
        have = sorted({s.processor for s in ledger.steps(request_id)})
        raise RequestError(f"request #{request_id} has no {processor!r} step "
                           f"(its processors: {', '.join(have) or 'none'})")
    by = (by or _login()).strip()
    manual = settings.manual_processor(processor)
    if manual is not None and manual.confirmers and by not in manual.confirmers:
        raise RequestError(f"{by!r} may not confirm {processor} (allowed: "
                           f"{', '.join(manual.confirmers)}; give --by NAME)")
    closable = [s for s in steps if s.state == "failed" or (s.kind == "manual" and s.state == "waiting")]
    if not closable:
        if all(s.state == "done" for s in steps):
            raise RequestError(f"the {processor} step of request #{request_id} is already done")
        raise RequestError(f"syncd carries out the {processor} step of request #{request_id} "
                           "itself (see syncd request show); nothing to confirm")
    with ledger.transaction():
        for step in closable:
            ledger.close_step(step.id, "done", confirmed_by=by, evidence=f"confirmed by {by}")
            _step_audit(ledger, step, "done", f"confirmed by {by}", subject_key=request.subject_key,
                        actor=by)
    log.info("request_step_confirmed", request_id=request_id, processor=processor,
             steps=len(closable))
    progress = Advanced(closed_steps=len(closable))
    _complete(ledger, [request_id], progress)
    del now
    return progress


def extend(
    ledger: Ledger, settings: Any, request_id: int, months: int, reason: str, *,
    by: str | None = None,
) -> Request:
    """Extend a request's deadline under UK GDPR Art. 12(3) (two further months at most).

    ``by`` is who extends it (default: the login name), kept in the audit trail.

    Raises:
        RequestError: no such open request, no reason, or more than two months in all.
        LedgerError: SQLite failed.
    """
    request = open_request(ledger, request_id)
    reason = " ".join(reason.split())
    if not reason:
        raise RequestError("--reason must say why the request needs more time")
    if months < 1:
        raise RequestError(f"--months must be 1 or {MAX_EXTENSION_MONTHS}")
    total = request.extended_months + months
    if total > MAX_EXTENSION_MONTHS:
        raise RequestError(
            f"a request can be extended by at most {MAX_EXTENSION_MONTHS} months in all "
            f"(UK GDPR Art. 12(3)); request #{request_id} already has "
            f"{request.extended_months}")
    due = add_months(request.received_at, settings.policy.request_deadline_months + total)
    with ledger.transaction():
        ledger.extend_request(request_id, total, due, reason)
        ledger.add_audit(request.subject_key, None, "extend_request", "R11:art_12_3", "done",
                         request_id=request_id, actor=(by or _login()).strip(),
                         detail=f"+{months} month(s), due {due:%Y-%m-%d}")  # fmt: skip
    extended = ledger.request(request_id)
    assert extended is not None
    return extended


def cancel(ledger: Ledger, request_id: int, reason: str, *, by: str | None = None) -> Request:
    """Cancel an open request: its waiting work stops.

    ``by`` is who cancels it (default: the login name), kept in the audit trail.

    Pending tasks are cancelled and waiting steps closed. An erasure that no
    processor has carried out yet gives its identifiers back (the suppression
    entries it added are removed); once anything was erased they stay, so the
    person is never re-added half-erased.

    Raises:
        RequestError: no such open request, or no reason.
        LedgerError: SQLite failed.
    """
    request = open_request(ledger, request_id)
    reason = " ".join(reason.split())
    if not reason:
        raise RequestError("--reason must say why the request is cancelled")
    with ledger.transaction():
        cancelled = 0
        for task in ledger.tasks_for_request(request_id):
            if task.state == "pending":
                cancelled += ledger.finish(task.id, "cancelled", error="request_cancelled")
        steps = ledger.steps(request_id)
        # A done manual step is an erasure too: Phorest's Forget, or a manual processor's
        # (paper forms shredded) that a person confirmed or syncd verified.
        erased = any(s.state == "done" and (s.task_id is not None or s.kind == "manual")
                     for s in steps) or any(
            t.state in ("done", "in_flight") for t in ledger.tasks_for_request(request_id))
        for step in steps:
            if step.state in ("waiting", "failed"):
                ledger.close_step(step.id, "cancelled", evidence="request cancelled")
        lifted = ledger.lift_suppression(request_id) if request.kind == "erase" and not erased else 0
        note = f"{request.note}; cancelled: {reason}" if request.note else f"cancelled: {reason}"
        ledger.close_request(request_id, "cancelled", note=note)
        ledger.add_audit(request.subject_key, None, f"request_{request.kind}",
                         f"{RULES.get(request.kind, 'R11')}:request", "cancelled",
                         request_id=request_id, actor=(by or _login()).strip(),
                         detail=f"tasks cancelled: {cancelled}; suppression entries lifted: "
                                f"{lifted}")  # fmt: skip
    log.info("request_cancelled", request_id=request_id, tasks=cancelled, lifted=lifted)
    closed = ledger.request(request_id)
    assert closed is not None
    return closed


def open_request(ledger: Ledger, request_id: int) -> Request:
    """The request, which must exist and be open.

    Raises:
        RequestError: unknown, or already closed.
    """
    request = ledger.request(request_id)
    if request is None:
        raise RequestError(f"no request #{request_id} (see syncd requests --all)")
    if request.state != "open":
        raise RequestError(f"request #{request_id} is already {request.state}")
    return request


def add_months(moment: datetime, months: int) -> datetime:
    """The same day ``months`` calendar months later (the month's last day if it has none)."""
    year, month = divmod(moment.month - 1 + months, 12)
    year += moment.year
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def processor_states(steps: Sequence[RequestStep]) -> dict[str, str]:
    """Each processor's state over its steps: failed, waiting, cancelled or done."""
    states: dict[str, list[str]] = {}
    for step in steps:
        states.setdefault(step.processor, []).append(step.state)
    order = ("failed", "waiting", "cancelled", "done")
    return {p: next(s for s in order if s in found) for p, found in states.items()}


def days_left(request: Request, now: datetime) -> int:
    """Whole days until the deadline (negative once overdue)."""
    return (request.due_at - now) // timedelta(days=1)


def _step_audit(ledger: Ledger, step: RequestStep, outcome: str, detail: str, *,
                subject_key: str | None = None, actor: str | None = None) -> None:  # fmt: skip
    if subject_key is None:
        request = ledger.request(step.request_id)
        subject_key = request.subject_key if request is not None else None
    action = "forget_client" if step.processor == PHOREST else "manual_step"
    ledger.add_audit(subject_key, step.processor, action, "R3:manual_step", outcome,
                     request_id=step.request_id, detail=detail, actor=actor)


def _identifier_keys(keys: SubjectKeys, person: Person) -> list[tuple[str, str]]:
    """(key, kind) of every identifier the request covers; shared addresses left out."""
    out = [(keys.email(e), "email") for e in person.own_emails]
    out += [(keys.phone(p), "phone") for p in person.phones]
    out += [(keys.client_id(c.client_id), "client_id") for c in person.clients]
    return out


def _parsed(normalise: Callable[[str], str], value: str | None, message: str) -> str | None:
    if value is None:
        return None
    try:
        return normalise(value)
    except IdentifierError:
        raise RequestError(message) from None


def _root(record: ClientRecord) -> str:
    """The client a record stands for: the survivor of a merge, else itself."""
    return record.merged_into or record.client_id


def _email_of(record: ClientRecord) -> str | None:
    try:
        return normalise_email(record.email) if record.email else None
    except IdentifierError:
        return None


def _phone_of(record: ClientRecord, keys: SubjectKeys) -> str | None:
    try:
        return normalise_phone(record.mobile, keys.default_phone_region) if record.mobile else None
    except IdentifierError:
        return None


def _same_phone(stored: str | None, phone: str, keys: SubjectKeys) -> bool:
    if not stored:
        return False
    try:
        return normalise_phone(stored, keys.default_phone_region) == phone
    except IdentifierError:
        return False


def _spellings(phone: str) -> list[str]:
    """Ways a number may be stored besides E.164: without the +, national, international."""
    import phonenumbers

    number = phonenumbers.parse(phone)
    formats = (phonenumbers.PhoneNumberFormat.NATIONAL,
               phonenumbers.PhoneNumberFormat.INTERNATIONAL)  # fmt: skip
    spelled = [phonenumbers.format_number(number, f) for f in formats]
    return [phone.lstrip("+"), *spelled, *(s.replace(" ", "") for s in spelled)]


def _unique(values: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def _label(kind: str) -> str:
    return {"email": "email", "phone": "phone number", "client_id": "client id"}[kind]


def login_name() -> str:
    """Who runs syncd, for a request's ``filed_by`` when ``--by`` is not given."""
    return _login()


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
