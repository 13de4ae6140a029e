"""``syncd run`` as a subprocess against the sandbox: ready, propagating, healthy, stoppable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncd import config
from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox
from syncd.web import WEBHOOK_PREFIX
from tests.support import SYNCD, Running, seeded_values, started_daemon
from tests.support import free_port as _free_port
from tests.support import start_daemon as _start
from tests.support import wait_for as _wait

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    with started_daemon(tmp_path, clients=150, seed=4) as run:
        yield run


def test_the_daemon_reports_ready_propagates_both_ways_and_stops_cleanly(
    running: Running,
) -> None:
    sandbox = running.sandbox
    status, body = running.get("/healthz")
    health = json.loads(body)
    assert health["status"] == "ok" and set(health["processors"]) == {"phorest", "mailchimp", "google_analytics"}

    # The first poll was a full resync: the seeded drift is gone.
    status, metrics = running.get("/metrics")
    assert status == 200 and b'syncd_tasks{processor="mailchimp",state="done"}' in metrics
    assert b"syncd_queue_depth 0.0" in metrics

    settings = config.load(running.config_path)
    secret = settings.mailchimp.webhook_secret  # type: ignore[union-attr]
    assert secret is not None
    hook = f"http://127.0.0.1:{running.port}{WEBHOOK_PREFIX}{secret.get_secret_value()}"
    sandbox.mailchimp.add_webhook(hook, validate=True)
    clients = [c for c in sandbox.phorest.snapshot_clients()
               if c.get("email") and c.get("emailMarketingConsent") and not c.get("archived")
               and (sandbox.mailchimp.member(c["email"]) or {}).get("status") == "subscribed"]
    clicker, staff = clients[0], clients[1]

    sandbox.mailchimp.click_unsubscribe(clicker["email"])  # webhook -> Phorest
    sandbox.phorest.edit_client(staff["clientId"], emailMarketingConsent=False)  # poll -> MC
    _wait(lambda: not sandbox.phorest.client(clicker["clientId"])["emailMarketingConsent"],
          20, "the click to reach Phorest")
    _wait(lambda: sandbox.mailchimp.member(staff["email"])["status"] == "unsubscribed",
          30, "the staff opt-out to reach Mailchimp")

    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=10) == 0
    assert any("STOPPING=1" in m for m in running.notifications())
    log_text = running.log_path.read_text()
    assert "daemon_stopped" in log_text and "Traceback" not in log_text
    assert clicker["email"] not in log_text and staff["email"] not in log_text


def test_a_second_daemon_on_the_same_ledger_is_refused_in_one_line(
    running: Running, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    env["SYNCD_DAEMON__LISTEN"] = f"127.0.0.1:{_free_port()}"
    env["SYNCD_CONSOLE__LISTEN"] = f"127.0.0.1:{_free_port()}"
    second = subprocess.run([str(SYNCD), "--config", str(running.config_path), "run"],
                            capture_output=True, text=True, env=env, timeout=30, check=False)
    assert second.returncode == 1
    assert second.stderr.count("\n") == 1 and "another syncd is running" in second.stderr
    assert running.process.poll() is None


def test_sighup_with_a_broken_file_keeps_the_old_configuration(running: Running) -> None:
    original = running.config_path.read_text()
    running.config_path.write_text(original + "\n[phorest]\npage_size = 'lots'\n")
    running.process.send_signal(signal.SIGHUP)
    _wait(lambda: "reload_rejected" in running.log_path.read_text(), 10, "the rejection")
    assert running.process.poll() is None
    assert running.get("/healthz")[0] == 200

    running.config_path.write_text(original)
    running.process.send_signal(signal.SIGHUP)
    _wait(lambda: "reload_applied" in running.log_path.read_text(), 10, "the reload")
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=10) == 0


def test_killed_mid_batch_and_restarted_it_converges(running: Running, tmp_path: Path) -> None:
    sandbox = running.sandbox
    targets = [c for c in sandbox.phorest.snapshot_clients()
               if c.get("email") and c.get("emailMarketingConsent") and not c.get("archived")
               and (sandbox.mailchimp.member(c["email"]) or {}).get("status") == "subscribed"]
    assert len(targets) >= 5
    # Slow Mailchimp down so the batch of unsubscribes is in flight when the kill lands.
    sandbox.traffic.faults["mailchimp"].latency_ms = 1500
    for client in targets:
        sandbox.phorest.edit_client(client["clientId"], emailMarketingConsent=False)
    after_start = len(running.log_path.read_text())
    _wait(lambda: '"processor": "mailchimp"' in "".join(
        line for line in running.log_path.read_text()[after_start:].splitlines()
        if '"tasks_batch"' in line), 40, "the unsubscribe batch to be sent")
    running.process.send_signal(signal.SIGKILL)
    running.process.wait(timeout=10)
    unsubscribed = [c for c in targets
                    if sandbox.mailchimp.member(c["email"])["status"] == "unsubscribed"]
    assert len(unsubscribed) < len(targets), "the kill came after the batch landed"
    sandbox.traffic.faults["mailchimp"].latency_ms = 0

    running.notifications()
    restarted = _start(running.config_path, running.port, tmp_path / "notify.sock",
                       running.log_path)
    running.process = restarted
    _wait(lambda: any("READY=1" in m for m in running.notifications()), 30, "READY=1")
    _wait(lambda: all(sandbox.mailchimp.member(c["email"])["status"] == "unsubscribed"
                      for c in targets), 60, "every opt-out to reach Mailchimp after restart")
    ledger_path = config.load(running.config_path).ledger.path

    def settled() -> bool:  # the released batch and whatever else the kill interrupted
        with Ledger.open(ledger_path) as ledger:
            states = ledger.count_tasks_by_state()
        return states["pending"] == 0 and states["in_flight"] == 0

    _wait(settled, 60, "the released tasks to be carried out")
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(timeout=10) == 0
    assert "tasks_released_after_restart" in running.log_path.read_text()
    with Ledger.open(ledger_path) as ledger:
        states = ledger.count_tasks_by_state()
    assert states["in_flight"] == 0 and states["failed"] == 0 and states["pending"] == 0
    assert sandbox.mailchimp.confirmation_emails_sent == 0


def test_check_prints_one_line_per_processor_and_fails_on_an_unreachable_one(
    running: Running,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    ok = subprocess.run([str(SYNCD), "--config", str(running.config_path), "check"],
                        capture_output=True, text=True, env=env, timeout=60, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines][:3] == ["ledger", "phorest", "mailchimp"]
    assert all("  OK  " in line or "  SKIPPED  " in line for line in lines)

    env["SYNCD_MAILCHIMP__BASE_URL"] = f"http://127.0.0.1:{_free_port()}/3.0"
    down = subprocess.run([str(SYNCD), "--config", str(running.config_path), "check"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert down.returncode == 1
    assert "mailchimp  FAILED  unreachable" in down.stdout
    assert "phorest  OK" in down.stdout and "Traceback" not in down.stderr


def _samples(metrics: str, name: str, *, vendor: str) -> dict[str, float]:
    """{status label: value} of one vendor's samples of a labelled counter."""
    found = {}
    for line in metrics.splitlines():
        if line.startswith(name + "{") and f'vendor="{vendor}"' in line:
            labels, value = line.rsplit(" ", 1)
            found[labels.split('status="')[1].split('"')[0]] = float(value)
    return found


