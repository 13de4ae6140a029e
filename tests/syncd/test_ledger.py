"""Tests for syncd.ledger against a real SQLite file in tmp_path (no mocks)."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.support import FakeClock
from syncd.ledger import _db as ledger_module  # where the migrations are read
from syncd.errors import LedgerError
from syncd.ledger import KEYS_PER_QUERY, SCHEMA_VERSION, Ledger, Task, TaskOutcome

REPO_ROOT = Path(__file__).resolve().parents[2]
START = datetime(2026, 11, 24, 19, 40, 5, 123456, tzinfo=UTC)
SEEDED_EMAIL = "alice.ledgertest@example.com"



@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite3"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def ledger(path: Path, clock: FakeClock) -> Iterator[Ledger]:
    with Ledger.open(path, clock=clock) as opened:
        yield opened


def raw(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Inspect the file with a plain sqlite3 connection, as an operator would."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def stored(ledger: Ledger, task_id: int) -> Task:
    task = ledger.task(task_id)
    assert task is not None, f"task {task_id} is missing"
    return task


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


# -- opening, file mode, schema versions ------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277], ids=["000", "022", "277"])
def test_new_file_is_private_in_wal_mode_at_the_current_version(path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with Ledger.open(path) as ledger:
            ledger.set_cursor("probe", "1")  # a write, so the -wal and -shm files exist
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            for sidecar in ("-wal", "-shm"):
                assert stat.S_IMODE(Path(f"{path}{sidecar}").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert raw(path, "PRAGMA journal_mode") == [("wal",)]
    assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_existing_file_keeps_its_mode(path: Path) -> None:
    path.touch(mode=0o640)
    path.chmod(0o640)
    Ledger.open(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_missing_directory_is_a_one_line_ledger_error(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "ledger.sqlite3"
    with pytest.raises(LedgerError) as caught:
        Ledger.open(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    assert not path.parent.exists()


def test_a_file_that_is_not_a_database_is_a_one_line_ledger_error(path: Path) -> None:
    path.write_bytes(b"these are not the pages you are looking for\n" * 200)
    with pytest.raises(LedgerError) as caught:
        Ledger.open(path)
    message = str(caught.value)
    assert str(path) in message and "not a database" in message and "\n" not in message


def test_a_newer_schema_is_refused_naming_the_path_and_both_versions(path: Path) -> None:
    Ledger.open(path).close()
    raw(path, f"PRAGMA user_version = {SCHEMA_VERSION + 3}")
    with pytest.raises(LedgerError) as caught:
        Ledger.open(path)
    assert str(caught.value) == (
        f"{path}: ledger schema version {SCHEMA_VERSION + 3} is newer than this syncd "
        f"understands ({SCHEMA_VERSION}); upgrade syncd"
    )


@pytest.mark.parametrize("start", range(1, SCHEMA_VERSION + 1))
def test_opening_an_older_file_migrates_it_and_keeps_its_data(
    path: Path, monkeypatch: pytest.MonkeyPatch, start: int
) -> None:
    full = ledger_module.MIGRATIONS
    extended = (*full, "CREATE TABLE later (id INTEGER PRIMARY KEY, note TEXT);")
    monkeypatch.setattr(ledger_module, "MIGRATIONS", full[:start])
    with Ledger.open(path) as old:
        task_id = old.add_task("s1", "mailchimp", "unsubscribe", "opt_out", payload={"k": "v"})
        old.suppress("id1", "erasure")
    assert raw(path, "PRAGMA user_version") == [(start,)]

    monkeypatch.setattr(ledger_module, "MIGRATIONS", extended)
    with Ledger.open(path) as new:
        task = new.task(task_id)
        assert task is not None and task.payload == {"k": "v"}
        assert new.is_suppressed("id1")
    assert raw(path, "PRAGMA user_version") == [(len(extended),)]
    assert raw(path, "SELECT COUNT(*) FROM later") == [(0,)]


def test_an_appended_migration_is_applied_once_and_never_again(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Ledger.open(path).close()
    added = (
        "ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;\n"
        "-- a second statement; with a semicolon in this comment\n"
        "INSERT INTO cursors (name, value, updated_at) VALUES ('migrated', 'x;y', 'then');"
    )
    monkeypatch.setattr(ledger_module, "MIGRATIONS", (*ledger_module.MIGRATIONS, added))
    for _ in range(3):  # re-applying would fail: duplicate column, duplicate cursor
        with Ledger.open(path) as ledger:
            assert ledger.get_cursor("migrated") == "x;y"
    assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert ("priority",) in raw(path, "SELECT name FROM pragma_table_info('tasks')")


def test_a_failing_migration_leaves_the_old_version_and_no_partial_change(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Ledger.open(path).close()
    broken = "CREATE TABLE half (id INTEGER);\nINSERT INTO no_such_table VALUES (1);"
    monkeypatch.setattr(ledger_module, "MIGRATIONS", (*ledger_module.MIGRATIONS, broken))
    with pytest.raises(LedgerError, match=f"schema version {SCHEMA_VERSION + 1} failed"):
        Ledger.open(path)
    assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert raw(path, "SELECT name FROM sqlite_master WHERE name = 'half'") == []


def test_threads_opening_a_new_file_at_once_all_succeed(path: Path) -> None:
    barrier, errors = threading.Barrier(4, timeout=30), []

    def open_it() -> None:
        barrier.wait()
        try:
            Ledger.open(path).close()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


# -- tasks --------------------------------------------------------------------


def test_claim_lets_exactly_one_of_two_threads_win(path: Path) -> None:
    rounds = 50
    with Ledger.open(path) as ledger:
        task_ids = [ledger.add_task(f"s{n}", "mailchimp", "unsubscribe", "opt_out")
                    for n in range(rounds)]  # fmt: skip
    barrier = threading.Barrier(2, timeout=30)
    wins: dict[str, list[bool]] = {}

    def worker(name: str) -> None:
        with Ledger.open(path) as own:  # one connection per thread
            results = []
            for task_id in task_ids:
                barrier.wait()
                results.append(own.claim(task_id))
            wins[name] = results

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a + b for a, b in zip(wins["a"], wins["b"], strict=True)] == [1] * rounds
    with Ledger.open(path) as ledger:
        assert {stored(ledger, t).attempts for t in task_ids} == {1}


def test_claim_is_refused_once_the_task_left_the_expected_state(ledger: Ledger) -> None:
    task_id = ledger.add_task("s1", "mailchimp", "unsubscribe", "opt_out")
    assert ledger.claim(task_id) is True
    assert ledger.claim(task_id) is False
    assert ledger.claim(999) is False


def test_finish_scrubs_the_payload_and_writes_an_audit_row(ledger: Ledger) -> None:
    task_id = ledger.add_task(
        "s1", "mailchimp", "delete_permanent", "erasure",
        payload={"email": SEEDED_EMAIL}, dedupe_key="erase:s1:mailchimp",
    )  # fmt: skip
    ledger.claim(task_id)
    assert ledger.finish(task_id, "done", vendor_request_id="req-42") is True

    task = ledger.task(task_id)
    assert task is not None
    assert (task.state, task.payload, task.dedupe_key) == ("done", None, None)
    [event] = ledger.audit_events(subject_key="s1")
    assert (event.task_id, event.processor, event.action, event.reason, event.outcome) == (
        task_id, "mailchimp", "delete_permanent", "erasure", "done",
    )  # fmt: skip
    assert event.vendor_request_id == "req-42" and event.at == START


def test_finishing_a_final_task_again_changes_nothing(ledger: Ledger) -> None:
    task_id = ledger.add_task("s1", "ga4", "delete_user", "erasure")
    assert ledger.finish(task_id, "failed", error="HTTP 400 invalid user id") is True
    assert ledger.finish(task_id, "done") is False
    assert stored(ledger, task_id).state == "failed"
    assert len(ledger.audit_events()) == 1
    with pytest.raises(ValueError):
        ledger.finish(task_id, "pending")
    with pytest.raises(LedgerError, match="no task 999"):
        ledger.finish(999, "done")


def test_record_outcomes_writes_what_finish_and_retry_later_write_one_by_one(
    ledger: Ledger, clock: FakeClock
) -> None:
    later = START + timedelta(minutes=5)
    # (state, error, vendor request id, detail, next attempt, refund): one of each way.
    ways = [("done", None, "req-1", None, None, False),
            ("done", None, None, "2026-01-01T00:00:00Z", None, False),
            ("needs_person", "needs_client_resubscribe", "req-2", None, None, False),
            ("failed", "x" * 1000, "req-3", None, None, False),
            ("pending", "retriable:unavailable", None, None, later, False),
            ("pending", "quota_wait:quota", None, None, later, True)]  # fmt: skip

    def queue(prefix: str) -> list[int]:
        ids = [ledger.add_task(f"{prefix}{n}", "mailchimp", "unsubscribe", "R2:opt_out",
                               payload={"email": f"{prefix}{n}@example.com"},
                               dedupe_key=f"{prefix}{n}") for n in range(len(ways))]
        for task_id in ids:
            assert ledger.claim(task_id)
        return ids

    singly, batched = queue("a"), queue("b")
    for task_id, (state, error, rid, detail, at, refund) in zip(singly, ways):
        if state == "pending":
            assert at is not None
            ledger.retry_later(task_id, at, error or "", refund_attempt=refund)
        else:
            ledger.finish(task_id, state, error=error, vendor_request_id=rid, detail=detail)
    written = ledger.record_outcomes([
        TaskOutcome(task_id, state, error, rid, detail, at, refund)
        for task_id, (state, error, rid, detail, at, refund) in zip(batched, ways)])
    assert written == [True] * len(ways)

    def task_row(task_id: int) -> tuple[object, ...]:
        t = stored(ledger, task_id)
        return (t.state, t.payload is None, t.dedupe_key is None, t.attempts, t.next_attempt_at,
                t.last_error, t.vendor_request_id)

    def evidence(prefix: str) -> list[tuple[object, ...]]:
        return [(e.at, e.subject_key[1:] if e.subject_key else None, e.processor, e.action,
                 e.reason, e.outcome, e.vendor_request_id, e.detail, e.request_id, e.actor)
                for e in ledger.audit_events(limit=100)
                if (e.subject_key or "").startswith(prefix)]

    assert [task_row(i) for i in batched] == [task_row(i) for i in singly]
    assert evidence("b") == evidence("a") and len(evidence("a")) == 4
    # Already final: nothing written; an unknown task or a task twice: nothing at all.
    assert ledger.record_outcomes([TaskOutcome(batched[0], "failed", "late")]) == [False]
    assert stored(ledger, batched[0]).state == "done" and len(evidence("b")) == 4
    open_id = queue("c")[0]
    with pytest.raises(LedgerError, match="no task 999"):
        ledger.record_outcomes([TaskOutcome(open_id, "done"), TaskOutcome(999, "done")])
    with pytest.raises(ValueError, match="two outcomes"):
        ledger.record_outcomes([TaskOutcome(open_id, "done"), TaskOutcome(open_id, "failed")])
    with pytest.raises(ValueError):
        ledger.record_outcomes([TaskOutcome(open_id, "in_flight")])
    assert stored(ledger, open_id).state == "in_flight" and evidence("c") == []


def test_the_schema_refuses_a_payload_on_a_final_task(path: Path, ledger: Ledger) -> None:
    task_id = ledger.add_task("s1", "mailchimp", "unsubscribe", "opt_out", payload={"e": "x"})
    with pytest.raises(sqlite3.IntegrityError):
        raw(path, f"UPDATE tasks SET state = 'done' WHERE id = {task_id}")


def test_retry_later_persists_attempts_and_next_attempt_across_a_reopen(
    path: Path, clock: FakeClock
) -> None:
    later = START + timedelta(minutes=5)
    with Ledger.open(path, clock=clock) as ledger:
        task_id = ledger.add_task("s1", "mailchimp", "unsubscribe", "opt_out", payload={"a": 1})
        ledger.claim(task_id)
        assert ledger.retry_later(task_id, later, "HTTP 503") is True
    with Ledger.open(path, clock=clock) as ledger:
        task = ledger.task(task_id)
        assert task is not None
        assert (task.state, task.attempts, task.next_attempt_at) == ("pending", 1, later)
        assert (task.last_error, task.payload) == ("HTTP 503", {"a": 1})
        assert ledger.due_tasks(10) == []
        clock.advance(minutes=5)
        assert [t.id for t in ledger.due_tasks(10)] == [task_id]
        assert ledger.claim(task_id)
        assert stored(ledger, task_id).attempts == 2


def test_due_tasks_respects_next_attempt_at_order_limit_and_processor(
    ledger: Ledger, clock: FakeClock
) -> None:
    soon = ledger.add_task(
        "s1", "mailchimp", "a", "r", next_attempt_at=START + timedelta(seconds=1)
    )
    now_mc = ledger.add_task("s2", "mailchimp", "a", "r")
    now_ga = ledger.add_task("s3", "ga4", "a", "r")
    # 20:40:06 at +01:00 is 19:40:06.000000Z: stored as UTC with a fixed width,
    # it sorts before `soon` (19:40:06.123456Z) although it has no fraction.
    plus_one = timezone(timedelta(hours=1))
    whole = ledger.add_task(
        "s4", "mailchimp", "a", "r",
        next_attempt_at=datetime(2026, 11, 24, 20, 40, 6, tzinfo=plus_one),
    )
    assert [t.id for t in ledger.due_tasks(10)] == [now_mc, now_ga]
    clock.advance(seconds=1)
    assert [t.id for t in ledger.due_tasks(10)] == [now_mc, now_ga, whole, soon]
    assert [t.id for t in ledger.due_tasks(1)] == [now_mc]
    assert [t.id for t in ledger.due_tasks(10, processor="ga4")] == [now_ga]
    assert stored(ledger, whole).next_attempt_at == START.replace(second=6, microsecond=0)
    ledger.claim(now_mc)
    assert now_mc not in [t.id for t in ledger.due_tasks(10)]
    with pytest.raises(ValueError, match="naive"):
        ledger.add_task("s5", "ga4", "a", "r", next_attempt_at=datetime(2026, 1, 1))


def test_dedupe_key_prevents_duplicates_while_open_and_allows_requeue_after_final(
    ledger: Ledger,
) -> None:
    first = ledger.add_task("s1", "mailchimp", "unsubscribe", "opt_out", dedupe_key="k")
    assert ledger.add_task("s1", "mailchimp", "unsubscribe", "opt_out", dedupe_key="k") == first
    ledger.claim(first)
    assert ledger.add_task("s1", "mailchimp", "unsubscribe", "opt_out", dedupe_key="k") == first
    assert sum(ledger.count_tasks_by_state().values()) == 1

    ledger.finish(first, "done")
    second = ledger.add_task("s1", "mailchimp", "unsubscribe", "opt_out", dedupe_key="k")
    assert second != first
    assert ledger.count_tasks_by_state() == {
        "pending": 1, "in_flight": 0, "done": 1, "failed": 0, "needs_person": 0, "cancelled": 0,
    }  # fmt: skip


def test_release_in_flight_returns_every_claim_to_pending_due_now_whatever_its_age(
    ledger: Ledger, clock: FakeClock
) -> None:
    later = START + timedelta(hours=1)
    old, recent, waiting = (ledger.add_task(f"s{n}", "mailchimp", "a", "r") for n in range(3))
    backed_off = ledger.add_task("s3", "phorest", "a", "r", next_attempt_at=later)
    ledger.claim(old)
    clock.advance(minutes=9)
    ledger.claim(recent)
    ledger.claim(backed_off)
    ledger.retry_later(waiting, later, "retriable:http_503")
    assert ledger.release_in_flight() == 3
    assert [stored(ledger, t).state for t in (old, recent, backed_off, waiting)] == ["pending"] * 4
    assert {t.id for t in ledger.due_tasks(10)} == {old, recent, backed_off}  # not `waiting`
    assert stored(ledger, old).attempts == 1  # the interrupted call counts as an attempt
    assert stored(ledger, old).last_error == "released: in flight when syncd stopped"
    assert ledger.release_in_flight() == 0


def test_count_open_counts_each_task_once_while_pending_or_in_flight(ledger: Ledger) -> None:
    pending, claimed, done = (ledger.add_task(f"s{n}", "mailchimp", "a", "r") for n in range(3))
    ledger.claim(claimed)
    ledger.finish(done, "done")
    assert ledger.count_open([pending, pending, claimed, done, 999]) == 2
    assert ledger.count_open([]) == 0


def test_long_error_text_is_cut_to_the_limit(ledger: Ledger) -> None:
    task_id = ledger.add_task("s1", "ga4", "a", "r")
    ledger.retry_later(task_id, START, "x" * 10_000)
    assert stored(ledger, task_id).last_error == "x" * ledger_module.ERROR_TEXT_LIMIT_CHARS


# -- transactions and crashes -------------------------------------------------


def test_a_failed_transaction_leaves_nothing_behind(ledger: Ledger) -> None:
    with pytest.raises(RuntimeError):
        with ledger.transaction():
            task_id = ledger.add_task("s1", "mailchimp", "a", "r", dedupe_key="k")
            ledger.finish(task_id, "done")  # itself a transaction: must nest, not BEGIN again
            raise RuntimeError("boom")
    assert ledger.task(task_id) is None
    assert ledger.audit_events() == []


def test_a_caught_failure_in_a_nested_transaction_undoes_only_the_inner_block(
    ledger: Ledger,
) -> None:
    with ledger.transaction():
        ledger.set_cursor("outer", "1")
        with pytest.raises(RuntimeError), ledger.transaction():
            ledger.set_cursor("inner", "1")
            raise RuntimeError("boom")
    assert (ledger.get_cursor("outer"), ledger.get_cursor("inner")) == ("1", None)


def test_a_crash_before_commit_leaves_neither_row_and_a_sound_file(path: Path) -> None:
    result = run_python(
        """
        import os, signal, sys
        from syncd.ledger import Ledger
        ledger = Ledger.open(sys.argv[1])
        with ledger.transaction():
            task_id = ledger.add_task("s1", "mailchimp", "unsubscribe", "opt_out")
            ledger.add_audit("s1", "mailchimp", "unsubscribe", "opt_out", "queued", task_id=task_id)
            print(task_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """,
        str(path),
    )
    assert result.returncode == -9, result.stderr
    assert result.stdout.strip() == "1"
    with Ledger.open(path) as ledger:
        assert ledger.task(1) is None
        assert ledger.audit_events() == []
        assert sum(ledger.count_tasks_by_state().values()) == 0
        assert ledger.integrity_problems() == []


def test_committed_work_survives_a_kill_right_after_commit(path: Path) -> None:
    result = run_python(
        """
        import os, signal, sys
        from syncd.ledger import Ledger
        ledger = Ledger.open(sys.argv[1])
        task_id = ledger.add_task("s1", "mailchimp", "unsubscribe", "opt_out", payload={"n": 1})
        ledger.claim(task_id)
        ledger.set_cursor("phorest", "2026-11-24T19:40:05Z")
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        str(path),
    )
    assert result.returncode == -9, result.stderr
    with Ledger.open(path) as ledger:
        task = ledger.task(1)
        assert task is not None and (task.state, task.payload) == ("in_flight", {"n": 1})
        assert ledger.get_cursor("phorest") == "2026-11-24T19:40:05Z"
        assert ledger.integrity_problems() == []


