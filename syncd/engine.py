"""The engine: reconcile Phorest and Mailchimp in full (:func:`resync`) or by change (:func:`poll`).

:func:`resync` reads everything both systems hold, builds one
:class:`~syncd.reconcile.SubjectView` per email address, lets
:func:`~syncd.reconcile.plan` decide, and (unless it is a dry run) queues the
actions as ledger tasks and runs them (STYLE 6: the task is written before the
call, the outcome after). :func:`poll` does the same for the addresses the two
change feeds show since the last poll or resync.

Which Phorest records govern an address is :func:`syncd.reconcile.govern`'s
decision, the same in a full resync, a poll and the webhook inbox: active
records first, archived ones only when no active record uses the address,
dead ones only when no live one does. The view's subject is the governing
record created first (its names go to Mailchimp); every other record at the
address rides along as a housemate with its own subject, so a Mailchimp
opt-out withdraws consent on each of them and each keeps its own consent facts.

Email changes (R6): the ledger keeps, per subject, the keyed hash of the address
its member was last seen at or put under (``synced_email_key``). A consenting
client with no member at their address whose synced key matches a member no
client holds any more gets that member as the view's member, so :func:`plan`
moves it (``move_email``) rather than subscribing a new one and unsubscribing
the old as an orphan. The key moves to the new address once the move is done.

Memory stays flat whatever the audience: what both systems hold goes into a
scratch store (:class:`~syncd.ledger.Scratch`, an anonymous temporary SQLite
database that leaves nothing on disk, even when the process is killed) keyed
by each address's keyed hash, and is planned from there a batch of addresses
at a time, in key order (:func:`_subject_batches`); a poll's few addresses
take the same path.

Personal data: addresses and names live only in memory and in the scratch
store while the engine runs, and in pending task payloads (scrubbed when
final). The ledger's subject rows hold HMAC keys and times; the result holds
Phorest client ids, never emails.
"""

from __future__ import annotations

import contextvars
import marshal
import queue
import threading
from collections import Counter
from contextlib import ExitStack
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import structlog

import connectors as registry
from connectors.base import ClientRecord, MemberRecord, ReadableConnector
from syncd.errors import ConfigError, IdentifierError
from syncd.identity import SubjectKeys, normalise_email
from syncd.ledger import Ledger, Scratch, SubjectFacts
from syncd.reconcile import (
    ERASED_CLIENT_STATES,
    ERASURE_SUPPRESSION,
    KEPT_FOR_ANOTHER_CLIENT,
    MARKETED_STATUSES,
    OPTED_OUT_STATUSES,
    Governance,
    Housemate,
    LedgerFacts,
    Planned,
    SubjectView,
    govern,
    plan,
    plan_analytics_erasure,
)
from syncd.retry import RetryPolicy
from syncd.tasks import BackgroundRun, RunReport, enqueue, run_due

log = structlog.get_logger(__name__)

PROCESSORS = ("phorest", "mailchimp")
# Processors syncd writes to but cannot read: used when configured and enabled.
WRITE_ONLY_PROCESSORS = ("google_analytics",)
ANALYTICS = "google_analytics"
# A suppressed person Phorest shows with consent again: one alert per client.
SUPPRESSED_CONSENT = "suppressed_consent"
PROGRESS_EVERY_RECORDS = 200
PHOREST_CURSOR = "phorest.clients"
MAILCHIMP_CURSOR = "mailchimp.members"
# Past this many changed addresses (two lookups each), a poll reads everything.
POLL_MAX_ADDRESSES = 300
POLL_LOOKUP_WORKERS = 8
# A full read: records handed from each side's reading thread at a time, and how
# many such chunks a side may read ahead of the indexing (about one page each).
READ_CHUNK_RECORDS = 200
READ_AHEAD_CHUNKS = 8
READ_AHEAD_POLL_SECONDS = 0.05
# Per-action rows a result keeps (the counts cover every action): a resync of a
# million clients plans hundreds of thousands, and holding them all would make
# memory grow with the audience again.
ROWS_KEPT = 10_000
# Addresses planned (and their facts stored and tasks queued) at a time.
PLAN_BATCH_ADDRESSES = 500
# Processors whose tasks run while the rest of the plan is made, each on a
# thread of its own (full batches only until the plan is complete): Phorest's
# one call per write is the longest part of a large resync, and Mailchimp's
# batches wait seconds for their results.
RUN_WHILE_PLANNING = ("phorest", "mailchimp")
# Instants go to the scratch store as whole microseconds since this one.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# A refusal the Mailchimp connector reports when only the person can re-subscribe.
RESUBSCRIBE_REFUSED_REASON = "needs_client_resubscribe"

# (stage, done so far, total or None when unknown): stages are "phorest" and
# "mailchimp" (records read), "planned" (actions) and "applied" (tasks finished).
Progress = Callable[[str, int, "int | None"], None]
CountKey = tuple[str, str, str, str]  # processor, action kind, rule, why


def configured(settings: Any) -> dict[str, Any]:
    """The engine's processors (:data:`PROCESSORS` and :data:`WRITE_ONLY_PROCESSORS`)
    the configuration has and enables."""
    return {name: section for name, section in settings.sections()
            if name in (*PROCESSORS, *WRITE_ONLY_PROCESSORS) and section.is_active()}  # fmt: skip


def subject_keys(settings: Any) -> SubjectKeys:
    """The subject keys of a configuration (``[identity]``).

    Raises:
        ConfigError: ``identity.hmac_key`` is not set.
    """
    secret = settings.identity.hmac_key
    if secret is None:
        raise ConfigError(["identity.hmac_key is not set"])
    return SubjectKeys(secret.get_secret_value().encode(), settings.identity.default_phone_region)


def build(settings: Any, *, needed_by: str) -> tuple[dict[str, Any], SubjectKeys]:
    """The connectors and subject keys a resync or a poll needs, from a configuration.

    Phorest and Mailchimp are required (read with :class:`ReadableConnector`);
    Google Analytics joins when its section is configured and enabled.

    Args:
        settings: the loaded configuration.
        needed_by: who asks, for the error lines (``"resync"``, ``"the daemon"``).

    Raises:
        ConfigError: every missing section, and an unset ``identity.hmac_key``, at once.
    """
    sections = configured(settings)
    problems = [f"{needed_by} needs the [{name}] section" for name in PROCESSORS
                if name not in sections]  # fmt: skip
    if settings.identity.hmac_key is None:
        problems.append("identity.hmac_key is not set")
    if problems:
        raise ConfigError(problems)
    built = {name: registry.load(name)(section) for name, section in sections.items()}
    return built, subject_keys(settings)


