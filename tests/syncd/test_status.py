"""Tests for syncd.status: the verdict, its exit code and what the report shows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from syncd import config, status
from syncd.cli import main
from syncd.errors import SyncdError
from syncd.ledger import Ledger
from syncd.lock import lock_holder, writer_lock
from tests.support import FakeClock

REPO_ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
SECRET_ADDRESS = "jane.status@example.com"


@pytest.fixture
def settings(tmp_path: Path) -> config.Settings:
    loaded = config.load(REPO_ROOT / "config" / "syncd.example.toml", require_secrets=False)
    ledger = loaded.ledger.model_copy(update={"path": tmp_path / "ledger.sqlite3"})
    return loaded.model_copy(update={"ledger": ledger})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW - timedelta(seconds=30))


@pytest.fixture
def ledger(settings: config.Settings, clock: FakeClock) -> Iterator[Ledger]:
    with Ledger.open(settings.ledger.path, clock=clock) as opened:
        yield opened


@pytest.fixture
def daemon(settings: config.Settings, ledger: Ledger) -> Iterator[None]:
    """This process plays a running daemon: the lock, a fresh heartbeat and poll."""
    with writer_lock(settings.ledger.path):
        ledger.set_cursor(status.HEARTBEAT_CURSOR, (NOW - timedelta(seconds=5)).isoformat())
        ledger.set_cursor(status.LAST_POLL_CURSOR, (NOW - timedelta(seconds=20)).isoformat())
        yield


def _all_up(ledger: Ledger) -> None:
    for name in ("phorest", "mailchimp", "google_analytics"):
        ledger.record_contact(name, ok=True)


def test_no_ledger_is_down(settings: config.Settings) -> None:
    report = status.gather(settings, now=NOW)
    assert (report.verdict, report.exit_code) == ("down", 2)
    assert report.reasons == [f"no ledger at {settings.ledger.path}: syncd has not run here yet"]
    assert not Path(settings.ledger.path).exists()  # status never creates it


def test_no_daemon_is_down_even_with_fresh_contacts(settings: config.Settings,
                                                    ledger: Ledger) -> None:
    _all_up(ledger)
    report = status.gather(settings, now=NOW)
    assert report.verdict == "down" and report.reasons == ["syncd run is not running"]
    assert report.daemon == {"running": False, "pid": None, "heartbeat": None}


@pytest.mark.usefixtures("daemon")
def test_a_running_daemon_with_every_processor_reached_is_healthy(
    settings: config.Settings, ledger: Ledger
) -> None:
    _all_up(ledger)
    report = status.gather(settings, now=NOW)
    assert (report.verdict, report.exit_code, report.reasons) == ("healthy", 0, [])
    assert report.daemon["pid"] == lock_holder(settings.ledger.path) > 0
    assert {n: p["state"] for n, p in report.processors.items()} == {
        "phorest": "ok", "mailchimp": "ok", "google_analytics": "ok"}


@pytest.mark.usefixtures("daemon")
def test_a_silent_loop_is_down(settings: config.Settings, ledger: Ledger) -> None:
    _all_up(ledger)
    ledger.set_cursor(status.HEARTBEAT_CURSOR, (NOW - timedelta(hours=1)).isoformat())
    report = status.gather(settings, now=NOW)
    assert report.verdict == "down"
    assert report.reasons == ["the daemon holds the lock but its loop has not beaten recently"]


@pytest.mark.usefixtures("daemon")
def test_problems_degrade_and_are_listed(settings: config.Settings, ledger: Ledger,
                                         clock: FakeClock) -> None:
    ledger.record_contact("phorest", ok=True)
    ledger.record_contact("google_analytics", ok=True)
    ledger.record_contact("mailchimp", ok=False, error=f"401 refused for {SECRET_ADDRESS}",
                          credentials_ok=False)
    overdue = ledger.add_request("erase", "subject-1", "cli", NOW - timedelta(days=1))
    ledger.add_request("export", "subject-2", "cli", NOW + timedelta(days=20))
    ledger.raise_alert("credentials:mailchimp", "credentials", "Mailchimp refused the API key")
    retrying = ledger.add_task("subject-3", "phorest", "withdraw_consent", "R1")
    ledger.claim(retrying)
    ledger.retry_later(retrying, NOW + timedelta(minutes=5), "503 Service Unavailable")
    manual = ledger.add_task("subject-4", "mailchimp", "subscribe", "R2")
    ledger.claim(manual)
    ledger.finish(manual, "needs_person", error="compliance state")
    ledger.add_command("resync", {})

    report = status.gather(settings, now=NOW)
    assert (report.verdict, report.exit_code) == ("degraded", 1)
    assert report.reasons == ["mailchimp is down", "mailchimp refused the credentials",
                              "1 request(s) overdue", "1 open alert(s)"]
    assert report.processors["mailchimp"]["credentials_ok"] is False
    assert report.oldest_failing_task is not None and report.oldest_failing_task["id"] == retrying
    assert [t["id"] for t in report.manual_steps] == [manual]
    assert [(r["id"], r["overdue"]) for r in report.requests][0] == (overdue, True)
    assert report.commands[0]["state"] == "queued"
    text = json.dumps(report.as_json())
    assert SECRET_ADDRESS not in text and "subject-1" not in text


@pytest.mark.usefixtures("daemon")
def test_a_late_poll_and_a_stale_processor_degrade(settings: config.Settings,
                                                   ledger: Ledger) -> None:
    _all_up(ledger)  # at NOW - 30 s
    late = NOW + timedelta(minutes=10)
    ledger.set_cursor(status.HEARTBEAT_CURSOR, late.isoformat())
    report = status.gather(settings, now=late)
    assert report.verdict == "down"  # nothing reached within the window
    assert "the last successful poll is late" in report.reasons
    assert report.processors["phorest"]["state"] == "stale"


@pytest.mark.usefixtures("daemon")
def test_the_cli_prints_tables_or_json_and_exits_with_the_verdict(
    settings: config.Settings, ledger: Ledger, clock: FakeClock,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock.advance(seconds=(datetime.now(UTC) - clock.now).total_seconds())  # the CLI's clock
    _all_up(ledger)
    ledger.set_cursor(status.HEARTBEAT_CURSOR, datetime.now(UTC).isoformat())
    ledger.set_cursor(status.LAST_POLL_CURSOR, datetime.now(UTC).isoformat())
    monkeypatch.setenv("SYNCD_LEDGER__PATH", str(settings.ledger.path))
    example = str(REPO_ROOT / "config" / "syncd.example.toml")
    assert main(["--config", example, "status"]) == 0
    out = capsys.readouterr().out
    assert "HEALTHY" in out and "phorest" in out and "Processors" in out
    assert main(["--config", example, "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "healthy"
    ledger.raise_alert("job_failed:poll", "job_failed", "the poll job keeps failing")
    assert main(["--config", example, "status"]) == 1
    assert "DEGRADED: 1 open alert(s)" in capsys.readouterr().out


def test_the_cli_says_down_without_a_daemon(settings: config.Settings, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCD_LEDGER__PATH", str(settings.ledger.path))
    assert main(["--config", str(REPO_ROOT / "config" / "syncd.example.toml"), "status"]) == 2
    assert "DOWN: no ledger at" in capsys.readouterr().out


def test_an_unreadable_lock_is_one_clear_line(settings: config.Settings, ledger: Ledger,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(_path: object) -> None:  # as for a user other than the service's
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(status, "lock_holder", denied)
    with pytest.raises(SyncdError, match="cannot read .*lock: Permission denied; run as root"):
        status.gather(settings, now=NOW)
