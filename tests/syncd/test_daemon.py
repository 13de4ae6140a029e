"""The daemon's job guard: a job that raises anything is recorded and paused, never fatal."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from syncd import config
from syncd.daemon import Daemon, _Job
from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox

# Text an exception may carry that must never reach the log or the alert.
PERSONAL_TEXT = "jane.doe@example.com"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "ledger.sqlite3") as opened:
        yield opened


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _raising(error: Exception) -> Callable[[], None]:
    calls = []

    def job() -> None:
        calls.append(1)
        raise error

    job.calls = calls  # type: ignore[attr-defined]
    return job


@pytest.mark.parametrize(
    "error",
    [ZeroDivisionError(PERSONAL_TEXT), OverflowError(PERSONAL_TEXT), TypeError(PERSONAL_TEXT),
     AttributeError(PERSONAL_TEXT), AssertionError(PERSONAL_TEXT)],
    ids=lambda e: type(e).__name__,
)
def test_a_job_raising_any_exception_is_logged_by_type_alerted_and_paused(
    ledger: Ledger, error: Exception
) -> None:
    daemon = Daemon(None, install_signals=False)
    job = _raising(error)
    guarded = daemon._guarded(ledger, _Job("alerts", job))
    with structlog.testing.capture_logs() as events:
        guarded()  # must not raise
        guarded()  # paused: not run again at once
    assert len(job.calls) == 1  # type: ignore[attr-defined]
    failed = [e for e in events if e["event"] == "job_failed"]
    assert failed == [{"event": "job_failed", "log_level": "error", "job": "alerts",
                       "error": type(error).__name__, "failures": 1, "retry_in_seconds": 5.0}]
    assert PERSONAL_TEXT not in repr(events)
    (alert,) = ledger.open_alerts()
    assert alert.problem_key == "job_failed:alerts"
    assert type(error).__name__ in alert.summary and PERSONAL_TEXT not in alert.summary


def test_the_daemon_keeps_running_when_a_job_overflows(tmp_path: Path) -> None:
    """The reported crash: an unbounded reminder interval made the alert job overflow."""
    with Sandbox(clients=20, seed=1, smtp_port=0) as sandbox:
        path = sandbox.write_config(tmp_path / "syncd.toml", daemon_listen=f"127.0.0.1:{_free_port()}",
                                    console_listen=f"127.0.0.1:{_free_port()}")
        settings = config.load(path)
        # Validation now refuses inf, so build the bad settings without it, as an
        # older file or a future bug could.
        alerts = settings.alerts.model_copy(update={"remind_every_hours": float("inf")})
        daemon_settings = settings.daemon.model_copy(update={"alert_check_seconds": 1})
        broken = settings.model_copy(update={"alerts": alerts, "daemon": daemon_settings})
        daemon = Daemon(str(path), settings=broken, install_signals=False)
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                outcome["code"] = daemon.run()
            except BaseException as error:  # noqa: BLE001 - the test reports it
                outcome["error"] = error

        thread = threading.Thread(target=run, name="test-daemon", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30  # a hang guard, not a speed check
            while True:
                if daemon.ledger_path is not None:
                    with Ledger.open(daemon.ledger_path) as reader:
                        if any(a.problem_key == "job_failed:alerts" for a in reader.open_alerts()):
                            break
                assert thread.is_alive(), f"the daemon stopped: {outcome}"
                assert time.monotonic() < deadline, "the alert job never failed"
                time.sleep(0.1)
            time.sleep(1.5)  # the next turns of the loop go by
            assert thread.is_alive(), f"the daemon stopped: {outcome}"
        finally:
            daemon.stop()
            thread.join(timeout=30)
    assert not thread.is_alive()
    assert outcome == {"code": 0}


def test_a_requested_resync_that_raises_any_exception_is_marked_failed_for_the_waiting_cli(
    ledger: Ledger,
) -> None:
    daemon = Daemon(None, install_signals=False)
    command_id = ledger.add_command("resync", {})

    def resync(*_: object) -> None:
        raise ZeroDivisionError(PERSONAL_TEXT)

    guarded = daemon._guarded(ledger, _Job("commands", lambda: daemon._run_commands(ledger, resync)))
    guarded()  # must not raise
    command = ledger.command(command_id)
    assert command is not None and command.state == "failed"
    assert command.error is not None and command.error.startswith("ZeroDivisionError")
    assert PERSONAL_TEXT not in command.error
    assert [a.problem_key for a in ledger.open_alerts()] == ["job_failed:commands"]


def test_the_retention_purge_runs_daily_at_its_configured_time_guard_included(
    tmp_path: Path, ledger: Ledger
) -> None:
    from datetime import time as clock_time

    with Sandbox(clients=30, seed=3, smtp_port=None) as sandbox:
        path = sandbox.write_config(tmp_path / "syncd.toml")
        settings = config.load(path)
        settings = settings.model_copy(update={
            "daemon": settings.daemon.model_copy(update={"retention_purge_at": "04:15"}),
            "policy": settings.policy.model_copy(update={"purge_guard_percent": 0.0})})
        daemon = Daemon(str(path), settings=settings, install_signals=False)
        runtime = daemon._build(settings)
        daemon._schedule(ledger, runtime)
        daily = [job for job in runtime.scheduler.jobs
                 if job.unit == "days" and job.at_time == clock_time(4, 15)]
        assert len(daily) == 1
        daily[0].job_func()  # what the scheduler runs at 04:15
    (run,) = [ledger.retention_run(1)]
    assert run is not None and run.state == "guarded" and run.stale_count > 0
    assert ledger.all_requests() == []
    assert [a.kind for a in ledger.open_alerts()] == ["purge_guard"]
