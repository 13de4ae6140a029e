"""``syncd run`` as a subprocess against the sandbox: ready, propagating, healthy, stoppable."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from syncd import config
from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox
from syncd.web import WEBHOOK_PREFIX

SYNCD = Path(sys.executable).with_name("syncd")
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(done: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds  # a hang guard, not a speed check
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@dataclass
class Running:
    sandbox: Sandbox
    config_path: Path
    process: subprocess.Popen[str]
    port: int
    notify: socket.socket
    log_path: Path

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def notifications(self) -> list[str]:
        found = []
        while True:
            try:
                found.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                return found


def _start(config_path: Path, port: int, notify_path: Path, log_path: Path,
           ) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    env.update(SYNCD_DAEMON__LISTEN=f"127.0.0.1:{port}", NOTIFY_SOCKET=str(notify_path))
    return subprocess.Popen(
        [str(SYNCD), "--config", str(config_path), "--log-level", "info", "run"],
        stdout=log_path.open("a"), stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    with Sandbox(clients=150, seed=4, smtp_port=None) as sandbox:
        config_path = sandbox.write_config(tmp_path / "syncd.toml")
        port, log_path = _free_port(), tmp_path / "daemon.log"
        process = _start(config_path, port, notify_path, log_path)
        run = Running(sandbox, config_path, process, port, notify, log_path)
        try:
            seen: list[str] = []
            _wait(lambda: seen.extend(run.notifications()) or any("READY=1" in m for m in seen),
                  30, "READY=1")
            # Ready comes before the first poll (a full resync); healthy once both were reached.
            _wait(lambda: run.get("/healthz")[0] == 200, 30, "/healthz to turn 200")
            yield run
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            notify.close()


def test_the_daemon_reports_ready_propagates_both_ways_and_stops_cleanly(
    running: Running,
) -> None:
    sandbox = running.sandbox
    status, body = running.get("/healthz")
    health = json.loads(body)
    assert health["status"] == "ok" and set(health["processors"]) == {"phorest", "mailchimp"}

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
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(timeout=10) == 0
    assert "tasks_released_after_restart" in running.log_path.read_text()
    with Ledger.open(config.load(running.config_path).ledger.path) as ledger:
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


def test_a_real_resync_is_refused_while_the_daemon_runs_and_a_dry_run_is_not(
    running: Running,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    base = [str(SYNCD), "--config", str(running.config_path), "resync"]
    real = subprocess.run(base, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert real.returncode == 1 and "another syncd is running" in real.stderr
    dry = subprocess.run([*base, "--dry-run"], capture_output=True, text=True, env=env,
                         timeout=60, check=False)
    assert dry.returncode == 0, dry.stderr
