"""The retention purge (R4): the staleness rule, the purge guard and its confirmation.

Phorest is the sandbox emulator over real HTTP and the ledger a real SQLite file;
the clients here have no email address, so no Mailchimp is needed to file their
erasures (the e2e test covers Mailchimp and GA).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from connectors.base import ClientRecord
from connectors.phorest import PhorestConnector
from syncd import config, retention
from syncd.identity import SubjectKeys
from syncd.ledger import Ledger
from syncd.retention import RetentionError, cutoff, is_old, over_guard
from syncd.retry import RetryPolicy
from syncd.sandbox.http import SandboxServer, Traffic
from syncd.sandbox.phorest import PhorestEmulator
from tests.connectors.test_phorest import PASSWORD, USERNAME, make_settings
from tests.syncd.test_config import MINIMAL, errors_of, write

NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
TODAY = NOW.date()
CUTOFF = date(2024, 12, 3)  # 24 months before TODAY
OLD = "2022-01-10T10:00:00.000Z"


def record(last_visit: date | None, created: datetime | None) -> ClientRecord:
    return ClientRecord(client_id="c1", email=None, mobile=None, first_name="A", last_name="B",
                        email_consent=False, state="active", version=1, updated_at=NOW,
                        created_at=created, last_visit=last_visit)  # fmt: skip


def at(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("last_visit", "created", "old"),
    [
        (date(2023, 5, 1), at(date(2020, 1, 1)), True),
        (None, at(date(2020, 1, 1)), True),
        (None, at(date(2026, 6, 1)), False),
        (date(2023, 5, 1), at(date(2026, 6, 1)), False),
        (CUTOFF, at(date(2020, 1, 1)), False),
        (CUTOFF - timedelta(days=1), at(date(2020, 1, 1)), True),
        (date(2023, 5, 1), at(CUTOFF), False),
        (date(2023, 5, 1), at(CUTOFF - timedelta(days=1)), True),
        (date(2023, 5, 1), None, False),
    ],
    ids=["old-visit", "never-visited-old", "never-visited-created-recently",
         "created-recently", "visit-on-cutoff", "visit-day-before-cutoff",
         "created-on-cutoff", "created-day-before-cutoff", "no-created-at"],
)
def test_a_client_is_old_only_when_last_visit_and_creation_are_both_before_the_cutoff(
    last_visit: date | None, created: datetime | None, old: bool
) -> None:
    assert cutoff(TODAY, 24) == CUTOFF
    assert is_old(record(last_visit, created), CUTOFF) is old


def test_the_cutoff_takes_the_months_last_day_when_it_has_no_such_day() -> None:
    assert cutoff(date(2026, 3, 31), 1) == date(2026, 2, 28)
    assert cutoff(date(2026, 1, 15), 13) == date(2024, 12, 15)


@pytest.mark.parametrize(("stale", "live", "percent", "held"),
                         [(5, 100, 5, False), (6, 100, 5, True), (0, 0, 0, False),
                          (1, 100, 0, True)],
                         ids=["at-the-guard", "above", "nothing", "zero-percent"])  # fmt: skip
def test_the_guard_holds_back_more_than_its_share(stale: int, live: int, percent: float,
                                                  held: bool) -> None:  # fmt: skip
    assert over_guard(stale, live, percent) is held


@pytest.mark.parametrize("months", ["0", "-3"])
def test_retention_months_below_one_is_refused_by_config_validation(
    tmp_path: Path, months: str
) -> None:
    (line,) = errors_of(write(tmp_path, MINIMAL + f"[policy]\nretention_months = {months}\n"))
    assert "policy.retention_months" in line and "greater than or equal to 1" in line


# -- against the emulator, with a real ledger -------------------------------------------------


@dataclass
class Clinic:
    phorest: PhorestEmulator
    api: PhorestConnector
    ledger: Ledger
    keys: SubjectKeys
    branch: str

    def client(self, name: str, *, last_visit: str | None, created: str = OLD,
               **fields: Any) -> str:  # fmt: skip
        return str(self.phorest.add_client(firstName="C", lastName=name, createdAt=created,
                                           lastVisit=last_visit, **fields)["clientId"])

    def book(self, client_id: str, days: int, **fields: Any) -> None:
        values = {"state": "BOOKED", "activationState": "ACTIVE", **fields}
        self.phorest.add_appointment(self.branch, clientId=client_id, startTime="10:00:00",
                                     appointmentDate=(TODAY + timedelta(days=days)).isoformat(),
                                     **values)  # fmt: skip


def policy(**values: Any) -> Any:
    return SimpleNamespace(policy=config.PolicySettings(**values), manual_processors=[],
                           manual_processor=lambda _name: None)  # fmt: skip


@pytest.fixture
def clinic(tmp_path: Path) -> Iterator[Clinic]:
    phorest = PhorestEmulator("biz-r", USERNAME, PASSWORD, max_requests_per_second=None)
    server = SandboxServer(("127.0.0.1", 0), [phorest], Traffic())
    server.start()
    api = PhorestConnector(make_settings(base_url=f"{server.base_url}/third-party-api-server",
                                         business_id="biz-r", page_size=100,
                                         max_requests_per_second=100),
                           retry=RetryPolicy(attempts=1), sleep=lambda _s: None)  # fmt: skip
    try:
        with Ledger.open(tmp_path / "ledger.sqlite3") as ledger:
            yield Clinic(phorest, api, ledger, SubjectKeys(b"0123456789abcdef-test"),
                         phorest.add_branch("Soho", branch_id="soho")["branchId"])
    finally:
        server.shutdown()
        server.server_close()


def stale_ids(evaluation: retention.Evaluation) -> set[str]:
    return {c.client_id for c in evaluation.stale}


def test_only_old_live_clients_without_a_booking_are_stale(clinic: Clinic) -> None:
    stale = clinic.client("stale", last_visit="2023-01-05")
    never = clinic.client("never-visited", last_visit=None)
    archived = clinic.client("archived", last_visit="2023-01-05", archived=True)
    booked = clinic.client("booked", last_visit="2023-01-05")
    clinic.book(booked, 170)
    cancelled = clinic.client("cancelled", last_visit="2023-01-05")
    clinic.book(cancelled, 10, activationState="CANCELED")
    deleted_booking = clinic.client("deleted-booking", last_visit="2023-01-05")
    clinic.book(deleted_booking, 10, deleted=True)
    too_late = clinic.client("booked-beyond-lookahead", last_visit="2023-01-05")
    clinic.book(too_late, 181)
    clinic.client("recent", last_visit="2026-11-01")
    clinic.client("on-cutoff", last_visit=CUTOFF.isoformat())
    clinic.client("created-recently", last_visit=None, created="2026-10-01T10:00:00.000Z")
    gone = clinic.client("deleted", last_visit="2023-01-05")
    clinic.phorest.delete(gone)

    found = retention.evaluate(clinic.api, policy(), today=TODAY, ledger=clinic.ledger)

    assert stale_ids(found) == {stale, never, archived, cancelled, deleted_booking, too_late}
    assert found.live == 10 and found.kept_by_appointment == 1
    assert {c.client_id: c.last_visit for c in found.stale}[never] is None
    assert len(found.windows) == 6  # one branch, 181 days in 31-day windows
    assert found.calls == 1 + 1 + 6  # one page of clients, the branches, one page per window


def test_no_appointment_is_read_when_nobody_is_old_enough(clinic: Clinic) -> None:
    clinic.client("recent", last_visit="2026-11-01")
    found = retention.evaluate(clinic.api, policy(), today=TODAY)
    assert found.stale == () and found.windows == () and found.calls == 1


def requests_and_runs(ledger: Ledger) -> tuple[int, list[tuple[int, str, int]], list[str]]:
    runs = [ledger.retention_run(i) for i in range(1, 10)]
    alerts = [a.problem_key for a in ledger.open_alerts()]
    return (len(ledger.all_requests()),
            [(r.id, r.state, r.stale_count) for r in runs if r is not None], alerts)


def test_a_run_above_the_guard_erases_nothing_and_alerts_once_with_counts_only(
    clinic: Clinic,
) -> None:
    for n in range(3):
        clinic.client(f"stale{n}", last_visit="2023-01-05")
    clinic.client("recent", last_visit="2026-11-01")
    settings = policy(purge_guard_percent=50)

    first = retention.purge(clinic.ledger, settings, {"phorest": clinic.api}, clinic.keys, now=NOW)
    again = retention.purge(clinic.ledger, settings, {"phorest": clinic.api}, clinic.keys, now=NOW)

    assert first.outcome == again.outcome == "guarded" and first.run_id == again.run_id
    assert first.request_ids == ()
    assert requests_and_runs(clinic.ledger) == (0, [(1, "guarded", 3)], ["purge_guard:1"])
    (alert,) = clinic.ledger.open_alerts()
    assert "erase 3 of 4 live clients" in alert.summary
    assert "--confirm-run 1 --count 3" in alert.summary
    assert "stale0" not in alert.summary and "C " not in alert.summary


def test_confirming_with_the_wrong_count_is_one_line_and_changes_nothing(clinic: Clinic) -> None:
    for n in range(3):
        clinic.client(f"stale{n}", last_visit="2023-01-05")
    settings = policy(purge_guard_percent=10)
    run = retention.purge(clinic.ledger, settings, {"phorest": clinic.api}, clinic.keys, now=NOW)
    before = requests_and_runs(clinic.ledger)

    with pytest.raises(RetentionError) as wrong:
        retention.purge(clinic.ledger, settings, {"phorest": clinic.api}, clinic.keys, now=NOW,
                        confirm=(run.run_id, 2))
    assert str(wrong.value) == "retention run #1 would erase 3 client(s), not 2; nothing changed"
    with pytest.raises(RetentionError, match=r"^retention run #7 is unknown"):
        retention.purge(clinic.ledger, settings, {"phorest": clinic.api}, clinic.keys, now=NOW,
                        confirm=(7, 3))
    clinic.client("stale-since", last_visit="2023-01-05")  # the world moved on
    with pytest.raises(RetentionError) as moved:
        retention.purge(clinic.ledger, settings, {"phorest": clinic.api}, clinic.keys, now=NOW,
                        confirm=(run.run_id, 3))
    assert str(moved.value) == ("the purge now finds 4 stale client(s), not the 3 of retention "
                                "run #1; nothing changed (run syncd retention again)")
    assert "\n" not in str(wrong.value) + str(moved.value)
    assert requests_and_runs(clinic.ledger) == before


def test_a_confirmed_run_files_one_retention_erasure_per_stale_client(clinic: Clinic) -> None:
    stale = {clinic.client(f"stale{n}", last_visit="2023-01-05") for n in range(3)}
    clinic.client("recent", last_visit="2026-11-01")
    settings = policy(purge_guard_percent=10)
    run = retention.purge(clinic.ledger, settings, {"phorest": clinic.api}, clinic.keys, now=NOW)

    done = retention.purge(clinic.ledger, settings, {"phorest": clinic.api}, clinic.keys,
                           now=NOW, confirm=(run.run_id, 3), confirmed_by="Ann")

    assert done.outcome == "confirmed" and len(done.request_ids) == 3
    requests = [clinic.ledger.request(i) for i in done.request_ids]
    assert {r.client_id for r in requests if r} == stale
    assert {(r.kind, r.source, r.filed_by, r.state) for r in requests if r} == {
        ("erase", "retention", "syncd retention", "open")}
    for request_id in done.request_ids:  # the same steps as a person's own request
        assert {(s.processor, s.state) for s in clinic.ledger.steps(request_id)} == {
            ("mailchimp", "done"), ("phorest", "waiting")}
    found = clinic.ledger.retention_run(run.run_id)
    assert found is not None and (found.state, found.filed_count, found.confirmed_by) == (
        "confirmed", 3, "Ann")
    confirmations = [(e.action, e.actor, e.detail) for e in clinic.ledger.find_audit()
                     if e.action == "retention_confirm"]
    assert confirmations == [("retention_confirm", "Ann",
                              f"retention run #{run.run_id}: 3 stale client(s)")]
    assert clinic.ledger.open_alerts() == []
    # The next daily run leaves them alone while their requests are open.
    later = retention.purge(clinic.ledger, settings, {"phorest": clinic.api}, clinic.keys, now=NOW)
    assert later.outcome == "filed" and later.request_ids == ()
    assert later.evaluation.already_requested == 3