def _syncd(running: Running, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    return subprocess.run([str(SYNCD), "--config", str(running.config_path), *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def _stale_subscription(sandbox: Sandbox) -> dict[str, object]:
    """A Mailchimp subscription, untouched for a year, of a client without consent.

    It is older than the change feed's cursor, so no poll sees it; only a full
    resync does.
    """
    client = next(c for c in sandbox.phorest.snapshot_clients()
                  if c.get("email") and not c.get("emailMarketingConsent")
                  and not c.get("archived") and sandbox.mailchimp.member(c["email"]) is None)
    sandbox.mailchimp.add_member(client["email"], "subscribed",
                                 last_changed=time.time() - 365 * 86400)
    return client


def test_a_real_resync_is_handed_to_the_running_daemon_and_followed(running: Running) -> None:
    sandbox = running.sandbox
    stale = _stale_subscription(sandbox)
    time.sleep(3)  # a few polls go by: none of them sees the old subscription
    assert sandbox.mailchimp.member(stale["email"])["status"] == "subscribed"

    real = _syncd(running, "resync")
    assert real.returncode == 0, real.stderr
    assert "handed to it" in real.stderr and "Traceback" not in real.stderr
    assert "Actions taken" in real.stdout and "failed" in real.stdout
    assert sandbox.mailchimp.member(stale["email"])["status"] == "unsubscribed"
    assert stale["email"] not in real.stdout + real.stderr

    again = _syncd(running, "resync", "--json")
    summary = json.loads(again.stdout)
    assert again.returncode == 0 and summary["planned"] == 0 and summary["failed"] == 0
    assert summary["clients"] > 0 and "rows" not in summary

    with Ledger.open(config.load(running.config_path).ledger.path) as ledger:
        assert ledger.active_commands() == []
        first, second = ledger.command(1), ledger.command(2)
    assert first is not None and first.state == "done" and first.result is not None
    assert first.result["planned"] >= 1 and second is not None and second.state == "done"
    assert running.process.poll() is None  # the daemon did the work and kept running

    dry = _syncd(running, "resync", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "handed" not in dry.stderr and "Nothing to do" in dry.stdout


def test_a_followed_resync_fails_in_one_line_when_the_daemon_stops(running: Running) -> None:
    # Mailchimp is slowed so the resync is still reading when SIGTERM arrives.
    running.sandbox.traffic.faults["mailchimp"].latency_ms = 1500
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    follower = subprocess.Popen(
        [str(SYNCD), "--config", str(running.config_path), "resync"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    path = config.load(running.config_path).ledger.path

    def started() -> bool:
        with Ledger.open(path) as ledger:
            command = ledger.command(1)
        return command is not None and command.state == "running"

    _wait(started, 30, "the daemon to take the resync")
    running.process.send_signal(signal.SIGTERM)
    out, err = follower.communicate(timeout=60)
    # SIGTERM stops a long resync at its next safe point, well inside systemd's patience.
    assert running.process.wait(timeout=10) == 0
    assert follower.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "syncd: the daemon's resync #1 failed: the daemon stopped before it finished; "
        "ask again once it runs")
    with Ledger.open(path) as ledger:
        command = ledger.command(1)
        states = ledger.count_tasks_by_state()
    assert command is not None and command.state == "failed"
    assert states["in_flight"] == 0
    assert "job_interrupted" in running.log_path.read_text()


def test_status_says_healthy_degraded_and_down_with_matching_exit_codes(
    running: Running,
) -> None:
    healthy = _syncd(running, "status", "--json")
    report = json.loads(healthy.stdout)
    assert healthy.returncode == 0, report["reasons"]
    assert report["verdict"] == "healthy" and report["daemon"]["running"] is True
    assert {name: p["state"] for name, p in report["processors"].items()} == {
        "phorest": "ok", "mailchimp": "ok", "google_analytics": "ok"}
    assert report["processors"]["mailchimp"]["credentials_ok"] is True
    assert report["last_poll"] and report["last_resync"] and report["tasks"]["done"] > 0
    table = _syncd(running, "status")
    assert table.returncode == 0 and "HEALTHY" in table.stdout and "mailchimp" in table.stdout
    seen: list[str] = []  # systemd's `systemctl status` shows the latest STATUS= line
    _wait(lambda: seen.extend(running.notifications()) or any(
        "STATUS=running; last poll" in m for m in seen), 20, "a STATUS= line after a poll")

    # Mailchimp fails every call: the next poll fails and the probe records it.
    running.sandbox.traffic.faults["mailchimp"].rate_5xx = 1.0
    _wait(lambda: running.get("/healthz")[0] == 503, 60, "/healthz to turn 503")
    degraded = _syncd(running, "status", "--json")
    report = json.loads(degraded.stdout)
    assert degraded.returncode == 1 and report["verdict"] == "degraded"
    mailchimp = report["processors"]["mailchimp"]
    assert mailchimp["state"] == "down" and mailchimp["down_since"] and mailchimp["last_error"]
    assert "mailchimp is down" in report["reasons"]
    assert "mailchimp" in json.loads(running.get("/healthz")[1])["processors"]

    metrics = running.get("/metrics")[1].decode()
    counted = _samples(metrics, "syncd_api_errors_total", vendor="mailchimp")
    answered = {labels: n for labels, n in counted.items() if labels.startswith("5")}
    served = sum(n for (vendor, _m, _t, code), n in running.sandbox.traffic.counts.items()
                 if vendor == "mailchimp" and code >= 500)
    # Every 5xx the emulator served was counted (a scrape may trail the calls in flight,
    # at most the connector's 4 connections).
    assert answered and served - 4 <= sum(answered.values()) <= served
    assert _samples(metrics, "syncd_api_calls_total", vendor="phorest").get("200", 0) > 0

    running.sandbox.traffic.faults["mailchimp"].rate_5xx = 0.0
    _wait(lambda: running.get("/healthz")[0] == 200, 60, "/healthz to recover")
    assert _syncd(running, "status").returncode == 0

    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=10) == 0
    down = _syncd(running, "status", "--json")
    report = json.loads(down.stdout)
    assert down.returncode == 2 and report["verdict"] == "down"
    assert "syncd run is not running" in report["reasons"]


def test_a_processor_down_past_the_threshold_emails_the_manager_once_then_the_recovery(
    running: Running,
) -> None:
    sink = running.sandbox.smtp
    assert sink is not None
    seeded = [c["email"] for c in running.sandbox.phorest.snapshot_clients() if c.get("email")]
    running.sandbox.traffic.faults["mailchimp"].rate_5xx = 1.0

    def subjects() -> list[str]:
        return [m["subject"] for m in sink.messages()]

    _wait(lambda: any("Mailchimp" in s for s in subjects()), 60, "the processor-down email")
    time.sleep(3)  # more checks go by: no repeat before remind_every_hours
    down = [s for s in subjects() if "Mailchimp" in s]
    assert len(down) == 1 and "Resolved" not in down[0], subjects()

    running.sandbox.traffic.faults["mailchimp"].rate_5xx = 0.0
    _wait(lambda: any(s.startswith("[syncd] Resolved") for s in subjects()), 60,
          "the recovery email")
    assert len([s for s in subjects() if s.startswith("[syncd] Resolved")]) == 1
    mail = json.dumps(sink.messages())
    assert not [address for address in seeded if address in mail]
    report = json.loads(_syncd(running, "status", "--json").stdout)
    assert not [a for a in report["alerts"] if a["problem"].startswith("processor_down")]


def test_sigterm_during_a_long_run_of_withdrawals_exits_promptly_and_loses_none(
    running: Running, tmp_path: Path
) -> None:
    sandbox = running.sandbox
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=10) == 0
    # Restart throttled to 2 Phorest requests a second: applies of 10 withdrawals (one PUT
    # each), ~5 s each.
    running.notifications()
    running.process = _start(running.config_path, running.port, tmp_path / "notify.sock",
                             running.log_path, SYNCD_PHOREST__MAX_REQUESTS_PER_SECOND="2")
    _wait(lambda: any("READY=1" in m for m in running.notifications()), 30, "READY=1")
    secret = config.load(running.config_path).mailchimp.webhook_secret  # type: ignore[union-attr]
    assert secret is not None
    sandbox.mailchimp.add_webhook(
        f"http://127.0.0.1:{running.port}{WEBHOOK_PREFIX}{secret.get_secret_value()}")
    clickers = [c for c in sandbox.phorest.snapshot_clients()
                if c.get("email") and c.get("emailMarketingConsent") and not c.get("archived")
                and (sandbox.mailchimp.member(c["email"]) or {}).get("status") == "subscribed"]
    assert len(clickers) >= 30
    clickers = clickers[:30]
    for client in clickers:
        sandbox.mailchimp.click_unsubscribe(client["email"])

    def withdrawn() -> int:
        return sum(not sandbox.phorest.client(c["clientId"])["emailMarketingConsent"]
                   for c in clickers)

    _wait(lambda: withdrawn() >= 1, 30, "the first withdrawals")
    running.process.send_signal(signal.SIGTERM)
    stopping = time.monotonic()
    assert running.process.wait(timeout=10) == 0
    assert time.monotonic() - stopping < 10
    assert withdrawn() < len(clickers), "every withdrawal was done before SIGTERM landed"
    assert "job_interrupted" in running.log_path.read_text()

    running.process = _start(running.config_path, running.port, tmp_path / "notify.sock",
                             running.log_path)
    _wait(lambda: withdrawn() == len(clickers), 60, "every withdrawal after the restart")
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=10) == 0
    with Ledger.open(config.load(running.config_path).ledger.path) as ledger:
        states = ledger.count_tasks_by_state("phorest")
    assert states["pending"] == states["in_flight"] == states["failed"] == 0


# -- scrubbed personal data and the WAL ----------------------------------------------------


def _hook(running: Running) -> str:
    secret = config.load(running.config_path).mailchimp.webhook_secret  # type: ignore[union-attr]
    assert secret is not None
    return f"http://127.0.0.1:{running.port}{WEBHOOK_PREFIX}{secret.get_secret_value()}"


def _subscribed_consenting(sandbox: Sandbox) -> list[dict[str, Any]]:
    return [c for c in sandbox.phorest.snapshot_clients()
            if c.get("email") and c.get("emailMarketingConsent") and not c.get("archived")
            and (sandbox.mailchimp.member(c["email"]) or {}).get("status") == "subscribed"]


def _addresses_in_ledger_files(running: Running) -> dict[str, int]:
    """Per ledger file (the database and its WAL, read as raw bytes): seeded addresses in it."""
    ledger_path = Path(config.load(running.config_path).ledger.path)
    addresses = [v.encode() for v in seeded_values(running.sandbox) if "@" in v]
    found = {}
    for path in (ledger_path, Path(f"{ledger_path}-wal")):
        data = path.read_bytes() if path.exists() else b""
        found[path.name] = sum(address in data for address in addresses)
    return found


def _no_address_left(running: Running) -> bool:
    return not any(_addresses_in_ledger_files(running).values())


def test_a_processed_opt_out_leaves_no_address_in_the_wal_while_the_daemon_runs(
    running: Running,
) -> None:
    sandbox = running.sandbox
    sandbox.mailchimp.add_webhook(_hook(running), validate=True)
    clicker = _subscribed_consenting(sandbox)[0]
    sandbox.mailchimp.click_unsubscribe(clicker["email"])
    _wait(lambda: not sandbox.phorest.client(clicker["clientId"])["emailMarketingConsent"],
          20, "the click to reach Phorest")
    # Processing the event scrubbed its address; the WAL lets go of it by the next loop turn.
    _wait(lambda: _no_address_left(running), 20, "the scrubbed addresses to leave the WAL")
    assert running.process.poll() is None  # still running: nothing was closed to get here
    assert _addresses_in_ledger_files(running) == {"ledger.sqlite3": 0, "ledger.sqlite3-wal": 0}


def test_after_a_sigkill_and_restart_no_address_stays_in_the_wal(
    running: Running, tmp_path: Path
) -> None:
    sandbox = running.sandbox
    sandbox.mailchimp.add_webhook(_hook(running), validate=True)
    clicker = _subscribed_consenting(sandbox)[0]
    # Phorest is down: the recorded opt-out waits in the ledger, address and all.
    sandbox.traffic.faults["phorest"].rate_5xx = 1.0
    sandbox.mailchimp.click_unsubscribe(clicker["email"])
    assert sandbox.mailchimp.drain_webhooks()
    assert any(d["ok"] and d["type"] == "unsubscribe" for d in sandbox.mailchimp.webhook_log())
    assert any(_addresses_in_ledger_files(running).values())  # the check below can see it
    running.process.send_signal(signal.SIGKILL)
    running.process.wait(timeout=10)
    sandbox.traffic.faults["phorest"].rate_5xx = 0.0

    running.notifications()
    running.process = _start(running.config_path, running.port, tmp_path / "notify.sock",
                             running.log_path)
    _wait(lambda: any("READY=1" in m for m in running.notifications()), 30, "READY=1")
    _wait(lambda: not sandbox.phorest.client(clicker["clientId"])["emailMarketingConsent"],
          30, "the opt-out to reach Phorest after the restart")
    _wait(lambda: _no_address_left(running), 20, "the scrubbed addresses to leave the WAL")
    assert running.process.poll() is None
    assert _addresses_in_ledger_files(running) == {"ledger.sqlite3": 0, "ledger.sqlite3-wal": 0}
