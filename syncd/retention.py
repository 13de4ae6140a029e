"""The retention purge (R4): clients with no visit for ``[policy] retention_months`` are erased.

A live (active or archived) Phorest client is **stale** when, on ``today``:

- ``lastVisit`` is before the cut-off (``retention_months`` calendar months
  before today), or absent (never visited);
- ``createdAt`` is before the cut-off too (a client created recently has had
  no time to visit); a record without ``createdAt`` is never stale, since its
  age cannot be told;
- no booked appointment (not cancelled, not deleted) falls between today and
  ``[policy] appointment_lookahead_days`` later, at any branch.

"Before" is strict: a visit on the cut-off day itself keeps the client. Dead
records (deleted, forgotten, merged away) are R5's, not the purge's.

One run (:func:`evaluate`, then :func:`purge`) reads every client once (a paged
scan) and, only if any client is old enough, the appointments: per branch, one
31-day window at a time, pages of 100 (:meth:`PhorestConnector.booked_clients`),
never a call per client. Each stale client then becomes an erasure request
exactly like a person's own (:func:`syncd.rights.file`: suppression, Mailchimp,
GA, Phorest's Forget, manual processors, evidence), with source ``retention``
and filed by ``syncd retention``. A client with an open erasure request, or
whose retention request a person cancelled (they chose to keep the client), is
left out.

**The purge guard.** A run that would erase more than ``[policy]
purge_guard_percent`` of the live clients erases nothing: it is recorded in
the ledger as ``guarded`` and the manager gets an alert (client counts only).
``syncd retention --confirm-run ID --count N``, with N the count the run
found, re-evaluates and files the requests only if the count is still N. A
later run that finds another count supersedes the held-back one.

Personal data: runs hold client counts only; the dry run shows Phorest client
ids and last-visit dates, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

import structlog

from connectors.base import ClientRecord, add_call_observer, remove_call_observer
from syncd import engine, rights
from syncd.errors import SyncdError
from syncd.identity import SubjectKeys
from syncd.ledger import Ledger

log = structlog.get_logger(__name__)

SOURCE = "retention"  # the request's ``source`` column
FILED_BY = "syncd retention"
RULE = "R4"
LIVE_STATES = frozenset({"active", "archived"})
GUARD_ALERT = "purge_guard"  # alert kind; problem key ``purge_guard:<run id>``

Progress = Callable[[], None]


class RetentionError(SyncdError):
    """A purge cannot go ahead as asked (one line, client counts only)."""


@dataclass(frozen=True, slots=True)
class StaleClient:
    """A client the purge would erase: what the dry run shows, and nothing more.

    Attributes:
        client_id: the Phorest client id.
        last_visit: the last paid visit, or None if they never visited.
    """

    client_id: str
    last_visit: date | None


@dataclass(frozen=True)
class Evaluation:
    """What one run found (no writes were made to find it).

    Attributes:
        today: the day the rule was applied on.
        cutoff: visits and creations before this day are old.
        lookahead_until: the last day of the appointment look-ahead.
        live: live (active or archived) clients in all.
        stale: the clients to erase, by client id.
        kept_by_appointment: old clients a booked appointment keeps.
        already_requested: old clients left out for an existing request.
        guard_percent: ``[policy] purge_guard_percent``.
        calls: Phorest API calls made (client pages, branches, appointment pages).
        windows: the appointment reads, per branch and window.
    """

    today: date
    cutoff: date
    lookahead_until: date
    live: int
    stale: tuple[StaleClient, ...]
    kept_by_appointment: int
    already_requested: int
    guard_percent: float
    calls: int
    windows: tuple[Any, ...] = ()
    _records: Mapping[str, ClientRecord] = field(default_factory=dict, repr=False)
    _holders: Mapping[str, tuple[ClientRecord, ...]] = field(default_factory=dict, repr=False)
    _merged: Mapping[str, tuple[ClientRecord, ...]] = field(default_factory=dict, repr=False)

    @property
    def guarded(self) -> bool:
        """Whether the purge guard holds this run back."""
        return over_guard(len(self.stale), self.live, self.guard_percent)

    def as_json(self) -> dict[str, Any]:
        """Totals, calls and the stale clients' ids and last visits (no other field)."""
        return {
            "today": self.today.isoformat(), "cutoff": self.cutoff.isoformat(),
            "lookahead_until": self.lookahead_until.isoformat(), "live": self.live,
            "stale": len(self.stale), "kept_by_appointment": self.kept_by_appointment,
            "already_requested": self.already_requested,
            "guard_percent": self.guard_percent, "guarded": self.guarded,
            "calls": {"phorest": self.calls,
                      "appointment_pages": sum(w.pages for w in self.windows),
                      "windows": [{"branch_id": w.branch_id, "from": w.first.isoformat(),
                                   "to": w.last.isoformat(), "pages": w.pages, "rows": w.rows}
                                  for w in self.windows]},
            "clients": [{"client_id": c.client_id,
                         "last_visit": c.last_visit.isoformat() if c.last_visit else None}
                        for c in self.stale],
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """What :func:`purge` did.

    Attributes:
        evaluation: what the run found.
        outcome: ``filed`` (requests filed), ``guarded`` (held back, nothing
            erased) or ``confirmed`` (a held-back run a person confirmed).
        run_id: the run's id in the ledger.
        request_ids: the erasure requests filed.
    """

    evaluation: Evaluation
    outcome: Literal["filed", "guarded", "confirmed"]
    run_id: int
    request_ids: tuple[int, ...] = ()


def cutoff(today: date, months: int) -> date:
    """``months`` calendar months before ``today`` (the month's last day if it has no such day)."""
    moment = datetime(today.year, today.month, today.day)
    return rights.add_months(moment, -months).date()


def is_old(record: ClientRecord, cutoff_day: date) -> bool:
    """Whether a record's last visit and creation are both before ``cutoff_day``.

    A record that never visited is judged by its creation alone; one without
    ``createdAt`` is never old (its age cannot be told).
    """
    if record.created_at is None or record.created_at.date() >= cutoff_day:
        return False
    return record.last_visit is None or record.last_visit < cutoff_day


def over_guard(stale: int, live: int, percent: float) -> bool:
    """Whether erasing ``stale`` of ``live`` clients is more than ``percent`` of them."""
    return stale > 0 and stale * 100 > percent * live


def evaluate(
    phorest: Any,
    settings: Any,
    *,
    today: date,
    ledger: Ledger | None = None,
    progress: Progress | None = None,
) -> Evaluation:
    """Apply the rule to every client; read-only everywhere.

    Args:
        phorest: the Phorest connector (``scan``, ``booked_clients``).
        settings: the configuration (``[policy]``).
        today: the day to apply the rule on.
        ledger: to leave out clients with an erasure request already (None: none are).
        progress: called between pages of appointments (a stop point for the daemon).

    Raises:
        ConnectorError: Phorest could not be read.
        LedgerError: SQLite failed.
    """
    policy = settings.policy
    cut = cutoff(today, policy.retention_months)
    days = policy.appointment_lookahead_days
    calls = [0]

    def count(vendor: str, _status: str) -> None:
        if vendor == "phorest":
            calls[0] += 1

    add_call_observer(count)
    try:
        records: dict[str, ClientRecord] = {}
        holders: dict[str, list[ClientRecord]] = {}
        merged: dict[str, list[ClientRecord]] = {}
        old: list[ClientRecord] = []
        for record in phorest.scan():
            records[record.client_id] = record
            if (address := rights.email_of(record)) is not None:
                holders.setdefault(address, []).append(record)
            if record.merged_into:
                merged.setdefault(record.merged_into, []).append(record)
            if record.state in LIVE_STATES and is_old(record, cut):
                old.append(record)
        live = sum(1 for r in records.values() if r.state in LIVE_STATES)
        windows: tuple[Any, ...] = ()
        booked: frozenset[str] = frozenset()
        if old:  # nobody old enough: no appointment needs reading
            on_window = (lambda _w: progress()) if progress is not None else None
            bookings = phorest.booked_clients(today, days + 1, on_window=on_window)
            booked, windows = bookings.client_ids, bookings.windows
    finally:
        remove_call_observer(count)
    exempt: set[str] = set()
    if ledger is not None:
        exempt = ledger.requested_client_ids("erase", states=("open",)) | \
            ledger.requested_client_ids("erase", states=("cancelled",), source=SOURCE)
    unbooked = [r for r in old if r.client_id not in booked]
    stale = [r for r in unbooked if r.client_id not in exempt]
    evaluation = Evaluation(
        today=today, cutoff=cut, lookahead_until=date.fromordinal(today.toordinal() + days),
        live=live, stale=tuple(StaleClient(r.client_id, r.last_visit) for r in stale),
        kept_by_appointment=len(old) - len(unbooked),
        already_requested=len(unbooked) - len(stale), guard_percent=policy.purge_guard_percent,
        calls=calls[0], windows=windows, _records={r.client_id: r for r in stale},
        _holders={k: tuple(v) for k, v in holders.items()},
        _merged={k: tuple(v) for k, v in merged.items()},
    )  # fmt: skip
    log.info("retention_evaluated", live=live, stale=len(stale), cutoff=cut.isoformat(),
             kept_by_appointment=evaluation.kept_by_appointment,
             already_requested=evaluation.already_requested, calls=calls[0])
    return evaluation


def purge(
    ledger: Ledger,
    settings: Any,
    connectors: Mapping[str, Any],
    keys: SubjectKeys,
    *,
    now: datetime,
    confirm: tuple[int, int] | None = None,
    confirmed_by: str | None = None,
    progress: Progress | None = None,
) -> PurgeResult:
    """Run the purge: evaluate, then file an erasure request per stale client, or hold back.

    Nothing is carried out here: the requests' tasks run like any request's
    (the daemon's work job, or the CLI's ``run_due`` with no daemon).

    Args:
        ledger: the ledger.
        settings: the configuration.
        connectors: ``phorest``, ``mailchimp`` and, when configured, ``google_analytics``.
        keys: the subject keys.
        now: the current time (its UTC date is "today").
        confirm: ``(run id, count)`` to let a run the guard held back through.
        confirmed_by: who confirms (stored with the run).
        progress: called between reads and filings (the daemon's stop point).

    Raises:
        RetentionError: the run to confirm is unknown or not held back, the
            count given is not its count, or the count has changed since.
        ConnectorError: Phorest or Mailchimp could not be read.
        LedgerError: SQLite failed.
    """
    if confirm is not None:
        run_id, count = confirm
        run = ledger.retention_run(run_id)
        if run is None or run.state != "guarded":
            state = "unknown" if run is None else run.state
            raise RetentionError(f"retention run #{run_id} is {state}, not held back by the "
                                 "purge guard; nothing changed")
        if count != run.stale_count:
            raise RetentionError(f"retention run #{run_id} would erase {run.stale_count} "
                                 f"client(s), not {count}; nothing changed")
    evaluation = evaluate(connectors["phorest"], settings, today=now.date(), ledger=ledger,
                          progress=progress)
    found = len(evaluation.stale)
    if confirm is not None:
        run_id, count = confirm
        if found != count:
            raise RetentionError(f"the purge now finds {found} stale client(s), not the {count} "
                                 f"of retention run #{run_id}; nothing changed (run syncd "
                                 "retention again)")
        with ledger.transaction():
            if not ledger.close_retention_run(run_id, "confirmed", filed_count=found,
                                              confirmed_by=confirmed_by or "unknown"):
                raise RetentionError(f"retention run #{run_id} was confirmed meanwhile; "
                                     "nothing changed")
            ledger.resolve_alert(f"{GUARD_ALERT}:{run_id}")
            ledger.add_audit(None, None, "retention_confirm", "R4:guard", "done",
                             actor=confirmed_by or "unknown",
                             detail=f"retention run #{run_id}: {found} stale client(s)")
        ids = _file_all(ledger, settings, connectors, keys, evaluation, now, progress)
        log.info("retention_confirmed", run_id=run_id, filed=len(ids))
        return PurgeResult(evaluation, "confirmed", run_id, ids)
    if evaluation.guarded:
        return PurgeResult(evaluation, "guarded", _hold_back(ledger, evaluation))
    with ledger.transaction():
        _supersede(ledger, ledger.guarded_retention_runs())
        run_id = ledger.add_retention_run(found, evaluation.live, "filed")
    ids = _file_all(ledger, settings, connectors, keys, evaluation, now, progress)
    ledger.close_retention_run(run_id, "filed", filed_count=len(ids), from_states=("filed",))
    log.info("retention_purged", run_id=run_id, filed=len(ids), live=evaluation.live)
    return PurgeResult(evaluation, "filed", run_id, ids)


def _hold_back(ledger: Ledger, evaluation: Evaluation) -> int:
    """Record a guarded run and alert the manager; a run held back with the same count is kept."""
    found, live = len(evaluation.stale), evaluation.live
    with ledger.transaction():
        waiting = ledger.guarded_retention_runs()
        same = [r for r in waiting if r.stale_count == found and r.live_count == live]
        if same:  # the daily run finds what is already waiting: no second alert
            return same[-1].id
        _supersede(ledger, waiting)
        run_id = ledger.add_retention_run(found, live, "guarded")
        share = 100 * found / live if live else 100.0
        ledger.raise_alert(
            f"{GUARD_ALERT}:{run_id}", GUARD_ALERT,
            f"Retention purge held back: it would erase {found} of {live} live clients "
            f"({share:.1f}%, above the {evaluation.guard_percent:g}% guard); nothing was "
            f"erased. Check with `syncd retention --dry-run`, then run `syncd retention "
            f"--confirm-run {run_id} --count {found}`")  # fmt: skip
    log.info("retention_guarded", run_id=run_id, stale=found, live=live)
    return run_id


def _supersede(ledger: Ledger, runs: Sequence[Any]) -> None:
    for run in runs:
        if ledger.close_retention_run(run.id, "superseded"):
            ledger.resolve_alert(f"{GUARD_ALERT}:{run.id}")


def _file_all(
    ledger: Ledger,
    settings: Any,
    connectors: Mapping[str, Any],
    keys: SubjectKeys,
    evaluation: Evaluation,
    now: datetime,
    progress: Progress | None,
) -> tuple[int, ...]:
    """One erasure request per stale client, each in its own transaction."""
    ids: list[int] = []
    analytics = connectors.get(engine.ANALYTICS)
    leaving = frozenset(evaluation._records)
    for stale in evaluation.stale:
        if progress is not None:
            progress()
        record = evaluation._records[stale.client_id]
        person = rights.person_of(record, keys, source=SOURCE, holders=evaluation._holders,
                                  merged=evaluation._merged.get(record.client_id, ()),
                                  leaving=leaving)
        queue = engine.plan_addresses(ledger, connectors, keys, person.own_emails, person.holders)
        visited = stale.last_visit.isoformat() if stale.last_visit else "never"
        note = (f"{RULE} retention: no visit before {evaluation.cutoff.isoformat()} "
                f"(last visit {visited}), no booking until "
                f"{evaluation.lookahead_until.isoformat()}")
        ids.append(rights.file(ledger, settings, keys, "erase", person, queue, filed_by=FILED_BY,
                               note=note, now=now, analytics=analytics))
    return tuple(ids)
