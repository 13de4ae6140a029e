"""``syncd resync`` end to end: the real command, as a subprocess, against a sandbox.

Includes the SIGKILL trials: a resync killed at a random moment is finished by the next one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from syncd import config
from syncd.cli import main
from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox

SYNCD = Path(sys.executable).with_name("syncd")
TIMEOUT_SECONDS = 60


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(clients=150, seed=2, smtp_port=None) as running:
        yield running


def _syncd(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    return subprocess.run(
        [str(SYNCD), "--config", str(config_path), *args], capture_output=True, text=True,
        env=env, timeout=TIMEOUT_SECONDS, check=False, cwd=config_path.parent,
    )  # fmt: skip


def _popen_syncd(config_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    return subprocess.Popen(
        [str(SYNCD), "--config", str(config_path), *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env, cwd=config_path.parent,
    )  # fmt: skip


def _personal_data(sandbox: Sandbox) -> set[str]:
    values: set[str] = set()
    for client in sandbox.phorest.snapshot_clients():
        for name in ("email", "firstName", "lastName"):
            if client.get(name):
                values.add(str(client[name]))
    values.update(m["email_address"] for m in sandbox.mailchimp.snapshot_members())
    # Very short names would match unrelated text (e.g. "Al" in "Already"); emails always count.
    return {v for v in values if "@" in v or len(v) >= 4}


def test_resync_through_the_cli_converges_and_prints_no_personal_data(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config_path = sandbox.write_config(tmp_path / "syncd.toml")
    secrets = _personal_data(sandbox)
    members_before = sandbox.mailchimp.snapshot_members()
    outputs: list[str] = []

    dry = _syncd(config_path, "resync", "--dry-run")
    outputs += [dry.stdout, dry.stderr]
    assert dry.returncode == 0, dry.stderr
    assert "withdraw_consent" in dry.stdout and "unsubscribe" in dry.stdout
    assert "@" not in dry.stdout + dry.stderr
    assert sandbox.mailchimp.snapshot_members() == members_before

    dry_json = _syncd(config_path, "resync", "--dry-run", "--json")
    outputs += [dry_json.stdout, dry_json.stderr]
    assert dry_json.returncode == 0, dry_json.stderr
    plan = json.loads(dry_json.stdout)
    assert plan["dry_run"] is True and plan["planned"] == len(plan["rows"]) > 0

    real = _syncd(config_path, "resync")
    outputs += [real.stdout, real.stderr]
    assert real.returncode == 0, real.stdout + real.stderr
    assert "0 failed" in real.stdout

    again = _syncd(config_path, "resync", "--dry-run", "--json")
    outputs += [again.stdout, again.stderr]
    assert again.returncode == 0 and json.loads(again.stdout)["planned"] == 0
    quiet = _syncd(config_path, "resync", "--dry-run")
    outputs += [quiet.stdout, quiet.stderr]
    assert "Nothing to do" in quiet.stdout

    settings = config.load(config_path)
    with Ledger.open(settings.ledger.path) as ledger:
        assert ledger.checkpoint()
    ledger_bytes = Path(settings.ledger.path).read_bytes()
    leaked = {v for v in secrets if any(v in text for text in outputs)}
    assert not leaked, f"{len(leaked)} seeded values printed"
    in_file = {v for v in secrets if v.encode() in ledger_bytes}
    assert not in_file, f"{len(in_file)} seeded values left in the ledger file"
    assert sandbox.mailchimp.confirmation_emails_sent == 0


def test_resync_reports_an_unusable_configuration_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    result = _syncd(missing, "resync", "--dry-run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.strip()


# -- a one-shot resync killed with SIGKILL, then run again ------------------------------

KILL_TRIALS = 10
KILL_TRIAL_CLIENTS = 200  # 10-15 opt-outs to carry: a second or two of Phorest writes
KILL_TRIAL_LATENCY_MS = 20
KILL_SEED = 12
# An uninterrupted resync of that world takes about 2.5 s (interpreter start and reads,
# Phorest withdrawals at its 20 requests/s limit, Mailchimp batches); kills land anywhere.
KILL_WINDOW_SECONDS = (0.3, 2.5)
OPTED_OUT = ("unsubscribed", "cleaned")
REQUEST_TIMEOUT_SECONDS = 10


def _phorest_clients(sandbox: Sandbox) -> list[dict[str, Any]]:
    """Every live client (archived included), read over Phorest's HTTP API."""
    c = sandbox.credentials
    url = f"{sandbox.base_url}/third-party-api-server/api/business/{c.phorest_business_id}/client"
    clients: list[dict[str, Any]] = []
    page = 0
    while True:
        answer = requests.get(url, params={"size": 200, "page": page, "includeArchived": "true"},
                              auth=(c.phorest_username, c.phorest_password),
                              timeout=REQUEST_TIMEOUT_SECONDS)
        answer.raise_for_status()
        body = answer.json()
        clients += body.get("_embedded", {}).get("clients", [])
        page += 1
        if page >= body["page"]["totalPages"]:
            return [client for client in clients if not client.get("mergedToClientId")]