def test_a_finished_payload_leaves_no_trace_in_the_file_bytes(path: Path) -> None:
    def file_bytes() -> bytes:
        return b"".join(p.read_bytes() for p in path.parent.glob(f"{path.name}*"))

    with Ledger.open(path) as ledger:
        ledger.link_identifier("hmac-e", "email", "s1")
        task_id = ledger.add_task(
            "s1", "mailchimp", "delete_permanent", "erasure",
            payload={"email": SEEDED_EMAIL, "subscriber_hash": "0" * 32, "list_id": "a1b2c3d4e5"},
        )  # fmt: skip
        # Later rows on the same page keep the freed cell from simply being
        # overwritten by its replacement: only zeroing removes the old bytes.
        others = [ledger.add_task(f"s{n}", "ga4", "delete_user", "erasure") for n in range(5)]
        ledger.checkpoint()
        assert SEEDED_EMAIL.encode() in file_bytes()  # the check below can see it
        ledger.claim(task_id)
        ledger.finish(task_id, "done")
        ledger.finish(others[0], "done")
        assert ledger.checkpoint() is True
        assert SEEDED_EMAIL.encode() not in file_bytes()
    assert SEEDED_EMAIL.encode() not in file_bytes()


def _wal_bytes(path: Path) -> bytes:
    wal = Path(f"{path}-wal")
    return wal.read_bytes() if wal.exists() else b""


