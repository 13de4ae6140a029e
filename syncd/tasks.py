"""The durable task runner: planned actions become ledger tasks, tasks become vendor calls.

"Insert before the call, outcome after" (STYLE 6): :func:`enqueue` writes one
ledger task per planned action before anything is sent; :func:`run_due` claims
due tasks with a compare-and-set, calls each connector's ``apply`` once per
batch, then records every outcome of that batch in one transaction (done,
needs_person, failed, or back to pending with a later ``next_attempt_at``; a
vendor's daily quota that is spent reschedules to its reset and never fails a
task). Until that transaction commits, the batch's tasks stay in flight: a
process killed mid-batch loses nothing, the next writer lock holder releases them.
If ``apply`` raises, every claimed task is pushed forward before the error
propagates, so nothing spins.

Personal data lives only in a pending task's payload (the ledger scrubs it at a
final state, and each batch ends by flushing the scrubbed pages out of the WAL);
alerts and log lines carry processors, reasons, counts and task ids.
"""

from __future__ import annotations

import contextvars
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from connectors.base import Action, Connector, Outcome
from syncd.errors import IdentifierError, LedgerError
from syncd.identity import SubjectKeys
from syncd.ledger import Ledger, Task, TaskOutcome
from syncd.reconcile import Planned
from syncd.retry import RetryPolicy

log = structlog.get_logger(__name__)

DEFAULT_BATCH_SIZE = 500
MAX_BATCHES_PER_RUN = 1000  # 500 x 1000: a 100k-task resync finishes in one run_due
PAYLOAD_FIELDS = (
    "email", "new_email", "client_id", "first_name", "last_name", "fields", "record", "read_at",
)


@dataclass(frozen=True)
class RunReport:
    """What one :func:`run_due` did (or, in a dry run, would do).

    Attributes:
        counts: processor -> outcome status (done, retriable, permanent,
            needs_person) -> number of tasks.
        failed: tasks finished as ``failed`` (permanent, or out of retries).
        skipped: due tasks another worker claimed first.
        dry_run: whether nothing was claimed, sent or recorded.
    """

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    failed: int = 0
    skipped: int = 0
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        """False when any task failed."""
        return self.failed == 0

    def __bool__(self) -> bool:
        return self.ok

    def plus(self, other: RunReport) -> RunReport:
        """This report and ``other`` together (e.g. two processors run side by side)."""
        counts = {p: dict(c) for p, c in self.counts.items()}
        for processor, statuses in other.counts.items():
            mine = counts.setdefault(processor, {})
            for status, n in statuses.items():
                mine[status] = mine.get(status, 0) + n
        return RunReport(counts, self.failed + other.failed, self.skipped + other.skipped,
                         self.dry_run and other.dry_run)


def enqueue(
    ledger: Ledger, planned: Iterable[Planned], *, request_id: int | None = None
) -> list[int]:
    """Queue one task per planned action, before any call is made.

    Args:
        ledger: the ledger to write to.
        planned: actions from :func:`syncd.reconcile.plan`.
        request_id: the data-subject request these actions serve, if any.

    Returns:
        The task ids in order; a duplicate of an open task gives that task's id.

    Raises:
        LedgerError: SQLite failed (nothing is queued).
    """
    ids: list[int] = []
    with ledger.transaction():
        for item in planned:
            action = item.action
            ids.append(ledger.add_task(
                action.subject_key, item.processor, action.kind, f"{item.rule}:{item.why}",
                payload=_payload(action),
                dedupe_key=f"{item.processor}:{action.kind}:{action.subject_key}",
                request_id=request_id,
            ))  # fmt: skip
    # At debug: a resync queues a batch of addresses at a time and logs the total itself.
    log.debug("tasks_enqueued", count=len(ids), unique=len(set(ids)))
    return ids


