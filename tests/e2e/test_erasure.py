"""Data-subject requests end to end: erasure, restriction, extensions, deadlines (issue 13).

The real ``syncd run`` and ``syncd request …`` commands run as subprocesses
against the sandbox over HTTP on 127.0.0.1, with a real SQLite ledger and the
sandbox's SMTP sink as the manager's mailbox. Verdicts come from what the
vendors hold (Mailchimp's own API, the GA emulator's deletion log, Phorest's
records), what the CLI prints as JSON, and what email arrived; the ledger is
read only to wait for the daemon, and written only to move a deadline or a
retry time that no test can wait for.

Two worlds per module: one with the daemon running (most tests), one without
(the CLI carries requests out itself), where the GA quota can be spent and
given back without a daemon remembering the spent quota until Pacific midnight.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import phonenumbers
import pytest
import requests

from syncd import config
from syncd.errors import IdentifierError
from syncd.health import LAST_POLL_CURSOR
from syncd.identity import normalise_email, normalise_phone
from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox
from tests.support import started_daemon, syncd_cli, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

PAPER_FORMS = "paper_forms"
MANUAL_PROCESSORS = f"""
[[manual_processors]]
name = "{PAPER_FORMS}"
instructions = "Shred the client's paper consultation forms in the locked cabinet"
confirmers = ["Ann"]
"""
HANG_GUARD_SECONDS = 30  # the daemon polls Phorest every 5 s and checks alerts every second
WIDE = {"COLUMNS": "250"}  # `syncd requests` prints a table: one row per line
PACIFIC = ZoneInfo("America/Los_Angeles")
QUOTA_RESET_MARGIN = timedelta(seconds=60)  # connectors.google_analytics waits a minute more
FORGOTTEN_EMAIL = "Forgotten Email Not Subscribed"


@dataclass
class World:
    """A sandbox and a syncd configuration for it (with or without the daemon running)."""

    sandbox: Sandbox
    config_path: Path
    taken: set[str] = field(default_factory=set)

    @property
    def ledger_path(self) -> Path:
        return Path(config.load(self.config_path).ledger.path)

    # -- the CLI --------------------------------------------------------------------------

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return syncd_cli(self.config_path, *args, **env)

    def ok(self, *args: str, **env: str) -> str:
        result = self.cli(*args, **env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        return result.stdout

    def ok_json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def refused(self, *args: str) -> str:
        """The one-line reason a command was refused with exit 1."""
        result = self.cli(*args)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        return lines[0]

    def at_once(self, *calls: Callable[[], Any]) -> list[Any]:
        """Run independent commands side by side (each CLI call is a process start)."""
        with ThreadPoolExecutor(len(calls)) as pool:
            return [future.result() for future in [pool.submit(call) for call in calls]]

    def file(self, *filings: tuple[str, ...]) -> list[dict[str, Any]]:
        """File requests (``("erase", "--email", E)`` …) at once; each one's JSON."""
        return self.at_once(*(partial(self.ok_json, "request", *f) for f in filings))

    def listed(self, *options: str) -> dict[int, dict[str, Any]]:
        """``syncd requests --json [options]`` by request id."""
        return {row["id"]: row for row in self.ok_json("requests", *options)}

    def show(self, request_id: int) -> dict[str, Any]:
        return self.ok_json("request", "show", str(request_id))

    # -- waiting on the daemon (the ledger, read only: a CLI call a time is too slow) ------

    def steps(self, request_id: int) -> dict[str, str]:
        """processor -> state of its steps (one step each here)."""
        with Ledger.open(self.ledger_path) as ledger:
            return {s.processor: s.state for s in ledger.steps(request_id)}

    def state(self, request_id: int) -> str:
        with Ledger.open(self.ledger_path) as ledger:
            request = ledger.request(request_id)
        assert request is not None
        return request.state

    def wait(self, done: Callable[[], bool], what: str) -> None:
        wait_for(done, HANG_GUARD_SECONDS, what)

    def wait_polls(self, count: int) -> None:
        """Until the daemon has finished ``count`` more polls."""

        def last_poll() -> str | None:
            with Ledger.open(self.ledger_path) as ledger:
                return ledger.get_cursor(LAST_POLL_CURSOR)

        for n in range(count):
            before = last_poll()
            self.wait(lambda before=before: last_poll() != before, f"poll {n + 1} of {count}")

    def write_ledger(self, sql: str, *params: Any) -> None:
        """What no test can wait for (a deadline a month away): written as syncd writes it."""
        with closing(sqlite3.connect(self.ledger_path, timeout=10)) as db, db:
            assert db.execute(sql, params).rowcount == 1

    # -- people ---------------------------------------------------------------------------

    def people(self, count: int) -> list[dict[str, Any]]:
        """Active clients no other test used, subscribed with consent, whose address and mobile
        no other client shares (a shared address is kept for the other client, by design)."""
        region = config.load(self.config_path).identity.default_phone_region
        clients = self.sandbox.phorest.snapshot_clients()
        emails = Counter(_email(c) for c in clients)
        phones = Counter(_phone(c, region) for c in clients)
        chosen = [c for c in clients
                  if c["clientId"] not in self.taken and c.get("emailMarketingConsent")
                  and not (c.get("archived") or c.get("deleted") or c.get("mergedToClientId"))
                  and _email(c) and emails[_email(c)] == 1
                  and _phone(c, region) and phones[_phone(c, region)] == 1
                  and (self.sandbox.mailchimp.member(c["email"]) or {}).get("status")
                  == "subscribed"][:count]  # fmt: skip
        assert len(chosen) == count, "the seeded world has too few such clients"
        self.taken.update(c["clientId"] for c in chosen)
        return chosen

    # -- the manager's mailbox ---------------------------------------------------------------

    def mail_about(self, *needles: str) -> list[dict[str, Any]]:
        """Messages whose subject or body holds every needle (a digest's body counts too)."""
        assert self.sandbox.smtp is not None
        return [m for m in self.sandbox.smtp.messages()
                if all(n in f"{m['subject']}\n{m['text']}" for n in needles)]  # fmt: skip