def _scrub_task(ledger: Ledger) -> None:
    task_id = ledger.add_task("s1", "mailchimp", "delete_permanent", "erasure",
                              payload={"email": SEEDED_EMAIL})
    ledger.claim(task_id)
    ledger.finish(task_id, "done")


def _scrub_inbox_event(ledger: Ledger) -> None:
    ledger.add_inbox_event("mailchimp", "unsubscribe", START, {"email": SEEDED_EMAIL}, "e1")
    (event,) = ledger.pending_inbox()
    ledger.finish_inbox_event(event.id, "consent_withdrawal_queued")


@pytest.mark.parametrize("scrub", [_scrub_task, _scrub_inbox_event], ids=["task", "inbox"])
def test_flush_scrubbed_empties_the_wal_once_no_reader_holds_an_old_snapshot(
    path: Path, scrub: Callable[[Ledger], None]
) -> None:
    with Ledger.open(path) as ledger:
        ledger.set_cursor("warm", "up")  # the reader below starts on this snapshot
        reader = sqlite3.connect(path)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM cursors").fetchall()
            scrub(ledger)
            assert SEEDED_EMAIL.encode() in _wal_bytes(path)  # the check below can see it
            assert ledger.flush_scrubbed() is False  # the reader keeps the old frames alive
            assert SEEDED_EMAIL.encode() in _wal_bytes(path)
            reader.execute("ROLLBACK")
            assert ledger.flush_scrubbed() is True  # tried again (the daemon's next turn)
        finally:
            reader.close()
        assert _wal_bytes(path) == b""
        assert SEEDED_EMAIL.encode() not in path.read_bytes()


