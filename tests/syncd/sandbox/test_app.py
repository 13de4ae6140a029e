"""The assembled sandbox: seeding, control API, people actions, written config, the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mailchimp_marketing
import pytest
import requests
from google.auth.transport.requests import AuthorizedSession
from google.oauth2 import service_account

from syncd import config
from syncd.sandbox.app import Sandbox

FIXED_NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
SYNCD = Path(sys.executable).with_name("syncd")


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(clients=400, seed=3, smtp_port=0) as running:
        yield running


def phorest_get(sandbox: Sandbox, path: str, **params: str) -> requests.Response:
    c = sandbox.credentials
    return requests.get(
        f"{sandbox.base_url}/third-party-api-server/api/business/{c.phorest_business_id}{path}",
        params=params,
        auth=(c.phorest_username, c.phorest_password),
        timeout=10,
    )


def mailchimp(sandbox: Sandbox) -> mailchimp_marketing.Client:
    client = mailchimp_marketing.Client()
    client.set_config({"api_key": sandbox.credentials.mailchimp_api_key})
    client.api_client.host = f"{sandbox.base_url}/3.0"
    return client


def control(sandbox: Sandbox, method: str, path: str, body: object = None) -> requests.Response:
    return requests.request(method, f"{sandbox.base_url}/_sandbox{path}", json=body, timeout=10)


def live_consenting_member(sandbox: Sandbox) -> tuple[dict, dict]:
    """A client with consent whose member is subscribed, and that member."""
    for client in sandbox.phorest.snapshot_clients():
        if client["emailMarketingConsent"] and not client["deleted"] and client["email"]:
            member = sandbox.mailchimp.member(client["email"])
            if member and member["status"] == "subscribed":
                return client, member
    raise AssertionError("the seed has no in-sync subscribed client")


def test_same_seed_and_clock_give_the_same_world() -> None:
    worlds = [Sandbox(clients=150, seed=11, smtp_port=None, clock=lambda: FIXED_NOW) for _ in range(2)]
    try:
        assert worlds[0].phorest.snapshot_clients() == worlds[1].phorest.snapshot_clients()
        assert worlds[0].mailchimp.snapshot_members() == worlds[1].mailchimp.snapshot_members()
        other = Sandbox(clients=150, seed=12, smtp_port=None, clock=lambda: FIXED_NOW)
        other.server.server_close()
        assert other.phorest.snapshot_clients() != worlds[0].phorest.snapshot_clients()
    finally:
        for world in worlds:
            world.server.server_close()


def test_seeded_world_has_every_kind_of_client_and_drift() -> None:
    world = Sandbox(clients=3000, seed=1, smtp_port=None)
    world.server.server_close()
    clients, members = world.report.clients, world.report.members
    for kind in ("consent", "no_consent", "no_email", "family_email", "stale_24_months",
                 "stale_with_future_appointment", "archived", "deleted", "merged", "forgotten"):
        assert clients.get(kind, 0) > 0, kind
    for kind in ("in_sync", "stale_subscription", "orphan", "extra_merge_fields",
                 "unsubscribed_in_mailchimp_only", "consenting_client_missing",
                 "name_changed_in_phorest", "cleaned"):
        assert members.get(kind, 0) > 0, kind
    # Households sharing one address come on top, one per 40 clients, every kind of them.
    assert clients["total"] == 3000 + clients["household"]
    for kind in ("active+archived", "two_active_mixed_consent", "active+deleted",
                 "active+merged", "family_of_three"):
        assert clients[f"household_{kind}"] == 3000 // 40 // 5, kind
    assert world.phorest.clients_count() == clients["total"]
    assert world.mailchimp.members_count() == members["total"]


def test_only_loopback_hosts_are_accepted() -> None:
    with pytest.raises(ValueError, match="loopback"):
        Sandbox(host="0.0.0.0", smtp_port=None)


def test_control_api_counts_requests_by_vendor(sandbox: Sandbox) -> None:
    control(sandbox, "DELETE", "/requests")
    assert phorest_get(sandbox, "/client", size="5").status_code == 200
    mailchimp(sandbox).ping.get()
    counts = control(sandbox, "GET", "/requests").json()
    assert counts["phorest"]["routes"]["GET /third-party-api-server/api/business/{business_id}/client"] == {"200": 1}
    assert counts["mailchimp"]["total"] == 1


def test_control_api_state_holds_counts_not_personal_data(sandbox: Sandbox) -> None:
    state = control(sandbox, "GET", "/state")
    assert state.status_code == 200
    emails = [c["email"] for c in sandbox.phorest.snapshot_clients() if c["email"]]
    emails += [m["email_address"] for m in sandbox.mailchimp.snapshot_members()]
    assert emails and not any(email in state.text for email in emails)
    assert set(state.json()) == {"phorest", "mailchimp", "google", "smtp"}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"rate_5xx": 2}, 400),
        ({"rate_429": 0.6, "rate_5xx": 0.6}, 400),
        ({"colour": "red"}, 400),
        ({"latency_ms": -1}, 400),
        ([1, 2], 400),
    ],
    ids=["rate-over-1", "rates-sum-over-1", "unknown-setting", "negative-latency", "not-an-object"],
)
def test_bad_fault_settings_are_refused(sandbox: Sandbox, body: object, status: int) -> None:
    assert control(sandbox, "PUT", "/faults/mailchimp", body).status_code == status
    assert control(sandbox, "GET", "/faults").json()["mailchimp"]["rate_5xx"] == 0


def test_faults_set_at_runtime_reach_the_vendor(sandbox: Sandbox) -> None:
    assert control(sandbox, "PUT", "/faults/phorest", {"rate_5xx": 1.0}).status_code == 200
    try:
        assert phorest_get(sandbox, "/client").status_code == 503
    finally:
        control(sandbox, "PUT", "/faults/phorest", {})
    assert phorest_get(sandbox, "/client").status_code == 200
    assert control(sandbox, "PUT", "/faults/nobody", {}).status_code == 404


def test_unknown_action_and_bad_arguments_are_4xx(sandbox: Sandbox) -> None:
    assert control(sandbox, "POST", "/actions/fly", {}).status_code == 404
    assert control(sandbox, "POST", "/actions/phorest-consent", {"client_id": "x"}).status_code == 400
    missing = control(sandbox, "POST", "/actions/phorest-forget", {"client_id": "no-such-client"})
    assert missing.status_code == 404


def test_staff_opt_out_in_phorest_changes_the_client(sandbox: Sandbox) -> None:
    client, _ = live_consenting_member(sandbox)
    answer = control(sandbox, "POST", "/actions/phorest-consent",
                     {"client_id": client["clientId"], "consent": False})
    assert answer.status_code == 200
    after = phorest_get(sandbox, f"/client/{client['clientId']}").json()
    assert after["emailMarketingConsent"] is False
    assert after["version"] == client["version"] + 1
    assert after["updatedAt"] > client["updatedAt"]


def test_click_unsubscribe_changes_the_member_and_fires_the_webhook(sandbox: Sandbox) -> None:
    received: list[dict[str, str]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the validator
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:  # noqa: N802
            from urllib.parse import parse_qsl

            length = int(self.headers["Content-Length"])
            received.append(dict(parse_qsl(self.rfile.read(length).decode())))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{receiver.server_address[1]}/webhooks/mailchimp/secret"
        assert control(sandbox, "POST", "/actions/mailchimp-register-webhook", {"url": url}).ok
        client, member = live_consenting_member(sandbox)
        answer = control(sandbox, "POST", "/actions/mailchimp-unsubscribe", {"email": client["email"]})
        assert answer.status_code == 200
        assert mailchimp(sandbox).lists.get_list_member(
            sandbox.credentials.mailchimp_list_id, member["id"]
        )["status"] == "unsubscribed"
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert received and received[0]["type"] == "unsubscribe"
        assert received[0]["data[email]"] == client["email"]
    finally:
        receiver.shutdown()
        receiver.server_close()


def test_retention_run_forgets_clients_not_seen_for_that_long() -> None:
    with Sandbox(clients=300, seed=5, smtp_port=None) as world:
        answer = control(world, "POST", "/actions/phorest-retention-run", {"months": 24}).json()
        assert answer["result"]["forgotten"] > 0
        stale = [
            c for c in world.phorest.snapshot_clients()
            if c["lastVisit"] and c["lastVisit"] < "2024-01-01"
            and not c["deleted"] and not c["mergedToClientId"]
        ]
        assert stale and all(not c["email"] for c in stale)


def test_smtp_sink_messages_are_readable_through_the_control_api(sandbox: Sandbox) -> None:
    import smtplib
    from email.message import EmailMessage

    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.com", "b@example.com", "hello"
    message.set_content("body text")
    with smtplib.SMTP(sandbox.smtp.host, sandbox.smtp.port, timeout=10) as smtp:
        smtp.send_message(message)
    messages = control(sandbox, "GET", "/smtp/messages").json()["messages"]
    assert any(m["subject"] == "hello" for m in messages)
    assert control(sandbox, "DELETE", "/smtp/messages").status_code == 204
    assert control(sandbox, "GET", "/smtp/messages").json()["messages"] == []


def test_written_config_validates_and_its_credentials_work(sandbox: Sandbox, tmp_path: Path) -> None:
    path = sandbox.write_config(tmp_path / "syncd.toml", ledger_path=tmp_path / "ledger.sqlite3")
    settings = config.load(path)  # every secret must resolve
    assert settings.phorest.password.get_secret_value() == sandbox.credentials.phorest_password
    assert (tmp_path / "syncd.toml.d" / "phorest_password").stat().st_mode & 0o777 == 0o600
    assert sandbox.credentials.phorest_password not in path.read_text()
    # Phorest and Mailchimp accept the configured credentials...
    ph = settings.phorest
    response = requests.get(
        f"{ph.base_url}/api/business/{ph.business_id}/client",
        auth=(ph.username, ph.password.get_secret_value()),
        timeout=10,
    )
    assert response.status_code == 200
    client = mailchimp_marketing.Client()
    client.set_config({"api_key": settings.mailchimp.api_key.get_secret_value()})
    client.api_client.host = settings.mailchimp.api_root
    assert client.ping.get()["health_status"]
    # ...and so does Google, through real google-auth.
    info = json.loads(settings.google_analytics.credentials.get_secret_value())
    creds = service_account.Credentials.from_service_account_info(
        info, scopes=["https://www.googleapis.com/auth/analytics.edit"]
    )
    ga = AuthorizedSession(creds)
    url = (f"{settings.google_analytics.admin_base_url}/v1beta/properties/"
           f"{settings.google_analytics.property_id}/dataRetentionSettings")
    assert ga.get(url, timeout=10).status_code == 200
    assert settings.alerts.smtp_port == sandbox.smtp.port


def test_cli_serves_writes_config_and_stops_on_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    process = subprocess.Popen(
        [str(SYNCD), "sandbox", "--clients", "50", "--port", "0", "--smtp-port", "0",
         "--write-config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert path.exists(), process.stderr.read() if process.poll() is not None else "timeout"
        time.sleep(0.2)
        base = tomllib.loads(path.read_text())["mailchimp"]["base_url"].removesuffix("/3.0")
        assert requests.get(f"{base}/_sandbox/state", timeout=10).json()["phorest"]
        result = subprocess.run(
            [str(SYNCD), "config", "validate", "--require-secrets", "--config", str(path)],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=15)
    assert process.returncode == 0
    assert "Traceback" not in err


def test_written_config_and_secrets_are_private_even_over_an_existing_file(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text("# an older, world-readable file\n")
    path.chmod(0o644)
    (tmp_path / "syncd.toml.d").mkdir(mode=0o755)
    (tmp_path / "syncd.toml.d").chmod(0o755)
    sandbox.write_config(path)
    assert path.stat().st_mode & 0o777 == 0o600
    secrets = tmp_path / "syncd.toml.d"
    assert secrets.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in secrets.iterdir()} == {0o600}


@pytest.mark.parametrize("where", ["directory", "missing-parent"])
def test_write_config_refuses_a_directory_or_a_missing_parent(
    sandbox: Sandbox, tmp_path: Path, where: str
) -> None:
    path = tmp_path if where == "directory" else tmp_path / "no" / "such" / "syncd.toml"
    with pytest.raises(ValueError):
        sandbox.write_config(path)
    assert not (tmp_path / "no").exists()
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path.parent / f"{tmp_path.name}.d").exists()


@pytest.mark.parametrize(
    ("where", "fragment"),
    [("directory", "is a directory"), ("missing-parent", "does not exist")],
)
def test_cli_write_config_refuses_bad_paths_in_one_line(
    tmp_path: Path, where: str, fragment: str
) -> None:
    path = tmp_path if where == "directory" else tmp_path / "no" / "such" / "syncd.toml"
    try:
        result = subprocess.run(
            [str(SYNCD), "sandbox", "--clients", "0", "--port", "0", "--smtp-port", "0",
             "--write-config", str(path)],
            capture_output=True, text=True, timeout=30,  # a hang guard: it must not serve
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the sandbox started instead of refusing the path")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and fragment in result.stderr
    assert result.stderr.startswith("syncd sandbox: ")
    assert not (tmp_path / "no").exists()
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path.parent / f"{tmp_path.name}.d").exists()


def test_production_modules_never_import_the_sandbox() -> None:
    code = (
        "import sys, syncd.cli, syncd.config, syncd.ledger, syncd.log, syncd.identity, connectors\n"
        "loaded = [m for m in sys.modules if m.startswith('syncd.sandbox')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
