"""``make demo`` end to end: six scenes, the audit trail, exit 0, and no personal data shown.

It runs with ``--keep-running``: once the scenes are over, the web console it
announced is checked (``/login`` answers, the printed demo login works), then the
demo is sent the Ctrl-C a terminal would send, and must stop everything and exit 0.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

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
                f"DEMO_ARGS=--clients {CLIENTS} --keep-running"]
    return [sys.executable, "-m", "syncd.sandbox.demo", "--clients", str(CLIENTS),
            "--keep-running"]


def _demo_pid(process: subprocess.Popen[str]) -> int:
    """The demo's own process: make's child when run through make (Linux /proc)."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    if Path(process.args[0]).name == "make" and children.exists():
        found = children.read_text().split()
        assert len(found) == 1, found
        return int(found[0])
    return process.pid


def _read_lines(process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.put(line)
    lines.put(None)


def _console_works(url: str, name: str, password: str) -> None:
    """The console answers, and the printed login opens the manager's overview."""
    with requests.Session() as http:
        page = http.get(f"{url}login", timeout=10)
        assert page.status_code == 200, page.text
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text)
        assert token, page.text
        answer = http.post(f"{url}login", data={"csrf_token": token.group(1), "name": name,
                                                "password": password}, timeout=10)
        assert answer.status_code == 200 and answer.url == url, answer.text
        assert f"{name} (manager)" in answer.text
        requests_page = http.get(f"{url}requests", params={"all": "1"}, timeout=10)
        assert requests_page.status_code == 200 and "erase" in requests_page.text


def _seeded_values() -> set[str]:
    """Addresses, names and phones of the world the demo's sandbox seeds (same seed, same day)."""
    with Sandbox(clients=CLIENTS, smtp_port=None) as sandbox:
        return seeded_values(sandbox)


def test_make_demo_plays_every_scene_shows_the_audit_trail_and_no_personal_data() -> None:
    seeded = _seeded_values()
    assert len(seeded) > 100
    process = subprocess.Popen(_command(), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process, lines), daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + DEMO_TIMEOUT_SECONDS

    def read_until(marker: str) -> bool:
        """Collect output until a line holds ``marker`` (False: the output ended first)."""
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                return False
            seen.append(line)
            if marker in line:
                return True
        os.killpg(process.pid, signal.SIGTERM)  # the demo stops its own processes on SIGTERM
        process.wait(timeout=30)
        pytest.fail(f"make demo did not get to {marker!r} within {DEMO_TIMEOUT_SECONDS} s:\n"
                    + "".join(seen))

    try:
        # The scenes are over and everything keeps running: the console is browsable.
        kept = read_until("Ctrl-C stops syncd and the sandbox")
        output = "".join(seen)
        assert kept, output
        announced = re.search(r"Web console: (http://127\.0\.0\.1:\d+/) +\(log in as "
                              r"(demo-manager), password ([\w-]+)\)", output)
        assert announced, output
        assert output.index("Web console: ") < output.index("1. A client clicks")
        _console_works(*announced.groups())
        assert process.poll() is None, "the demo did not keep running"

        os.kill(_demo_pid(process), signal.SIGINT)  # Ctrl-C
        read_until("\x00")  # to the end of the output
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = "".join(seen)
    assert "Ctrl-C: stopping syncd and the sandbox." in output
    with pytest.raises(requests.ConnectionError):
        requests.get(announced.group(1), timeout=5)  # the console stopped with the daemon
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