def test_closing_after_a_scrub_empties_the_wal_while_another_connection_stays_open(
    path: Path,
) -> None:
    with Ledger.open(path) as other:
        with Ledger.open(path) as ledger:
            _scrub_task(ledger)
            assert SEEDED_EMAIL.encode() in _wal_bytes(path)
        # SQLite itself only empties the WAL when the last connection closes.
        assert SEEDED_EMAIL.encode() not in _wal_bytes(path)
        assert other.count_open([1]) == 0


def test_frames_from_before_an_automatic_checkpoint_do_not_linger_in_the_wal(path: Path) -> None:
    filler = "x" * 3000  # about one page per write
    near_checkpoint_bytes = 950 * 4120  # SQLite checkpoints at 1000 frames of 4 KiB pages
    with Ledger.open(path) as ledger:
        n = 0
        while len(_wal_bytes(path)) < near_checkpoint_bytes:
            ledger.set_cursor(f"c{n}", filler)
            n += 1
        _scrub_task(ledger)  # near the end of the WAL, the unscrubbed page version
        assert SEEDED_EMAIL.encode() in _wal_bytes(path)
        largest = len(_wal_bytes(path))
        for more in range(n, n + 200):  # past the automatic checkpoint, and the WAL restarts
            ledger.set_cursor(f"c{more}", filler)
            if len(_wal_bytes(path)) < largest:
                break
        # journal_size_limit: the first commit after the restart cut the file to what it wrote.
        assert len(_wal_bytes(path)) < largest
        assert SEEDED_EMAIL.encode() not in _wal_bytes(path)


# -- subjects, suppression, cursors, alerts, requests -------------------------


def test_upsert_subject_changes_only_the_fields_given(ledger: Ledger, clock: FakeClock) -> None:
    assert ledger.subject("s1") is None
    ledger.upsert_subject("s1", consent=True, consent_at=START - timedelta(days=1))
    clock.advance(hours=1)
    ledger.upsert_subject("s1", restricted=True)
    subject = ledger.subject("s1")
    assert subject is not None
    assert (subject.consent, subject.consent_at, subject.restricted) == (
        True, START - timedelta(days=1), True,
    )  # fmt: skip
    assert (subject.created_at, subject.updated_at) == (START, clock.now)
    ledger.upsert_subject("s1", consent=None, consent_at=None)
    subject = ledger.subject("s1")
    assert subject is not None and (subject.consent, subject.restricted) == (None, True)


def test_identifiers_map_to_one_subject_and_relinking_reports_the_old_one(ledger: Ledger) -> None:
    assert ledger.link_identifier("hmac-email", "email", "s1") is None
    assert ledger.link_identifier("hmac-phone", "phone", "s1") is None
    assert ledger.link_identifier("hmac-phone", "phone", "s1") is None
    assert ledger.subject_for("hmac-email") == ledger.subject_for("hmac-phone") == "s1"
    assert ledger.subject("s1") is not None
    assert ledger.link_identifier("hmac-email", "email", "s2") == "s1"
    assert ledger.subject_for("hmac-email") == "s2"
    assert ledger.subject_for("unknown") is None
    with pytest.raises(ValueError):
        ledger.link_identifier("hmac-x", "postcode", "s1")