def _mailchimp_members(sandbox: Sandbox) -> list[dict[str, Any]]:
    """Every member of the audience, read over Mailchimp's HTTP API."""
    c = sandbox.credentials
    url = f"{sandbox.base_url}/3.0/lists/{c.mailchimp_list_id}/members"
    members: list[dict[str, Any]] = []
    while True:
        answer = requests.get(url, params={"count": 1000, "offset": len(members)},
                              auth=("syncd-test", c.mailchimp_api_key),
                              timeout=REQUEST_TIMEOUT_SECONDS)
        answer.raise_for_status()
        body = answer.json()
        members += body["members"]
        if not body["members"] or len(members) >= body["total_items"]:
            return members


def _opt_outs_missing_in_phorest(sandbox: Sandbox) -> list[str]:
    """Client ids still consenting in Phorest although their Mailchimp member opted out.

    Judged from the emulators' HTTP APIs alone. The client that counts for an address
    is the one that governs it (DESIGN: the newest live client holding it).
    """
    governing: dict[str, dict[str, Any]] = {}
    for client in _phorest_clients(sandbox):
        if client.get("email"):
            address = client["email"].strip().lower()
            held = governing.get(address)
            if held is None or client["updatedAt"] > held["updatedAt"]:
                governing[address] = client
    opted_out = {m["email_address"].strip().lower() for m in _mailchimp_members(sandbox)
                 if m["status"] in OPTED_OUT}
    return sorted(client["clientId"] for address, client in governing.items()
                  if address in opted_out and client["emailMarketingConsent"])


@pytest.mark.slow
def test_a_resync_killed_at_random_moments_is_finished_by_the_next_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(KILL_SEED)
    trials = []
    for trial in range(KILL_TRIALS):
        kill_after = rng.uniform(*KILL_WINDOW_SECONDS)
        with Sandbox(clients=KILL_TRIAL_CLIENTS, seed=trial, smtp_port=None,
                     latency_ms=KILL_TRIAL_LATENCY_MS) as sandbox:
            config_path = sandbox.write_config(tmp_path / f"trial{trial}" / "syncd.toml")
            assert _opt_outs_missing_in_phorest(sandbox), "the world has no opt-out to carry"
            killed = _popen_syncd(config_path, "resync")
            try:
                killed.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                killed.kill()  # SIGKILL: no clean-up of any kind
            killed.communicate(timeout=TIMEOUT_SECONDS)
            missing_at_kill = len(_opt_outs_missing_in_phorest(sandbox))
            with Ledger.open(config.load(config_path).ledger.path) as ledger:
                left_in_flight = ledger.count_tasks_by_state()["in_flight"]  # for the report

            again = _syncd(config_path, "resync")
            assert main(["--config", str(config_path), "resync", "--dry-run", "--json"]) == 0
            dry_run = json.loads(capsys.readouterr().out)
            trials.append({
                "trial": trial, "kill_after_s": round(kill_after, 2),
                "killed": killed.returncode == -signal.SIGKILL,
                "in_flight_at_kill": left_in_flight, "missing_at_kill": missing_at_kill,
                "exit": again.returncode, "planned_after": dry_run["planned"],
                "missing_after": _opt_outs_missing_in_phorest(sandbox),
            })
    print("\n".join(str(t) for t in trials))  # the trial report (pytest -s, or on failure)
    assert [t for t in trials if t["exit"] or t["planned_after"] or t["missing_after"]] == []
