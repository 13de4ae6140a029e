"""The task runner against a real ledger file and the real connectors talking to a sandbox."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import connectors
from connectors.base import Action, Connector, Outcome
from syncd import config
from syncd.errors import LedgerError
from syncd.identity import SubjectKeys
from syncd.ledger import Ledger
from syncd.reconcile import Planned
from syncd.retry import RetryPolicy
from syncd.sandbox.app import Sandbox
from syncd.tasks import BackgroundRun, RunReport, enqueue, run_due
from tests.support import FakeClock, wait_for

POLICY = RetryPolicy(budget=3)
_serial = itertools.count()
# Long enough for a stuck thread to show as a failed assertion, not a hung test.
WAIT_SECONDS = 10


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(clients=80, seed=7, smtp_port=None) as running:
        yield running


@pytest.fixture(scope="module")
def settings(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> config.Settings:
    return config.load(sandbox.write_config(tmp_path_factory.mktemp("tasks") / "syncd.toml"))


@pytest.fixture(scope="module")
def keys(settings: config.Settings) -> SubjectKeys:
    secret = settings.identity.hmac_key
    assert secret is not None
    return SubjectKeys(secret.get_secret_value().encode(), settings.identity.default_phone_region)


@pytest.fixture(scope="module")
def live(settings: config.Settings) -> dict[str, Connector]:
    build = lambda kind, section: connectors.load(kind)(  # noqa: E731
        section, retry=RetryPolicy(attempts=2), sleep=lambda _: None
    )
    return {"mailchimp": build("mailchimp", settings.mailchimp),
            "phorest": build("phorest", settings.phorest)}  # fmt: skip


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(tmp_path: Path, clock: FakeClock) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "ledger.sqlite3", clock=clock) as opened:
        yield opened


def new_email(sandbox: Sandbox, status: str | None = "subscribed") -> str:
    """A fresh address, seeded into the sandbox audience with ``status`` (None: not seeded)."""
    email = f"tasks-{next(_serial)}@example.com"
    if status is not None:
        sandbox.mailchimp.add_member(email, status, {"FNAME": "Ada", "LNAME": "Lovelace"})
    return email


def mailchimp(keys: SubjectKeys, kind: str, email: str, why: str = "test") -> Planned:
    names = {"first_name": "Ada", "last_name": "Lovelace"}
    action = Action(kind, keys.email(email), email=email, **names)  # type: ignore[arg-type]
    return Planned("mailchimp", action, "R2", why)


def run(ledger: Ledger, live: dict[str, Connector], keys: SubjectKeys, clock: FakeClock,
        **kwargs: Any) -> RunReport:  # fmt: skip
    return run_due(ledger, live, POLICY, keys, now=clock.now, **kwargs)


def alert_keys(ledger: Ledger) -> list[str]:
    return [alert.problem_key for alert in ledger.open_alerts()]


def test_unsubscribe_runs_and_leaves_evidence_without_personal_data(
    sandbox: Sandbox, ledger: Ledger, live: dict[str, Connector], keys: SubjectKeys,
    clock: FakeClock,
) -> None:  # fmt: skip
    email = new_email(sandbox)
    [task_id] = enqueue(ledger, [mailchimp(keys, "unsubscribe", email, "phorest_opt_out")])
    pending = ledger.task(task_id)
    assert pending is not None and pending.payload == {
        "email": email, "first_name": "Ada", "last_name": "Lovelace"}  # fmt: skip
    assert pending.reason == "R2:phorest_opt_out"

    report = run(ledger, live, keys, clock)

    assert report and report.counts["mailchimp"] == {"done": 1}
    assert sandbox.mailchimp.member(email)["status"] == "unsubscribed"  # type: ignore[index]
    task = ledger.task(task_id)
    assert task is not None and task.state == "done" and task.attempts == 1
    assert task.payload is None and task.dedupe_key is None
    [event] = ledger.audit_events(keys.email(email))
    assert (event.processor, event.action, event.outcome, event.task_id) == (
        "mailchimp", "unsubscribe", "done", task_id)  # fmt: skip


def test_the_same_open_action_is_queued_once(
    sandbox: Sandbox, ledger: Ledger, keys: SubjectKeys
) -> None:
    planned = mailchimp(keys, "unsubscribe", new_email(sandbox))
    first = enqueue(ledger, [planned])
    assert enqueue(ledger, [planned, planned]) == first * 2
    assert ledger.count_tasks_by_state()["pending"] == 1


def test_refused_resubscribes_need_a_person_and_raise_one_alert(
    sandbox: Sandbox, ledger: Ledger, live: dict[str, Connector], keys: SubjectKeys,
    clock: FakeClock,
) -> None:  # fmt: skip
    one = new_email(sandbox, "unsubscribed")
    [task_id] = enqueue(ledger, [mailchimp(keys, "subscribe", one)])
    report = run(ledger, live, keys, clock)
    assert report.counts["mailchimp"] == {"needs_person": 1} and report.failed == 0
    assert ledger.task(task_id).state == "needs_person"  # type: ignore[union-attr]
    assert sandbox.mailchimp.member(one)["status"] == "unsubscribed"  # type: ignore[index]
    assert alert_keys(ledger) == ["needs_person:mailchimp:needs_client_resubscribe"]

    ten = [new_email(sandbox, "unsubscribed") for _ in range(10)]  # one batch call
    enqueue(ledger, [mailchimp(keys, "subscribe", email) for email in ten])
    assert run(ledger, live, keys, clock).counts["mailchimp"] == {"needs_person": 10}
    assert alert_keys(ledger) == ["needs_person:mailchimp:needs_client_resubscribe"]
    [alert] = ledger.open_alerts()
    assert not any(email in alert.summary for email in [one, *ten])


def test_a_permanently_deleted_address_fails_and_is_suppressed(
    sandbox: Sandbox, ledger: Ledger, live: dict[str, Connector], keys: SubjectKeys,
    clock: FakeClock,
) -> None:  # fmt: skip
    email = new_email(sandbox, status=None)
    sandbox.mailchimp.forget(email)
    [task_id] = enqueue(ledger, [mailchimp(keys, "subscribe", email)])

    report = run(ledger, live, keys, clock)

    assert not report and report.failed == 1
    task = ledger.task(task_id)
    assert task is not None and task.state == "failed" and task.last_error == "forgotten_email"
    assert ledger.is_suppressed(keys.email(email))
    assert alert_keys(ledger) == ["task_failed:mailchimp:forgotten_email"]
    assert sandbox.mailchimp.member(email) is None


def test_server_errors_back_off_then_exhaust_the_budget(
    sandbox: Sandbox, ledger: Ledger, live: dict[str, Connector], keys: SubjectKeys,
    clock: FakeClock,
) -> None:  # fmt: skip
    email = new_email(sandbox)
    [task_id] = enqueue(ledger, [mailchimp(keys, "unsubscribe", email)])
    sandbox.traffic.faults["mailchimp"].rate_5xx = 1.0
    try:
        report = run(ledger, live, keys, clock)
        assert report.counts["mailchimp"] == {"retriable": 1} and report
        task = ledger.task(task_id)
        assert task is not None and task.state == "pending" and task.attempts == 1
        assert task.next_attempt_at > clock.now
        assert run(ledger, live, keys, clock).counts["mailchimp"] == {}  # not due yet

        for _ in range(POLICY.budget - 1):
            waiting = ledger.task(task_id)
            assert waiting is not None
            clock.now = waiting.next_attempt_at + timedelta(seconds=1)
            report = run(ledger, live, keys, clock)
    finally:
        sandbox.traffic.faults["mailchimp"].rate_5xx = 0.0

    assert not report and report.failed == 1
    task = ledger.task(task_id)
    assert task is not None and task.state == "failed" and task.attempts == POLICY.budget
    assert alert_keys(ledger) == ["retries_exhausted:mailchimp"]
    assert sandbox.mailchimp.member(email)["status"] == "subscribed"  # type: ignore[index]


def test_withdraw_consent_reaches_phorest(
    sandbox: Sandbox, ledger: Ledger, live: dict[str, Connector], keys: SubjectKeys,
    clock: FakeClock,
) -> None:  # fmt: skip
    client = next(
        c for c in sandbox.phorest.snapshot_clients()
        if c["emailMarketingConsent"] and not (c["deleted"] or c["archived"])
    )
    client_id = client["clientId"]
    action = Action("withdraw_consent", keys.client_id(client_id), client_id=client_id)
    [task_id] = enqueue(ledger, [Planned("phorest", action, "R2", "mailchimp_opt_out")])

    assert run(ledger, live, keys, clock).counts == {"phorest": {"done": 1}, "mailchimp": {}}

    stored = sandbox.phorest.client(client_id)
    assert stored is not None and stored["emailMarketingConsent"] is False
    assert ledger.task(task_id).state == "done"  # type: ignore[union-attr]


def test_a_scanned_record_travels_in_the_task_and_is_scrubbed_once_done(
    sandbox: Sandbox, ledger: Ledger, live: dict[str, Connector], keys: SubjectKeys,
    clock: FakeClock,
) -> None:  # fmt: skip
    phorest: Any = live["phorest"]
    record = next(c for c in phorest.scan() if c.email_consent and c.state == "active"
                  and c.email)  # fmt: skip
    action = Action("withdraw_consent", keys.client_id(record.client_id),
                    client_id=record.client_id, record=record.raw,
                    read_at=record.read_at.isoformat())
    [task_id] = enqueue(ledger, [Planned("phorest", action, "R2", "mailchimp_opt_out")])
    pending = ledger.task(task_id)
    assert pending is not None and pending.payload is not None
    assert (pending.payload["record"], pending.payload["read_at"]) == (record.raw,
                                                                       action.read_at)
    sandbox.traffic.reset_counts()

    assert run(ledger, live, keys, clock).counts == {"phorest": {"done": 1}, "mailchimp": {}}

    routes = sandbox.traffic.summary()["phorest"]["routes"]
    assert [(route.split()[0], sum(by.values())) for route, by in routes.items()] == [("PUT", 1)]
    stored = sandbox.phorest.client(record.client_id)
    assert stored is not None and stored["emailMarketingConsent"] is False
    task = ledger.task(task_id)
    assert task is not None and task.state == "done" and task.payload is None
    assert ledger.checkpoint()
    data = b"".join(p.read_bytes() for p in Path(ledger.path).parent.glob("ledger.sqlite3*"))
    assert record.email is not None and record.email.encode() not in data


def test_dry_run_changes_nothing(
    sandbox: Sandbox, ledger: Ledger, live: dict[str, Connector], keys: SubjectKeys,
    clock: FakeClock,
) -> None:  # fmt: skip
    email = new_email(sandbox)
    [task_id] = enqueue(ledger, [mailchimp(keys, "unsubscribe", email)])
    before = ledger.task(task_id)

    report = run(ledger, live, keys, clock, dry_run=True)

    assert report.dry_run and report.counts["mailchimp"] == {"done": 1}
    assert sandbox.mailchimp.member(email)["status"] == "subscribed"  # type: ignore[index]
    assert ledger.task(task_id) == before
    assert ledger.audit_events() == []


class _Exploding:
    """A connector whose apply fails outright (a bug, not an outcome)."""

    name = "mailchimp"

    def apply(self, actions: Sequence[Action], *, dry_run: bool = False) -> list[Outcome]:
        raise RuntimeError("boom")


def test_an_exception_from_apply_pushes_claimed_tasks_forward_and_propagates(
    sandbox: Sandbox, ledger: Ledger, keys: SubjectKeys, clock: FakeClock
) -> None:
    ids = enqueue(ledger, [mailchimp(keys, "unsubscribe", new_email(sandbox)) for _ in range(3)])

    with pytest.raises(RuntimeError, match="boom"):
        exploding: Any = _Exploding()
        run_due(ledger, {"mailchimp": exploding}, POLICY, keys, now=clock.now)

    for task_id in ids:
        task = ledger.task(task_id)
        assert task is not None and task.state == "pending" and task.attempts == 1
        assert task.next_attempt_at > clock.now
        assert task.last_error == "apply raised RuntimeError"
    assert ledger.due_tasks(10) == []


def test_no_address_stays_in_the_ledger_file_once_tasks_finish(
    sandbox: Sandbox, ledger: Ledger, live: dict[str, Connector], keys: SubjectKeys,
    clock: FakeClock,
) -> None:  # fmt: skip
    forgotten = new_email(sandbox, status=None)
    sandbox.mailchimp.forget(forgotten)
    emails = [new_email(sandbox), new_email(sandbox, "unsubscribed"), forgotten]
    seeded = [m["email_address"] for m in sandbox.mailchimp.snapshot_members()[:20]]
    planned = [mailchimp(keys, "unsubscribe", emails[0]), mailchimp(keys, "subscribe", emails[1]),
               mailchimp(keys, "subscribe", emails[2])]  # fmt: skip
    planned += [mailchimp(keys, "update_names", email) for email in seeded]
    enqueue(ledger, planned)

    run(ledger, live, keys, clock)

    assert ledger.count_tasks_by_state()["pending"] == 0
    assert ledger.checkpoint()
    data = b"".join(p.read_bytes() for p in Path(ledger.path).parent.glob("ledger.sqlite3*"))
    assert b"Lovelace" not in data
    for email in emails + seeded:
        assert email.encode() not in data


class _Scripted:
    """A connector answering every action with the outcome ``answer`` makes of it."""

    name = "google_analytics"
    apply_batch_size = 10

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls = 0

    def apply(self, actions: Sequence[Action], *, dry_run: bool = False) -> list[Outcome]:
        self.calls += 1
        return [self.answer(action) for action in actions]


def erase(keys: SubjectKeys, client_id: str) -> Planned:
    return Planned("google_analytics", Action("erase", keys.client_id(client_id),
                                              client_id=client_id), "R3", "erasure")


def test_a_spent_quota_waits_for_its_reset_and_never_fails_the_task(
    ledger: Ledger, keys: SubjectKeys, clock: FakeClock
) -> None:
    reset_seconds = 5 * 3600.0
    spent: Any = _Scripted(lambda action: Outcome(action, "retriable", "quota_exhausted",
                                                  retry_after_seconds=reset_seconds,
                                                  quota_wait=True))  # fmt: skip
    [task_id] = enqueue(ledger, [erase(keys, "client-1")])

    # Far more quota days than the retry budget allows failed attempts.
    for _ in range(POLICY.budget + 3):
        report = run_due(ledger, {"google_analytics": spent}, POLICY, keys, now=clock.now)
        assert report and report.counts["google_analytics"] == {"retriable": 1}
        task = ledger.task(task_id)
        assert task is not None and task.state == "pending"
        # The reset the vendor named, not the policy's (capped) backoff.
        assert task.next_attempt_at == clock.now + timedelta(seconds=reset_seconds)
        assert task.last_error == "quota_wait:quota_exhausted"
        assert task.attempts == 0  # a spent quota is no failed try: a later 503 has its budget
        clock.now = task.next_attempt_at

    assert ledger.open_alerts() == [] and ledger.audit_events() == []
    assert spent.calls == POLICY.budget + 3


def test_a_receipt_that_is_not_a_request_id_is_kept_as_the_audit_detail(
    ledger: Ledger, keys: SubjectKeys, clock: FakeClock
) -> None:
    receipt = "deletionRequestTime=2026-11-24T19:40:05.123456Z"
    done: Any = _Scripted(lambda action: Outcome(action, "done", "deleted", evidence=receipt))
    [task_id] = enqueue(ledger, [erase(keys, "client-2")])

    assert run_due(ledger, {"google_analytics": done}, POLICY, keys, now=clock.now)

    [event] = ledger.audit_events(keys.client_id("client-2"))
    assert (event.processor, event.action, event.outcome, event.task_id) == (
        "google_analytics", "erase", "done", task_id)  # fmt: skip
    assert event.detail == receipt
    task = ledger.task(task_id)
    assert task is not None and task.payload is None  # the client id is scrubbed
    assert task.last_error is None  # a receipt is not an error


class _ByKind:
    """A connector answering each action by its kind, as a script says; counts its applies."""

    name = "mailchimp"
    script = {"unsubscribe": ("done", None),
              "subscribe": ("needs_person", "needs_client_resubscribe"),
              "update_names": ("retriable", "unavailable"),
              "erase": ("permanent", "forgotten_email")}  # fmt: skip

    def __init__(self) -> None:
        self.applies = 0

    def apply(self, actions: Sequence[Action], *, dry_run: bool = False) -> list[Outcome]:
        self.applies += 1
        return [Outcome(a, self.script[a.kind][0], self.script[a.kind][1],  # type: ignore[arg-type]
                        request_id=f"rid-{a.task_id}") for a in actions]


def _mixed_batch(sandbox: Sandbox, keys: SubjectKeys) -> list[Planned]:
    return [mailchimp(keys, kind, new_email(sandbox, status=None))
            for kind in ("unsubscribe", "subscribe", "update_names", "erase") for _ in range(3)]


def test_a_batch_records_every_outcome_in_one_transaction_as_single_writes_would(
    sandbox: Sandbox, ledger: Ledger, keys: SubjectKeys, clock: FakeClock
) -> None:
    planned = _mixed_batch(sandbox, keys)
    ids = enqueue(ledger, planned)
    begun: list[str] = []
    connector = _ByKind()
    ledger._conn.set_trace_callback(  # noqa: SLF001
        lambda sql: begun.append(sql) if sql.startswith("BEGIN") else None)

    report = run_due(ledger, {"mailchimp": connector}, POLICY, keys, now=clock.now,
                     batch_size=len(ids))  # fmt: skip

    ledger._conn.set_trace_callback(None)  # noqa: SLF001
    assert connector.applies == 1
    # One to claim the batch, one for its twelve outcomes, one for its two alerts each.
    assert len(begun) == 2 + 2
    assert report.counts["mailchimp"] == {"done": 3, "needs_person": 3, "retriable": 3,
                                          "permanent": 3}  # fmt: skip
    states = {}
    for item, task_id in zip(planned, ids):
        task = ledger.task(task_id)
        assert task is not None
        states.setdefault(item.action.kind, set()).add(task.state)
        evidence = ledger.audit_events(item.action.subject_key)
        if item.action.kind == "update_names":  # back to pending, payload kept, no evidence
            assert task.payload and task.last_error == "retriable:unavailable"
            assert task.next_attempt_at > clock.now and evidence == []
            continue
        assert task.payload is None and task.dedupe_key is None  # scrubbed
        [event] = evidence
        assert (event.action, event.outcome, event.task_id, event.vendor_request_id) == (
            item.action.kind, task.state, task_id, f"rid-{task_id}")  # fmt: skip
    assert states == {"unsubscribe": {"done"}, "subscribe": {"needs_person"},
                      "update_names": {"pending"}, "erase": {"failed"}}  # fmt: skip
    facts = ledger.subject_facts([p.action.subject_key for p in planned])
    for item in planned:
        subject = facts.get(item.action.subject_key)
        marked = subject is not None and subject.unsubscribed_by_syncd
        assert marked == (item.action.kind == "unsubscribe")
        assert ledger.is_suppressed(keys.email(item.action.email or "")) == (
            item.action.kind == "erase")  # fmt: skip
    assert sorted(alert_keys(ledger)) == [
        "needs_person:mailchimp:needs_client_resubscribe",
        "task_failed:mailchimp:forgotten_email"]  # fmt: skip


def test_a_crash_while_recording_a_batch_loses_nothing(
    sandbox: Sandbox, ledger: Ledger, keys: SubjectKeys, clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    planned = _mixed_batch(sandbox, keys)
    ids = enqueue(ledger, planned)
    upsert, calls = ledger.upsert_subject, itertools.count()

    def dying_upsert(*args: Any, **kwargs: Any) -> None:
        if next(calls) == 1:  # mid-batch: the outcomes and evidence are already written
            raise LedgerError("disk gone")
        upsert(*args, **kwargs)

    monkeypatch.setattr(ledger, "upsert_subject", dying_upsert)
    with pytest.raises(LedgerError):
        run_due(ledger, {"mailchimp": _ByKind()}, POLICY, keys, now=clock.now,
                batch_size=len(ids))  # fmt: skip
    monkeypatch.undo()

    # Nothing of the batch was recorded: every task is still in flight with its payload.
    for task_id in ids:
        task = ledger.task(task_id)
        assert task is not None and task.state == "in_flight" and task.payload
    assert ledger.audit_events() == []
    assert not any(ledger.is_suppressed(keys.email(p.action.email or "")) for p in planned)
    # The next writer lock holder takes them over, and they finish once.
    assert ledger.release_in_flight() == len(ids)
    run_due(ledger, {"mailchimp": _ByKind()}, POLICY, keys, now=clock.now, batch_size=len(ids))
    assert ledger.count_tasks_by_state()["in_flight"] == 0
    assert len(ledger.audit_events(limit=100)) == 9  # done, needs_person, failed: 3 each


def test_mailchimp_write_calls_are_full_across_applies(
    sandbox: Sandbox, ledger: Ledger, live: dict[str, Connector], keys: SubjectKeys,
    clock: FakeClock,
) -> None:  # fmt: skip
    # 2,500 writes, 70% unsubscribes and 30% name updates, in applies of 1,000.
    planned = [mailchimp(keys, "update_names" if n % 10 < 3 else "unsubscribe", new_email(sandbox))
               for n in range(2_500)]  # fmt: skip
    enqueue(ledger, planned)
    sandbox.traffic.reset_counts()

    report = run(ledger, live, keys, clock, batch_size=1_000)

    assert report.counts["mailchimp"] == {"done": 2_500}
    routes = sandbox.traffic.summary()["mailchimp"]["routes"]
    writes = {route: sum(n.values()) for route, n in routes.items()
              if route.startswith(("POST", "PUT", "PATCH"))}  # fmt: skip
    # 2,500 / 500: each apply of 1,000 fills its last batch of updates with unsubscribes.
    assert sum(writes.values()) == 5, writes
    assert writes == {"POST /3.0/lists/{list_id}": 2, "POST /3.0/batches": 3}


# -- BackgroundRun: a processor's tasks run while more are queued -------------------------


class _Gated:
    """A connector that says done to everything, each apply waiting for ``gate`` first."""

    name = "google_analytics"
    apply_batch_size = 2

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.applied: list[str] = []
        self.threads: set[str] = set()
        self.sizes: list[int] = []

    def apply(self, actions: Sequence[Action], *, dry_run: bool = False) -> list[Outcome]:
        assert self.gate.wait(WAIT_SECONDS), "the test never opened the gate"
        self.threads.add(threading.current_thread().name)
        self.applied.extend(a.client_id or "" for a in actions)
        self.sizes.append(len(actions))
        return [Outcome(action, "done") for action in actions]


def test_a_background_run_carries_out_tasks_queued_in_several_goes(
    ledger: Ledger, keys: SubjectKeys, clock: FakeClock
) -> None:
    gated = _Gated()
    gated.gate.set()
    connectors_: Any = {"google_analytics": gated}
    with BackgroundRun(ledger, connectors_, POLICY, keys, now=clock.now) as background:
        ids = enqueue(ledger, [erase(keys, f"bg-{n}") for n in range(4)])
        background.wake()
        assert not background.running  # one go runs as before, by the caller
        for go in range(3):
            ids += enqueue(ledger, [erase(keys, f"bg-{go}-{n}") for n in range(5)])
            background.wake()
        assert background.running
        report = background.finish()
    assert report.counts == {"google_analytics": {"done": 19}} and report.ok
    assert background.handled == 19
    # Full batches while tasks were being queued; the one short batch at the end.
    assert gated.sizes[:-1] == [2] * 9 and gated.sizes[-1] == 1
    assert sorted(gated.applied) == sorted({f"bg-{n}" for n in range(4)}
                                           | {f"bg-{g}-{n}" for g in range(3) for n in range(5)})
    assert gated.threads == {"syncd-background-run"}
    assert {ledger.task(i).state for i in ids} == {"done"}  # type: ignore[union-attr]


def test_leaving_a_background_run_early_stops_it_after_the_batch_in_hand(
    ledger: Ledger, keys: SubjectKeys, clock: FakeClock
) -> None:
    gated = _Gated()
    connectors_: Any = {"google_analytics": gated}
    ids: list[int] = []

    class Interrupted(Exception):
        pass

    with pytest.raises(Interrupted), BackgroundRun(ledger, connectors_, POLICY, keys,
                                                   now=clock.now) as background:
        for go in range(2):
            ids += enqueue(ledger, [erase(keys, f"stop-{go}-{n}") for n in range(4)])
            background.wake()
        wait_for(lambda: ledger.count_tasks_by_state().get("in_flight", 0) == 2, WAIT_SECONDS,
                 "the first batch to be claimed")
        # The gate opens once the block is being left (and the run told to stop).
        threading.Timer(0.5, gated.gate.set).start()
        raise Interrupted
    assert not [t for t in threading.enumerate() if t.name == "syncd-background-run"]
    states = Counter(ledger.task(i).state for i in ids)  # type: ignore[union-attr]
    assert states == {"done": 2, "pending": 6}  # the batch in hand, and nothing in flight


def test_what_a_background_run_raised_is_raised_by_finish(
    sandbox: Sandbox, ledger: Ledger, keys: SubjectKeys, clock: FakeClock
) -> None:
    exploding: Any = _Exploding()
    with BackgroundRun(ledger, {"mailchimp": exploding}, POLICY, keys,
                       now=clock.now) as background:
        for _ in range(2):
            enqueue(ledger, [mailchimp(keys, "unsubscribe", new_email(sandbox))])
            background.wake()
        with pytest.raises(RuntimeError, match="boom"):
            background.finish()
    assert ledger.due_tasks(10) == []  # pushed forward, as by run_due itself


def test_reports_add_up() -> None:
    one = RunReport({"phorest": {"done": 2}, "mailchimp": {"done": 1}}, failed=1, skipped=0)
    two = RunReport({"phorest": {"done": 3, "retriable": 1}}, failed=0, skipped=2)
    assert one.plus(two) == RunReport(
        {"phorest": {"done": 5, "retriable": 1}, "mailchimp": {"done": 1}}, failed=1, skipped=2)
    assert one.counts == {"phorest": {"done": 2}, "mailchimp": {"done": 1}}  # unchanged


def test_the_ids_a_run_handled_are_remembered_in_any_order() -> None:
    from syncd.tasks import _Ids

    ids = _Ids()
    assert 5 not in ids
    ids.add_all([100, 103, 7, 250_000, 100])
    assert all(n in ids for n in (100, 103, 7, 250_000))
    assert not any(n in ids for n in (0, 6, 8, 101, 102, 104, 249_999, 250_001, -1))