def test_upsert_subjects_matches_one_upsert_per_subject(ledger: Ledger, clock: FakeClock) -> None:
    ledger.upsert_subject("old", consent=True, restricted=True, synced_email_key="k-old")
    changes = {
        "old": {"consent": False, "consent_at": START},  # others keep their value
        "new": {},  # created with the defaults
        "opted": {"opted_out_at": START, "unsubscribed_by_syncd": True},
        "synced": {"synced_email_key": "k-1", "client_seen": "3|x|active"},
    }
    with ledger.transaction():
        ledger.upsert_subjects(changes)
    facts = ledger.subject_facts(list(changes))
    old, new, opted, synced = (facts.get(k) for k in changes)
    assert old is not None and (old.consent, old.restricted, old.synced_email_key) == (
        False, True, "k-old")
    subject = ledger.subject("old")
    assert subject is not None and subject.consent_at == START
    assert new is not None and (new.consent, new.restricted, new.unsubscribed_by_syncd) == (
        None, False, False)
    assert opted is not None and (opted.opted_out_at, opted.unsubscribed_by_syncd) == (START, True)
    assert synced is not None and (synced.synced_email_key, synced.client_seen) == (
        "k-1", "3|x|active")
    with pytest.raises(ValueError):
        ledger.upsert_subjects({"s": {"no_such_column": 1}})


def test_link_identifiers_links_many_and_relinks(ledger: Ledger) -> None:
    ledger.link_identifier("e1", "email", "s1")
    ledger.link_identifiers([("e1", "email", "s2"), ("e2", "email", "s3"), ("p3", "phone", "s3")])
    assert ledger.subjects_for(["e1", "e2", "p3"]) == {"e1": "s2", "e2": "s3", "p3": "s3"}
    assert ledger.subject("s3") is not None
    with pytest.raises(ValueError):
        ledger.link_identifiers([("x", "postcode", "s1")])


def test_digests_round_trip_per_processor(ledger: Ledger) -> None:
    ledger.upsert_subject("s1")
    ledger.set_digest("s1", "mailchimp", "d1")
    ledger.set_digest("s1", "mailchimp", "d2")
    assert (ledger.digest("s1", "mailchimp"), ledger.digest("s1", "ga4")) == ("d2", None)
    with pytest.raises(LedgerError, match="FOREIGN KEY"):
        ledger.set_digest("nobody", "mailchimp", "d")


def test_suppression_is_idempotent_and_checked_over_several_keys(ledger: Ledger) -> None:
    request_id = ledger.add_request("erase", "s1", "cli", START + timedelta(days=30))
    assert ledger.suppress("k-email", "erasure", request_id) is True
    assert ledger.suppress("k-email", "retention") is False
    assert ledger.is_suppressed("k-phone", "k-email") is True
    assert ledger.is_suppressed("k-phone", "k-other") is False
    assert ledger.is_suppressed() is False
    many = [f"k{n}" for n in range(1200)] + ["k-email"]  # more than one query's worth
    assert ledger.is_suppressed(*many) is True


def test_cursors_round_trip_and_survive_a_reopen(path: Path) -> None:
    with Ledger.open(path) as ledger:
        assert ledger.get_cursor("phorest") is None
        ledger.set_cursor("phorest", "a")
        ledger.set_cursor("phorest", "b")
    with Ledger.open(path) as ledger:
        assert ledger.get_cursor("phorest") == "b"


def test_alerts_dedupe_per_problem_and_reopen_after_resolve(
    ledger: Ledger, clock: FakeClock
) -> None:
    first = ledger.raise_alert("down:mailchimp", "processor_down", "Mailchimp unreachable")
    again = ledger.raise_alert("down:mailchimp", "processor_down", "still unreachable")
    other = ledger.raise_alert("down:ga4", "processor_down", "GA4 unreachable")
    assert again == first and other.id != first.id
    assert [a.id for a in ledger.open_alerts()] == [first.id, other.id]

    clock.advance(minutes=1)
    ledger.mark_notified(first.id)
    ledger.mark_notified(first.id)
    notified = ledger.raise_alert("down:mailchimp", "processor_down", "x")
    assert (notified.notify_count, notified.last_notified_at) == (2, clock.now)

    assert ledger.resolve_alert("down:mailchimp") is True
    assert ledger.resolve_alert("down:mailchimp") is False
    assert [a.id for a in ledger.open_alerts()] == [other.id]
    reopened = ledger.raise_alert("down:mailchimp", "processor_down", "down again")
    assert reopened.id != first.id and reopened.notify_count == 0


def test_requests_open_close_and_link_to_tasks(ledger: Ledger) -> None:
    late = ledger.add_request("erase", "s1", "cli", START + timedelta(days=30))
    soon = ledger.add_request("export", "s2", "webhook", START + timedelta(days=3))
    assert [r.id for r in ledger.open_requests()] == [soon, late]
    task_id = ledger.add_task("s1", "mailchimp", "delete_permanent", "erasure", request_id=late)
    assert stored(ledger, task_id).request_id == late
    with pytest.raises(LedgerError, match="FOREIGN KEY"):
        ledger.add_task("s1", "mailchimp", "delete_permanent", "erasure", request_id=999)

    assert ledger.close_request(soon, "done", note="sent") is True
    assert ledger.close_request(soon, "cancelled") is False
    closed = ledger.request(soon)
    assert closed is not None and (closed.state, closed.closed_at, closed.note) == (
        "done", START, "sent",
    )  # fmt: skip
    assert [r.id for r in ledger.open_requests()] == [late]
    with pytest.raises(ValueError):
        ledger.add_request("delete", "s1", "cli", START)


def test_open_requests_page_by_due_date_and_count(ledger: Ledger) -> None:
    dues = (9, 3, 5, 3, 7)
    ids = [ledger.add_request("erase", f"s{n}", "cli", START + timedelta(days=d))
           for n, d in enumerate(dues)]  # fmt: skip
    ledger.close_request(ids[2], "done")
    everything = [r.id for r in ledger.open_requests()]
    assert everything == [ids[1], ids[3], ids[4], ids[0]]
    assert [r.id for r in ledger.open_requests(2)] == everything[:2]
    assert [r.id for r in ledger.open_requests(2, 2)] == everything[2:]
    assert ledger.open_requests(2, 4) == []
    assert ledger.count_open_requests() == 4
    assert ledger.count_requests() == 5


