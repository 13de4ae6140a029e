"""Erasure requests survive ``kill -9`` of ``syncd run`` in the middle of a vendor batch.

Thirty erasures are filed while the daemon runs (through the rights API on a
ledger connection of the test's own, as ``syncd request erase`` files when a
daemon holds the writer lock), with Mailchimp, then GA, slowed down by the
sandbox's latency fault so that their batch is in flight when the daemon is
killed. After the restarts every request must complete, with nothing lost and
no side effect repeated beyond the one batch that was in flight.

(That reading Phorest for many Forget steps feeds the watchdog and yields to
SIGTERM between reads is tested on ``rights.advance`` itself, in
tests/syncd/test_rights.py: the daemon reads at most 50 a run.)
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from syncd import config, engine, health, rights
from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox
from tests.e2e.test_daemon import Running, _start, _wait, started_daemon

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

REQUESTS = 30
MANUAL = "paper_forms"
MANUAL_SECTION = f"""
[[manual_processors]]
name = "{MANUAL}"
instructions = "Shred the client's paper consultation forms"
"""


def erasable(sandbox: Sandbox, count: int) -> list[dict[str, Any]]:
    """Live clients, each alone at an address that has a Mailchimp member, and alone in Phorest.

    One person per request, one Phorest record and one member each: so every
    request has exactly one Mailchimp, one GA, one Phorest and one manual step.
    """
    clients = sandbox.phorest.snapshot_clients()
    at_address = Counter(c["email"].strip().lower() for c in clients if c.get("email"))
    merged_into = {c["mergedToClientId"] for c in clients if c.get("mergedToClientId")}
    chosen = [c for c in clients
              if c.get("email") and at_address[c["email"].strip().lower()] == 1
              and not (c.get("archived") or c.get("deleted") or c.get("mergedToClientId"))
              and c["clientId"] not in merged_into and c.get("firstName") != "Anonymous"
              and _member_status(sandbox, c["email"]) not in (None, "archived")]
    assert len(chosen) >= count, f"only {len(chosen)} erasable clients in the seeded world"
    return chosen[:count]


def _member_status(sandbox: Sandbox, email: str) -> str | None:
    return (sandbox.mailchimp.member(email) or {}).get("status")


def file_erasures(config_path: Path, emails: list[str], *, before_writing: Any = None) -> list[int]:
    """File one erasure per address, all in one transaction, as the CLI does beside a daemon.

    The reads (Phorest, Mailchimp) happen first; ``before_writing`` runs between
    the reads and the one write, so the daemon picks every task up in one batch.
    """
    settings = config.load(config_path)
    built, keys = engine.build(settings, needed_by="the test")
    people = [rights.resolve(built["phorest"], keys, email=email) for email in emails]
    with Ledger.open(settings.ledger.path) as ledger:
        queues = [engine.plan_addresses(ledger, built, keys, p.own_emails, p.holders)
                  for p in people]
        if before_writing is not None:
            before_writing()
        with ledger.transaction():
            return [rights.file(ledger, settings, keys, "erase", person, queue, filed_by="test",
                                now=datetime.now(UTC), analytics=built.get(engine.ANALYTICS))
                    for person, queue in zip(people, queues)]  # fmt: skip


def ledger_of(running: Running) -> Ledger:
    return Ledger.open(config.load(running.config_path).ledger.path)


def task_states(running: Running, processor: str) -> Counter[str]:
    with ledger_of(running) as ledger:
        return Counter({s: n for s, n in ledger.count_tasks_by_state(processor).items() if n})


def ga_deletions(sandbox: Sandbox) -> Counter[str]:
    """How many accepted GA deletions each identifier (by SHA-256) has."""
    return Counter(d["identifier_sha256"] for d in sandbox.google.deletions())


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def restart(running: Running, tmp_path: Path, **env: str) -> None:
    running.notifications()
    running.process = _start(running.config_path, running.port, tmp_path / "notify.sock",
                             running.log_path, **env)
    _wait(lambda: any("READY=1" in m for m in running.notifications()), 30, "READY=1")


def stop_restarted(running: Running) -> None:
    """Kill a daemon a test restarted and left running (``started_daemon`` kills the first)."""
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


def sigkill(running: Running) -> None:
    running.process.send_signal(signal.SIGKILL)
    running.process.wait(timeout=10)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    with started_daemon(tmp_path, clients=150, seed=13) as run:
        with run.config_path.open("a") as toml:
            toml.write(MANUAL_SECTION)  # read by the filing below and by every restart
        try:
            yield run
        finally:
            stop_restarted(run)


@pytest.mark.slow  # about 30 s: three daemon starts, two kills and a Phorest verification
def test_erasures_killed_mid_mailchimp_and_mid_ga_batch_all_complete_and_repeat_nothing_else(
    running: Running, tmp_path: Path
) -> None:
    sandbox, faults = running.sandbox, running.sandbox.traffic.faults
    targets = erasable(sandbox, REQUESTS)
    ids = {c["clientId"]: sha(c["clientId"]) for c in targets}  # GA knows them by user id
    before = ga_deletions(sandbox)  # the first resync's R5 deletions of dead clients
    assert not set(ids.values()) & set(before)
    addresses = [c["email"].strip().lower().encode() for c in targets]
    path = config.load(running.config_path).ledger.path

    def addresses_in_ledger_files() -> int:
        files = [Path(path), Path(f"{path}-wal")]
        return sum(a in f.read_bytes().lower() for f in files if f.exists() for a in addresses)

    def slow_mailchimp() -> None:
        faults["mailchimp"].latency_ms = 1000  # POST /batches, its polls, its results: ~3 s

    request_ids = file_erasures(running.config_path, [c["email"] for c in targets],
                                before_writing=slow_mailchimp)
    assert len(set(request_ids)) == REQUESTS
    assert addresses_in_ledger_files() > 0  # the pending tasks' payloads: the check sees them

    # Kill 1: Mailchimp has carried the batch out, syncd has not recorded it.
    gone = lambda: all(sandbox.mailchimp.member(c["email"]) is None for c in targets)  # noqa: E731
    _wait(lambda: gone() and task_states(running, "mailchimp")["in_flight"] == REQUESTS, 30,
          "the erasure batch to land in Mailchimp")
    sigkill(running)
    assert task_states(running, "mailchimp")["in_flight"] == REQUESTS, "the kill came too late"
    assert task_states(running, "google_analytics")["pending"] == REQUESTS

    # Kill 2: part of GA's first batch of deletions has been sent, none recorded.
    faults["mailchimp"].latency_ms = 0
    faults["google"].latency_ms = 300
    restart(running, tmp_path)
    sent = lambda: sum(ga_deletions(sandbox)[h] > 0 for h in ids.values())  # noqa: E731
    _wait(lambda: sent() >= 3 and task_states(running, "google_analytics")["in_flight"] > 0, 30,
          "GA deletions to be on their way")
    sigkill(running)
    time.sleep(0.6)  # the request the server was holding (300 ms) is still carried out
    sent_at_kill = {h for h in ids.values() if ga_deletions(sandbox)[h]}
    in_flight_at_kill = task_states(running, "google_analytics")["in_flight"]
    assert 0 < len(sent_at_kill) < REQUESTS and in_flight_at_kill > 0, "the kill came too late"

    faults["google"].latency_ms = 0
    restart(running, tmp_path)

    def tasks_settled() -> bool:
        return all(not task_states(running, p)[s] for p in ("mailchimp", "google_analytics")
                   for s in ("pending", "in_flight"))

    _wait(tasks_settled, 30, "every released task to be carried out")
    # The people's part: Forget in Phorest, and the paper forms confirmed.
    settings = config.load(running.config_path)
    forgotten_at = datetime.now(UTC)
    for client in targets:
        sandbox.phorest.forget(client["clientId"])
    with ledger_of(running) as ledger:
        for request_id in request_ids:
            rights.confirm(ledger, settings, request_id, MANUAL, by="front desk",
                           now=datetime.now(UTC))

    def all_done() -> bool:
        with ledger_of(running) as ledger:
            requests = [ledger.request(r) for r in request_ids]
        return all(r is not None and r.state == "done" for r in requests)

    _wait(all_done, 30, "every request to complete once Phorest shows the clients forgotten")

    def last_poll() -> datetime:
        with ledger_of(running) as ledger:
            last = ledger.get_cursor(health.LAST_POLL_CURSOR)
        return datetime.fromisoformat(last) if last else datetime.min.replace(tzinfo=UTC)

    # A poll that started after the Forget reads the forgotten clients (R5 plans a GA
    # deletion for a dead client): it must find them deleted already and queue nothing.
    _wait(lambda: last_poll() > forgotten_at, 30, "a poll to end after the Forget")
    ended = last_poll()
    _wait(lambda: last_poll() > ended, 30, "the poll after it")
    _wait(tasks_settled, 30, "whatever that poll queued to be carried out")
    # The payloads the killed daemons left behind were scrubbed, and left the WAL too.
    _wait(lambda: addresses_in_ledger_files() == 0, 20, "no address left in the ledger files")
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=10) == 0

    log_text = running.log_path.read_text()
    assert log_text.count('"tasks_released_after_restart"') == 2
    assert not [a for a in addresses if a in log_text.lower().encode()]
    with ledger_of(running) as ledger:
        assert {s: n for s, n in ledger.count_tasks_by_state().items() if n} == {
            "done": sum(ledger.count_tasks_by_state().values())}
        for request_id, client in zip(request_ids, targets):
            request = ledger.request(request_id)
            assert request is not None and request.state == "done"
            assert request.client_id == client["clientId"]
            steps = ledger.steps(request_id)
            assert sorted((s.processor, s.state) for s in steps) == [
                ("google_analytics", "done"), ("mailchimp", "done"), (MANUAL, "done"),
                ("phorest", "done")], request_id
            tasks = ledger.tasks_for_request(request_id)
            assert sorted((t.processor, t.action, t.state) for t in tasks) == [
                ("google_analytics", "erase", "done"), ("mailchimp", "erase", "done")]
            # One piece of evidence per task, however often it was sent.
            done = [e for e in ledger.find_audit(request_id=request_id)
                    if e.task_id is not None and e.outcome == "done"]
            assert sorted(e.processor for e in done) == ["google_analytics", "mailchimp"]

    assert all(sandbox.mailchimp.member(c["email"]) is None for c in targets)
    after = ga_deletions(sandbox)
    for client_id, digest in ids.items():
        assert 1 <= after[digest] <= 2, client_id
        # Only a deletion the killed daemon had sent was sent again.
        assert after[digest] == 1 or digest in sent_at_kill, client_id
    # Nothing else was deleted again: the dead clients of the first resync stay at one.
    assert {h: n for h, n in after.items() if h not in ids.values()} == before
    assert sandbox.mailchimp.confirmation_emails_sent == 0
