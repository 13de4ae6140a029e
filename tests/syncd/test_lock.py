"""Tests for syncd.lock: one writer per ledger, who holds it, and taking over from a dead one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from syncd.ledger import Ledger
from syncd.lock import AlreadyRunning, lock_holder, lock_path, writer_ledger, writer_lock


def test_lock_holder_names_the_writer_and_never_creates_the_file(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    assert lock_holder(ledger) is None and not lock_path(ledger).exists()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from syncd.lock import writer_lock\n"
         f"with writer_lock({str(ledger)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert lock_holder(ledger) == holder.pid
        with pytest.raises(AlreadyRunning, match="another syncd is running on this ledger"):
            with writer_lock(ledger):
                pass
        assert lock_holder(ledger) == holder.pid  # probing did not take it
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(ledger) is None  # the kernel dropped it with the process
    with writer_lock(ledger):
        assert lock_path(ledger).stat().st_mode & 0o777 == 0o600


SEEDED_EMAIL = "bob.locktest@example.com"
# A holder that dies mid-run: tasks claimed, a followed resync running, a payload
# scrubbed but still in the WAL, then SIGKILL (no clean-up of any kind).
DYING_HOLDER = """
import os, signal, sys
from datetime import UTC, datetime, timedelta
from syncd.lock import writer_ledger
with writer_ledger(sys.argv[1]) as ledger:
    later = datetime.now(UTC) + timedelta(hours=1)
    for n in range(3):
        ledger.claim(ledger.add_task(f"s{n}", "phorest", "withdraw_consent", "R2",
                                     payload={"client_id": f"c{n}"},
                                     dedupe_key=f"phorest:withdraw_consent:s{n}"))
    ledger.add_task("s9", "mailchimp", "unsubscribe", "R2", next_attempt_at=later)
    ledger.start_command(ledger.add_command("resync", {}))
    scrubbed = ledger.add_task("s8", "mailchimp", "delete_permanent", "R3",
                               payload={"email": sys.argv[2]})
    ledger.claim(scrubbed)
    ledger.finish(scrubbed, "done")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _wal_bytes(ledger_path: Path) -> bytes:
    wal = Path(f"{ledger_path}-wal")
    return wal.read_bytes() if wal.exists() else b""


def test_taking_the_lock_takes_over_what_a_killed_holder_left(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.sqlite3"
    died = subprocess.run([sys.executable, "-c", DYING_HOLDER, str(ledger_path), SEEDED_EMAIL],
                          capture_output=True, text=True, timeout=60, check=False)
    assert died.returncode == -9, died.stderr
    assert SEEDED_EMAIL.encode() in _wal_bytes(ledger_path)  # the check below can see it
    with Ledger.open(ledger_path) as reader:
        assert reader.count_tasks_by_state()["in_flight"] == 3

    with writer_ledger(ledger_path) as ledger:
        states = ledger.count_tasks_by_state()
        assert (states["in_flight"], states["pending"]) == (0, 4)
        # Every released task is due now; the one waiting for its retry still waits.
        assert sorted(t.subject_key for t in ledger.due_tasks(10)) == ["s0", "s1", "s2"]
        # Planning the same action again lands on the released task, which now runs.
        again = ledger.add_task("s0", "phorest", "withdraw_consent", "R2",
                                dedupe_key="phorest:withdraw_consent:s0")
        assert again == ledger.due_tasks(1)[0].id
        command = ledger.command(1)
        assert command is not None and command.state == "failed"
        assert _wal_bytes(ledger_path) == b""
        assert SEEDED_EMAIL.encode() not in ledger_path.read_bytes()


def test_a_refused_lock_takes_nothing_over(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.sqlite3"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from syncd.lock import writer_ledger\n"
         f"with writer_ledger({str(ledger_path)!r}) as ledger:\n"
         "    ledger.claim(ledger.add_task('s1', 'phorest', 'withdraw_consent', 'R2'))\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyRunning):
            with writer_ledger(ledger_path):
                pass
        with Ledger.open(ledger_path) as reader:
            assert reader.count_tasks_by_state()["in_flight"] == 1  # still the live holder's
    finally:
        holder.kill()
        holder.wait()
