"""Phorest's own forgetting reaches every processor (R5); GA's retention is held to the policy (R9).

Against the sandbox over real HTTP, with a real ledger file: the CLI's resync
for the first, the real daemon (and the sandbox's SMTP sink) for the second.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncd import config
from syncd.identity import SubjectKeys
from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox
from tests.support import Running, free_port, start_daemon, syncd_cli, wait_for

PROPERTY = "123456789"


def _keys(config_path: Path) -> SubjectKeys:
    settings = config.load(config_path)
    assert settings.identity.hmac_key is not None
    return SubjectKeys(settings.identity.hmac_key.get_secret_value().encode(),
                       settings.identity.default_phone_region)  # fmt: skip


def test_clients_phorests_retention_setting_forgets_are_erased_downstream_and_suppressed(
    tmp_path: Path,
) -> None:
    with Sandbox(clients=60, seed=7, smtp_port=None) as sandbox:
        config_path = sandbox.write_config(tmp_path / "syncd.toml")
        assert syncd_cli(config_path, "resync").returncode == 0
        before = {c["clientId"]: c for c in sandbox.phorest.snapshot_clients()}
        marketed = {cid: c["email"] for cid, c in before.items() if c.get("email")
                    and (sandbox.mailchimp.member(c["email"]) or {}).get("status")}

        # Phorest's Data Retention setting runs: everyone not seen for 24 months is forgotten.
        assert _retention_run(sandbox, 24) > 0
        gone = [cid for cid, c in before.items()
                if not _forgotten(c) and _forgotten(sandbox.phorest.client(cid) or {})]
        # A household's address another live client still uses keeps its member (R5: kept).
        live_addresses = {c["email"].strip().lower() for c in sandbox.phorest.snapshot_clients()
                          if c.get("email") and not c.get("deleted")
                          and not c.get("mergedToClientId")}  # fmt: skip
        in_mailchimp = [cid for cid in gone if cid in marketed
                        and marketed[cid].strip().lower() not in live_addresses]
        assert gone and in_mailchimp, "the world should hold a forgotten client with a member"

        resynced = syncd_cli(config_path, "resync", "--json")
        assert resynced.returncode == 0, resynced.stderr
        summary = json.loads(resynced.stdout)
        erased = {(c["processor"], c["why"]): c["count"] for c in summary["counts"]
                  if c["action"] == "erase"}  # fmt: skip
        assert erased.get(("mailchimp", "client_forgotten"), 0) >= len(in_mailchimp)
        assert erased.get(("google_analytics", "client_forgotten"), 0) >= len(gone)

        for cid in in_mailchimp:
            assert sandbox.mailchimp.member(marketed[cid]) is None
        for cid in gone:
            assert sandbox.google.was_deleted(cid, identifier_type="userId")
        keys = _keys(config_path)
        with Ledger.open(config.load(config_path).ledger.path) as ledger:
            assert ledger.suppressed_among([keys.client_id(c) for c in gone]) == {
                keys.client_id(c) for c in gone}
            evidence = ledger.find_audit(subject_keys=[keys.client_id(c) for c in gone])
        assert {(e.processor, e.action, e.outcome) for e in evidence} >= {
            ("mailchimp", "erase", "done"), ("google_analytics", "erase", "done")}

        # A second resync finds nothing more to do for them: no repeat, nothing re-added.
        again = json.loads(syncd_cli(config_path, "resync", "--json").stdout)
        assert not [c for c in again["counts"] if c["action"] == "erase"]


def _forgotten(client: dict[str, Any]) -> bool:
    """Blanked as Phorest's Forget leaves a record (no address, no mobile, no name)."""
    return not client.get("email") and not client.get("mobile") and client.get(
        "firstName") in (None, "", "Anonymous")


def _retention_run(sandbox: Sandbox, months: int) -> int:
    """The sandbox's "Phorest retention setting forgets clients" action, over its control API."""
    import urllib.request

    request = urllib.request.Request(
        f"{sandbox.base_url}/_sandbox/actions/phorest-retention-run",
        data=json.dumps({"months": months}).encode(), method="POST",
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return int(json.load(answer)["result"]["forgotten"])


@pytest.fixture
def drifted(tmp_path: Path) -> Iterator[tuple[Sandbox, Path]]:
    """A sandbox whose GA property keeps event data for 50 months (the policy allows 14)."""
    with Sandbox(clients=30, seed=3, smtp_port=0) as sandbox:
        sandbox.google.set_retention(PROPERTY, "FIFTY_MONTHS")
        yield sandbox, sandbox.write_config(tmp_path / "syncd.toml")


def _run_daemon(sandbox: Sandbox, config_path: Path, tmp_path: Path, name: str,
                **env: str) -> Running:  # fmt: skip
    notify_path = tmp_path / f"{name}.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    port, log_path = free_port(), tmp_path / f"{name}.log"
    process = start_daemon(config_path, port, notify_path, log_path, **env)
    return Running(sandbox, config_path, process, port, notify, log_path)


def _stop(running: Running) -> None:
    running.process.terminate()
    assert running.process.wait(timeout=20) == 0
    running.notify.close()


def _retention_mail(sandbox: Sandbox) -> list[dict[str, Any]]:
    assert sandbox.smtp is not None
    return [m for m in sandbox.smtp.messages()
            if "keeps event data for 50 months" in f"{m['subject']}\n{m['text']}"]


def test_ga_retention_drift_is_alerted_then_corrected_when_enforced(
    drifted: tuple[Sandbox, Path], tmp_path: Path
) -> None:
    sandbox, config_path = drifted
    running = _run_daemon(sandbox, config_path, tmp_path, "report")
    try:
        wait_for(lambda: bool(_retention_mail(sandbox)), 30, "the retention alert's email")
        status = json.loads(syncd_cli(config_path, "status", "--json").stdout)
        assert status["ga_event_retention"] == "FIFTY_MONTHS"
        assert sandbox.google.retention(PROPERTY)["eventDataRetention"] == "FIFTY_MONTHS"
        checked = syncd_cli(config_path, "check").stdout
        assert ("event data kept FIFTY_MONTHS (LONGER than the policy's FOURTEEN_MONTHS)"
                in checked)
    finally:
        _stop(running)
    assert len(_retention_mail(sandbox)) == 1

    enforcing = _run_daemon(sandbox, config_path, tmp_path, "enforce",
                            SYNCD_GOOGLE_ANALYTICS__ENFORCE_RETENTION="true")
    try:
        wait_for(lambda: sandbox.google.retention(PROPERTY)["eventDataRetention"]
                 == "FOURTEEN_MONTHS", 30, "GA's retention to be set to the policy's maximum")
    finally:
        _stop(enforcing)
    with Ledger.open(config.load(config_path).ledger.path) as ledger:
        changes = [e for e in ledger.find_audit() if e.action == "set_event_retention"]
        assert [(e.processor, e.outcome, e.detail) for e in changes] == [
            ("google_analytics", "done", "FIFTY_MONTHS -> FOURTEEN_MONTHS")]
        assert not [a for a in ledger.open_alerts() if a.problem_key.startswith("ga_retention")]
    status = json.loads(syncd_cli(config_path, "status", "--json").stdout)
    assert status["ga_event_retention"] == "FOURTEEN_MONTHS"
