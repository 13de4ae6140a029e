"""A resync killed while it streams both systems into its scratch store leaves no address on disk.

``syncd resync`` runs as a subprocess against a sandbox large enough that its
scratch store outgrows the page cache and spills to a file in the temporary
directory. As soon as that file is open, the process is killed with SIGKILL.
The kill must have come in the streaming phase (no task queued yet), and
neither the state directory (config, secrets, ledger, WAL) nor the temporary
directory may hold any seeded address, phone or name, in any letter case.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox
from tests.support import SYNCD, seeded_values, wait_for

# About 1.6 KB per client and member in the store: past its 16 MiB page cache
# after about a quarter of them. At 20 Phorest requests/s the 200 pages take
# 10 s, so the kill comes seconds before the streaming ends, even on a busy
# machine.
CLIENTS = 40_000
PHOREST_REQUESTS_PER_SECOND = 20
SPILL_WAIT_SECONDS = 120


def _open_files(pid: int) -> list[str]:
    """What a process's file descriptors point at (a deleted file ends in "(deleted)")."""
    targets = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # the process is gone
        return []
    for fd in fds:
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # closed since it was listed
            continue
    return targets


def _files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


@pytest.mark.slow  # about 20 s: seeding 40,000 clients and members, then a partial read
def test_a_resync_killed_while_streaming_leaves_no_address_on_disk(tmp_path: Path) -> None:
    state, temporary = tmp_path / "state", tmp_path / "tmp"
    state.mkdir()
    temporary.mkdir()
    with Sandbox(clients=CLIENTS, seed=16, smtp_port=None) as sandbox:
        config_path = sandbox.write_config(state / "syncd.toml", ledger_path=state / "ledger.sqlite3")
        values = seeded_values(sandbox)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SYNCD_") and k != "SQLITE_TMPDIR"}  # fmt: skip
        env.update(TMPDIR=str(temporary), SYNCD_PHOREST__PAGE_SIZE="200",
                   SYNCD_PHOREST__MAX_REQUESTS_PER_SECOND=str(PHOREST_REQUESTS_PER_SECOND))
        process = subprocess.Popen([str(SYNCD), "--config", str(config_path), "resync"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=env, cwd=state)
        try:
            spill = lambda: [t for t in _open_files(process.pid)  # noqa: E731
                             if t.startswith(str(temporary))]
            wait_for(lambda: bool(spill()) or process.poll() is not None, SPILL_WAIT_SECONDS,
                     "the scratch store to spill to its file")
            opened = spill()
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert opened, "the resync ended before its scratch store spilled: nothing was tested"
    assert all(target.endswith("(deleted)") for target in opened), opened
    with Ledger.open(state / "ledger.sqlite3") as ledger:
        assert ledger.task(1) is None, "the kill came after the streaming phase"

    assert _files(temporary) == []
    lowered = {value.lower() for value in values}
    assert any("@" in value for value in lowered) and len(values) > CLIENTS
    for path in _files(state):
        data = path.read_bytes()
        assert not [v for v in values if v.encode() in data], path
        assert not [v for v in lowered if "@" in v and v.encode() in data.lower()], path
