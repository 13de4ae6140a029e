"""Access and portability end to end (R8): ``syncd request export`` against the sandbox.

The real command runs as a subprocess against the sandbox's Phorest, Mailchimp and
GA emulators over HTTP, with a real SQLite ledger that a resync filled first (so
syncd's own subscribe of the person is on the audit trail). Verdicts compare the
file with what the emulators hold, and grep the ledger, its WAL and the command's
output for the person's data.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncd import config
from syncd.export import COLUMNS, GA_UNREADABLE
from syncd.sandbox.app import Sandbox
from tests.support import SYNCD, syncd_cli

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

CLI_TIMEOUT_SECONDS = 60


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Sandbox, Path, dict[str, Any]]]:
    """A converged sandbox and the person syncd itself subscribed during the resync."""
    tmp_path = tmp_path_factory.mktemp("export")
    with Sandbox(clients=30, seed=23, smtp_port=None) as sandbox:
        clients = sandbox.phorest.snapshot_clients()
        emails = Counter((c.get("email") or "").strip().lower() for c in clients)
        person = next(c for c in clients
                      if c.get("emailMarketingConsent") and c.get("email") and c.get("mobile")
                      and not (c.get("archived") or c.get("deleted") or c.get("mergedToClientId"))
                      and emails[c["email"].strip().lower()] == 1
                      and sandbox.mailchimp.member(c["email"]) is None)  # fmt: skip
        config_path = sandbox.write_config(tmp_path / "syncd.toml")
        resync = syncd_cli(config_path, "resync")
        assert resync.returncode == 0, resync.stdout + resync.stderr
        yield sandbox, config_path, person


def export(config_path: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``syncd request export ARGS`` run in ``cwd``, without the caller's SYNCD_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    return subprocess.run([str(SYNCD), "--config", str(config_path), "request", "export",
                           "--by", "Ann", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=CLI_TIMEOUT_SECONDS, check=False)  # fmt: skip


def first_subscribe(config_path: Path, client_id: str) -> str:
    """When the audit trail shows syncd's subscribe of the client done (``syncd audit``)."""
    audit = syncd_cli(config_path, "audit", "--client-id", client_id, "--json")
    assert audit.returncode == 0, audit.stderr
    done = ("mailchimp", "subscribe", "done")
    return next(e["at"] for e in json.loads(audit.stdout)
                if (e["processor"], e["action"], e["outcome"]) == done)


def test_an_export_lists_what_each_processor_holds_and_keeps_the_person_out_of_the_ledger(
    world: tuple[Sandbox, Path, dict[str, Any]], tmp_path: Path
) -> None:
    sandbox, config_path, person = world
    email, client_id = person["email"], person["clientId"]
    member = sandbox.mailchimp.member(email)
    assert member is not None and member["status"] == "subscribed"  # syncd subscribed them

    result = export(config_path, tmp_path, "--email", email.upper())

    assert result.returncode == 0 and result.stderr == "", result.stderr
    (path,) = tmp_path.glob("syncd-export-*.csv")  # the default name, in the current directory
    request_id = int(path.stem.removeprefix("syncd-export-"))
    assert f"request #{request_id} done: export of client {client_id} written to" in result.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert list(rows[0]) == list(COLUMNS)
    phorest = {r["field"]: r for r in rows if r["processor"] == "phorest"}
    mailchimp = {r["field"]: r for r in rows if r["processor"] == "mailchimp"}
    analytics = {r["field"]: r for r in rows if r["processor"] == "google_analytics"}

    # Phorest: the client's fields as the emulator holds them, since the record was created.
    for name in ("clientId", "firstName", "lastName", "email", "mobile", "createdAt"):
        assert phorest[name]["value"] == str(person[name]), name
    assert {r["location"] for r in phorest.values()} == {"AWS Dublin, Ireland (EU)"}
    assert {r["first_disclosed"] for r in phorest.values()} == {person["createdAt"]}
    # Mailchimp: the member, first disclosed by syncd's own subscribe during the resync.
    assert mailchimp["email_address"]["value"] == member["email_address"]
    assert mailchimp["status"]["value"] == "subscribed"
    assert mailchimp["merge_fields.FNAME"]["value"] == member["merge_fields"]["FNAME"]
    assert mailchimp["timestamp_opt"]["value"] == member["timestamp_opt"]
    assert {r["location"] for r in mailchimp.values()} == {"USA"}
    subscribed_at = first_subscribe(config_path, client_id)
    assert {r["first_disclosed"] for r in mailchimp.values()} == {subscribed_at}
    # GA: what it files the person under, and that it cannot be read back.
    assert analytics["user_id (Phorest client id)"]["value"] == client_id
    assert analytics["events"]["value"] == GA_UNREADABLE
    assert {r["location"] for r in analytics.values()} == {"USA"}
    assert all(r["lawful_basis"] and r["retention"] for r in rows)

    # JSON too, at a path of our choosing; the same path again is refused, the file untouched.
    target = tmp_path / "copy.json"
    again = export(config_path, tmp_path, "--client-id", client_id, "--format", "json",
                   "--output", str(target))  # fmt: skip
    assert again.returncode == 0, again.stderr
    document = json.loads(target.read_text())
    assert document["request_id"] == request_id + 1
    assert {r["processor"] for r in document["rows"]} == {"phorest", "mailchimp",
                                                           "google_analytics"}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    written = target.read_bytes()
    refused = export(config_path, tmp_path, "--client-id", client_id, "--output", str(target))
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "already exists" in refused.stderr
    assert target.read_bytes() == written

    # Both requests are on record, done; nothing of the person is in the ledger or the output.
    listed = {r["id"]: r for r in json.loads(syncd_cli(config_path, "requests", "--all",
                                                       "--json").stdout)}  # fmt: skip
    assert {listed[i]["kind"] for i in (request_id, request_id + 1)} == {"export"}
    assert {listed[i]["state"] for i in (request_id, request_id + 1)} == {"done"}
    ledger = Path(config.load(config_path, require_secrets=False).ledger.path)
    files = list(ledger.parent.glob(f"{ledger.name}*"))  # the ledger, its WAL and shm if any
    assert ledger in files
    stored = b"".join(p.read_bytes() for p in files)
    personal = [person[k] for k in ("email", "mobile", "firstName", "lastName")]
    personal += [email.upper(), email.lower()]
    for value in personal:
        assert value.encode() not in stored, "personal data in the ledger"
        for output in (result, again, refused):
            assert value not in output.stdout + output.stderr
