"""Tests for syncd.lock: one writer per ledger, and who holds it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from syncd.lock import AlreadyRunning, lock_holder, lock_path, writer_lock


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
