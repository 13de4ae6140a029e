"""The resync engine against a real sandbox, the real connectors and a real ledger file."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, astuple, dataclass
from datetime import timedelta
from pathlib import Path

import pytest

import connectors
from connectors.base import ClientRecord, Connector, MemberRecord
from syncd import config, engine
from syncd.engine import ResyncResult, poll, resync
from syncd.identity import SubjectKeys, normalise_email
from syncd.ledger import Ledger
from syncd.reconcile import ERASED_CLIENT_STATES
from syncd.retry import RetryPolicy
from syncd.sandbox.app import Sandbox
from tests.support import FakeClock, shared_address_violations, vendor_addresses

CLIENTS, SEED = 150, 2
POLICY = RetryPolicy(budget=8)


@dataclass
class World:
    sandbox: Sandbox
    settings: config.Settings
    live: dict[str, Connector]
    keys: SubjectKeys
    ledger: Ledger
    clock: FakeClock

    def resync(self, **kwargs: object) -> ResyncResult:
        return resync(self.settings, self.ledger, self.live, self.keys, now=self.clock.now,
                      policy=POLICY, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with Sandbox(clients=CLIENTS, seed=SEED, smtp_port=None) as sandbox:
        settings = config.load(sandbox.write_config(tmp_path / "syncd.toml"))
        live: dict[str, Connector] = {
            kind: connectors.load(kind)(
                getattr(settings, kind), retry=RetryPolicy(attempts=2), sleep=lambda _: None
            )
            for kind in ("phorest", "mailchimp")
        }
        secret = settings.identity.hmac_key
        assert secret is not None
        keys = SubjectKeys(secret.get_secret_value().encode(), settings.identity.default_phone_region)
        clock = FakeClock()
        with Ledger.open(settings.ledger.path, clock=clock) as ledger:
            yield World(sandbox, settings, live, keys, ledger, clock)


def _clients(world: World) -> list[ClientRecord]:
    return [c for c in world.live["phorest"].scan() if isinstance(c, ClientRecord)]


def _members(world: World) -> dict[str, MemberRecord]:
    return {normalise_email(m.email): m for m in world.live["mailchimp"].scan()
            if isinstance(m, MemberRecord)}  # fmt: skip


def test_dry_run_lists_the_differences_and_changes_nothing(world: World) -> None:
    members_before = world.sandbox.mailchimp.snapshot_members()
    clients_before = world.sandbox.phorest.snapshot_clients()

    result = world.resync(dry_run=True)

    assert result.dry_run and result.report is None and result.failed == 0
    assert result.planned == sum(result.counts.values()) > 0
    kinds = {(processor, action) for processor, action, _rule, _why in result.counts}
    assert {("mailchimp", "unsubscribe"), ("mailchimp", "subscribe"),
            ("mailchimp", "erase"), ("phorest", "withdraw_consent")} <= kinds  # fmt: skip
    ids = {c["clientId"] for c in clients_before}
    assert all(row.client_id in ids or row.client_id == "-" for row in result.rows)
    assert all("@" not in value for row in result.rows for value in asdict(row).values())
    assert world.sandbox.mailchimp.snapshot_members() == members_before
    assert world.sandbox.phorest.snapshot_clients() == clients_before
    assert not any(world.ledger.count_tasks_by_state().values())


def test_resync_brings_mailchimp_in_line_with_phorest_and_a_second_one_plans_nothing(
    world: World,
) -> None:
    before_clients = {c.client_id: c for c in _clients(world)}
    before_members = _members(world)

    before = vendor_addresses(world.sandbox)

    result = world.resync()

    assert result.failed == 0 and result.report is not None and result.report.ok
    assert result.planned > 0
    after_clients = _clients(world)
    after = vendor_addresses(world.sandbox)
    assert shared_address_violations(after) == []
    for email, address in after.items():
        raw = address.member
        if address.tier == "dead":
            # R5: the member of a deleted/forgotten/merged client is gone for good.
            assert raw is None and world.sandbox.mailchimp.member(email) is None
        if raw is not None and raw["status"] == "subscribed":
            # R1: the Phorest name and nothing else.
            fields = {k: v for k, v in raw["merge_fields"].items() if v not in ("", None, {})}
            assert set(fields) <= {"FNAME", "LNAME"}
        if address.tier is None:  # an orphan: never marketed
            assert not address.marketed
    # R2: Phorest consent withdrawn exactly for the live clients at addresses
    # opted out in Mailchimp only: every one of them, shared or not.
    withdrawn = {c.client_id for c in after_clients
                 if before_clients[c.client_id].email_consent and not c.email_consent}
    opted_out = {
        raw["clientId"] for address in before.values()
        if address.member is not None and address.member["status"] in ("unsubscribed", "cleaned")
        for raw in address.live if raw.get("emailMarketingConsent") is True
    }  # fmt: skip
    assert withdrawn == opted_out and withdrawn
    assert world.sandbox.mailchimp.confirmation_emails_sent == 0

    again = world.resync(dry_run=True)
    assert (again.planned, again.counts) == (0, {})


def test_resync_with_processor_applies_only_that_processors_actions(world: World) -> None:
    members_before = world.sandbox.mailchimp.snapshot_members()

    result = world.resync(processors=["phorest"])

    assert result.failed == 0 and {p for p, *_ in result.counts} == {"phorest"}
    assert world.sandbox.mailchimp.snapshot_members() == members_before
    remaining = world.resync(dry_run=True)
    assert {p for p, *_ in remaining.counts} == {"mailchimp"}


def test_resync_converges_despite_vendor_faults(world: World) -> None:
    # Scans must survive on the in-call tier; writes may also be left to the persisted one.
    world.live = {kind: connectors.load(kind)(getattr(world.settings, kind),
                                              retry=RetryPolicy(attempts=6), sleep=lambda _: None)
                  for kind in ("phorest", "mailchimp")}  # fmt: skip
    faults = world.sandbox.traffic.faults["mailchimp"]
    faults.rate_5xx, faults.rate_429, faults.rate_drop = 0.1, 0.05, 0.02

    def injected() -> int:
        return sum(n for (vendor, _m, _t, status), n in world.sandbox.traffic.counts.items()
                   if vendor == "mailchimp" and status in (0, 429, 500, 502, 503, 504))

    # Mailchimp takes few calls (full batches), and reads run on threads, so which call
    # draws a fault varies: go on until a fault really happened, and it converged.
    for _ in range(12):
        result = world.resync()
        assert result.failed == 0
        open_tasks = world.ledger.count_tasks_by_state()
        if (not open_tasks.get("pending") and not world.resync(dry_run=True).planned
                and injected() > 0):
            break
        world.clock.advance(hours=2)  # every persisted retry comes due
    faults.rate_5xx = faults.rate_429 = faults.rate_drop = 0.0
    assert injected() > 0  # the faults really happened
    assert world.ledger.count_tasks_by_state().get("failed", 0) == 0
    assert world.resync(dry_run=True).planned == 0
    assert world.sandbox.mailchimp.confirmation_emails_sent == 0


def test_an_opt_in_in_phorest_after_an_opt_out_is_honoured(world: World) -> None:
    world.resync()
    # A client whose consent syncd withdrew because they unsubscribed in Mailchimp.
    members = _members(world)
    client = next(
        c for c in _clients(world)
        if c.state == "active" and not c.email_consent and c.email
        and getattr(members.get(normalise_email(c.email)), "status", None) == "unsubscribed"
    )  # fmt: skip
    assert world.resync(dry_run=True).planned == 0
    world.sandbox.phorest.edit_client(client.client_id, emailMarketingConsent=True)

    result = world.resync()

    assert ("mailchimp", "subscribe", "R1", "opted_in_in_phorest_after_opt_out") in result.counts
    assert result.failed == 0
    member = world.sandbox.mailchimp.member(client.email or "")
    assert member is not None and member["status"] in ("subscribed", "unsubscribed")
    assert world.sandbox.mailchimp.confirmation_emails_sent == 0
    assert world.resync(dry_run=True).planned == 0


def test_an_email_change_in_phorest_moves_the_same_member(world: World) -> None:
    world.resync()
    members = _members(world)
    client = next(
        c for c in _clients(world)
        if c.state == "active" and c.email_consent and c.email
        and getattr(members.get(normalise_email(c.email)), "status", None) == "subscribed"
        and sum(1 for o in _clients(world) if o.email == c.email) == 1
    )  # fmt: skip
    old = world.sandbox.mailchimp.member(client.email or "")
    assert old is not None
    new_email = "moved.client@example.net"
    world.sandbox.phorest.edit_client(client.client_id, email=new_email)
    count_before = world.sandbox.mailchimp.members_count()

    plan = world.resync(dry_run=True)
    assert plan.counts == {("mailchimp", "move_email", "R6", "email_changed_in_phorest"): 1}
    result = world.resync()

    assert result.failed == 0
    moved = world.sandbox.mailchimp.member(new_email)
    assert moved is not None and moved["status"] == "subscribed"
    assert moved["unique_email_id"] == old["unique_email_id"]  # the same member, not a new one
    assert world.sandbox.mailchimp.member(client.email or "") is None
    assert world.sandbox.mailchimp.members_count() == count_before
    assert world.resync(dry_run=True).planned == 0
    # A second change moves it again, from the address syncd put it under.
    world.sandbox.phorest.edit_client(client.client_id, email="moved.again@example.org")
    assert world.resync().counts == {
        ("mailchimp", "move_email", "R6", "email_changed_in_phorest"): 1}
    again = world.sandbox.mailchimp.member("moved.again@example.org")
    assert again is not None and again["unique_email_id"] == old["unique_email_id"]


def _plan_of(result: ResyncResult) -> tuple[object, ...]:
    """Everything a resync decided, in an order that does not depend on batching."""
    return (result.counts, sorted(map(astuple, result.rows)), result.shared,
            sorted(map(astuple, result.kept)), result.clients, result.members)


@pytest.mark.parametrize("batch", [1, 7])
def test_planning_in_small_batches_decides_exactly_what_one_batch_does(
    world: World, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """Addresses are planned a batch at a time in key order: moves (whose old and new
    address fall in different batches), shared addresses and erasures come out the same."""
    default = engine.PLAN_BATCH_ADDRESSES
    whole = world.resync(dry_run=True)
    monkeypatch.setattr(engine, "PLAN_BATCH_ADDRESSES", batch)
    assert _plan_of(world.resync(dry_run=True)) == _plan_of(whole)
    assert whole.shared and whole.planned > 20

    assert world.resync().failed == 0  # in batches of ``batch`` addresses
    monkeypatch.setattr(engine, "PLAN_BATCH_ADDRESSES", default)
    assert world.resync(dry_run=True).planned == 0
    members, clients = _members(world), _clients(world)
    movable = [c for c in clients if c.state == "active" and c.email_consent and c.email
               and getattr(members.get(normalise_email(c.email)), "status", None) == "subscribed"
               and sum(1 for o in clients if o.email == c.email) == 1][:2]  # fmt: skip
    for n, client in enumerate(movable):
        world.sandbox.phorest.edit_client(client.client_id, email=f"moved.{n}@example.net")
    whole = world.resync(dry_run=True)
    assert whole.counts == {("mailchimp", "move_email", "R6", "email_changed_in_phorest"): 2}
    monkeypatch.setattr(engine, "PLAN_BATCH_ADDRESSES", batch)
    assert _plan_of(world.resync(dry_run=True)) == _plan_of(whole)
    assert world.resync().counts == whole.counts
    assert world.resync(dry_run=True).planned == 0
    for n in range(2):
        member = world.sandbox.mailchimp.member(f"moved.{n}@example.net")
        assert member is not None and member["status"] == "subscribed"


def test_a_result_keeps_a_bounded_number_of_rows_and_counts_every_action(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    every = world.resync(dry_run=True)
    monkeypatch.setattr(engine, "ROWS_KEPT", 5)
    few = world.resync(dry_run=True)
    assert few.counts == every.counts and few.planned == every.planned > 5
    assert few.rows == every.rows[:5] and few.rows_left_out == every.planned - 5
    summary = few.as_json()
    assert len(summary["rows"]) == 5 and summary["rows_left_out"] == every.planned - 5
    assert every.rows_left_out == 0 and len(every.rows) == every.planned


# -- poll: the change feeds -------------------------------------------------


def _poll(world: World) -> ResyncResult:
    world.clock.advance(seconds=5)
    return poll(world.ledger, world.live, world.keys, now=world.clock.now, policy=POLICY)


def _subscribed_client(world: World) -> ClientRecord:
    members = _members(world)
    return next(
        c for c in _clients(world)
        if c.state == "active" and c.email_consent and c.email
        and getattr(members.get(normalise_email(c.email)), "status", None) == "subscribed"
        and sum(1 for o in _clients(world) if o.email == c.email) == 1
    )  # fmt: skip


def _calls(world: World) -> int:
    return sum(world.sandbox.traffic.counts.values())


def test_the_first_poll_is_a_full_resync_and_a_quiet_poll_costs_two_reads(world: World) -> None:
    first = _poll(world)
    assert first.planned > 0 and first.failed == 0
    before = _calls(world)

    quiet = _poll(world)

    assert quiet.planned == 0
    # Each feed is one page; syncd's own writes are recognised without lookups.
    assert _calls(world) - before <= 4


def test_a_staff_opt_out_in_phorest_reaches_mailchimp_by_poll(world: World) -> None:
    world.resync()
    client = _subscribed_client(world)
    world.sandbox.phorest.edit_client(client.client_id, emailMarketingConsent=False)

    result = _poll(world)

    assert result.counts == {("mailchimp", "unsubscribe", "R1", "no_consent_in_phorest"): 1}
    member = world.sandbox.mailchimp.member(client.email or "")
    assert member is not None and member["status"] == "unsubscribed"
    assert _poll(world).planned == 0


def test_an_unsubscribe_in_mailchimp_reaches_phorest_by_poll_without_a_webhook(
    world: World,
) -> None:
    world.resync()
    client = _subscribed_client(world)
    world.sandbox.mailchimp.click_unsubscribe(client.email or "")

    result = _poll(world)

    assert result.counts == {("phorest", "withdraw_consent", "R2", "unsubscribed_in_mailchimp"): 1}
    assert world.sandbox.phorest.client(client.client_id)["emailMarketingConsent"] is False
    assert _poll(world).planned == 0


def test_an_email_change_and_a_rename_in_phorest_reach_mailchimp_by_poll(world: World) -> None:
    world.resync()
    moved, renamed = _subscribed_client(world), None
    old = world.sandbox.mailchimp.member(moved.email or "")
    world.sandbox.phorest.edit_client(moved.client_id, email="poll.moved@example.net")
    renamed = next(c for c in _clients(world) if c.client_id != moved.client_id
                   and c.email_consent and c.state == "active" and c.email
                   and (world.sandbox.mailchimp.member(c.email) or {}).get("status") == "subscribed")
    world.sandbox.phorest.edit_client(renamed.client_id, lastName="Newname")

    result = _poll(world)

    assert result.counts == {
        ("mailchimp", "move_email", "R6", "email_changed_in_phorest"): 1,
        ("mailchimp", "update_names", "R6", "name_changed_in_phorest"): 1,
    }
    member = world.sandbox.mailchimp.member("poll.moved@example.net")
    assert old is not None and member is not None
    assert member["unique_email_id"] == old["unique_email_id"]
    assert world.sandbox.mailchimp.member(renamed.email or "")["merge_fields"]["LNAME"] == "Newname"
    assert _poll(world).planned == 0


def test_a_client_forgotten_in_phorest_is_erased_from_mailchimp_by_poll(world: World) -> None:
    world.resync()
    client = _subscribed_client(world)
    world.sandbox.phorest.forget(client.client_id)

    result = _poll(world)

    assert result.counts == {("mailchimp", "erase", "R5", "client_forgotten"): 1}
    assert world.sandbox.mailchimp.member(client.email or "") is None
    assert _poll(world).planned == 0


def test_every_client_phorest_forgot_deleted_or_merged_away_joins_the_suppression_list(
    world: World,
) -> None:
    dead = _dead(world)
    assert dead
    world.resync()
    keys = [world.keys.client_id(c.client_id) for c in dead]
    assert world.ledger.suppressed_among(keys) == set(keys)
    live = [world.keys.client_id(c.client_id) for c in _clients(world) if c.state == "active"]
    assert world.ledger.suppressed_among(live) == set()

    # Forgotten by staff and found by the next poll: suppressed too, so that nothing re-adds
    # the person, whatever Phorest later shows.
    client = _subscribed_client(world)
    world.sandbox.phorest.forget(client.client_id)
    _poll(world)
    assert world.ledger.is_suppressed(world.keys.client_id(client.client_id))


def test_a_deleted_record_at_a_shared_address_keeps_the_member_and_says_so_once(
    world: World,
) -> None:
    phorest, email = world.sandbox.phorest, "shared.e2e@example.org"
    stays = phorest.add_client(firstName="Ann", lastName="Lee", email=email,
                               emailMarketingConsent=True, createdAt="2020-01-01T00:00:00.000Z")
    goes = phorest.add_client(firstName="Bo", lastName="Lee", email=email,
                              emailMarketingConsent=True)
    phorest.delete(goes["clientId"])
    world.sandbox.mailchimp.add_member(email, "subscribed",
                                       merge_fields={"FNAME": "Ann", "LNAME": "Lee"})

    dry = world.resync(dry_run=True)

    assert [(row.client_id, row.action, row.why) for row in dry.kept] == [
        (goes["clientId"], "keep", "shared address: kept for another client")]
    assert ("active+deleted", "active") in dry.shared
    assert not [row for row in dry.rows if row.client_id in (goes["clientId"], stays["clientId"])]
    assert dry.as_json()["kept"][0]["client_id"] == goes["clientId"]

    world.resync()
    world.resync()

    assert world.sandbox.mailchimp.member(email)["status"] == "subscribed"
    kept = [e for e in world.ledger.audit_events(world.keys.client_id(goes["clientId"]))
            if e.action == "keep_shared_member"]
    assert [(e.reason, e.outcome) for e in kept] == [("R5:kept_for_another_client", "kept")]


def test_a_mark_of_syncds_own_unsubscribe_never_hides_the_persons_later_opt_out(
    world: World,
) -> None:
    phorest, email = world.sandbox.phorest, "family.e2e@example.org"
    first = phorest.add_client(firstName="Ann", lastName="Lee", email=email,
                               emailMarketingConsent=True, createdAt="2020-01-01T00:00:00.000Z")
    second = phorest.add_client(firstName="Bo", lastName="Lee", email=email,
                                emailMarketingConsent=True)
    world.sandbox.mailchimp.add_member(email, "subscribed",
                                       merge_fields={"FNAME": "Ann", "LNAME": "Lee"})
    # A mark left on the other record's subject (it was the primary once).
    world.ledger.upsert_subject(world.keys.client_id(second["clientId"]),
                                unsubscribed_by_syncd=True)
    world.resync()  # the member is seen subscribed: the mark ends everywhere
    world.sandbox.mailchimp.click_unsubscribe(email)

    world.resync()

    for client in (first, second):
        assert phorest.client(client["clientId"])["emailMarketingConsent"] is False


# -- Google Analytics (R5), suppression by phone, erased people back with consent ------


def _dead(world: World) -> list[ClientRecord]:
    return [c for c in _clients(world) if c.state in ERASED_CLIENT_STATES]


def test_each_dead_client_gets_exactly_one_ga_deletion_across_resyncs(world: World) -> None:
    google = world.sandbox.google
    world.live["google_analytics"] = connectors.load("google_analytics")(
        world.settings.google_analytics, retry=RetryPolicy(attempts=2), sleep=lambda _: None)
    dead = _dead(world)
    assert dead  # the seeded world has deleted, merged and forgotten clients

    first = world.resync()
    world.clock.advance(hours=1)
    second = world.resync()

    assert first.failed == 0 and second.failed == 0
    assert sum(n for (p, *_), n in first.counts.items() if p == "google_analytics") == len(dead)
    assert not [key for key in second.counts if key[0] == "google_analytics"]
    assert len(google.deletions()) == len(dead)
    assert all(google.was_deleted(c.client_id, identifier_type="userId") for c in dead)
    facts = world.ledger.subject_facts([world.keys.client_id(c.client_id) for c in dead])
    assert all(f.analytics_erased_at is not None for f in facts.values()) and len(facts) == len(dead)

    # One more client deleted in Phorest: one more deletion, that one only.
    goes = next(c for c in _clients(world) if c.state == "active")
    world.sandbox.phorest.delete(goes.client_id)
    third = world.resync()
    assert third.counts.get(("google_analytics", "erase", "R5", "client_deleted")) == 1
    assert len(google.deletions()) == len(dead) + 1
    assert google.was_deleted(goes.client_id, identifier_type="userId")


def test_a_suppressed_phone_keeps_an_erased_person_off_mailchimp_under_a_new_address(
    world: World,
) -> None:
    world.resync()
    mobile = "07700 900777"
    world.ledger.suppress(world.keys.phone(mobile), "erasure")
    back = world.sandbox.phorest.add_client(
        firstName="Rita", lastName="Back", email="rita.new.address@example.net", mobile=mobile,
        emailMarketingConsent=True)
    control = world.sandbox.phorest.add_client(
        firstName="Una", lastName="Other", email="una.other@example.net", mobile="07700 900778",
        emailMarketingConsent=True)

    result = world.resync()

    assert result.failed == 0
    assert world.sandbox.mailchimp.member("rita.new.address@example.net") is None
    subscribed = world.sandbox.mailchimp.member("una.other@example.net")
    assert subscribed is not None and subscribed["status"] == "subscribed"  # the control was
    assert back["clientId"] not in [row.client_id for row in result.rows]


def test_an_erased_person_back_with_consent_is_one_alert_but_not_while_their_request_is_open(
    world: World,
) -> None:
    client = world.sandbox.phorest.add_client(
        firstName="Rita", lastName="Back", email="rita.back@example.net",
        emailMarketingConsent=True)
    subject_key = world.keys.client_id(client["clientId"])
    request_id = world.ledger.add_request("erase", subject_key, "email",
                                          world.clock.now + timedelta(days=30))
    world.ledger.suppress(world.keys.email("rita.back@example.net"), "erasure", request_id)
    problem = f"suppressed_consent:{client['clientId']}"

    world.resync()  # staff have not pressed Forget yet: Phorest still shows the consent
    assert problem not in {a.problem_key for a in world.ledger.open_alerts()}

    world.ledger.close_request(request_id, "done")
    world.resync()
    world.clock.advance(hours=1)
    world.resync()

    alerts = [a for a in world.ledger.open_alerts() if a.problem_key == problem]
    assert [(a.kind, a.notify_count) for a in alerts] == [("suppressed_consent", 0)]
    conn = sqlite3.connect(world.settings.ledger.path)
    try:  # raised once: one row ever, not one resolved and raised again per resync
        rows = conn.execute("SELECT COUNT(*) FROM alerts WHERE problem_key = ?",
                            (problem,)).fetchone()  # fmt: skip
    finally:
        conn.close()
    assert rows == (1,)
    assert "rita" not in alerts[0].summary.lower()
    assert world.sandbox.mailchimp.member("rita.back@example.net") is None
