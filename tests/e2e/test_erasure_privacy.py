"""After erasures and restrictions, no file syncd wrote and nothing it printed names anyone.

``syncd run`` runs against the sandbox while ``syncd request`` files erasures by
email, by phone and by client id (two completed once Phorest's Forget is
pressed, one left waiting) and a restriction that is then lifted; the
operator reads them back with ``request show``, ``requests``, ``audit`` and
``status``. The daemon stops, and one more erasure is carried out by the CLI
itself. Then the ledger, its WAL and shared-memory file, the daemon's log and
every command's output are searched for the seeded people's addresses, phone
numbers and names, as written in Phorest and in the forms syncd normalises
them to. The audit trail must still be found by hashing each identifier.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncd import config
from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox
from tests.e2e.test_daemon import Running, _syncd, _wait, started_daemon
from tests.e2e.test_erasure_crash import erasable
from tests.support import seeded_values

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

# What Phorest's Forget writes in place of a name: not anybody's personal data.
FORGOTTEN_NAMES = frozenset({"Anonymous"})


def personal_values(sandbox: Sandbox, people: list[dict[str, Any]]) -> set[str]:
    """Every seeded value, plus the forms syncd writes the involved people's identifiers in."""
    values = seeded_values(sandbox) - FORGOTTEN_NAMES
    for person in people:
        values.add(person["email"].strip().lower())
        digits = re.sub(r"\D", "", person["mobile"])
        values.update({f"+{digits}", "0" + digits[2:], digits[2:]})  # E.164, national, bare
    return values


def found_in(data: bytes, values: set[str]) -> list[str]:
    """The values ``data`` holds (an address in any letter case)."""
    lowered = data.lower()
    return sorted(v for v in values
                  if (v.lower().encode() in lowered if "@" in v else v.encode() in data))


