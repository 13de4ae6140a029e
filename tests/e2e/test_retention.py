"""The retention purge end to end (R4): real CLI, real HTTP to the sandbox, real SQLite.

No daemon: `syncd retention` carries the erasures out itself. The verdict comes
from the emulators: which Mailchimp members are gone, which GA deletions arrived,
judged against the staleness rule applied here to the emulator's own records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from syncd.sandbox.app import Sandbox
from syncd.sandbox.seed import BRANCHES
from tests.e2e.test_erasure import World, ga_deletions

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

LOOKAHEAD_DAYS = 180  # [policy] appointment_lookahead_days, default
GUARD_ON = {"SYNCD_POLICY__PURGE_GUARD_PERCENT": "1"}  # the seeded world is ~10% stale
GUARD_OFF = {"SYNCD_POLICY__PURGE_GUARD_PERCENT": "100"}


def _months_back(day: date, months: int) -> date:
    year, month = divmod(day.month - 1 - months, 12)
    import calendar

    month += 1
    year += day.year
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def _live(client: dict[str, Any]) -> bool:
    forgotten = not client["email"] and not client["mobile"] and not client["lastName"]
    return not (client["deleted"] or client["mergedToClientId"] or forgotten)


def _booked(sandbox: Sandbox, today: date) -> set[str]:
    """Client ids with an active appointment in the look-ahead, straight from the API."""
    c = sandbox.credentials
    base = (f"{sandbox.base_url}/third-party-api-server/api/business/{c.phorest_business_id}"
            "/branch/{branch}/appointment")
    found: set[str] = set()
    for _name, branch in BRANCHES:
        start = today
        while start <= today + timedelta(days=LOOKAHEAD_DAYS):
            stop = min(start + timedelta(days=30), today + timedelta(days=LOOKAHEAD_DAYS))
            body = requests.get(base.format(branch=branch), timeout=10,
                                auth=(c.phorest_username, c.phorest_password),
                                params={"from_date": start.isoformat(), "to_date": stop.isoformat(),
                                        "size": 100}).json()  # fmt: skip
            assert body["page"]["totalPages"] <= 1
            found |= {a["clientId"] for a in body.get("_embedded", {}).get("appointments", [])}
            start = stop + timedelta(days=1)
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, dict[str, str]]]:
    tmp_path: Path = tmp_path_factory.mktemp("retention")
    with Sandbox(clients=40, seed=31, smtp_port=None) as sandbox:
        now = datetime.now(UTC)
        old = (now - timedelta(days=365 * 4)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        old_visit = (now - timedelta(days=365 * 3)).date().isoformat()
        phorest = sandbox.phorest

        def add(name: str, **fields: Any) -> str:
            values = {"createdAt": old, "lastVisit": old_visit, **fields}
            return str(phorest.add_client(firstName="Ret", lastName=name,
                                          email=f"ret.{name}@example.com",
                                          emailMarketingConsent=True, **values)["clientId"])

        ours = {"purged": add("purged"), "booked": add("booked"), "visited": add("visited"),
                "new": add("new", createdAt=(now - timedelta(days=20)).strftime(
                    "%Y-%m-%dT%H:%M:%S.000Z"), lastVisit=None)}  # fmt: skip
        phorest.add_appointment(BRANCHES[1][1], clientId=ours["booked"], startTime="10:00:00",
                                appointmentDate=(now.date() + timedelta(days=150)).isoformat(),
                                state="BOOKED", activationState="ACTIVE")  # fmt: skip
        phorest.record_visit(ours["visited"], now.date() - timedelta(days=3))
        config_path = sandbox.write_config(tmp_path / "syncd.toml")
        world = World(sandbox, config_path)
        world.ok("resync")  # Mailchimp holds every consenting client's member
        yield world, ours


def test_a_purge_erases_exactly_the_stale_clients_behind_its_guard(
    world: tuple[World, dict[str, str]],
) -> None:
    world_, ours = world
    sandbox = world_.sandbox
    today = datetime.now(UTC).date()
    cutoff = _months_back(today, 24)
    clients = sandbox.phorest.snapshot_clients()
    booked = _booked(sandbox, today)
    expected = {
        c["clientId"] for c in clients
        if _live(c) and c["clientId"] not in booked
        and c["createdAt"][:10] < cutoff.isoformat()
        and (c["lastVisit"] is None or c["lastVisit"] < cutoff.isoformat())
    }  # fmt: skip
    assert ours["purged"] in expected and len(expected) >= 3
    assert not {ours["booked"], ours["visited"], ours["new"]} & expected
    members_before = {c["clientId"]: sandbox.mailchimp.member(c["email"])
                      for c in clients if c["email"]}  # fmt: skip
    ga_before = {c["clientId"]: ga_deletions(sandbox, c["clientId"]) for c in clients}

    # The dry run lists client ids and last visits only, and changes nothing.
    dry = world_.ok_json("retention", "--dry-run")
    assert {c["client_id"] for c in dry["clients"]} == expected
    assert all(set(c) == {"client_id", "last_visit"} for c in dry["clients"])
    assert dry["calls"]["appointment_pages"] == 2 * 6  # two branches, six 31-day windows
    assert world_.ok_json("requests", "--all") == []

    # Above the guard: held back, nothing erased, one line to get past it.
    held = world_.cli("retention", "--json", **GUARD_ON)
    assert held.returncode == 1, held.stderr
    shown = json.loads(held.stdout)
    assert shown["outcome"] == "guarded" and shown["stale"] == len(expected)
    assert world_.ok_json("requests", "--all") == []
    wrong = world_.cli("retention", "--confirm-run", str(shown["run_id"]),
                       "--count", str(len(expected) + 1))  # fmt: skip
    assert wrong.returncode == 1 and wrong.stdout == ""
    assert wrong.stderr.strip() == (f"syncd: retention run #{shown['run_id']} would erase "
                                    f"{len(expected)} client(s), not {len(expected) + 1}; "
                                    "nothing changed")
    assert world_.ok_json("requests", "--all") == []

    done = world_.ok_json("retention", "--confirm-run", str(shown["run_id"]),
                          "--count", str(len(expected)))  # fmt: skip
    assert done["outcome"] == "confirmed" and len(done["requests"]) == len(expected)
    filed = world_.ok_json("requests", "--all")
    assert {r["client_id"] for r in filed} == expected
    assert {(r["kind"], r["source"], r["filed_by"]) for r in filed} == {
        ("erase", "retention", "syncd retention")}

    # The vendors: each stale client's member and GA user gone, nobody else's touched.
    by_email: dict[str, set[str]] = {}
    for c in clients:
        if c["email"] and _live(c):
            by_email.setdefault(c["email"].lower(), set()).add(c["clientId"])
    for c in clients:
        cid, member = c["clientId"], members_before.get(c["clientId"])
        if cid in expected:
            assert ga_deletions(sandbox, cid) == ga_before[cid] + 1, cid
            if member is not None and by_email[c["email"].lower()] <= expected:
                assert sandbox.mailchimp.member(c["email"]) is None, cid
        elif _live(c):
            assert ga_deletions(sandbox, cid) == ga_before[cid], cid
            if member is not None:
                assert sandbox.mailchimp.member(c["email"]) is not None, cid
    for kept in ("booked", "visited", "new"):
        assert sandbox.mailchimp.member(f"ret.{kept}@example.com")["status"] == "subscribed"

    # The ledger and its WAL keep keys, ids and dates: nothing personal of the purged.
    stored = b"".join(path.read_bytes() for path in world_.ledger_path.parent.iterdir()
                      if path.name.startswith(world_.ledger_path.name) and path.is_file())
    for c in clients:
        if c["clientId"] in expected:
            for value in (c["email"], c["mobile"]):
                assert not value or value.encode() not in stored, c["clientId"]

    # The next run finds them requested already and files nothing twice.
    again = json.loads(world_.ok("retention", "--json", **GUARD_OFF))
    assert again["outcome"] == "filed" and again["requests"] == []
    assert again["already_requested"] == len(expected)