def run_due(
    ledger: Ledger,
    connectors: Mapping[str, Connector],
    policy: RetryPolicy,
    keys: SubjectKeys,
    *,
    now: datetime,
    batch_size: int | None = None,
    dry_run: bool = False,
    on_batch: Callable[[int], None] | None = None,
    full_batches_only: bool = False,
) -> RunReport:
    """Carry out the due tasks of every processor that has a connector.

    Args:
        ledger: the ledger holding the tasks (its clock decides what is due).
        connectors: processor name -> connector.
        policy: decides the next attempt time and when retries are exhausted.
        keys: turns a forgotten address into its suppression key.
        now: the current time, for ``next_attempt_at``.
        batch_size: tasks per ``apply`` call (default: the connector's
            ``apply_batch_size``, else :data:`DEFAULT_BATCH_SIZE`).
        dry_run: only ask each connector what it would do (one batch per
            processor); nothing is claimed or recorded.
        on_batch: called after each batch with the number of tasks finished
            or rescheduled so far in this run (for a progress bar).
        full_batches_only: stop at a batch smaller than the batch size (its
            tasks wait for a later run, when more may have been queued).

    Returns:
        The counts; falsy when a task failed.

    Raises:
        Exception: whatever a connector's ``apply`` raised, after every task
            claimed for that call was pushed forward.
        LedgerError: SQLite failed.
    """
    counts: dict[str, Counter[str]] = {}
    failed = skipped = handled = 0
    for processor, connector in connectors.items():
        tally, seen = counts.setdefault(processor, Counter()), _Ids()
        size = batch_size or getattr(connector, "apply_batch_size", DEFAULT_BATCH_SIZE)
        for _ in range(1 if dry_run else MAX_BATCHES_PER_RUN):
            due = [t for t in ledger.due_tasks(size, processor) if t.id not in seen]
            if not due or (full_batches_only and len(due) < size):
                break
            seen.add_all(t.id for t in due)
            if dry_run:
                outcomes = connector.apply([_action(t) for t in due], dry_run=True)
                tally.update(o.status for o in outcomes)
                continue
            with ledger.transaction():
                claimed = [t for t in due if ledger.claim(t.id, "pending")]
            skipped += len(due) - len(claimed)
            if claimed:
                failed += _run_batch(
                    ledger, connector, processor, claimed, policy, keys, now, tally
                )
                handled += len(claimed)
                # The batch scrubbed the payloads of what it finished: out of the WAL with
                # them now, not at the end of a run that may last minutes.
                ledger.flush_scrubbed()
                if on_batch is not None:
                    on_batch(handled)
        else:
            if not dry_run:
                log.warning("tasks_batch_limit", processor=processor, batches=MAX_BATCHES_PER_RUN)
    report = RunReport({p: dict(c) for p, c in counts.items()}, failed, skipped, dry_run)
    busy = any(report.counts.values()) or skipped
    (log.info if busy else log.debug)("tasks_run", counts=report.counts, failed=failed,
                                      skipped=skipped, dry_run=dry_run)
    return report


def _run_batch(
    ledger: Ledger,
    connector: Connector,
    processor: str,
    claimed: list[Task],
    policy: RetryPolicy,
    keys: SubjectKeys,
    now: datetime,
    tally: Counter[str],
) -> int:
    """Send one claimed batch and record its outcomes. Returns how many failed."""
    ids = [t.id for t in claimed]
    log.info("tasks_batch", processor=processor, count=len(ids), first_id=ids[0], last_id=ids[-1])
    try:
        outcomes = connector.apply([_action(t) for t in claimed], dry_run=False)
        if len(outcomes) != len(claimed):
            raise RuntimeError(f"{processor}: {len(outcomes)} outcomes for {len(claimed)} actions")
    except BaseException as exc:
        # STYLE 6: push the claimed work forward before re-raising, so it neither
        # stays in flight nor comes straight back.
        error = f"apply raised {type(exc).__name__}"
        log.error("tasks_apply_raised", processor=processor, count=len(claimed), error=error)
        try:
            with ledger.transaction():
                for task in claimed:
                    ledger.retry_later(task.id, now + _delay(policy, task.attempts + 1), error)
        except LedgerError:  # never mask the original error; the next lock holder releases them
            log.exception("tasks_push_forward_failed", processor=processor, count=len(claimed))
        raise
    alerts: Counter[tuple[str, str, str]] = Counter()
    failed = 0
    records: list[TaskOutcome] = []
    for task, outcome in zip(claimed, outcomes):
        tally[outcome.status] += 1
        record, alert = _record(processor, task, outcome, policy, keys, now)
        records.append(record)
        if alert is not None:
            alerts[alert] += 1
            failed += alert[1] != "needs_person"
    # One transaction for the whole batch: until it commits, every task stays in flight.
    ledger.record_outcomes(records)
    for (problem_key, kind, what), count in alerts.items():
        summary = f"{processor}: {count} task(s) {what}; see the task list for details"
        ledger.raise_alert(problem_key, kind, summary)
    return failed