def with_unique_mobile(sandbox: Sandbox, candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    mobiles = Counter(re.sub(r"\D", "", c["mobile"])[-10:]
                      for c in sandbox.phorest.snapshot_clients() if c.get("mobile"))
    return [c for c in candidates
            if c.get("mobile") and mobiles[re.sub(r"\D", "", c["mobile"])[-10:]] == 1]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    with started_daemon(tmp_path, clients=150, seed=21) as run:
        yield run


@pytest.mark.slow  # about 30 s: a daemon start, a dozen CLI runs, two Phorest verifications
def test_erasure_and_restriction_leave_no_personal_data_in_the_ledger_wal_log_or_output(
    running: Running,
) -> None:
    sandbox = running.sandbox
    by_email, by_phone, by_id, restricted, offline = with_unique_mobile(
        sandbox, erasable(sandbox, 60))[:5]
    people = [by_email, by_phone, by_id, restricted, offline]
    values = personal_values(sandbox, people)  # before Forget blanks the records
    assert len(values) > 300
    outputs: list[str] = []

    def cli(*args: str, codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
        done = _syncd(running, *args)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode in codes, done.stderr
        assert "Traceback" not in done.stderr
        return done

    def filed(*args: str) -> int:
        done = cli("request", *args)
        if "--json" in args:
            return int(json.loads(done.stdout)["id"])
        found = re.search(r"request #(\d+) filed", done.stdout)
        assert found, done.stdout
        return int(found[1])

    ledger_path = config.load(running.config_path).ledger.path

    def state(request_id: int) -> str:
        with Ledger.open(ledger_path) as ledger:
            request = ledger.request(request_id)
        assert request is not None
        return request.state

    def step_states(request_id: int) -> list[str]:
        with Ledger.open(ledger_path) as ledger:
            return [s.state for s in ledger.steps(request_id)]

    erased_email = filed("erase", "--email", by_email["email"].upper())
    erased_phone = filed("erase", "--phone", "+" + re.sub(r"\D", "", by_phone["mobile"]))
    erased_id = filed("erase", "--client-id", by_id["clientId"], "--by", "Front Desk",
                      "--note", "asked at reception")
    restriction = filed("restrict", "--email", restricted["email"])
    _wait(lambda: state(restriction) == "done", 30, "the restriction to reach Mailchimp")
    assert sandbox.mailchimp.member(restricted["email"])["status"] == "unsubscribed"
    lifted = filed("unrestrict", "--client-id", restricted["clientId"], "--json")
    # Lifting is done at once; Mailchimp keeps an unsubscribed member in its compliance
    # state, so the subscribe consent asks for is refused and only the person can
    # re-subscribe (a signup form): the manager is told (R2).
    assert state(lifted) == "done" and step_states(lifted) == []
    with Ledger.open(ledger_path) as ledger:
        _wait(lambda: [t.state for t in ledger.tasks_for_request(lifted)] == ["needs_person"],
              30, "the resubscribe to be refused")

    sandbox.phorest.forget(by_email["clientId"])
    sandbox.phorest.forget(by_id["clientId"])
    _wait(lambda: state(erased_email) == state(erased_id) == "done", 30,
          "Phorest's Forget to be verified")
    for person in (by_email, by_phone, by_id):
        assert sandbox.mailchimp.member(person["email"]) is None
    assert state(erased_phone) == "open"  # its Forget was never pressed

    shown = json.loads(cli("request", "show", str(erased_email), "--json").stdout)
    assert shown["state"] == "done" and shown["client_id"] == by_email["clientId"]
    cli("request", "show", str(erased_phone))
    assert {r["id"] for r in json.loads(cli("requests", "--all", "--json").stdout)} == {
        erased_email, erased_phone, erased_id, restriction, lifted}
    cli("requests")
    cli("status", codes=(0, 1))  # 1: degraded, by the alert about the refused resubscribe

    # The audit trail is found by hashing whatever identifier the person gives.
    def audited(*args: str) -> set[int | None]:
        return {e["request_id"] for e in json.loads(cli("audit", *args, "--json").stdout)}

    assert erased_email in audited("--email", by_email["email"])
    assert erased_phone in audited("--phone", by_phone["mobile"])  # as Phorest holds it
    assert erased_id in audited("--client-id", by_id["clientId"])
    assert {restriction, lifted} <= audited("--email", restricted["email"])
    cli("audit", "--phone", "+" + re.sub(r"\D", "", by_phone["mobile"]))
    cli("audit", "--request", str(erased_id))

    # While the daemon runs, what it scrubbed leaves the WAL by its next loop turn.
    ledger_files = [Path(ledger_path), Path(f"{ledger_path}-wal"), Path(f"{ledger_path}-shm")]

    def in_ledger_files() -> dict[str, list[str]]:
        found = {p.name: found_in(p.read_bytes(), values) for p in ledger_files if p.exists()}
        return {name: leaked for name, leaked in found.items() if leaked}

    _wait(lambda: not in_ledger_files(), 20, "the scrubbed identifiers to leave the WAL")
    assert Path(f"{ledger_path}-wal").exists() and running.process.poll() is None

    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=10) == 0
    # With no daemon, the command carries the erasure out itself.
    offline_request = filed("erase", "--email", offline["email"])
    assert sandbox.mailchimp.member(offline["email"]) is None
    assert offline_request in audited("--email", offline["email"])
    cli("audit", "--email", offline["email"])

    with Ledger.open(ledger_path) as ledger:
        states = ledger.count_tasks_by_state()
    assert states["pending"] == states["in_flight"] == states["failed"] == 0
    files = {path.name: path.read_bytes() for path in (*ledger_files, running.log_path)
             if path.exists()}  # fmt: skip
    assert Path(ledger_path).name in files and running.log_path.name in files
    leaks = {name: found_in(data, values) for name, data in files.items()}
    leaks.update({f"output {n}": found_in(text.encode(), values)
                  for n, text in enumerate(outputs)})
    assert {where: found for where, found in leaks.items() if found} == {}