@dataclass(frozen=True, slots=True)
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
        rows: one row per planned action, in plan order, the first
            :data:`ROWS_KEPT` of them (``rows_left_out`` counts the rest).
        report: the task runner's report (None in a dry run).
        failed: tasks that failed for good in this run.
        dry_run: nothing was changed anywhere.
        clients: Phorest clients read.
        members: Mailchimp members read.
        unusable_addresses: records whose email is not a plausible address (ignored).
        shared: (what shares the address, who governs it) -> addresses, for
            every address more than one Phorest record uses (e.g.
            ("active+archived", "active") -> 3).
        kept: one row per dead record whose member was kept because another
            client still governs its address (not an action: never counted
            as planned), the first :data:`ROWS_KEPT` of them.
        unfinished: planned actions whose task is still pending or in flight at the end.
    """

    counts: dict[CountKey, int]
    rows: list[PlannedRow]
    report: RunReport | None
    failed: int
    dry_run: bool
    clients: int = 0
    members: int = 0
    unusable_addresses: int = 0
    shared: dict[tuple[str, str], int] = field(default_factory=dict)
    kept: list[PlannedRow] = field(default_factory=list)
    unfinished: int = 0
    rows_left_out: int = 0

    @property
    def planned(self) -> int:
        """How many actions were planned."""
        return sum(self.counts.values())

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready summary (client ids, counts and reasons only)."""
        return {
            "dry_run": self.dry_run,
            "clients": self.clients,
            "members": self.members,
            "unusable_addresses": self.unusable_addresses,
            "planned": self.planned,
            "failed": self.failed,
            "unfinished": self.unfinished,
            "counts": [
                {"processor": p, "action": a, "rule": r, "why": w, "count": n}
                for (p, a, r, w), n in sorted(self.counts.items())
            ],
            "rows": [asdict(row) for row in self.rows],
            "rows_left_out": self.rows_left_out,
            "outcomes": self.report.counts if self.report is not None else None,
            "shared_addresses": [
                {"records": records, "governed_by": tier, "count": n}
                for (records, tier), n in sorted(self.shared.items())
            ],
            "kept": [asdict(row) for row in self.kept],
        }


@dataclass(slots=True)
class _Address:
    """What both systems hold at one normalised address (only what planning needs)."""

    clients: dict[str, ClientRecord] = field(default_factory=dict)  # by client id, newest
    member: MemberRecord | None = None


@dataclass(slots=True)
class _Change:
    """What the change feeds showed at one address."""

    clients: list[ClientRecord] = field(default_factory=list)  # the clients that changed
    member: MemberRecord | None = None
    all_clients: bool = False  # ``clients`` is every client at the address (already read)


@dataclass(slots=True)
class _Record:
    """One Phorest record's own facts, as the ledger would write them back."""

    subject_key: str
    client_id: str
    stored: SubjectFacts | None
    consent: bool | None
    consent_at: datetime | None
    opted_in_at: datetime | None
    client_seen: str


@dataclass(slots=True)
class _Subject:
    """One view plus the ledger facts it would write back."""

    view: SubjectView
    stored: SubjectFacts | None
    records: list[_Record]
    governance: Governance
    link_email_key: str | None = None
    synced_email_key: str | None = None


