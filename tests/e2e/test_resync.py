"""``syncd resync`` end to end: the real command, as a subprocess, against a sandbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd import config
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
    assert "Shared addresses" in dry.stdout and "active+active" in dry.stdout
    assert "@" not in dry.stdout + dry.stderr
    assert sandbox.mailchimp.snapshot_members() == members_before

    dry_json = _syncd(config_path, "resync", "--dry-run", "--json")
    outputs += [dry_json.stdout, dry_json.stderr]
    assert dry_json.returncode == 0, dry_json.stderr
    plan = json.loads(dry_json.stdout)
    assert plan["dry_run"] is True and plan["planned"] == len(plan["rows"]) > 0
    shared = {(row["records"], row["governed_by"]): row["count"]
              for row in plan["shared_addresses"]}  # fmt: skip
    assert shared[("active+active", "active")] > 0

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
