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

import pytest

from syncd import config
from syncd.cli import main
from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox
from tests.support import vendor_addresses

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


# -- a one-shot resync killed with SIGKILL, then run again ------------------------------

KILL_TRIALS = 6  # each kills at another random moment; six cover the stages in CI time
KILL_TRIAL_CLIENTS = 200  # 10-15 opt-outs to carry: a second or two of Phorest writes
KILL_TRIAL_LATENCY_MS = 20
KILL_SEED = 12
# An uninterrupted resync of that world takes about 2.5 s (interpreter start and reads,
# Phorest withdrawals at its 20 requests/s limit, Mailchimp batches); kills land anywhere.
KILL_WINDOW_SECONDS = (0.3, 2.5)
OPTED_OUT = ("unsubscribed", "cleaned")


def _opted_out_addresses(sandbox: Sandbox) -> set[str]:
    """The addresses whose Mailchimp member opted out (read before syncd acts)."""
    return {email for email, address in vendor_addresses(sandbox).items()
            if address.member is not None and address.member["status"] in OPTED_OUT}


def _opt_outs_missing_in_phorest(sandbox: Sandbox, opted_out: set[str]) -> list[str]:
    """Client ids still consenting in Phorest although the mailbox they share opted out.

    Judged from the emulators' HTTP APIs alone: every live client (archived
    included) at an address whose member opted out must lose its consent.
    """
    addresses = vendor_addresses(sandbox)
    return sorted(client["clientId"] for email in opted_out
                  for client in addresses[email].live
                  if client.get("emailMarketingConsent") is True)


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
            (tmp_path / f"trial{trial}").mkdir()
            config_path = sandbox.write_config(tmp_path / f"trial{trial}" / "syncd.toml")
            opted_out = _opted_out_addresses(sandbox)
            assert _opt_outs_missing_in_phorest(sandbox, opted_out), "no opt-out to carry"
            killed = _popen_syncd(config_path, "resync")
            try:
                killed.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                killed.kill()  # SIGKILL: no clean-up of any kind
            killed.communicate(timeout=TIMEOUT_SECONDS)
            missing_at_kill = len(_opt_outs_missing_in_phorest(sandbox, opted_out))
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
                "missing_after": _opt_outs_missing_in_phorest(sandbox, opted_out),
            })
    print("\n".join(str(t) for t in trials))  # the trial report (pytest -s, or on failure)
    assert [t for t in trials if t["exit"] or t["planned_after"] or t["missing_after"]] == []