def resync(
    settings: Any,
    ledger: Ledger,
    connectors: Mapping[str, ReadableConnector],
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
    report_progress = progress or _no_progress
    with _Store(keys) as store:
        _read(store, connectors["phorest"].scan(), connectors["mailchimp"].scan(), report_progress)
        result = _reconcile(ledger, connectors, store, dry_run=dry_run, now=now or datetime.now(UTC),
                            progress=report_progress, processors=processors, policy=policy,
                            event="resync")
        if not dry_run and processors is None:
            # Everything was read: the next poll needs only what changed since.
            _set_cursors(ledger, store.cursors())
    return result


def poll(
    ledger: Ledger,
    connectors: Mapping[str, ReadableConnector],
    keys: SubjectKeys,
    *,
    now: datetime | None = None,
    policy: RetryPolicy | None = None,
    progress: Progress | None = None,
) -> ResyncResult:
    """Reconcile what changed in Phorest or Mailchimp since the last poll.

    Reads both change feeds from the ledger's cursors, keeps the changes the
    ledger does not already account for (see :func:`_needs_look`), reads the
    other side of each changed address, and plans, queues and runs what they
    need, exactly as :func:`resync` does for every address. The cursors move
    only once that is done, so a crash means the next poll reads the same
    changes again (the tasks are deduplicated).

    The first poll (no cursor yet) is a :func:`resync`. An answer in which
    Phorest ignored the filter, or more than :data:`POLL_MAX_ADDRESSES` changed
    addresses, is reconciled from a full read: by then that is cheaper.

    Args:
        ledger: the ledger (cursors, facts, tasks).
        connectors: ``"phorest"`` and ``"mailchimp"``; the Mailchimp one must
            offer ``member(email)`` and the Phorest one ``find_by_email(email)``.
        keys: turns identifiers into subject keys.
        now: the current time for retry scheduling (default: the system clock).
        policy: the persisted retry policy for the task runner.
        progress: called as a full read, the planning and the applying advance, as
            :func:`resync` calls it (a caller may raise from it to stop at that point).

    Returns:
        What was planned and done (``clients`` and ``members`` count the records read).

    Raises:
        ConnectorError: a feed or a lookup could not be read; no cursor moves.
        LedgerError: SQLite failed.
    """
    now = now or datetime.now(UTC)
    report_progress = progress or _no_progress
    if not polled_before(ledger):
        log.info("poll_first_is_resync")
        return resync(None, ledger, connectors, keys, now=now, policy=policy, progress=progress)
    phorest, mailchimp = connectors["phorest"], connectors["mailchimp"]
    clients = phorest.changes(ledger.get_cursor(PHOREST_CURSOR))
    members = mailchimp.changes(ledger.get_cursor(MAILCHIMP_CURSOR))
    with _Store(keys) as store:
        full_read = clients.full or members.full
        if not full_read:
            wanted, blank = _needs_look(ledger, keys, clients.records, members.records)
            full_read = len(wanted) > POLL_MAX_ADDRESSES
            if full_read:
                log.info("poll_many_changes", changed_addresses=len(wanted))
            else:
                _look_up(store, ledger, connectors, wanted, blank)
        if full_read:
            log.info("poll_full", phorest_full=clients.full, mailchimp_full=members.full)
            # A feed that answered with everything is already the full read of its side.
            _read(store, clients.records if clients.full else phorest.scan(),
                  members.records if members.full else mailchimp.scan(), report_progress)
        result = _reconcile(ledger, connectors, store, dry_run=False, now=now,
                            progress=report_progress, processors=None, policy=policy,
                            event="poll")
        # After a full read, the newest times seen; the feeds' own cursors otherwise
        # (a looked-up record may be older than the last poll: never move back to it).
        cursors = store.cursors() if full_read else {}
    cursors.update({name: value for name, value in (
        (PHOREST_CURSOR, clients.cursor), (MAILCHIMP_CURSOR, members.cursor)) if value})
    _set_cursors(ledger, cursors)
    return result


def polled_before(ledger: Ledger) -> bool:
    """Whether both change-feed cursors exist (else the next :func:`poll` is a resync)."""
    return all(ledger.get_cursor(name) is not None for name in (PHOREST_CURSOR, MAILCHIMP_CURSOR))


def _set_cursors(ledger: Ledger, cursors: Mapping[str, str]) -> None:
    """Store the change-feed cursors together."""
    with ledger.transaction():
        for name, value in cursors.items():
            ledger.set_cursor(name, value)


def _needs_look(
    ledger: Ledger,
    keys: SubjectKeys,
    clients: Iterable[Any],
    members: Iterable[Any],
) -> tuple[dict[str, _Change], list[ClientRecord]]:
    """The changes the ledger does not already account for.

    Skipped: a client version the ledger already reconciled (the feed's overlap
    window shows changes twice), a client without consent whom the ledger
    already knows without consent at the same address (typically syncd's own
    withdrawal), an opted-out member whose address no subject has, whom syncd
    unsubscribed itself, or whose opt-out the ledger already carried to Phorest,
    and a subscribed member the ledger put there (syncd's own subscribe or move).
    Everything else is looked at: a Phorest change may be consent, a name or an
    address; a Mailchimp one an opt-out or a sign-up.

    Returns:
        normalised address -> what the feeds showed there, and the erased
        clients that no longer show an address (forgotten): their addresses are
        known by key only.
    """
    wanted: dict[str, _Change] = {}
    blank: list[ClientRecord] = []
    client_records = [c for c in clients if isinstance(c, ClientRecord)]
    facts = ledger.subject_facts([keys.client_id(c.client_id) for c in client_records])
    for client in client_records:
        email = _normalised(client.email) if client.email else None
        if email is None:
            if client.state in ERASED_CLIENT_STATES:
                blank.append(client)
            continue
        stored = facts.get(keys.client_id(client.client_id))
        if stored is not None and stored.client_seen == _seen(client):
            continue  # this very version was reconciled (the feed's overlap re-reads it)
        if (client.state not in ERASED_CLIENT_STATES and not client.email_consent
                and stored is not None and stored.consent is False
                and _seen_state(stored.client_seen) == client.state
                and stored.synced_email_key in (None, keys.email(email))):
            continue  # an archiving (or un-archiving) changes who governs: looked at
        wanted.setdefault(email, _Change()).clients.append(client)
    addressed = [(member, email, keys.email(email)) for member in members
                 if isinstance(member, MemberRecord) and (email := _normalised(member.email))]
    subject_of = ledger.subjects_for([email_key for _, _, email_key in addressed])
    member_facts = ledger.subject_facts(list(set(subject_of.values())))
    for member, email, email_key in addressed:
        subject_key = subject_of.get(email_key)
        stored = member_facts.get(subject_key) if subject_key else None
        if member.status in OPTED_OUT_STATUSES and (
            stored is None or stored.unsubscribed_by_syncd
            or (stored.consent is False and stored.opted_out_at is not None)
        ):
            # Nothing to withdraw: no client was ever linked to the address (a new client
            # with it shows in Phorest's feed), syncd unsubscribed the member itself, or
            # the opt-out is on record and was carried to every client at the address.
            continue
        if stored is not None:
            if (member.status == "subscribed" and stored.consent
                    and stored.synced_email_key == email_key
                    and not stored.resubscribe_refused):  # else: the person signed up again
                continue
        wanted.setdefault(email, _Change()).member = member
    return wanted, blank


def _look_up(
    store: _Store,
    ledger: Ledger,
    connectors: Mapping[str, ReadableConnector],
    wanted: Mapping[str, _Change],
    blank: Iterable[ClientRecord],
) -> None:
    """Read both sides of each wanted address into ``store``.

    Phorest: every client holding the address (``find_by_email``), so it is
    governed exactly as in a full resync; a changed client the feed showed
    counts in its newer version. Mailchimp: the member there (one GET unless
    the feed showed it). The lookups run concurrently, within each connector's own limits. Then
    the members at addresses the ledger knows only by key (a moved client's
    previous address, an erased client's): those take one scan of the
    audience, stopped as soon as all are found.
    """
    phorest: Any = connectors["phorest"]
    mailchimp: Any = connectors["mailchimp"]
    store.add_clients(blank)

    def read(item: tuple[str, _Change]) -> tuple[list[Any], MemberRecord | None]:
        email, change = item
        clients = change.clients if change.all_clients else [
            *change.clients, *phorest.find_by_email(email)]
        member = change.member if change.member is not None else mailchimp.member(email)
        return clients, member

    with ThreadPoolExecutor(max_workers=POLL_LOOKUP_WORKERS) as pool:
        for clients, member in pool.map(read, wanted.items()):
            store.add_clients(clients)
            if member is not None:
                store.add_members((member,))
    by_key: set[str] = set()
    for pairs in _move_candidates(store, ledger):
        by_key.update(old_key for old_key, _new_key in pairs)  # the clients' previous addresses
    for chunk in store.scratch.dead_batches():
        for dead_key, _record in chunk:
            by_key.update(ledger.identifier_keys(dead_key, "email"))
    by_key -= {email_key for email_key, _clients, _member in store.scratch.at(sorted(by_key))}
    if not by_key:
        return
    log.info("poll_member_search", keys=len(by_key))
    for member in mailchimp.scan():
        email_key = _email_key(store.keys, member.email)
        if email_key in by_key:
            by_key.discard(email_key)
            store.add_members((member,))
            if not by_key:
                return


def _reconcile(
    ledger: Ledger,
    connectors: Mapping[str, ReadableConnector],
    store: _Store,
    *,
    dry_run: bool,
    now: datetime,
    progress: Progress,
    processors: Collection[str] | None,
    policy: RetryPolicy | None,
    event: str,
) -> ResyncResult:
    """Plan what the addresses read need; unless a dry run, queue and run it.

    Shared by :func:`resync` (every address) and :func:`poll` (the changed ones).
    The addresses are planned a batch at a time in key order (see
    :func:`_subject_batches`), each batch's facts stored and its tasks queued
    before the next is read, so memory holds one batch, whatever the audience.
    """
    wanted = set(processors) if processors is not None else set(connectors)
    runners = {name: connector for name, connector in connectors.items() if name in wanted}
    early = {name: runners[name] for name in RUN_WHILE_PLANNING
             if name in runners and not dry_run}  # fmt: skip
    policy = policy or RetryPolicy()
    with ExitStack() as stack:
        background = {name: stack.enter_context(BackgroundRun(
            ledger, {name: connector}, policy, store.keys, now=now))
            for name, connector in early.items()}  # fmt: skip
        tally = _plan_all(ledger, connectors, store, wanted, background, dry_run=dry_run,
                          progress=progress)
        stats = dict(store.stats)
        # A quiet poll every minute is not news: only work done is logged at info.
        quiet = log.debug if not tally.planned and event == "poll" else log.info
        quiet(f"{event}_planned", planned=tally.planned, dry_run=dry_run,
              shared_addresses=sum(tally.shared.values()), kept_for_another_client=tally.kept_total,
              **stats)
        if dry_run:
            return ResyncResult(dict(tally.counts), tally.rows, None, 0, True, **stats,
                                **tally.extra)
        _suppress_dead(ledger, store)
        report = _apply(ledger, runners, background, policy, store.keys, now=now,
                        progress=progress, total=tally.planned)
    unfinished = _record_results(ledger, store)
    quiet(f"{event}_done", planned=tally.planned, failed=report.failed, counts=report.counts,
          unfinished=unfinished)
    return ResyncResult(dict(tally.counts), tally.rows, report, report.failed, False, **stats,
                        **tally.extra, unfinished=unfinished)


def _plan_all(
    ledger: Ledger,
    connectors: Mapping[str, ReadableConnector],
    store: _Store,
    wanted: Collection[str],
    background: Mapping[str, BackgroundRun],
    *,
    dry_run: bool,
    progress: Progress,
) -> _Tally:
    """Plan every address in the store (and GA's erasures); unless a dry run, store the
    facts learned and queue the tasks batch by batch, waking the background runs."""
    tally = _Tally()
    pending: set[str] | None = None
    for subjects in _subject_batches(store, ledger):
        planned = [p for s in subjects for p in plan(s.view) if p.processor in wanted]
        tally.add(planned, subjects)
        if not dry_run:
            _store_facts(ledger, subjects)
            store.add_followups(planned, enqueue(ledger, planned))
            for name in {p.processor for p in planned} & set(background):
                background[name].wake()
            if pending is None:
                pending = {request.subject_key for request in ledger.open_requests()
                           if request.kind == "erase"}  # fmt: skip
            _alert_suppressed_consent(ledger, subjects, pending)
        progress("planned", tally.planned, None)
    if ANALYTICS in connectors and ANALYTICS in wanted:
        for planned in _analytics_erasures(ledger, store, connectors[ANALYTICS]):
            tally.add(planned)
            if not dry_run:
                store.add_followups(planned, enqueue(ledger, planned))
    progress("planned", tally.planned, tally.planned)
    return tally


def _apply(
    ledger: Ledger,
    runners: Mapping[str, Any],
    background: Mapping[str, BackgroundRun],
    policy: RetryPolicy,
    keys: SubjectKeys,
    *,
    now: datetime,
    progress: Progress,
    total: int,
) -> RunReport:
    """Run the due tasks: what a background run started goes on there, the rest runs here
    meanwhile; then wait for the background runs. Progress counts both."""
    running = [run for run in background.values() if run.running]
    here = {name: c for name, c in runners.items()
            if name not in background or not background[name].running}  # fmt: skip
    done_here = 0

    def applied(done: int) -> None:
        nonlocal done_here
        done_here = done
        progress("applied", done_here + sum(run.handled for run in running), total)

    applied(0)
    report = run_due(ledger, here, policy, keys, now=now, on_batch=applied)
    for run in running:
        report = report.plus(run.finish(lambda: applied(done_here)))
    return report


@dataclass(slots=True)
class _Tally:
    """What a run planned, batch by batch: the counts and rows of its :class:`ResyncResult`."""

    counts: Counter[CountKey] = field(default_factory=Counter)
    rows: list[PlannedRow] = field(default_factory=list)
    shared: Counter[tuple[str, str]] = field(default_factory=Counter)
    kept: list[PlannedRow] = field(default_factory=list)
    kept_total: int = 0
    planned: int = 0

    @property
    def extra(self) -> dict[str, Any]:
        """The :class:`ResyncResult` fields besides the counts."""
        return {"shared": dict(self.shared), "kept": self.kept[:ROWS_KEPT],
                "rows_left_out": self.planned - len(self.rows)}

    def add(self, planned: Iterable[Planned], subjects: Iterable[_Subject] = ()) -> None:
        for p in planned:
            self.planned += 1
            self.counts[(p.processor, p.action.kind, p.rule, p.why)] += 1
            if len(self.rows) < ROWS_KEPT:  # memory stays flat however much is planned
                self.rows.append(PlannedRow(p.action.client_id or "-", p.processor,
                                            p.action.kind, p.rule, p.why))
        for s in subjects:
            if s.governance.shared:
                self.shared[s.governance.describe()] += 1
            if not _member_kept(s):
                continue
            self.kept_total += len(s.governance.kept)
            if len(self.kept) < ROWS_KEPT:
                self.kept.extend(PlannedRow(dead.client_id, "mailchimp", "keep", "R5",
                                            KEPT_FOR_ANOTHER_CLIENT)
                                 for dead in s.governance.kept)  # fmt: skip


def plan_addresses(
    ledger: Ledger,
    connectors: Mapping[str, Any],
    keys: SubjectKeys,
    emails: Iterable[str],
    known: Mapping[str, Iterable[ClientRecord]] | None = None,
) -> Callable[[], list[tuple[Planned, int]]]:
    """Read both sides of some addresses now; return how to plan and queue what they need.

    For a data-subject request: the reads (every Phorest client at each address,
    the Mailchimp member there, and a member left at a previous address) happen
    here, outside any transaction; the returned function plans from the ledger
    as it stands when called, so the caller writes the request's suppression or
    restriction first and calls it in the same transaction. Nothing is run.

    Args:
        ledger: the ledger (facts, and the tasks queued).
        connectors: ``"phorest"`` and ``"mailchimp"`` (as for :func:`poll`).
        keys: turns identifiers into subject keys.
        emails: the addresses (unusable ones are skipped).
        known: normalised address -> every Phorest client at it, when the caller
            has just read them (Phorest is not asked again for those).

    Returns:
        A function that plans, stores the facts learned and queues the tasks,
        returning each planned Mailchimp or Phorest action with its task id
        (call it once: what was read is dropped then).

    Raises:
        ConnectorError: a lookup could not be read.
    """
    store = _Store(keys)
    held = known or {}
    wanted = {email: _Change(list(held[email]), all_clients=True) if email in held else _Change()
              for address in emails if (email := _normalised(address))}
    try:
        if wanted:
            _look_up(store, ledger, connectors, wanted, ())
    except BaseException:
        store.close()
        raise

    def queue() -> list[tuple[Planned, int]]:
        queued: list[tuple[Planned, int]] = []
        with store, ledger.transaction():
            for subjects in _subject_batches(store, ledger):
                planned = [p for s in subjects for p in plan(s.view) if p.processor in PROCESSORS]
                _store_facts(ledger, subjects)
                queued.extend(zip(planned, enqueue(ledger, planned)))
        return queued

    return queue


def _analytics_erasures(ledger: Ledger, store: _Store, analytics: Any) -> Iterator[list[Planned]]:
    """One GA deletion per client Phorest shows deleted, forgotten or merged away (R5).

    GA cannot be read, so the ledger remembers each subject GA was asked to
    delete (``analytics_erased_at``) and each is asked once. With ``identity =
    "email"`` a client whose address a live client still uses is left alone
    (the deletion would reach that client's data), and a forgotten client no
    longer shows the address GA knows them by. Yields the deletions a batch
    of erased clients at a time.
    """
    identity = getattr(analytics, "identity", "user_id")
    keys = store.keys
    for chunk in store.scratch.dead_batches():
        dead = [(subject_key, _unpack_client(record)) for subject_key, record in chunk]
        emails = [_normalised(client.email) if client.email else None for _, client in dead]
        email_keys = [keys.email(email) if email else None for email in emails]
        live = store.scratch.live_among([email_key for email_key in email_keys if email_key])
        facts = ledger.subject_facts([subject_key for subject_key, _ in dead])
        planned: list[Planned] = []
        for (subject_key, client), email, email_key in zip(dead, emails, email_keys):
            stored = facts.get(subject_key)
            item = plan_analytics_erasure(
                subject_key, client, identity=identity,
                erased_before=stored is not None and stored.analytics_erased_at is not None,
                email=email, shared=email_key in live,
            )  # fmt: skip
            if item is not None:
                planned.append(item)
        yield planned


def _suppress_dead(ledger: Ledger, store: _Store) -> None:
    """Put the client-id key of every client Phorest deleted, forgot or merged away on
    the suppression list (R5), so that no later change re-adds them anywhere.

    Their erasure downstream is planned like any other (with its evidence);
    this makes it stick, as an erasure request's suppression does.
    """
    count = 0
    for chunk in store.scratch.dead_batches():
        already = ledger.suppressed_among([key for key, _record in chunk])
        fresh = [(key, _unpack_client(record).state) for key, record in chunk if key not in already]
        with ledger.transaction():
            for key, state in fresh:
                ledger.suppress(key, f"phorest_{state}")
        count += len(fresh)
    if count:
        log.info("dead_clients_suppressed", count=count)


def _alert_suppressed_consent(ledger: Ledger, subjects: Iterable[_Subject],
                              pending: Collection[str]) -> None:
    """Tell the manager once when Phorest shows an erased person with consent again (R3).

    syncd keeps such a person off every processor; only a person can tell
    whether it is a new sign-up to honour with a fresh record or a mistake.
    A client whose own erasure request is still open is not news: Phorest
    keeps the record, consent included, until staff press Forget (``pending``:
    the subject keys of the open erasure requests).
    """
    for subject in subjects:
        view = subject.view
        if not view.facts.suppressed:
            continue
        for record in subject.records:
            client = next((c for c in subject.governance.live
                           if c.client_id == record.client_id), None)  # fmt: skip
            if client is None or not client.email_consent or record.subject_key in pending:
                continue
            ledger.raise_alert(
                f"{SUPPRESSED_CONSENT}:{client.client_id}", SUPPRESSED_CONSENT,
                f"Phorest client {client.client_id} matches a person who asked to be erased "
                "and shows email-marketing consent again; syncd keeps them off every processor "
                "until a person decides what the client wants",
            )


def _member_kept(subject: _Subject) -> bool:
    """Whether a dead record's erasure would have reached a member another client keeps."""
    member = subject.view.member
    return bool(subject.governance.kept) and member is not None and member.status != "absent"


class _Store:
    """What a run read, in a :class:`~syncd.ledger.Scratch` keyed by each address's keyed hash.

    Only records that can govern an address are kept per address: every client
    at it (its newest version) and the last member read there; erased clients
    are kept by client-id key too (a forgotten client's blanked record no longer
    shows its address, but the ledger linked that address to it). Counts and
    the newest change time of each system stay in memory. Use it as a context
    manager: the scratch store and every address in it go when it closes.
    """

    def __init__(self, keys: SubjectKeys) -> None:
        self.keys = keys
        self.scratch = Scratch()
        self.stats = {"clients": 0, "members": 0, "unusable_addresses": 0}
        # The newest change time each system showed: where the next poll starts.
        self.newest: dict[str, datetime] = {}

    def __enter__(self) -> _Store:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the scratch store."""
        self.scratch.close()

    def _seen(self, processor: str, moment: datetime | None) -> None:
        if moment is not None and (processor not in self.newest or moment > self.newest[processor]):
            self.newest[processor] = moment

    def cursors(self) -> dict[str, str]:
        """Change-feed cursors (ISO 8601 instants) for a poll after this full read."""
        names = {"phorest": PHOREST_CURSOR, "mailchimp": MAILCHIMP_CURSOR}
        return {names[p]: moment.isoformat() for p, moment in self.newest.items()}

    def add_clients(self, clients: Iterable[ClientRecord]) -> None:
        """Store a chunk of Phorest records."""
        rows: list[tuple[str, str, float, int, bool, bytes]] = []
        dead: list[tuple[str, bytes]] = []
        for client in clients:
            self.stats["clients"] += 1
            self._seen("phorest", client.updated_at)
            record = _pack_client(client)
            live = client.state not in ERASED_CLIENT_STATES
            if not live:
                dead.append((self.keys.client_id(client.client_id), record))
            if not client.email:
                continue
            try:
                email_key = self.keys.email(client.email)
            except IdentifierError:
                self.stats["unusable_addresses"] += 1
                continue
            rows.append((email_key, client.client_id, client.updated_at.timestamp(),
                         client.version, live, record))
        self.scratch.add_dead(dead)
        self.scratch.add_clients(rows)

    def add_members(self, members: Iterable[MemberRecord]) -> None:
        """Store a chunk of Mailchimp members (a later one at an address wins)."""
        rows: list[tuple[str, str, bytes]] = []
        for member in members:
            self.stats["members"] += 1
            self._seen("mailchimp", member.last_changed)
            try:
                email_key = self.keys.email(member.email)
            except IdentifierError:
                self.stats["unusable_addresses"] += 1
                continue
            rows.append((email_key, member.status, _pack_member(member)))
        self.scratch.add_members(rows)

    def dead_client(self, client_key: str | None) -> ClientRecord | None:
        """The erased client with this client-id key, if the run read one."""
        record = self.scratch.dead(client_key) if client_key else None
        return _unpack_client(record) if record is not None else None

    def forgotten_client(self, ledger: Ledger, email_key: str) -> ClientRecord | None:
        """The erased client the ledger linked this address to, if the run read one
        (a forgotten client's blanked record no longer shows the address)."""
        return self.dead_client(ledger.subject_for(email_key))

    def add_followups(self, planned: Sequence[Planned], task_ids: Sequence[int]) -> None:
        """Remember each queued task, and what :func:`_record_results` must learn from it."""
        self.scratch.add_followups(
            (task_id, marshal.dumps(_followup(self.keys, item.action)))
            for item, task_id in zip(planned, task_ids))


def _followup(keys: SubjectKeys, action: Any) -> tuple[str, str, str | None] | None:
    """(kind, subject key, email key) of an action whose outcome the ledger learns from."""
    if action.kind == "withdraw_consent":
        return (action.kind, action.subject_key, None)
    if action.kind in ("subscribe", "move_email"):
        address = action.new_email if action.kind == "move_email" else action.email
        return (action.kind, action.subject_key, _email_key(keys, address))
    return None


def _pack_client(client: ClientRecord) -> bytes:
    """A client record as bytes for the scratch store (every field, in field order)."""
    last_visit = client.last_visit
    return marshal.dumps((
        client.client_id, client.email, client.mobile, client.first_name, client.last_name,
        client.email_consent, client.state, client.version, _instant(client.updated_at),
        _instant(client.created_at), last_visit.toordinal() if last_visit else None,
        client.merged_into, client.raw, _instant(client.read_at),
    ))  # fmt: skip


def _unpack_client(record: bytes) -> ClientRecord:
    """The client :func:`_pack_client` packed."""
    (client_id, email, mobile, first_name, last_name, consent, state, version, updated_at,
     created_at, last_visit, merged_into, raw, read_at) = marshal.loads(record)
    return ClientRecord(
        client_id, email, mobile, first_name, last_name, consent, state, version,
        _from_instant(updated_at), _from_instant(created_at),
        date.fromordinal(last_visit) if last_visit else None, merged_into, raw,
        _from_instant(read_at),
    )  # fmt: skip


def _pack_member(member: MemberRecord) -> bytes:
    """A member record as bytes for the scratch store."""
    return marshal.dumps((member.email, member.status, member.first_name, member.last_name,
                          tuple(member.extra_fields), _instant(member.last_changed)))


def _unpack_member(record: bytes) -> MemberRecord:
    """The member :func:`_pack_member` packed."""
    email, status, first_name, last_name, extra_fields, last_changed = marshal.loads(record)
    return MemberRecord(email, status, first_name, last_name, extra_fields,
                        _from_instant(last_changed))


def _instant(moment: datetime | None) -> int | None:
    """An aware instant as whole microseconds since the epoch: exact for any instant,
    and cheaper to write than ISO text (a full resync packs several per record)."""
    return (moment - _EPOCH) // _MICROSECOND if moment is not None else None


def _from_instant(micros: int | None) -> datetime | None:
    """The instant :func:`_instant` packed, in UTC (as the connectors give every instant)."""
    return _EPOCH + timedelta(microseconds=micros) if micros is not None else None


def _no_progress(_stage: str, _done: int, _total: int | None) -> None:
    """A :data:`Progress` that shows nothing."""


def _read(
    store: _Store,
    clients: Iterable[Any],
    members: Iterable[Any],
    progress: Progress = _no_progress,
) -> None:
    """Read every client and every member into ``store`` (a full read of both sides).

    Both sides are read at once, each on a thread of its own that runs ahead of
    this one by at most :data:`READ_AHEAD_CHUNKS` chunks (each connector keeps
    to its own vendor's limits), so a full read takes about as long as the
    slower side, not both; each chunk goes to the scratch store as it comes,
    so memory holds a few chunks, whatever the audience. What the store holds
    afterwards does not depend on how the two sides interleaved.
    """
    with _ReadAhead({"phorest": clients, "mailchimp": members}) as feed:
        counts = {"phorest": 0, "mailchimp": 0}
        for stage, chunk in feed:
            if chunk is None:
                progress(stage, counts[stage], counts[stage])  # this side is finished
                continue
            if stage == "phorest":
                store.add_clients(chunk)
            else:
                store.add_members(chunk)
            before, counts[stage] = counts[stage], counts[stage] + len(chunk)
            if counts[stage] // PROGRESS_EVERY_RECORDS > before // PROGRESS_EVERY_RECORDS:
                progress(stage, counts[stage], None)


class _ReadAhead:
    """Iterate several record streams at once, each on a daemon thread, in chunks.

    Iterating yields ``(name, chunk)`` in arrival order, and ``(name, None)``
    once a stream is finished; an exception a stream raised is raised here.
    Leaving the ``with`` block (normally or not) stops the threads and waits
    for them, so no connector is still in use afterwards.
    """

    def __init__(self, streams: Mapping[str, Iterable[Any]]) -> None:
        self._streams = dict(streams)
        self._queue: queue.Queue[tuple[str, list[Any] | None, BaseException | None]] = (
            queue.Queue(maxsize=READ_AHEAD_CHUNKS * len(self._streams)))
        self._stop = threading.Event()
        self._finished: set[str] = set()
        self._threads = [
            threading.Thread(target=contextvars.copy_context().run,
                             args=(self._produce, name, records),
                             name=f"syncd-read-{name}", daemon=True)
            for name, records in self._streams.items()
        ]

    def __enter__(self) -> _ReadAhead:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        while any(thread.is_alive() for thread in self._threads):
            try:  # unblock a producer waiting for room
                self._queue.get(timeout=READ_AHEAD_POLL_SECONDS)
            except queue.Empty:
                pass
        for thread in self._threads:
            thread.join()

    def finished(self, name: str) -> bool:
        """Whether the stream ``name`` has been read to its end (and that was yielded)."""
        return name in self._finished

    def __iter__(self) -> Iterator[tuple[str, list[Any] | None]]:
        while len(self._finished) < len(self._streams):
            name, chunk, error = self._queue.get()
            if error is not None:
                raise error
            if chunk is None:
                self._finished.add(name)
            yield name, chunk

    def _produce(self, name: str, records: Iterable[Any]) -> None:
        try:
            chunk: list[Any] = []
            for record in records:
                chunk.append(record)
                if len(chunk) >= READ_CHUNK_RECORDS:
                    if not self._put((name, chunk, None)):
                        return
                    chunk = []
            if chunk and not self._put((name, chunk, None)):
                return
            self._put((name, None, None))
        except BaseException as error:  # handed to the reading thread, raised there
            self._put((name, None, error))
        finally:
            close = getattr(records, "close", None)
            if callable(close):
                close()

    def _put(self, item: tuple[str, list[Any] | None, BaseException | None]) -> bool:
        """Queue ``item`` unless stopped first; whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=READ_AHEAD_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False


def _subject_batches(store: _Store, ledger: Ledger) -> Iterator[list[_Subject]]:
    """Every address the store holds, in key order, as subjects, a batch at a time.

    First the moves (R6) are settled over the whole store (:func:`_claim_moves`):
    a client's new address and the member at its previous one are usually in
    different batches. A claimed member's address is then planned with its
    client's new one and skipped in its own place. Facts the caller writes
    for one batch never concern another's addresses, so planning a batch after
    the previous one was stored decides what planning them all at once would.
    """
    _claim_moves(store, ledger)
    phones = ledger.suppression_size(ERASURE_SUPPRESSION) > 0
    scratch = store.scratch
    for batch in scratch.addresses(size=PLAN_BATCH_ADDRESSES):
        here = [email_key for email_key, _clients, _member in batch]
        claimed = scratch.claimed(here)
        moves = scratch.moves(here)
        rows = [row for row in batch if row[0] not in claimed]
        if moves:
            rows.extend(scratch.at(sorted(moves.values())))
        addresses = {email_key: _Address(
            {client.client_id: client for client in map(_unpack_client, clients)},
            _unpack_member(member) if member is not None else None,
        ) for email_key, clients, member in rows}  # fmt: skip
        yield _views(addresses, moves, store, ledger, phones=phones)


def _move_candidates(store: _Store, ledger: Ledger) -> Iterator[list[tuple[str, str]]]:
    """(previous key, new key) of every live client whose address holds no member and
    whose subject was last synced at another address, in new-key order, a batch at a time."""
    keys = store.keys
    for batch in store.scratch.addresses(memberless=True, size=PLAN_BATCH_ADDRESSES):
        primaries: list[tuple[str, str]] = []
        for email_key, clients, _member in batch:
            primary = govern(map(_unpack_client, clients)).primary
            if primary is not None and primary.state not in ERASED_CLIENT_STATES:
                primaries.append((email_key, keys.client_id(primary.client_id)))
        facts = ledger.subject_facts([subject_key for _, subject_key in primaries])
        yield [(old_key, email_key) for email_key, subject_key in primaries
               if (stored := facts.get(subject_key)) is not None
               and (old_key := stored.synced_email_key) and old_key != email_key]  # fmt: skip


def _claim_moves(store: _Store, ledger: Ledger) -> None:
    """Match each moved client to the member left at its previous address (R6).

    The member must be one no client holds (no record at that address, nor an
    erased client the ledger linked it to); when two clients claim the same
    member, the one whose new address comes first in key order gets it.
    """
    for pairs in _move_candidates(store, ledger):
        if not pairs:
            continue
        orphans = store.scratch.unclaimed_members([old_key for old_key, _ in pairs])
        store.scratch.claim(
            (old_key, new_key) for old_key, new_key in pairs if old_key in orphans
            and store.forgotten_client(ledger, old_key) is None)


def _views(
    addresses: Mapping[str, _Address],
    moves: Mapping[str, str],
    store: _Store,
    ledger: Ledger,
    *,
    phones: bool,
) -> list[_Subject]:
    """One subject per address (keyed by its email key), with the ledger's facts
    brought up to date in memory; ``moves`` maps a moved client's new key to its
    previous one (both among ``addresses``); ``phones``: whether any phone may be
    on the suppression list (only an erasure request puts one there)."""
    keys = store.keys
    governed: list[tuple[str, Governance, ClientRecord | None, MemberRecord | None]] = []
    for email_key, slot in addresses.items():
        governance = govern(slot.clients.values())
        client = governance.primary
        if client is None and slot.member is not None:
            # An address no client shows any more: it may be a forgotten client's.
            client = store.forgotten_client(ledger, email_key)
        governed.append((email_key, governance, client, slot.member))

    subject_keys = [keys.client_id(c.client_id) if c else ek for ek, _, c, _ in governed]
    record_keys = {c.client_id: keys.client_id(c.client_id)
                   for _, g, _, _ in governed for c in g.others}  # fmt: skip
    stored_by_key = ledger.subject_facts([*subject_keys, *record_keys.values()])
    # A primary client's mobile counts too: an erased person back under a new address.
    # (Parsing every number costs time: only when a phone can be suppressed at all.)
    phone_keys = [_phone_key(keys, c.mobile if c and phones else None)
                  for _, _, c, _ in governed]  # fmt: skip
    suppressed = ledger.suppressed_among(
        [ek for ek, _, _, _ in governed] + [sk for sk, (_, _, c, _) in
                                                zip(subject_keys, governed) if c]
        + [pk for pk in phone_keys if pk]
    )
    linked = ledger.subjects_for([ek for ek, g, _, _ in governed if g.live])
    position = {email_key: index for index, (email_key, _, _, _) in enumerate(governed)}
    moved = {position[new_key]: position[old_key] for new_key, old_key in moves.items()
             if new_key in position and old_key in position}  # fmt: skip
    moved_from = set(moved.values())
    subjects: list[_Subject] = []
    for index, (subject_key, (email_key, governance, client, member)) in enumerate(
        zip(subject_keys, governed)
    ):
        if index in moved_from:
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
        held = (*governance.live, *governance.dead) or ((client,) if client else ())
        records = [_record(c, subject_key if c is client else record_keys[c.client_id],
                           stored_by_key) for c in held]
        mine = next((r for r in records if r.subject_key == subject_key), None)
        opted_in_at = mine.opted_in_at if mine else (stored.opted_in_at if stored else None)
        # Every record's stored facts speak for the address, whichever is primary now.
        facts_here = [f for f in (stored, *(r.stored for r in records if r.stored is not stored))
                      if f is not None]  # fmt: skip
        refused = any(f.resubscribe_refused for f in facts_here)
        if mine is not None and mine.opted_in_at != (stored.opted_in_at if stored else None):
            refused = False  # consent switched on again since: a past refusal no longer applies
        own_unsubscribe = any(f.unsubscribed_by_syncd for f in facts_here)
        if member is not None and member.status in MARKETED_STATUSES:
            own_unsubscribe = False  # marketed again: any later unsubscribe is news
        opted_out_at = max((f.opted_out_at for f in facts_here if f.opted_out_at), default=None)
        if (member is not None and member.status in OPTED_OUT_STATUSES and member.last_changed
                and not (member.status == "unsubscribed" and own_unsubscribe)):
            if opted_out_at is None or member.last_changed > opted_out_at:
                opted_out_at = member.last_changed
        facts = LedgerFacts(
            suppressed=email_key in suppressed or phone_keys[index] in suppressed
            or (client is not None and subject_key in suppressed),
            restricted=any(f.restricted for f in facts_here),
            opted_out_at=opted_out_at,
            opted_in_at=opted_in_at,
            synced_email=synced_email,
            resubscribe_refused=refused,
            unsubscribed_by_syncd=own_unsubscribe,
        )
        housemates = tuple(Housemate(r.subject_key, c, r.opted_in_at)
                           for r, c in zip(records, held) if c is not client)  # fmt: skip
        view = SubjectView(subject_key, client, member, facts, housemates)
        link = email_key if governance.live and linked.get(email_key) != subject_key else None
        subjects.append(_Subject(view, stored, records, governance,
                                 link_email_key=link, synced_email_key=synced_key))
    return subjects


def _record(client: ClientRecord, subject_key: str,
            stored_by_key: Mapping[str, SubjectFacts]) -> _Record:
    """One record's own facts: consent as Phorest shows it, and when it was switched on."""
    stored = stored_by_key.get(subject_key)
    live = client.state not in ERASED_CLIENT_STATES
    opted_in_at = stored.opted_in_at if stored else None
    if live and client.email_consent and stored is not None and stored.consent is False:
        # Consent switched on in Phorest since the ledger last looked (R2: a fresh
        # opt-in, dated by Phorest).
        opted_in_at = client.updated_at
    return _Record(subject_key, client.client_id, stored,
                   consent=client.email_consent if live else None,
                   consent_at=client.updated_at if live else None, opted_in_at=opted_in_at,
                   client_seen=_seen(client))


def _store_facts(ledger: Ledger, subjects: Iterable[_Subject]) -> None:
    """Write back what changed about each subject and each record (keys and times only).

    The changes are gathered first and written in one transaction, a few
    statements for all subjects (:meth:`~syncd.ledger.Ledger.upsert_subjects`).
    A subject changed twice (as a record, then as a view) gets both sets of
    columns, the later winning, exactly as two upserts in turn would leave it.
    """
    changed: dict[str, dict[str, Any]] = {}
    links: list[tuple[str, str, str]] = []
    kept: list[str] = []
    for subject in subjects:
        view, stored, facts = subject.view, subject.stored, subject.view.facts
        for record in subject.records:
            changes: dict[str, Any] = {}
            held = record.stored
            if record.consent is not None and (held is None or held.consent != record.consent):
                changes.update(consent=record.consent, consent_at=record.consent_at)
            if record.opted_in_at != (held.opted_in_at if held else None):
                changes["opted_in_at"] = record.opted_in_at
            if record.client_seen != (held.client_seen if held else None):
                changes["client_seen"] = record.client_seen
            if (held is not None and held.unsubscribed_by_syncd
                    and not facts.unsubscribed_by_syncd
                    and record.subject_key != view.subject_key):
                # The mark may sit on a former primary's subject: it ends for all.
                changes["unsubscribed_by_syncd"] = False
            if changes or held is None:
                changed.setdefault(record.subject_key, {}).update(changes)
            if "client_seen" in changes and _member_kept(subject) and any(
                dead.client_id == record.client_id for dead in subject.governance.kept
            ):
                # R11: the choice not to erase is evidence too (once per record version).
                kept.append(record.subject_key)
        changes = {}
        if facts.opted_out_at != (stored.opted_out_at if stored else None):
            changes["opted_out_at"] = facts.opted_out_at
        if facts.resubscribe_refused != (stored.resubscribe_refused if stored else False):
            changes["resubscribe_refused"] = facts.resubscribe_refused
        if facts.unsubscribed_by_syncd != (stored.unsubscribed_by_syncd if stored else False):
            changes["unsubscribed_by_syncd"] = facts.unsubscribed_by_syncd
        if subject.synced_email_key is not None and subject.synced_email_key != (
            stored.synced_email_key if stored else None
        ):
            changes["synced_email_key"] = subject.synced_email_key
        if changes:
            changed.setdefault(view.subject_key, {}).update(changes)
        if subject.link_email_key is not None:
            links.append((subject.link_email_key, "email", view.subject_key))
    with ledger.transaction():
        ledger.upsert_subjects(changed)
        ledger.link_identifiers(links)
        for subject_key in kept:
            ledger.add_audit(subject_key, "mailchimp", "keep_shared_member",
                             "R5:kept_for_another_client", "kept")
    log.debug("resync_facts_stored", subjects=len(changed))


def _record_results(ledger: Ledger, store: _Store) -> int:
    """Learn from the finished tasks what the next run must know.

    A ``subscribe`` or ``move_email`` that is done puts the member under the
    client's address: that address becomes the subject's synced one (R6). A
    ``subscribe`` Mailchimp refused (compliance state) waits for the person (R2).
    A ``withdraw_consent`` that is done leaves the client without consent.

    Returns:
        How many of the run's tasks are still pending or in flight.
    """
    unfinished = 0
    for chunk in store.scratch.followups():
        unfinished += ledger.count_open([task_id for task_id, _item in chunk])
        with ledger.transaction():
            for task_id, item in chunk:
                followup = marshal.loads(item)
                if followup is None:
                    continue
                kind, subject_key, email_key = followup
                task = ledger.task(task_id)
                if task is None:
                    continue
                if kind == "withdraw_consent":
                    if task.state == "done":  # what Phorest holds now
                        ledger.upsert_subject(subject_key, consent=False)
                elif task.state == "done":
                    if email_key is not None:
                        ledger.upsert_subject(subject_key, synced_email_key=email_key)
                        ledger.link_identifier(email_key, "email", subject_key)
                elif task.state == "needs_person" and task.last_error == RESUBSCRIBE_REFUSED_REASON:
                    ledger.upsert_subject(subject_key, resubscribe_refused=True)
    return unfinished


def _email_key(keys: SubjectKeys, address: str | None) -> str | None:
    """The keyed hash of an address, or None when it is not a usable one."""
    email = _normalised(address) if address else None
    return keys.email(email) if email else None


def _phone_key(keys: SubjectKeys, mobile: str | None) -> str | None:
    """The keyed hash of a stored mobile, or None when there is none or it is not a number."""
    if not mobile:
        return None
    try:
        return keys.phone(mobile)
    except IdentifierError:
        return None


def _seen(client: ClientRecord) -> str:
    """Which version of a Phorest record this is (no personal data)."""
    return f"{client.version}|{client.updated_at.isoformat()}|{client.state}"


def _seen_state(client_seen: str | None) -> str | None:
    """The client state a :func:`_seen` value recorded."""
    return client_seen.rsplit("|", 1)[-1] if client_seen else None


def _normalised(email: str) -> str | None:
    """The normalised address, or None when it is not a plausible one."""
    try:
        return normalise_email(email)
    except IdentifierError:
        return None