def test_requests_by_id_reads_many_requests_at_once(ledger: Ledger) -> None:
    ids = [ledger.add_request("erase", f"s{n}", "cli", START + timedelta(days=n))
           for n in range(KEYS_PER_QUERY + 3)]  # fmt: skip
    ledger.close_request(ids[1], "cancelled")
    found = ledger.requests_by_id([ids[1], 999_999, *reversed(ids), ids[0]])
    assert sorted(found) == ids
    assert found[ids[1]] == ledger.request(ids[1])
    assert found[ids[-1]].due_at == START + timedelta(days=KEYS_PER_QUERY + 2)
    assert ledger.requests_by_id([]) == {}


def test_subjects_for_answers_many_identifiers_in_one_call(ledger: Ledger) -> None:
    for n in range(1200):  # more than one query's worth of keys
        ledger.link_identifier(f"email-{n}", "email", f"s{n % 7}")
    asked = [f"email-{n}" for n in range(0, 1200, 3)] + ["never-linked"]
    found = ledger.subjects_for(asked)
    assert found == {f"email-{n}": f"s{n % 7}" for n in range(0, 1200, 3)}
    assert all(ledger.subject_for(key) == subject for key, subject in found.items())


def test_recovery_notice_is_owed_only_for_notified_alerts(ledger: Ledger, clock: FakeClock) -> None:
    told = ledger.raise_alert("down:mailchimp", "processor_down", "Mailchimp unreachable")
    untold = ledger.raise_alert("down:phorest", "processor_down", "Phorest unreachable")
    ledger.mark_notified(told.id)
    clock.advance(minutes=5)
    ledger.resolve_alert("down:mailchimp")
    ledger.resolve_alert("down:phorest")
    assert [a.id for a in ledger.alerts_recovered()] == [told.id]
    ledger.mark_recovery_notified(told.id)
    assert ledger.alerts_recovered() == []
    assert untold.id not in [a.id for a in ledger.open_alerts()]


def test_processor_health_tracks_contact_and_down_since(ledger: Ledger, clock: FakeClock) -> None:
    assert ledger.processor_health() == {}
    ledger.record_contact("mailchimp", ok=True)
    clock.advance(minutes=1)
    ledger.record_contact("mailchimp", ok=False, error="ConnectionError", credentials_ok=None)
    first_failure = clock.now
    clock.advance(minutes=1)
    ledger.record_contact("mailchimp", ok=False, error="401 API Key Invalid", credentials_ok=False)
    state = ledger.processor_health()["mailchimp"]
    assert state.last_ok_at == START
    assert (state.last_error, state.last_error_at) == ("401 API Key Invalid", clock.now)
    assert state.down_since == first_failure  # the first failure of the run, not the latest
    assert state.credentials_ok is False
    clock.advance(minutes=1)
    ledger.record_contact("mailchimp", ok=True)
    state = ledger.processor_health()["mailchimp"]
    assert (state.last_ok_at, state.down_since, state.credentials_ok) == (clock.now, None, True)
    assert state.last_error == "401 API Key Invalid"  # kept as history

    ledger.record_contact("phorest", ok=False, error="x" * 2000)
    fresh = ledger.processor_health()["phorest"]
    assert fresh.last_ok_at is None and fresh.credentials_ok is None
    assert len(fresh.last_error or "") == ledger_module.ERROR_TEXT_LIMIT_CHARS


def test_commands_queue_claim_progress_and_finish(ledger: Ledger) -> None:
    assert ledger.next_command() is None
    first = ledger.add_command("resync", {"processor": "mailchimp"})
    second = ledger.add_command("resync", {})
    assert [c.id for c in ledger.active_commands()] == [first, second]
    queued = ledger.next_command()
    assert queued is not None and (queued.id, queued.options) == (first, {"processor": "mailchimp"})
    assert ledger.start_command(first) is True
    assert ledger.start_command(first) is False  # compare-and-set: one claimant
    ledger.command_progress(first, {"stage": "phorest", "done": 200, "total": None})
    running = ledger.command(first)
    assert running is not None and running.state == "running"
    assert running.progress == {"stage": "phorest", "done": 200, "total": None}
    assert ledger.finish_command(first, "done", result={"planned": 3}) is True
    assert ledger.finish_command(first, "failed", error="late") is False
    done = ledger.command(first)
    assert done is not None and (done.state, done.result, done.error) == ("done", {"planned": 3}, None)
    assert done.finished_at is not None
    next_up = ledger.next_command()
    assert next_up is not None and next_up.id == second
    assert [c.id for c in ledger.active_commands()] == [second]
    with pytest.raises(ValueError, match="unknown command kind"):
        ledger.add_command("purge", {})
    with pytest.raises(ValueError, match="not a final command state"):
        ledger.finish_command(second, "queued")


def test_abandoned_running_commands_are_failed(ledger: Ledger) -> None:
    running = ledger.add_command("resync", {})
    waiting = ledger.add_command("resync", {})
    ledger.start_command(running)
    assert ledger.fail_abandoned_commands("the daemon stopped before it finished") == 1
    gone, still = ledger.command(running), ledger.command(waiting)
    assert gone is not None and (gone.state, gone.error) == (
        "failed", "the daemon stopped before it finished")
    assert still is not None and still.state == "queued"


def test_status_task_summaries(ledger: Ledger, clock: FakeClock) -> None:
    assert ledger.oldest_failing_task() is None
    ok = ledger.add_task("s1", "mailchimp", "unsubscribe", "R1")
    retrying = ledger.add_task("s2", "phorest", "withdraw_consent", "R1")
    clock.advance(minutes=1)
    manual = ledger.add_task("s3", "mailchimp", "subscribe", "R2")
    assert ledger.oldest_failing_task() is None
    ledger.claim(retrying)
    ledger.retry_later(retrying, clock.now + timedelta(minutes=5), "503 Service Unavailable")
    ledger.claim(manual)
    ledger.finish(manual, "needs_person", error="compliance state")
    failing = ledger.oldest_failing_task()
    assert failing is not None and failing.id == retrying
    assert [t.id for t in ledger.tasks_in_state("needs_person")] == [manual]
    assert ok not in [t.id for t in ledger.tasks_in_state("needs_person")]
    with pytest.raises(ValueError, match="unknown task state"):
        ledger.tasks_in_state("lost")


