"""``make demo`` end to end: six scenes, the audit trail, exit 0, and no personal data shown."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from syncd.sandbox.app import Sandbox
from tests.support import seeded_values

REPO = Path(__file__).parents[3]
CLIENTS = 60
DEMO_TIMEOUT_SECONDS = 240  # a hang guard, not a speed check
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def _command() -> list[str]:
    """``make demo`` when the install is current (as after ``make test``), else the module."""
    make = shutil.which("make")
    if make and subprocess.run([make, "-q", "-C", str(REPO), "install"],
                               capture_output=True, check=False).returncode == 0:
        return [make, "--no-print-directory", "-C", str(REPO), "demo",
                f"DEMO_ARGS=--clients {CLIENTS}"]
    return [sys.executable, "-m", "syncd.sandbox.demo", "--clients", str(CLIENTS)]


def _seeded_values() -> set[str]:
    """Addresses, names and phones of the world the demo's sandbox seeds (same seed, same day)."""
    with Sandbox(clients=CLIENTS, smtp_port=None) as sandbox:
        return seeded_values(sandbox)


def test_make_demo_plays_every_scene_shows_the_audit_trail_and_no_personal_data() -> None:
    seeded = _seeded_values()
    assert len(seeded) > 100
    process = subprocess.Popen(_command(), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=DEMO_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)  # the demo stops its own processes on SIGTERM
        output, _ = process.communicate(timeout=30)
        pytest.fail(f"make demo did not finish within {DEMO_TIMEOUT_SECONDS} s:\n{output}")

    assert process.returncode == 0, output
    for outcome in (
        "consent off in Phorest",  # 1. the webhook reached Phorest
        "unsubscribed in Mailchimp",  # 2. the poll reached Mailchimp
        "1 action(s) planned; outcomes: mailchimp: 1 done; 0 failed",  # 3. the resync
        "resync fixed it",
        # 4. the erasure: Mailchimp and GA done, the request waits on Forget, then completes
        "filed: erase client",
        "Mailchimp member deleted permanently",
        "submitUserDeletion of userId",
        "mailchimp done, google_analytics done, phorest waiting; it waits on the Phorest Forget",
        "Nothing to do: Mailchimp and Phorest agree.",  # the later resync plans nothing
        "the resync did not re-add the person",
        # 5. the retention purge: the dry run, the guard, the confirmed run, the booked client
        "dry run: ",
        "kept by a booking",
        "held back by the purge guard",
        "(confirmed): ",
        "stale clients' Mailchimp members deleted",
        "the booked client was left alone: still in Phorest and in Mailchimp",
        # 6. the export: mode 0600 and rows per processor, never the contents
        "export written with mode 0600",
        "Audit trail in the ledger",
        "syncd stopped cleanly (exit 0)",
    ):
        assert outcome in output, f"missing {outcome!r}:\n{output}"
    # 4. the request completed once staff pressed Forget, and the member stayed absent after
    # the later resync (the last table of the scene, whose rows are before and after it).
    assert re.search(r"request #\d+ done [\d.]+ s after Forget", output), output
    scene = output.split("4. A client asks to be erased", 1)[-1]
    table = scene.split("the resync did not re-add the person", 1)[0].rsplit("Person D:", 1)[-1]
    rows = [line for line in table.splitlines() if line.startswith(("│ before", "│ after"))]
    assert len(rows) == 2 and all("absent (404)" in row for row in rows), table
    # 5. every stale client the dry run listed got a request; the booked one kept its member.
    listed = re.search(r"dry run: (\d+) of \d+ live clients would be erased", output)
    assert listed and re.search(rf"\(confirmed\): {listed.group(1)} erasure request\(s\) filed",
                                output), output
    scene = output.split("5. The retention purge", 1)[-1].split("6. A client asks", 1)[0]
    table = scene.rsplit("Person E:", 1)[-1]
    rows = [line for line in table.splitlines() if line.startswith(("│ before", "│ after"))]
    assert len(rows) == 2 and not any("absent" in row for row in rows), table
    # 6. the export counted rows from Phorest and Mailchimp at least.
    scene = output.split("6. A client asks for a copy of their data", 1)[-1]
    for processor in ("phorest", "mailchimp"):
        assert re.search(rf"│ {processor} +│ +[1-9]\d* │", scene), scene
    for row in ("webhook_unsubscribe", "withdraw_consent", "R1:extra_merge_fields",
                "request_erase", "R3:erasure_request", "forget_client", "request_export",
                "export_read"):
        assert row in output, f"the audit table lacks {row!r}:\n{output}"
    assert "Traceback" not in output
    assert "@" not in output, "an email address was printed"
    shown = sorted(v for v in seeded if v in output)
    assert not shown, f"{len(shown)} seeded values printed"
