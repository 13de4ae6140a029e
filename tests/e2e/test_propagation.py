"""Opt-outs, renames and moves travel both ways; nothing personal is logged or kept.

One world: a sandbox with seeded drift over real HTTP on 127.0.0.1, syncd's
webhook app registered with the Mailchimp emulator, a real SQLite ledger file,
the real connectors, and syncd's logging at debug into a buffer. A resync, then
the people actions a clinic sees every day, each carried by the path the daemon
uses (webhook -> inbox -> task, or the change-feed poll). At the end, every seeded
email and name is searched for in the log and in the ledger file.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog

from connectors.base import Connector
from syncd import log as syncd_log
from syncd.engine import poll, resync
from syncd.identity import SubjectKeys
from syncd.inbox import process_inbox
from syncd.ledger import Ledger
from syncd.retry import RetryPolicy
from syncd.sandbox.app import Sandbox
from syncd.tasks import run_due
from tests.support import seeded_values, wired_sandbox

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
POLICY = RetryPolicy(budget=8)


@dataclass
class World:
    sandbox: Sandbox
    ledger: Ledger
    ledger_path: Path
    live: dict[str, Connector]
    keys: SubjectKeys
    log: io.StringIO

    def webhooks_and_tasks(self) -> None:
        """What the daemon does when a webhook arrives: inbox, then due tasks."""
        assert self.sandbox.mailchimp.drain_webhooks(10)
        now = datetime.now(UTC)
        process_inbox(self.ledger, self.live["phorest"], self.keys, now=now)  # type: ignore[arg-type]
        run_due(self.ledger, self.live, POLICY, self.keys, now=now)

    def poll(self) -> None:
        time.sleep(0.01)  # distinct change times
        assert poll(self.ledger, self.live, self.keys, policy=POLICY).failed == 0

    def subscribed_clients(self) -> list[dict[str, str]]:
        """Live consenting clients, alone at their address, whose member is subscribed."""
        clients = self.sandbox.phorest.snapshot_clients()
        holders: dict[str, int] = {}
        for c in clients:
            if c.get("email"):
                holders[c["email"].lower()] = holders.get(c["email"].lower(), 0) + 1
        found = []
        for c in clients:
            email = c.get("email")
            if not email or not c.get("emailMarketingConsent") or holders[email.lower()] > 1:
                continue
            if c.get("archived") or c.get("deleted") or c.get("mergedToClientId"):
                continue
            member = self.sandbox.mailchimp.member(email)
            if member and member["status"] == "subscribed":
                found.append(c)
        return found


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    syncd_log.configure(level="debug", fmt="json", stream=stream)
    try:
        with Sandbox(clients=200, seed=11, smtp_port=None) as sandbox, \
                wired_sandbox(sandbox, tmp_path, sleep=lambda _: None) as wired:
            yield World(sandbox, wired.ledger, wired.ledger_path, wired.live, wired.keys, stream)
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


def test_everyday_changes_reach_the_other_system_and_leave_no_personal_data(
    world: World,
) -> None:
    sandbox = world.sandbox
    seeded = seeded_values(sandbox)
    assert len(seeded) > 300  # addresses, names and phones of 200 clients
    assert resync(None, world.ledger, world.live, world.keys, policy=POLICY).failed == 0
    clicker, staff_opt_out, mover, renamed = world.subscribed_clients()[:4]
    old_member = sandbox.mailchimp.member(mover["email"])
    assert old_member is not None
    world.poll()  # the cursors are where the resync left them: nothing to do

    # A client clicks unsubscribe in a campaign: the webhook carries it to Phorest.
    sandbox.mailchimp.click_unsubscribe(clicker["email"])
    world.webhooks_and_tasks()
    assert sandbox.phorest.client(clicker["clientId"])["emailMarketingConsent"] is False

    # Staff record an opt-out, an email change and a new surname in Phorest.
    sandbox.phorest.edit_client(staff_opt_out["clientId"], emailMarketingConsent=False)
    sandbox.phorest.edit_client(mover["clientId"], email="moved.e2e@example.net")
    sandbox.phorest.edit_client(renamed["clientId"], lastName="Newsurname")
    world.poll()

    assert sandbox.mailchimp.member(staff_opt_out["email"])["status"] == "unsubscribed"
    moved = sandbox.mailchimp.member("moved.e2e@example.net")
    assert moved is not None and moved["unique_email_id"] == old_member["unique_email_id"]
    assert sandbox.mailchimp.member(mover["email"]) is None
    assert sandbox.mailchimp.member(renamed["email"])["merge_fields"]["LNAME"] == "Newsurname"
    assert sandbox.mailchimp.member(clicker["email"])["status"] == "unsubscribed"

    # Everything agrees now: a full resync finds nothing, and no task is left open.
    assert resync(None, world.ledger, world.live, world.keys, dry_run=True).planned == 0
    states = world.ledger.count_tasks_by_state()
    assert {s for s, n in states.items() if n} <= {"done"}, states
    assert sandbox.mailchimp.confirmation_emails_sent == 0

    seeded |= {"moved.e2e@example.net", "Newsurname"}
    assert world.ledger.checkpoint()
    text = world.log.getvalue()
    assert "poll_done" in text and "inbox_processed" in text  # the log was captured
    in_log = {v for v in seeded if v in text}
    assert not in_log, f"{len(in_log)} seeded values in the log"
    ledger_bytes = world.ledger_path.read_bytes()
    in_ledger = {v for v in seeded if v.encode() in ledger_bytes}
    assert not in_ledger, f"{len(in_ledger)} seeded values in the ledger file"