def _as_typed(mobile: str) -> str:
    """A number as staff would type it from the person's letter: national format, spaced."""
    number = phonenumbers.parse(mobile if mobile.startswith("+") else f"+{mobile}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)


def _email(client: dict[str, Any]) -> str | None:
    try:
        return normalise_email(client["email"]) if client.get("email") else None
    except IdentifierError:
        return None


def _phone(client: dict[str, Any], region: str) -> str | None:
    try:
        return normalise_phone(client["mobile"], region) if client.get("mobile") else None
    except IdentifierError:
        return None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The daemon running, with a paper_forms manual processor and its webhook registered."""
    tmp_path = tmp_path_factory.mktemp("erasure")
    with started_daemon(tmp_path, clients=60, seed=21, extra_toml=MANUAL_PROCESSORS,
                        until_healthy=False) as run:
        run.sandbox.mailchimp.add_webhook(run.hook(), validate=True)
        yield World(run.sandbox, run.config_path)


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """No daemon: each `syncd request` carries its tasks out itself."""
    tmp_path = tmp_path_factory.mktemp("erasure_offline")
    with Sandbox(clients=40, seed=22, smtp_port=None) as sandbox:
        config_path = sandbox.write_config(tmp_path / "syncd.toml")
        with config_path.open("a") as fh:
            fh.write(MANUAL_PROCESSORS)
        world = World(sandbox, config_path)
        world.ok("resync")  # converged, the seeded dead clients' GA deletions sent
        yield world


# -- what the vendors hold ------------------------------------------------------------------


def _mailchimp(sandbox: Sandbox, method: str, path: str,
               body: dict[str, Any] | None = None) -> requests.Response:  # fmt: skip
    c = sandbox.credentials
    return requests.request(method, f"{sandbox.base_url}/3.0/lists/{c.mailchimp_list_id}{path}",
                            json=body, auth=("syncd", c.mailchimp_api_key), timeout=10)


def _subscriber_hash(email: str) -> str:
    return hashlib.md5(email.strip().lower().encode()).hexdigest()  # Mailchimp's member id


def assert_erased_in_mailchimp(sandbox: Sandbox, email: str) -> None:
    """The member is gone, and Mailchimp itself refuses to take the address back."""
    assert _mailchimp(sandbox, "GET", f"/members/{_subscriber_hash(email)}").status_code == 404
    again = _mailchimp(sandbox, "POST", "/members",
                       {"email_address": email, "status": "subscribed"})
    assert again.status_code == 400 and again.json()["title"] == FORGOTTEN_EMAIL, again.text
    assert sandbox.mailchimp.member(email) is None


def ga_deletions(sandbox: Sandbox, client_id: str) -> int:
    """GA deletions accepted for this Phorest client id as the user id."""
    digest = hashlib.sha256(client_id.encode()).hexdigest()
    return sum(d["identifier_type"] == "userId" and d["identifier_sha256"] == digest
               for d in sandbox.google.deletions())  # fmt: skip


def _signup(sandbox: Sandbox, email: str) -> None:
    """The person signs up through Mailchimp's hosted form (the sandbox's people action)."""
    answer = requests.post(f"{sandbox.base_url}/_sandbox/actions/mailchimp-signup",
                           json={"email": email, "fname": "Again", "lname": "Here"}, timeout=10)
    assert answer.status_code == 200, answer.text


def _deliveries(sandbox: Sandbox, event: str) -> int:
    """Webhook deliveries of ``event`` the daemon accepted."""
    return sum(d["type"] == event and d["ok"] for d in sandbox.mailchimp.webhook_log())


def _next_pacific_midnight(moment: datetime) -> datetime:
    local = moment.astimezone(PACIFIC)
    midnight = datetime.combine(local.date() + timedelta(days=1), time(), tzinfo=PACIFIC)
    return midnight.astimezone(UTC)


def _ledger_time(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


# -- 1. erasure by email, phone and client id ----------------------------------------------


def test_an_erasure_by_email_phone_or_client_id_completes_once_every_processor_is_done(
    world: World,
) -> None:
    sandbox = world.sandbox
    people = world.people(3)
    by_email, by_phone, by_id = people
    filed = world.file(("erase", "--email", by_email["email"].upper()),
                       ("erase", "--phone", _as_typed(by_phone["mobile"])),
                       ("erase", "--client-id", by_id["clientId"], "--by", "Reception"))
    for shown, person, source in zip(filed, people, ("email", "phone", "client_id")):
        assert (shown["kind"], shown["state"], shown["source"]) == ("erase", "open", source)
        assert shown["client_id"] == person["clientId"]
        steps = {s["processor"]: s for s in shown["steps"]}
        assert set(steps) == {"mailchimp", "google_analytics", "phorest", PAPER_FORMS}
        assert steps["phorest"]["instructions"] == (
            f"In Phorest, open client {person['clientId']} and use Client actions › Forget")
    email_id, phone_id, client_id = (shown["id"] for shown in filed)
    # Staff press Forget for two of them at once, while syncd is still erasing elsewhere.
    sandbox.phorest.forget(by_phone["clientId"])
    sandbox.phorest.forget(by_id["clientId"])

    # The daemon erases the member and asks GA to delete the user; the request waits on people.
    def vendors_done(request_id: int) -> bool:
        steps = world.steps(request_id)
        return steps["mailchimp"] == steps["google_analytics"] == "done"

    world.wait(lambda: all(vendors_done(r) for r in (email_id, phone_id, client_id)),
               "the Mailchimp and GA steps of the three requests")
    for person in people:
        assert_erased_in_mailchimp(sandbox, person["email"])
        assert ga_deletions(sandbox, person["clientId"]) == 1
    listed = world.listed()
    for request_id in (email_id, phone_id, client_id):
        row = listed[request_id]
        assert row["state"] == "open" and row["processors"][PAPER_FORMS] == "waiting"
        assert row["processors"]["mailchimp"] == row["processors"]["google_analytics"] == "done"
    assert listed[email_id]["processors"]["phorest"] == "waiting"  # not forgotten yet

    # By email: paper forms first (only a listed confirmer may), Forget after.
    # By client id: both done. By phone: Forget only, so far.
    refusal, _, _ = world.at_once(
        partial(world.refused, "request", "confirm", str(email_id), "--processor", PAPER_FORMS,
                "--by", "Mallory"),
        partial(world.ok, "request", "confirm", str(email_id), "--processor", PAPER_FORMS,
                "--by", "Ann"),
        partial(world.ok, "request", "confirm", str(client_id), "--processor", PAPER_FORMS,
                "--by", "Ann"))  # fmt: skip
    assert refusal == "syncd: 'Mallory' may not confirm paper_forms (allowed: Ann; give --by NAME)"
    assert world.state(email_id) == "open"  # Phorest's Forget is still missing
    sandbox.phorest.forget(by_email["clientId"])
    world.wait(lambda: world.state(email_id) == world.state(client_id) == "done"
               and world.steps(phone_id)["phorest"] == "done", "syncd to see the Forgets")
    assert world.state(phone_id) == "open"  # paper forms are still missing
    confirmed = world.ok("request", "confirm", str(phone_id), "--processor", PAPER_FORMS,
                         "--by", "Ann")
    assert f"request #{phone_id} is complete" in confirmed

    done, trail, shown = world.at_once(partial(world.listed, "--all"),
                                       partial(world.ok_json, "audit"),
                                       partial(world.show, email_id))  # fmt: skip
    assert shown["state"] == "done" and set(shown["processors"].values()) == {"done"}
    for request_id in (email_id, phone_id, client_id):
        row = done[request_id]
        assert row["state"] == "done" and row["closed_at"]
        assert set(row["processors"].values()) == {"done"}
        steps = {s["processor"]: s for s in row["steps"]}
        assert steps["phorest"]["confirmed_by"] == "syncd (verified in Phorest)"
        assert steps[PAPER_FORMS]["confirmed_by"] == "Ann"
        assert steps["google_analytics"]["evidence"].startswith("deletionRequestTime=")
        assert steps["mailchimp"]["evidence"].startswith("request id ")
        mine = {(e["processor"], e["action"], e["outcome"]) for e in trail
                if e["request_id"] == request_id}  # fmt: skip
        assert {("mailchimp", "erase", "done"), ("google_analytics", "erase", "done"),
                ("phorest", "forget_client", "done"), (PAPER_FORMS, "manual_step", "done"),
                (None, "request_erase", "filed"), (None, "request_erase", "done")} <= mine
    for person in people:  # the Forgets, seen by the poll too, asked GA for nothing more
        assert ga_deletions(sandbox, person["clientId"]) == 1


# -- 2. never re-added ----------------------------------------------------------------------


@pytest.mark.slow
def test_an_erased_person_is_never_re_added_and_new_consent_is_told_to_the_manager_once(
    world: World,
) -> None:
    sandbox = world.sandbox
    erased, withdrawn = world.people(2)
    first, second = world.file(("erase", "--email", erased["email"]),
                               ("erase", "--client-id", withdrawn["clientId"]))
    # `erased` goes all the way; `withdrawn`'s member is erased, then staff untick the consent
    # and the person withdraws the request: the identifiers stay suppressed, since something
    # was erased already.
    world.wait(lambda: world.steps(first["id"])["mailchimp"] == "done"
               and world.steps(second["id"])["mailchimp"] == "done", "both members erased")
    sandbox.phorest.forget(erased["clientId"])
    sandbox.phorest.edit_client(withdrawn["clientId"], emailMarketingConsent=False)
    world.at_once(
        partial(world.ok, "request", "confirm", str(first["id"]), "--processor", PAPER_FORMS,
                "--by", "Ann"),
        partial(world.ok, "request", "cancel", str(second["id"]), "--reason", "withdrawn"))
    world.wait(lambda: world.state(first["id"]) == "done", "the erasure to complete")

    # A full resync, handed to the daemon, adds nobody back.
    world.ok("resync")
    for person in (erased, withdrawn):
        assert_erased_in_mailchimp(sandbox, person["email"])

    # Then, at once: the person signs up again on Mailchimp's hosted form (the subscribe
    # webhook reaches the daemon), staff create two new records with consent, one with the
    # erased address, one with the erased mobile and a new address, and tick the withdrawn
    # client's consent back on. syncd adds nothing to Phorest and nobody to Mailchimp,
    # erases the signed-up member again, and tells the manager once per client.
    signups = _deliveries(sandbox, "subscribe")
    _signup(sandbox, erased["email"])
    assert sandbox.mailchimp.member(erased["email"])["status"] == "subscribed"
    newcomer = sandbox.phorest.add_client(firstName="New", lastName="Record",
                                          email=erased["email"], emailMarketingConsent=True)
    new_address = f"new.{erased['email']}"  # same mobile, another address: the same person
    by_mobile = sandbox.phorest.add_client(firstName="Another", lastName="Record",
                                           email=new_address, mobile=erased["mobile"],
                                           emailMarketingConsent=True)
    sandbox.phorest.edit_client(withdrawn["clientId"], emailMarketingConsent=True)
    world.wait(lambda: _deliveries(sandbox, "subscribe") > signups, "the subscribe webhook")
    problems = {who["clientId"]: ("asked to be erased", who["clientId"])
                for who in (newcomer, by_mobile, withdrawn)}  # fmt: skip
    world.wait(lambda: sandbox.mailchimp.member(erased["email"]) is None
               and all(world.mail_about(*needles) for needles in problems.values()),
               "the member erased again and the suppressed-consent emails")

    # More passes over everyone (a resync, a poll): no one back, no second email.
    world.ok("resync")
    world.wait_polls(1)
    for client, needles in problems.items():
        assert len(world.mail_about(*needles)) == 1, client
    for person in (erased, withdrawn):
        assert_erased_in_mailchimp(sandbox, person["email"])
    assert sandbox.mailchimp.member(new_address) is None
    # Phorest's consent is a person's to settle: syncd only keeps them off the processors.
    for client in problems:
        assert sandbox.phorest.client(client)["emailMarketingConsent"] is True
    forgotten = sandbox.phorest.client(erased["clientId"])
    assert forgotten["email"] is None and forgotten["emailMarketingConsent"] is False
    report = json.loads(world.cli("status", "--json").stdout)
    assert {f"suppressed_consent:{c}" for c in problems} <= {a["problem"] for a in report["alerts"]}


# -- 3. GA's daily deletion quota ----------------------------------------------------------


def test_a_spent_ga_quota_defers_the_deletion_to_the_next_quota_day_and_never_fails_it(
    offline: World,
) -> None:
    sandbox = offline.sandbox
    early, late = offline.people(2)
    sandbox.google.daily_deletion_quota = len(sandbox.google.deletions()) + 1  # one left today
    done = offline.ok_json("request", "erase", "--client-id", early["clientId"])
    assert done["processors"]["google_analytics"] == "done"
    assert ga_deletions(sandbox, early["clientId"]) == 1

    before = datetime.now(UTC)
    waiting = offline.ok_json("request", "erase", "--client-id", late["clientId"])
    after = datetime.now(UTC)
    assert waiting["state"] == "open" and waiting["processors"]["google_analytics"] == "waiting"
    assert waiting["processors"]["mailchimp"] == "done"
    assert ga_deletions(sandbox, late["clientId"]) == 0

    def ga_task() -> Any:
        with Ledger.open(offline.ledger_path) as ledger:
            tasks = [t for t in ledger.tasks_for_request(waiting["id"])
                     if t.processor == "google_analytics"]  # fmt: skip
        assert len(tasks) == 1
        return tasks[0]

    def assert_waits_for_the_next_quota_day(start: datetime, end: datetime) -> None:
        task = ga_task()
        assert task.state == "pending" and task.attempts == 0, task
        assert (task.last_error or "").startswith("quota_wait"), task.last_error
        resets = {_next_pacific_midnight(start), _next_pacific_midnight(end)}
        assert any(abs(task.next_attempt_at - (reset + QUOTA_RESET_MARGIN)) < timedelta(seconds=5)
                   for reset in resets), (task.next_attempt_at, resets)

    assert_waits_for_the_next_quota_day(before, after)

    # Tried again while the quota is still spent (as if the day had turned early): it waits
    # again, and that costs no attempt and fails nothing; the request stays open.
    offline.write_ledger("UPDATE tasks SET next_attempt_at = ? WHERE id = ?",
                         _ledger_time(datetime.now(UTC)), ga_task().id)
    before = datetime.now(UTC)
    offline.ok("resync", "--processor", "google_analytics")
    assert_waits_for_the_next_quota_day(before, datetime.now(UTC))
    shown = offline.show(waiting["id"])
    assert shown["state"] == "open" and shown["processors"]["google_analytics"] == "waiting"
    assert ga_deletions(sandbox, late["clientId"]) == 0

    # The next quota day: the deletion goes through.
    sandbox.google.daily_deletion_quota += 1
    offline.write_ledger("UPDATE tasks SET next_attempt_at = ? WHERE id = ?",
                         _ledger_time(datetime.now(UTC)), ga_task().id)
    offline.ok("resync", "--processor", "google_analytics")
    assert ga_task().state == "done"
    assert ga_deletions(sandbox, late["clientId"]) == 1


# -- 4. restriction ------------------------------------------------------------------------


def test_a_restriction_unsubscribes_until_lifted_and_the_ledger_records_both_requests(
    world: World,
) -> None:
    sandbox = world.sandbox
    person = world.people(1)[0]
    email, client_id = person["email"], person["clientId"]
    restricted = world.ok_json("request", "restrict", "--client-id", client_id)
    assert restricted["kind"] == "restrict" and restricted["client_id"] == client_id
    world.wait(lambda: world.state(restricted["id"]) == "done", "the restriction")
    assert sandbox.mailchimp.member(email)["status"] == "unsubscribed"

    # A full resync keeps them off marketing, and reads syncd's own unsubscribe as no
    # opt-out: Phorest's consent stays (the person never withdrew it).
    world.ok("resync")
    assert sandbox.mailchimp.member(email)["status"] == "unsubscribed"
    assert sandbox.phorest.client(client_id)["emailMarketingConsent"] is True

    # Lifted: the request is done at once (the flag is the request) and consent decides
    # again: syncd subscribes them (consent in Phorest). Mailchimp keeps an address that
    # was unsubscribed in its compliance state and refuses that by API, so the manager
    # hears that the person must sign up again themselves (R2).
    lifted = world.ok_json("request", "unrestrict", "--client-id", client_id)
    assert lifted["state"] == "done" and lifted["steps"] == []
    world.wait(lambda: world.mail_about("need a person (needs_client_resubscribe)"),
               "the manager to hear that the person must sign up again")
    assert sandbox.mailchimp.member(email)["status"] == "unsubscribed"
    # Once they do, nothing restricts them any more: a resync keeps them subscribed and
    # puts Phorest's name back on the member (the form's name is not Phorest's).
    _signup(sandbox, email)
    world.ok("resync")
    member = sandbox.mailchimp.member(email)
    assert member["status"] == "subscribed"
    assert member["merge_fields"]["FNAME"] == person["firstName"]

    trail = world.ok_json("audit", "--client-id", client_id)
    assert [(e["action"], e["outcome"], e["request_id"]) for e in trail
            if e["action"].startswith("request_")] == [
        ("request_restrict", "filed", restricted["id"]),
        ("request_restrict", "done", restricted["id"]),
        ("request_unrestrict", "filed", lifted["id"]),
        ("request_unrestrict", "done", lifted["id"]),
    ]  # fmt: skip
    assert ("mailchimp", "unsubscribe", "R1:restricted", "done") in {
        (e["processor"], e["action"], e["reason"], e["outcome"]) for e in trail}


# -- 5. extension and cancellation ---------------------------------------------------------


def test_a_request_is_extended_by_two_months_at_most_and_a_cancel_stops_its_pending_tasks(
    offline: World,
) -> None:
    sandbox = offline.sandbox
    person = offline.people(1)[0]
    sandbox.google.daily_deletion_quota = len(sandbox.google.deletions())  # GA's task waits
    filed = offline.ok_json("request", "erase", "--client-id", person["clientId"])
    request_id = str(filed["id"])
    received = datetime.fromisoformat(filed["received_at"])
    assert datetime.fromisoformat(filed["due_at"]) == _months_later(received, 1)

    for months in (2, 3):
        said = offline.ok("request", "extend", request_id, "--months", "1",
                          "--reason", "complex request")
        assert said.strip() == (f"request #{request_id} extended by 1 month(s) ({months - 1} "
                                f"in all): due {_months_later(received, months):%Y-%m-%d}")
    listed, refusal = offline.at_once(
        offline.listed,
        partial(offline.refused, "request", "extend", request_id, "--months", "1",
                "--reason", "more"))  # fmt: skip
    row = listed[filed["id"]]
    assert datetime.fromisoformat(row["due_at"]) == _months_later(received, 3)
    assert (row["extended_months"], row["extension_reason"]) == (2, "complex request")
    assert refusal == (f"syncd: a request can be extended by at most 2 months in all (UK GDPR "
                       f"Art. 12(3)); request #{request_id} already has 2")

    with Ledger.open(offline.ledger_path) as ledger:
        pending = [t.id for t in ledger.tasks_for_request(filed["id"]) if t.state == "pending"]
    assert pending  # GA's deletion, waiting for the quota
    offline.ok("request", "cancel", request_id, "--reason", "the client withdrew the request")
    shown, still_open = offline.at_once(partial(offline.show, filed["id"]), offline.listed)
    assert shown["state"] == "cancelled" and "the client withdrew the request" in shown["note"]
    assert datetime.fromisoformat(shown["due_at"]) == _months_later(received, 3)  # refused: kept
    assert shown["processors"] == {"mailchimp": "done", "google_analytics": "cancelled",
                                   "phorest": "cancelled", PAPER_FORMS: "cancelled"}
    assert filed["id"] not in still_open
    with Ledger.open(offline.ledger_path) as ledger:
        assert {ledger.task(t).state for t in pending} == {"cancelled"}  # type: ignore[union-attr]
    assert ga_deletions(sandbox, person["clientId"]) == 0


def _months_later(moment: datetime, months: int) -> datetime:
    """The same day ``months`` calendar months on (the month's last day if it has none)."""
    year, month = divmod(moment.month - 1 + months, 12)
    year, month = moment.year + year, month + 1
    return moment.replace(year=year, month=month,
                          day=min(moment.day, calendar.monthrange(year, month)[1]))


# -- 6. deadlines --------------------------------------------------------------------------


def test_a_request_near_or_past_its_deadline_is_marked_and_the_manager_is_emailed(
    world: World,
) -> None:
    person = world.people(1)[0]
    filed = world.ok_json("request", "erase", "--client-id", person["clientId"])
    request_id = filed["id"]

    def deadline() -> tuple[str, str]:
        """The request's deadline in `syncd requests`: (as JSON, its table row)."""
        listed, table = world.at_once(world.listed, partial(world.ok, "requests", **WIDE))
        rows = [line for line in table.splitlines() if person["clientId"] in line]
        assert len(rows) == 1, table
        return listed[request_id]["deadline"], rows[0]

    soon = datetime.now(UTC) + timedelta(days=3, hours=1)
    world.write_ledger("UPDATE requests SET due_at = ? WHERE id = ?", _ledger_time(soon),
                       request_id)
    shown, row = deadline()
    assert shown == "DUE SOON (3 day(s) left)" and "DUE SOON" in row and "OVERDUE" not in row
    due_mail = (f"Erasure request #{request_id} is due on {soon:%Y-%m-%d}",)
    world.wait(lambda: world.mail_about(*due_mail), "the due-soon email")

    late = datetime.now(UTC) - timedelta(days=1, hours=1)
    world.write_ledger("UPDATE requests SET due_at = ? WHERE id = ?", _ledger_time(late),
                       request_id)
    shown, row = deadline()
    assert shown == "OVERDUE" and "OVERDUE" in row and "DUE SOON" not in row
    overdue_mail = (f"Erasure request #{request_id} is overdue: it was due on {late:%Y-%m-%d}",)
    world.wait(lambda: world.mail_about(*overdue_mail), "the overdue email")

    # Closed: the alert clears and the manager hears so; each notice came once.
    world.ok("request", "cancel", str(request_id), "--reason", "the client withdrew it")
    world.wait(lambda: world.mail_about("Resolved", *overdue_mail), "the resolved email")
    assert len(world.mail_about(*due_mail)) == 1
    assert len(world.mail_about(*overdue_mail)) == 2  # the problem, then its resolution