def _record(
    processor: str,
    task: Task,
    outcome: Outcome,
    policy: RetryPolicy,
    keys: SubjectKeys,
    now: datetime,
) -> tuple[TaskOutcome, tuple[str, str, str] | None]:
    """What to write for one outcome, and the alert it calls for as (problem_key, kind, what)."""
    reason, rid, attempts = outcome.reason or "unknown", outcome.request_id, task.attempts + 1
    log.debug("task_outcome", task_id=task.id, processor=processor, status=outcome.status,
              reason=reason)  # fmt: skip
    if outcome.status == "done":
        # A receipt that is not a request id (GA's deletionRequestTime) is the audit detail.
        return TaskOutcome(task.id, "done", vendor_request_id=rid, detail=outcome.evidence,
                           subject=_learn(processor, task, now)), None
    if outcome.status == "needs_person":
        return (TaskOutcome(task.id, "needs_person", error=reason, vendor_request_id=rid),
                (f"needs_person:{processor}:{reason}", "needs_person",
                 f"need a person ({reason})"))
    if outcome.status == "retriable" and outcome.quota_wait:
        # Not a failed try: the vendor's quota for the day is spent (GA: 500 deletions per
        # property). Wait for its reset however many days it takes, never against the budget:
        # a purge bigger than one day's quota must not fail its tail.
        wait = timedelta(seconds=max(outcome.retry_after_seconds or 0.0, 0.0))
        return TaskOutcome(task.id, "pending", error=f"quota_wait:{reason}",
                           next_attempt_at=now + wait, refund_attempt=True), None
    if outcome.status == "retriable" and not policy.exhausted(attempts):
        hint = timedelta(seconds=min(outcome.retry_after_seconds or 0.0,
                                     policy.persisted_max_delay_seconds))  # fmt: skip
        next_at = now + max(_delay(policy, attempts), hint)
        return TaskOutcome(task.id, "pending", error=f"retriable:{reason}",
                           next_attempt_at=next_at), None
    if outcome.status == "retriable":
        return (TaskOutcome(task.id, "failed", error=f"retries_exhausted:{reason}",
                            vendor_request_id=rid),
                (f"retries_exhausted:{processor}", "retries_exhausted", "ran out of retries"))
    suppress: str | None = None
    if reason == "forgotten_email" and task.payload and task.payload.get("email"):
        try:
            suppress = keys.email(task.payload["email"])
        except IdentifierError:
            log.warning("task_suppress_skipped", task_id=task.id, reason="bad_identifier")
    return (TaskOutcome(task.id, "failed", error=reason, vendor_request_id=rid,
                        suppress_key=suppress),
            (f"task_failed:{processor}:{reason}", "task_failed", f"failed ({reason})"))


def _learn(processor: str, task: Task, now: datetime) -> tuple[str, dict[str, Any]] | None:
    """What a done task makes true of its subject, written with its outcome, or None.

    GA cannot be read back: a done ``erase`` there is remembered
    (``analytics_erased_at``) so that the subject is not submitted again.

    An ``unsubscribe`` leaves the member ``unsubscribed`` by syncd's own hand:
    that status (and its ``last_changed``) must never read as a new opt-out by
    the person (see :attr:`syncd.reconcile.LedgerFacts.unsubscribed_by_syncd`);
    an opt-out that caused it is already on record with its own time. A done
    ``subscribe`` ends it. Written with the task's outcome, so a crash cannot
    leave the member unsubscribed without the mark.
    """
    if processor == "google_analytics" and task.action == "erase":
        return task.subject_key, {"analytics_erased_at": now}
    if processor != "mailchimp":
        return None
    if task.action == "unsubscribe":
        return task.subject_key, {"unsubscribed_by_syncd": True}
    if task.action == "subscribe":
        return task.subject_key, {"unsubscribed_by_syncd": False}
    return None


def _delay(policy: RetryPolicy, attempts: int) -> timedelta:
    """The wait after ``attempts`` tries: the first failure gets the policy's initial delay."""
    return policy.next_attempt_delay(max(attempts - 1, 0))


def _payload(action: Action) -> dict[str, Any]:
    """The Action fields needed to rebuild it; empty values are left out."""
    values = {name: getattr(action, name) for name in PAYLOAD_FIELDS}
    return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items() if v}


def _action(task: Task) -> Action:
    """Rebuild a task's Action (a payload-less task yields one the connector refuses)."""
    payload = dict(task.payload or {})
    payload["fields"] = tuple(payload.get("fields") or ())
    known = {name: payload[name] for name in PAYLOAD_FIELDS if name in payload}
    kind: Any = task.action  # an ActionKind: the ledger stores what enqueue was given
    return Action(kind=kind, subject_key=task.subject_key, task_id=task.id, **known)


