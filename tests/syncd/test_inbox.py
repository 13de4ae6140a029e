"""Webhook-inbox processing against a real ledger and a running sandbox, end to end.

Mailchimp's emulator delivers its webhooks over HTTP to ``syncd.web``'s app,
which records them in the ledger; :func:`process_inbox` then queues the
Phorest work and :func:`run_due` carries it out against Phorest's emulator.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from connectors.phorest import PhorestConnector
from syncd import config
from syncd.identity import SubjectKeys
from syncd.inbox import ALREADY, IGNORED, NO_CLIENT, NOTED, QUEUED, process_inbox, recorder
from syncd.ledger import Ledger
from syncd.retry import RetryPolicy
from syncd.sandbox.app import Sandbox
from syncd.tasks import run_due
from syncd.web import WEBHOOK_PREFIX, mailchimp_webhook_app
from tests.support import serve_wsgi

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@dataclass
class World:
    sandbox: Sandbox
    ledger: Ledger
    ledger_path: Path
    phorest: PhorestConnector
    keys: SubjectKeys

    def process(self, now: datetime | None = None) -> dict[str, int]:
        return process_inbox(self.ledger, self.phorest, self.keys, now=now or datetime.now(UTC))

    def run(self) -> None:
        run_due(self.ledger, {"phorest": self.phorest}, RetryPolicy(), self.keys,
                now=datetime.now(UTC))

    def consent(self, client_id: str) -> bool:
        client = self.sandbox.phorest.client(client_id)
        assert client is not None
        return bool(client["emailMarketingConsent"])

    def candidates(self) -> list[tuple[str, str]]:
        """(client_id, email) of live consenting clients whose member is subscribed."""
        found = []
        for c in self.sandbox.phorest.snapshot_clients():
            if not c.get("email") or not c.get("emailMarketingConsent"):
                continue
            if c.get("archived") or c.get("deleted") or c.get("mergedToClientId"):
                continue
            member = self.sandbox.mailchimp.member(c["email"])
            if member and member["status"] == "subscribed":
                found.append((c["clientId"], c["email"]))
        return found

    def unsubscribe(self, email: str) -> None:
        self.sandbox.mailchimp.click_unsubscribe(email)
        assert self.sandbox.mailchimp.drain_webhooks(10)


def tasks(world: World) -> dict[str, int]:
    return {k: v for k, v in world.ledger.count_tasks_by_state().items() if v}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    ledger_path = tmp_path / "ledger.sqlite3"
    with Sandbox(clients=60, seed=9, smtp_port=None) as sandbox:
        settings = config.load(sandbox.write_config(tmp_path / "syncd.toml",
                                                    ledger_path=ledger_path))  # fmt: skip
        assert settings.identity.hmac_key is not None and settings.mailchimp.webhook_secret
        keys = SubjectKeys(settings.identity.hmac_key.get_secret_value().encode(),
                           settings.identity.default_phone_region)  # fmt: skip
        secret = settings.mailchimp.webhook_secret.get_secret_value()

        record = recorder(ledger_path)

        with serve_wsgi(mailchimp_webhook_app(secret, record)) as base:
            sandbox.mailchimp.add_webhook(f"{base}{WEBHOOK_PREFIX}{secret}", validate=True)
            ledger = Ledger.open(ledger_path)
            try:
                yield World(sandbox, ledger, ledger_path, PhorestConnector(settings.phorest), keys)
            finally:
                ledger.close()


def test_a_mailchimp_unsubscribe_withdraws_consent_in_phorest(world: World) -> None:
    client_id, email = world.candidates()[0]
    world.unsubscribe(email)
    (event,) = world.ledger.pending_inbox()
    assert event.kind == "unsubscribe"

    assert world.process() == {QUEUED: 1}
    world.run()

    assert world.consent(client_id) is False
    assert world.ledger.pending_inbox() == []
    subject = world.keys.client_id(client_id)
    facts = world.ledger.subject_facts([subject])[subject]
    assert facts.opted_out_at == event.occurred_at
    assert world.ledger.subject_for(world.keys.email(email)) == subject
    assert tasks(world) == {"done": 1}
    row = world.ledger._conn.execute(  # noqa: SLF001 - the scrub is the point
        "SELECT payload, outcome FROM inbox WHERE id = ?", (event.id,)
    ).fetchone()
    assert row["payload"] is None and row["outcome"] == QUEUED


def test_replays_and_echoes_cause_nothing_more(world: World) -> None:
    client_id, email = world.candidates()[0]
    world.unsubscribe(email)
    (event,) = world.ledger.pending_inbox()
    # The same delivery replayed: deduplicated at intake.
    assert not world.ledger.add_inbox_event("mailchimp", event.kind, event.occurred_at,
                                            {"email": email}, event.dedupe_key)  # fmt: skip
    assert world.process() == {QUEUED: 1}
    world.run()
    version = world.sandbox.phorest.client(client_id)["version"]  # type: ignore[index]

    # A later, distinct event for the same address (e.g. an echo of an admin
    # unsubscribe): consent is already off, so no task and no Phorest write.
    later = event.occurred_at + timedelta(seconds=5)
    assert world.ledger.add_inbox_event("mailchimp", "unsubscribe", later, {"email": email}, "x1")
    assert world.process(now=later + timedelta(minutes=1)) == {ALREADY: 1}
    world.run()
    assert tasks(world) == {"done": 1}
    assert world.sandbox.phorest.client(client_id)["version"] == version  # type: ignore[index]
    subject = world.keys.client_id(client_id)
    assert world.ledger.subject_facts([subject])[subject].opted_out_at == later

    # An older one does not move the recorded opt-out back.
    assert world.ledger.add_inbox_event("mailchimp", "cleaned", event.occurred_at - timedelta(days=1),
                                        {"email": email}, "x2")  # fmt: skip
    assert world.process() == {ALREADY: 1}
    assert world.ledger.subject_facts([subject])[subject].opted_out_at == later
    assert world.process() == {}

    # An event dated in the future (skewed fired_at) is recorded as of now.
    now = later + timedelta(minutes=2)
    assert world.ledger.add_inbox_event("mailchimp", "unsubscribe", now + timedelta(days=3),
                                        {"email": email}, "x3")  # fmt: skip
    assert world.process(now=now) == {ALREADY: 1}
    assert world.ledger.subject_facts([subject])[subject].opted_out_at == now


def test_other_events_are_finished_without_touching_phorest(world: World) -> None:
    at = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    ledger = world.ledger
    ledger.add_inbox_event("mailchimp", "unsubscribe", at, {"email": "nobody.here@example.com"}, "a")
    ledger.add_inbox_event("mailchimp", "upemail", at + timedelta(seconds=1),
                           {"old_email": "a.b@example.com", "new_email": "c.d@example.com"}, "b")
    ledger.add_inbox_event("mailchimp", "profile", at + timedelta(seconds=2),
                           {"email": "a.b@example.com", "first_name": "A", "last_name": "B"}, "c")
    before = world.sandbox.phorest.snapshot_clients()
    assert world.process() == {NO_CLIENT: 1, NOTED: 1, IGNORED: 1}
    assert ledger.pending_inbox() == []
    assert tasks(world) == {}
    assert world.sandbox.phorest.snapshot_clients() == before


def test_no_seeded_address_stays_in_the_ledger_file(world: World) -> None:
    for _client_id, email in world.candidates()[:3]:
        world.unsubscribe(email)
    world.sandbox.mailchimp.change_email(world.candidates()[5][1], "moved.person@example.net")
    assert world.sandbox.mailchimp.drain_webhooks(10)
    world.process()
    world.run()
    assert world.ledger.pending_inbox() == []
    assert world.ledger.checkpoint()
    data = world.ledger_path.read_bytes()
    wal = world.ledger_path.with_name(world.ledger_path.name + "-wal")
    data += wal.read_bytes() if wal.exists() else b""
    emails = {c["email"] for c in world.sandbox.phorest.snapshot_clients() if c.get("email")}
    emails |= {m["email_address"] for m in world.sandbox.mailchimp.snapshot_members()}
    emails.add("moved.person@example.net")
    leaked = [e for e in emails if e.encode() in data or e.casefold().encode() in data]
    assert leaked == []


def test_twenty_clicks_in_a_row_each_reach_phorest(world: World) -> None:
    # The latency of this path is measured by benchmarks/propagation.py.
    chosen = world.candidates()[:20]
    assert len(chosen) == 20
    for client_id, email in chosen:
        world.sandbox.mailchimp.click_unsubscribe(email)
        deadline = time.monotonic() + 30  # a hang guard, not a speed check
        while world.consent(client_id):
            assert time.monotonic() < deadline, "consent not withdrawn"
            world.process()
            world.run()
    assert tasks(world) == {"done": 20}