# -- v7: request steps, extensions, audit by request -----------------------------


def test_the_current_schema_has_the_v7_request_steps() -> None:
    # The migration tests above run from every version up to SCHEMA_VERSION: v7 among them.
    assert SCHEMA_VERSION >= 7
    assert "request_steps" in ledger_module.MIGRATIONS[6]


@pytest.mark.parametrize("start", range(1, 7))
def test_a_request_from_before_v7_takes_steps_extensions_and_audit_by_request(
    path: Path, monkeypatch: pytest.MonkeyPatch, start: int
) -> None:
    full = ledger_module.MIGRATIONS
    monkeypatch.setattr(ledger_module, "MIGRATIONS", full[:start])
    Ledger.open(path).close()
    # Rows as an older syncd wrote them: only the columns every version has.
    at = "2026-11-24T19:40:05.123456Z"
    conn = sqlite3.connect(path)
    try:
        with conn:
            request_id = conn.execute(
                "INSERT INTO requests (kind, subject_key, source, received_at, due_at)"
                " VALUES ('erase', 's1', 'email', ?, ?)", (at, at)).lastrowid
            task_id = conn.execute(
                "INSERT INTO tasks (subject_key, processor, action, reason, next_attempt_at,"
                " created_at, updated_at, request_id) VALUES ('s1', 'mailchimp', 'erase', 'R3',"
                " ?, ?, ?, ?)", (at, at, at, request_id)).lastrowid
            conn.execute("INSERT INTO audit (at, subject_key, action, outcome)"
                         " VALUES (?, 's1', 'request_erase', 'filed')", (at,))
            conn.execute("INSERT INTO subjects (subject_key, created_at, updated_at)"
                         " VALUES ('s1', ?, ?)", (at, at))
    finally:
        conn.close()
    assert request_id is not None and task_id is not None
    monkeypatch.setattr(ledger_module, "MIGRATIONS", full)

    with Ledger.open(path) as new:
        request = new.request(request_id)
        assert request is not None
        assert (request.filed_by, request.client_id, request.extended_months,
                request.extension_reason) == (None, None, 0, None)  # fmt: skip
        [old_event] = new.find_audit()
        assert old_event.request_id is None
        facts = new.subject_facts(["s1"])["s1"]
        assert facts.analytics_erased_at is None
        step = new.add_step(request_id, "mailchimp", "task", task_id=task_id)
        assert [s.id for s in new.open_steps()] == [step]
        assert new.extend_request(request_id, 2, START + timedelta(days=90), "complex") is True
        new.finish(task_id, "done", vendor_request_id="r-1")
        assert [e.task_id for e in new.find_audit(request_id=request_id)] == [task_id]
    assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_steps_open_close_with_evidence_and_a_failed_step_may_still_be_done(
    ledger: Ledger, clock: FakeClock
) -> None:
    request_id = ledger.add_request("erase", "s1", "email", START + timedelta(days=30))
    task_id = ledger.add_task("s1", "mailchimp", "erase", "R3", request_id=request_id)
    task_step = ledger.add_step(request_id, "mailchimp", "task", task_id=task_id, client_id="c1")
    manual = ledger.add_step(request_id, "phorest", "manual", client_id="c1",
                             instructions="Forget client c1")  # fmt: skip
    clock.advance(minutes=5)

    assert ledger.close_step(task_step, "failed", evidence="task failed: 400") is True
    assert ledger.close_step(task_step, "failed") is False  # failing twice is not a change
    assert ledger.close_step(task_step, "done", confirmed_by="Ann", evidence="by hand") is True
    assert ledger.close_step(task_step, "done") is False
    assert ledger.close_step(task_step, "cancelled") is False
    assert ledger.close_step(manual, "cancelled", evidence="request cancelled") is True

    first, second = ledger.steps(request_id)
    assert (first.id, first.processor, first.kind, first.state, first.task_id, first.client_id) == (
        task_step, "mailchimp", "task", "done", task_id, "c1")
    assert (first.confirmed_by, first.evidence, first.opened_at, first.closed_at) == (
        "Ann", "by hand", START, clock.now)
    assert (second.state, second.instructions, second.evidence) == (
        "cancelled", "Forget client c1", "request cancelled")
    with pytest.raises(ValueError, match="does not close a step"):
        ledger.close_step(manual, "waiting")
    with pytest.raises(ValueError, match="unknown step kind"):
        ledger.add_step(request_id, "phorest", "robot")
    with pytest.raises(LedgerError, match="FOREIGN KEY"):
        ledger.add_step(999, "phorest", "manual")


def test_open_steps_are_the_waiting_and_failed_steps_of_open_requests(ledger: Ledger) -> None:
    request_id = ledger.add_request("erase", "s1", "email", START + timedelta(days=30))
    closed_request = ledger.add_request("erase", "s2", "email", START + timedelta(days=30))
    waiting = ledger.add_step(request_id, "mailchimp", "task")
    failed = ledger.add_step(request_id, "google_analytics", "task")
    done = ledger.add_step(request_id, "paper_forms", "manual")
    manual = ledger.add_step(request_id, "phorest", "manual")
    ledger.add_step(closed_request, "phorest", "manual")
    ledger.close_step(failed, "failed")
    ledger.close_step(done, "done")
    ledger.close_request(closed_request, "cancelled")

    assert [s.id for s in ledger.open_steps()] == [waiting, failed, manual]
    assert [s.id for s in ledger.open_steps(kind="manual")] == [manual]
    assert [s.id for s in ledger.open_steps(kind="task")] == [waiting, failed]


def test_an_extension_is_one_or_two_months_in_all_and_the_file_enforces_it(
    path: Path, ledger: Ledger
) -> None:
    request_id = ledger.add_request("erase", "s1", "email", START + timedelta(days=30))
    for months in (0, 3):
        with pytest.raises(ValueError, match="1 to 2 months"):
            ledger.extend_request(request_id, months, START + timedelta(days=60), "why")
    assert ledger.extend_request(request_id, 2, START + timedelta(days=90), "complex") is True
    request = ledger.request(request_id)
    assert request is not None
    assert (request.extended_months, request.due_at, request.extension_reason) == (
        2, START + timedelta(days=90), "complex")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        raw(path, f"UPDATE requests SET extended_months = 3 WHERE id = {request_id}")
    ledger.close_request(request_id, "done")
    assert ledger.extend_request(request_id, 1, START, "late") is False