class _Ids:
    """A set of task ids as one byte each from the lowest (ids are allocated in sequence).

    A run over 400,000 tasks remembers every id it handled: as a ``set`` that is
    some 25 MB, here under 1 MB, whatever the number of tasks.
    """

    def __init__(self) -> None:
        self._low = 0
        self._marks = bytearray()

    def __contains__(self, task_id: int) -> bool:
        at = task_id - self._low
        return 0 <= at < len(self._marks) and self._marks[at] == 1

    def add_all(self, task_ids: Iterable[int]) -> None:
        for task_id in task_ids:
            if not self._marks:
                self._low = task_id
            elif task_id < self._low:
                self._marks[:0] = bytes(self._low - task_id)
                self._low = task_id
            at = task_id - self._low
            if at >= len(self._marks):
                self._marks.extend(bytes(at + 1 - len(self._marks)))
            self._marks[at] = 1


class _Stopped(Exception):
    """A background run was told to stop (raised between batches, never past it)."""


class BackgroundRun:
    """Run some processors' due tasks on a thread of its own while more are being queued.

    A large resync queues its tasks a batch of addresses at a time. Phorest has
    no bulk write, so its tasks are one call each at the configured rate, the
    longest part of the run, and Mailchimp's batches wait for their results:
    this runs a processor's tasks as they are queued, full batches only until
    :meth:`finish`, on a ledger connection of its own
    (:meth:`~syncd.ledger.Ledger.another`) and through the caller's connectors
    (so their rate limits hold across threads), while the caller goes on
    planning and then runs the other processors.

    The thread starts on the second :meth:`wake` (work queued in one go runs as
    before, by the caller: see :attr:`running`). :meth:`finish` waits until
    everything queued before it was called has run. Leaving the ``with`` block
    without :meth:`finish` (an error or an interruption while planning) stops
    the thread after the batch in hand, whose outcomes are recorded.
    """

    def __init__(self, ledger: Ledger, connectors: Mapping[str, Connector], policy: RetryPolicy,
                 keys: SubjectKeys, *, now: datetime) -> None:
        self._ledger, self._connectors = ledger, dict(connectors)
        self._policy, self._keys, self._now = policy, keys, now
        self._wakes = 0
        self._woken = threading.Event()
        self._last_call = threading.Event()
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._report = RunReport()
        self.handled = 0  # tasks finished or rescheduled by the thread so far

    @property
    def running(self) -> bool:
        """Whether the thread was started (else the caller runs these processors itself)."""
        return self._thread is not None

    def __enter__(self) -> BackgroundRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._abort.set()
        self._join()

    def wake(self) -> None:
        """Say that tasks were queued."""
        self._wakes += 1
        if self._thread is None and self._connectors and self._wakes >= 2:
            self._thread = threading.Thread(
                target=contextvars.copy_context().run, args=(self._run,),
                name="syncd-background-run", daemon=True)  # fmt: skip
            self._thread.start()
        self._woken.set()

    def finish(self, waiting: Callable[[], None] = lambda: None,
               every: float = 0.5) -> RunReport:
        """Run what is still due, wait for the thread, and return what it did.

        Args:
            waiting: called every ``every`` seconds while the thread works
                (e.g. to report progress; it may raise to stop waiting).

        Raises:
            Exception: whatever the task runner raised on the thread.
        """
        self._release()
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(every)
            waiting()
        if self._error is not None:
            raise self._error
        return self._report

    def _join(self) -> None:
        self._release()
        if self._thread is not None:
            self._thread.join()

    def _release(self) -> None:
        """Let the thread make its last call (everything due) and end."""
        self._last_call.set()
        self._woken.set()

    def _run(self) -> None:
        try:
            with self._ledger.another() as ledger:
                while not self._abort.is_set():
                    last = self._last_call.is_set()
                    self._woken.clear()
                    before = self.handled
                    # Until the last call, only full batches: a processor that writes in
                    # bulk (Mailchimp) makes no more calls than if it ran at the end.
                    report = run_due(ledger, self._connectors, self._policy, self._keys,
                                     now=self._now, full_batches_only=not last,
                                     on_batch=lambda n: self._batch_done(before + n))
                    self._report = self._report.plus(report)
                    if last:
                        return
                    if self.handled == before:
                        self._woken.wait()
        except _Stopped:
            return
        except BaseException as error:  # raised again by finish()
            self._error = error

    def _batch_done(self, handled: int) -> None:
        self.handled = handled
        if self._abort.is_set():
            raise _Stopped
