"""Tests for ``syncd request export`` (R8): the file, its safety, and what is recorded.

The command runs through :func:`syncd.cli.main` with a real SQLite ledger;
Phorest, Mailchimp and GA are in-memory fakes handed over where the command
builds its connectors (:func:`syncd.engine.build`), so the person is resolved,
the processors read and the file written exactly as in production.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import stat
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connectors.base import ClientRecord
from connectors.phorest import TECHNICAL_FIELDS, _record
from syncd import engine
from syncd.cli import main
from syncd.export import COLUMNS, GA_UNREADABLE, SHARED_WITHHELD
from syncd.identity import SubjectKeys
from syncd.ledger import Ledger
from syncd.rights import add_months
from tests.support import FakeClock

KEYS = SubjectKeys(b"export-test-hmac-key-0123456789ab", "GB")
EMAIL = "jane.roe@example.org"
MOBILE = "07700 900123"
SUBSCRIBED_AT = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)
PERSONAL = (EMAIL, "Jane", "Roe", "7700900123", "7700 900123", "High St")
EU_MAILCHIMP = "Mailchimp EU data centre (Frankfurt)"


def client_json(client_id: str = "c1", **changes: Any) -> dict[str, Any]:
    """A client as Phorest's API returns it."""
    return {
        "clientId": client_id, "version": 3, "firstName": "Jane", "lastName": "Roe",
        "email": EMAIL, "mobile": MOBILE, "emailMarketingConsent": True, "archived": False,
        "deleted": False, "mergedToClientId": None, "createdAt": "2024-03-01T10:00:00.000Z",
        "updatedAt": "2026-01-02T03:04:05.000Z", "notes": "prefers mornings",
        "address": {"streetAddress1": "1 High St", "city": "Cork"}, **changes,
    }  # fmt: skip


MEMBER = {
    "email_address": EMAIL, "status": "subscribed",
    "merge_fields": {"FNAME": "Jane", "LNAME": "Roe"},
    "timestamp_signup": "", "timestamp_opt": "2025-06-01T08:00:01+00:00",
    "last_changed": "2025-06-01T08:00:01+00:00", "tags": [],
}  # fmt: skip


class FakePhorest:
    """Phorest's clients as raw JSON, read through the connector's own mapping."""

    def __init__(self, *clients: dict[str, Any]) -> None:
        self.clients = {c["clientId"]: c for c in clients}

    def client(self, client_id: str) -> ClientRecord | None:
        raw = self.clients.get(client_id)
        return None if raw is None else _record(raw)

    def client_fields(self, client_id: str) -> dict[str, Any] | None:
        raw = self.clients.get(client_id)
        return None if raw is None else {k: v for k, v in raw.items() if k not in TECHNICAL_FIELDS}

    def find_by_email(self, email: str) -> list[ClientRecord]:
        return [_record(c) for c in self.clients.values() if c["email"] == email]

    def find_by_phone(self, phone: str, spellings: Sequence[str] = ()) -> list[ClientRecord]:
        return [_record(c) for c in self.clients.values() if c["mobile"] in (phone, *spellings)]


class FakeMailchimp:
    def __init__(self, *members: dict[str, Any]) -> None:
        self.members = {m["email_address"]: m for m in members}

    def member_fields(self, email: str) -> dict[str, Any] | None:
        return self.members.get(email)


class FakeAnalytics:
    identity = "user_id"


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A configuration, a ledger showing one done subscribe, and the fake processors."""
    ledger_path = tmp_path / "state" / "ledger.sqlite3"
    ledger_path.parent.mkdir()
    config_path = tmp_path / "syncd.toml"
    config_path.write_text(f"""