def test_all_requests_lists_every_state_newest_first(ledger: Ledger) -> None:
    first = ledger.add_request("erase", "s1", "email", START, filed_by="Ann", client_id="c1")
    second = ledger.add_request("restrict", "s2", "phone", START)
    ledger.close_request(first, "done")
    assert [r.id for r in ledger.all_requests()] == [second, first]
    assert [r.id for r in ledger.all_requests(limit=1)] == [second]
    stored_first = ledger.request(first)
    assert stored_first is not None
    assert (stored_first.filed_by, stored_first.client_id) == ("Ann", "c1")


@pytest.fixture
def audit_trail(ledger: Ledger, clock: FakeClock) -> dict[str, int]:
    """Five entries a minute apart: two requests, three subjects, one task."""
    request_a = ledger.add_request("erase", "s1", "email", START + timedelta(days=30))
    request_b = ledger.add_request("erase", "s2", "email", START + timedelta(days=30))
    ids = {"request_a": request_a, "request_b": request_b}
    ids["e1"] = ledger.add_audit("s1", None, "request_erase", "R3", "filed", request_id=request_a)
    clock.advance(minutes=1)
    ids["e2"] = ledger.add_audit("s2", None, "request_erase", "R3", "filed", request_id=request_b)
    clock.advance(minutes=1)
    task_id = ledger.add_task("s1", "mailchimp", "erase", "R3", request_id=request_a)
    ledger.finish(task_id, "done", vendor_request_id="mc-1", detail="receipt")
    ids["e3"] = ledger.task_evidence(task_id).id  # type: ignore[union-attr]
    ids["task"] = task_id
    clock.advance(minutes=1)
    ids["e4"] = ledger.add_audit("s3", "mailchimp", "unsubscribe", "R1", "done")
    clock.advance(minutes=1)
    ids["e5"] = ledger.add_audit("s1", "phorest", "forget_client", "R3", "done",
                                 request_id=request_a)  # fmt: skip
    return ids


def test_find_audit_filters_by_subjects_request_and_time_oldest_first(
    ledger: Ledger, audit_trail: dict[str, int]
) -> None:
    ids = audit_trail

    def found(**filters: object) -> list[int]:
        return [e.id for e in ledger.find_audit(**filters)]  # type: ignore[arg-type]

    assert found() == [ids[f"e{n}"] for n in range(1, 6)]
    assert found(subject_keys=["s1"]) == [ids["e1"], ids["e3"], ids["e5"]]
    assert found(subject_keys=["s2", "s3", "s2"]) == [ids["e2"], ids["e4"]]
    assert found(subject_keys=[]) == []
    assert found(subject_keys=["nobody"]) == []
    assert found(request_id=ids["request_a"]) == [ids["e1"], ids["e3"], ids["e5"]]
    assert found(since=START + timedelta(minutes=2)) == [ids["e3"], ids["e4"], ids["e5"]]
    assert found(subject_keys=["s1"], request_id=ids["request_a"],
                 since=START + timedelta(minutes=1)) == [ids["e3"], ids["e5"]]  # fmt: skip
    assert found(limit=2) == [ids["e1"], ids["e2"]]
    assert found(limit=2, newest_first=True) == [ids["e5"], ids["e4"]]
    assert [e.id for e in ledger.audit_events("s1", limit=2)] == [ids["e5"], ids["e3"]]


def test_a_finished_tasks_evidence_carries_its_request_and_the_latest_entry_wins(
    ledger: Ledger, audit_trail: dict[str, int]
) -> None:
    evidence = ledger.task_evidence(audit_trail["task"])
    assert evidence is not None
    assert (evidence.request_id, evidence.vendor_request_id, evidence.detail, evidence.outcome) == (
        audit_trail["request_a"], "mc-1", "receipt", "done")
    later = ledger.add_audit("s1", "mailchimp", "erase", "R3", "verified",
                             task_id=audit_trail["task"])  # fmt: skip
    latest = ledger.task_evidence(audit_trail["task"])
    assert latest is not None and latest.id == later
    assert ledger.task_evidence(999) is None


def test_attach_task_only_gives_an_open_unattached_task_a_request(ledger: Ledger) -> None:
    request_id = ledger.add_request("erase", "s1", "email", START + timedelta(days=30))
    other = ledger.add_request("erase", "s2", "email", START + timedelta(days=30))
    pending = ledger.add_task("s1", "mailchimp", "erase", "R5")
    in_flight = ledger.add_task("s1", "google_analytics", "erase", "R5")
    ledger.claim(in_flight)
    attached = ledger.add_task("s1", "phorest", "withdraw_consent", "R2", request_id=other)
    final = ledger.add_task("s1", "mailchimp", "unsubscribe", "R1")
    ledger.finish(final, "done")

    assert ledger.attach_task(pending, request_id) is True
    assert ledger.attach_task(in_flight, request_id) is True
    assert ledger.attach_task(attached, request_id) is False
    assert ledger.attach_task(final, request_id) is False
    assert ledger.attach_task(999, request_id) is False

    assert [t.id for t in ledger.tasks_for_request(request_id)] == [pending, in_flight]
    assert [t.id for t in ledger.tasks_for_request(other)] == [attached]


def test_lift_suppression_removes_only_the_requests_own_entries(ledger: Ledger) -> None:
    mine = ledger.add_request("erase", "s1", "email", START + timedelta(days=30))
    theirs = ledger.add_request("erase", "s2", "email", START + timedelta(days=30))
    for key in ("k-email", "k-phone", "k-client"):
        ledger.suppress(key, "erasure", mine)
    ledger.suppress("k-other", "erasure", theirs)
    ledger.suppress("k-forgotten", "forgotten")
    assert ledger.suppression_size() == 5

    assert ledger.lift_suppression(mine) == 3

    assert ledger.suppression_size() == 2
    assert not ledger.is_suppressed("k-email", "k-phone", "k-client")
    assert ledger.is_suppressed("k-other") and ledger.is_suppressed("k-forgotten")
    assert ledger.lift_suppression(mine) == 0


def test_analytics_erased_at_is_remembered_per_subject(ledger: Ledger) -> None:
    ledger.upsert_subject("s1", analytics_erased_at=START)
    ledger.upsert_subject("s1", consent=False)  # other columns leave it alone
    facts = ledger.subject_facts(["s1", "s2"])
    assert list(facts) == ["s1"] and facts["s1"].analytics_erased_at == START