[ledger]
path = "{ledger_path}"
[identity]
hmac_key = "cli-test-hmac-key-0123456789abcdef"
[phorest]
business_id = "salon"
username = "global/api@salon.example"
password = "p"
[mailchimp]
list_id = "a1b2c3d4e5"
api_key = "0123456789abcdef-us6"
[processors.mailchimp]
location = "{EU_MAILCHIMP}"
""")
    with Ledger.open(ledger_path, clock=FakeClock(datetime(2025, 5, 1, tzinfo=UTC))) as ledger:
        # Neither a failed subscribe nor an opt-out sent the person's data to Mailchimp.
        ledger.add_audit(KEYS.client_id("c1"), "mailchimp", "subscribe", "R1:consent", "failed")
        ledger.add_audit(KEYS.client_id("c1"), "mailchimp", "unsubscribe", "R2:opt_out", "done")
    with Ledger.open(ledger_path, clock=FakeClock(SUBSCRIBED_AT)) as ledger:
        ledger.add_audit(KEYS.client_id("c1"), "mailchimp", "subscribe", "R1:consent", "done")
    processors: dict[str, Any] = {"phorest": FakePhorest(client_json()),
                                  "mailchimp": FakeMailchimp(MEMBER),
                                  "google_analytics": FakeAnalytics()}  # fmt: skip
    monkeypatch.setattr(engine, "build", lambda settings, needed_by: (processors, KEYS))
    monkeypatch.chdir(tmp_path)
    yield {"config": str(config_path), "ledger": ledger_path, "processors": processors,
           "dir": tmp_path}  # fmt: skip


def run(world: dict[str, Any], capsys: pytest.CaptureFixture[str],
        *argv: str) -> tuple[int, str, str]:  # fmt: skip
    try:
        code = main(["request", "export", "--config", world["config"], "--by", "Ann", *argv])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def dump(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())


def csv_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def by_field(rows: list[dict[str, Any]], processor: str) -> dict[str, dict[str, Any]]:
    return {r["field"]: r for r in rows if r["processor"] == processor}


def test_a_csv_export_lists_each_processors_fields_with_location_basis_and_first_disclosure(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(world, capsys, "--email", EMAIL)

    assert (code, err) == (0, "")
    path = world["dir"] / "syncd-export-1.csv"  # the default name, in the current directory
    assert f"request #1 done: export of client c1 written to {path.name}" in out
    text = path.read_text()
    assert text.splitlines()[0] == ",".join(COLUMNS)
    rows = csv_rows(path)
    phorest, mailchimp, analytics = (by_field(rows, p) for p in
                                     ("phorest", "mailchimp", "google_analytics"))  # fmt: skip
    assert phorest["firstName"]["value"] == "Jane" and phorest["email"]["value"] == EMAIL
    assert phorest["address.city"]["value"] == "Cork"  # nested fields dotted
    assert phorest["emailMarketingConsent"]["value"] == "true"
    assert phorest["mergedToClientId"]["value"] == ""
    assert "version" not in phorest  # about the record, not the person
    assert {r["record"] for r in phorest.values()} == {"c1"}
    assert {r["location"] for r in phorest.values()} == {"AWS Dublin, Ireland (EU)"}
    # Phorest is the controller's own system: since the record was created.
    assert {r["first_disclosed"] for r in phorest.values()} == {"2024-03-01T10:00:00.000Z"}
    assert phorest["lastName"]["lawful_basis"].startswith("Contract (UK GDPR Art. 6(1)(b))")
    assert mailchimp["email_address"]["value"] == EMAIL
    assert mailchimp["merge_fields.FNAME"]["value"] == "Jane"
    assert mailchimp["status"]["value"] == "subscribed"
    assert mailchimp["tags"]["value"] == "[]"
    assert {r["location"] for r in mailchimp.values()} == {EU_MAILCHIMP}  # configured
    assert {r["first_disclosed"] for r in mailchimp.values()} == {"2025-06-01T08:00:00+00:00"}
    assert mailchimp["status"]["lawful_basis"].startswith("Consent")
    assert analytics["user_id (Phorest client id)"]["value"] == "c1"
    assert analytics["events"]["value"] == GA_UNREADABLE
    assert {r["location"] for r in analytics.values()} == {"USA"}
    assert {r["first_disclosed"] for r in analytics.values()} == {""}  # syncd sends GA nothing
    assert all(r["retention"] for r in rows)
    assert not any(value in out for value in PERSONAL)


def test_a_json_export_holds_the_same_rows_and_the_request_is_closed_with_audit_only(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    target = world["dir"] / "out.json"

    code, out, _ = run(world, capsys, "--phone", MOBILE, "--format", "json",
                       "--output", str(target))  # fmt: skip

    assert code == 0 and str(target) in out
    document = json.loads(target.read_text())
    assert document["request_id"] == 1
    rows = document["rows"]
    assert set(rows[0]) == set(COLUMNS)
    phorest = by_field(rows, "phorest")
    assert phorest["emailMarketingConsent"]["value"] is True  # JSON keeps the types
    assert phorest["mergedToClientId"]["value"] is None
    assert by_field(rows, "mailchimp")["merge_fields.LNAME"]["value"] == "Roe"
    with Ledger.open(world["ledger"]) as ledger:
        request = ledger.request(1)
        assert request is not None
        assert (request.kind, request.state, request.filed_by, request.client_id) == (
            "export", "done", "Ann", "c1")
        # Due a calendar month after it was received, as any request.
        assert abs(request.due_at - add_months(request.received_at, 1)) < timedelta(seconds=5)
        assert request.closed_at is not None
        audit = ledger.find_audit(request_id=1)
    assert [(e.processor, e.action, e.outcome) for e in audit] == [
        (None, "request_export", "filed"),
        ("phorest", "export_read", "done"),
        ("mailchimp", "export_read", "done"),
        ("google_analytics", "export_read", "done"),
        (None, "request_export", "done"),
    ]
    stored = "\n".join(dump(world["ledger"]))
    assert not any(value in stored for value in PERSONAL)


def test_the_file_is_created_with_mode_0600_whatever_the_umask(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    old = os.umask(0)
    try:
        code, _, _ = run(world, capsys, "--client-id", "c1")
    finally:
        os.umask(old)
    assert code == 0
    assert stat.S_IMODE((world["dir"] / "syncd-export-1.csv").stat().st_mode) == 0o600


def test_an_existing_path_is_refused_in_one_line_untouched_and_nothing_is_recorded(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    target = world["dir"] / "taken.csv"
    target.write_text("someone else's file\n")
    before = dump(world["ledger"])

    code, out, err = run(world, capsys, "--email", EMAIL, "--output", str(target))

    assert (code, out) == (1, "")
    assert err == f"syncd: {target} already exists: an export never overwrites a file; " \
                  "choose another --output\n"
    assert target.read_text() == "someone else's file\n"
    assert dump(world["ledger"]) == before


def test_a_default_path_taken_by_a_dangling_link_is_refused_and_nothing_is_recorded(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # The check before reading cannot know the default name (it needs the request id):
    # the O_EXCL create refuses it, and the request is rolled back with it.
    link = world["dir"] / "syncd-export-1.csv"
    link.symlink_to(world["dir"] / "elsewhere.csv")
    before = dump(world["ledger"])

    code, _, err = run(world, capsys, "--email", EMAIL)

    assert code == 1 and err.count("\n") == 1 and "already exists" in err
    assert not (world["dir"] / "elsewhere.csv").exists()
    assert dump(world["ledger"]) == before


def test_an_unwritable_path_is_one_line_and_nothing_is_recorded(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    target = world["dir"] / "no-such-dir" / "export.csv"
    before = dump(world["ledger"])

    code, out, err = run(world, capsys, "--email", EMAIL, "--output", str(target))

    assert (code, out) == (1, "")
    assert err == f"syncd: cannot create {target}: No such file or directory\n"
    assert dump(world["ledger"]) == before


def test_identifiers_naming_several_clients_are_refused_and_nothing_is_read_or_recorded(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    world["processors"]["phorest"].clients["c2"] = client_json("c2", mobile="07700 900999")
    before = dump(world["ledger"])

    code, out, err = run(world, capsys, "--email", EMAIL)

    assert (code, out) == (1, "")
    assert err == ("syncd: the email matches 2 Phorest clients (c1, c2); choose one with "
                   "--client-id\n")
    assert list(world["dir"].glob("syncd-export-*")) == []
    assert dump(world["ledger"]) == before


def test_a_shared_address_member_is_withheld_and_a_missing_member_is_said_so(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    phorest = world["processors"]["phorest"]
    phorest.clients["c2"] = client_json("c2", mobile="07700 900999", firstName="Joe")
    code, _, _ = run(world, capsys, "--client-id", "c1")
    assert code == 0
    mailchimp = by_field(csv_rows(world["dir"] / "syncd-export-1.csv"), "mailchimp")
    assert list(mailchimp) == ["member"] and mailchimp["member"]["value"] == SHARED_WITHHELD

    del phorest.clients["c2"]
    world["processors"]["mailchimp"].members.clear()
    code, _, _ = run(world, capsys, "--client-id", "c1")
    assert code == 0
    mailchimp = by_field(csv_rows(world["dir"] / "syncd-export-2.csv"), "mailchimp")
    assert mailchimp["member"]["value"] == "none held: no member at this address"


@pytest.mark.parametrize(("value", "shown"), [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("+cmd", "'+cmd"),
    ("-2+3", "-2+3"),
    ("+447700900123", "+447700900123"),
    ("Jo", "Jo"),
    ("", ""),
])  # fmt: skip
def test_csv_cells_never_run_as_spreadsheet_formulas(value: str, shown: str) -> None:
    from syncd.export import _inert

    assert _inert(value) == shown
