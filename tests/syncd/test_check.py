"""``syncd check`` against a real sandbox, the real connectors, SMTP sink and ledger file."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

import connectors
from connectors.base import CheckResult
from syncd import config
from syncd.check import ProcessorCheck, check_all, render
from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox
from syncd.sandbox.smtp import SmtpSink

SMTP_USER, SMTP_PASSWORD = "alerts@example.com", "smtp-password-not-for-production"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(clients=3, seed=1) as running:
        yield running


@pytest.fixture
def settings(sandbox: Sandbox, tmp_path: Path) -> config.Settings:
    return config.load(sandbox.write_config(tmp_path / "syncd.toml"))


def _with(settings: config.Settings, section: str, **changes: Any) -> config.Settings:
    """``settings`` with some keys of one section replaced."""
    updated = getattr(settings, section).model_copy(update=changes)
    return settings.model_copy(update={section: updated})


def _by_name(results: list[ProcessorCheck]) -> dict[str, ProcessorCheck]:
    return {result.name: result for result in results}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _line(text: str, name: str) -> str:
    (line,) = [line for line in text.splitlines() if line.split("  ")[0] == name]
    return line


def test_everything_configured_and_working_is_ok(settings: config.Settings) -> None:
    results = check_all(settings)
    text, code = render(results)

    assert [r.name for r in results] == [
        "ledger", "phorest", "mailchimp", "google_analytics", "alerts"
    ]  # fmt: skip
    assert code == 0
    assert [r.status for r in results] == ["OK", "OK", "OK", "OK", "OK"]
    assert _line(text, "phorest").startswith("phorest  OK  credentials accepted (")
    assert _line(text, "phorest").endswith(" ms)")
    assert _line(text, "mailchimp").startswith("mailchimp  OK  credentials accepted (")
    assert "not created yet" in _line(text, "ledger")
    # GA's line also shows the event-data retention R9 holds to the policy's maximum.
    assert _line(text, "google_analytics").startswith(
        "google_analytics  OK  credentials accepted; event data kept TWO_MONTHS "
        "(policy maximum FOURTEEN_MONTHS) (")
    assert "accepts connections (no login configured)" in _line(text, "alerts")
    assert len(text.splitlines()) == 5
    assert all(r.seconds >= 0 for r in results)
    # Nothing was written: checking does not create the ledger.
    assert not Path(settings.ledger.path).exists()


def test_an_existing_ledger_is_opened(settings: config.Settings) -> None:
    Ledger.open(settings.ledger.path).close()

    ledger = _by_name(check_all(settings))["ledger"]

    assert ledger.ok and ledger.detail.endswith("opens")


def test_wrong_phorest_password_fails_that_line_only(settings: config.Settings) -> None:
    results = check_all(_with(settings, "phorest", password=SecretStr("wrong-password")))
    text, code = render(results)

    assert code == 1
    assert _line(text, "phorest") == "phorest  FAILED  credentials refused (401)"
    others = [r for r in results if r.name != "phorest"]
    assert others and all(r.ok for r in others)


def test_google_analytics_without_the_role_fails_naming_the_role(
    settings: config.Settings,
) -> None:
    # The emulator's service account cannot see this property, as one never added to it.
    results = check_all(_with(settings, "google_analytics", property_id="987654321"))
    text, code = render(results)

    assert code == 1
    assert _line(text, "google_analytics") == (
        "google_analytics  FAILED  credentials refused: HTTP 403: the service account needs the "
        "Editor role on GA4 property 987654321"
    )
    assert all(r.ok for r in results if r.name != "google_analytics")


def test_a_deleted_service_account_and_an_unusable_key_fail_that_line(
    settings: config.Settings, sandbox: Sandbox
) -> None:
    unusable = _with(settings, "google_analytics",
                     credentials=SecretStr('{"type": "service_account"}'))  # fmt: skip
    assert _by_name(check_all(unusable))["google_analytics"].detail == (
        "google_analytics.credentials: not a usable service-account key")

    sandbox.google.delete_service_account()
    deleted = _by_name(check_all(settings))["google_analytics"]

    assert not deleted.ok
    assert deleted.detail == "credentials refused: token endpoint refused the key (deleted_client)"


def test_unreachable_mailchimp_fails(settings: config.Settings) -> None:
    port = _closed_port()
    results = _by_name(check_all(_with(settings, "mailchimp",
                                       base_url=f"http://127.0.0.1:{port}/3.0")))  # fmt: skip

    assert not results["mailchimp"].ok
    assert results["mailchimp"].detail == "unreachable"
    assert results["phorest"].ok
    assert render(list(results.values()))[1] == 1


def test_timeout_caps_a_processor_that_never_answers(settings: config.Settings) -> None:
    # A listening socket that never accepts: connect succeeds, the answer never comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        slow = _with(settings, "mailchimp", base_url=f"http://127.0.0.1:{port}/3.0")
        results = _by_name(check_all(slow, timeout_seconds=0.3))

    assert results["mailchimp"].detail == "unreachable"
    # Not a speed test: without the cap each call would wait the configured 30 s.
    assert settings.mailchimp is not None
    assert results["mailchimp"].seconds < settings.mailchimp.timeout_seconds


def test_missing_ledger_directory_fails(settings: config.Settings, tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "ledger.sqlite3"

    results = check_all(_with(settings, "ledger", path=path))
    text, code = render(results)

    assert code == 1
    assert _line(text, "ledger").startswith("ledger  FAILED  ")
    assert "no directory" in _line(text, "ledger")
    assert not path.parent.exists()


def test_unwritable_ledger_directory_fails(
    settings: config.Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    real_access = os.access
    # Root may write anywhere whatever the mode, so ask access() as an ordinary user would.
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False
                        if Path(path) == folder and mode & os.W_OK else real_access(path, mode))
    try:
        ledger = _by_name(check_all(_with(settings, "ledger", path=folder / "l.sqlite3")))["ledger"]
    finally:
        folder.chmod(0o755)

    assert not ledger.ok
    assert "not writable" in ledger.detail


def test_a_ledger_that_is_not_a_database_fails(settings: config.Settings, tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not an SQLite database, not even close" * 20)

    ledger = _by_name(check_all(_with(settings, "ledger", path=path)))["ledger"]

    assert not ledger.ok
    assert "cannot open the ledger" in ledger.detail


def test_smtp_login_is_checked(settings: config.Settings) -> None:
    with SmtpSink(username=SMTP_USER, password=SMTP_PASSWORD) as sink:
        good = _with(settings, "alerts", smtp_port=sink.port, smtp_username=SMTP_USER,
                     smtp_password=SecretStr(SMTP_PASSWORD))  # fmt: skip
        bad = _with(good, "alerts", smtp_password=SecretStr("wrong-smtp-password"))
        no_password = _with(good, "alerts", smtp_password=None)

        accepted = _by_name(check_all(good))["alerts"]
        refused = _by_name(check_all(bad))["alerts"]
        incomplete = _by_name(check_all(no_password))["alerts"]

    assert accepted.ok and accepted.detail.endswith("login accepted")
    assert not refused.ok and refused.detail.endswith("credentials refused (535)")
    assert not incomplete.ok and "smtp_password is not" in incomplete.detail
    for result in (accepted, refused, incomplete):
        assert SMTP_USER not in result.detail and SMTP_PASSWORD not in result.detail


def test_smtp_unreachable_and_starttls_missing_fail(settings: config.Settings) -> None:
    closed = _by_name(check_all(_with(settings, "alerts", smtp_port=_closed_port())))["alerts"]
    # The sandbox's sink speaks plain SMTP only.
    no_tls = _by_name(check_all(_with(settings, "alerts", smtp_security="starttls")))["alerts"]

    assert not closed.ok and "unreachable during connect (ConnectionRefusedError)" in closed.detail
    assert not no_tls.ok and no_tls.detail.endswith("server does not offer STARTTLS")


def test_unconfigured_sections_are_not_listed_and_disabled_ones_are_skipped(
    settings: config.Settings,
) -> None:
    settings = settings.model_copy(update={"mailchimp": None, "alerts": None})
    settings = _with(settings, "google_analytics", enabled=False)

    results = check_all(settings)

    assert [(r.name, r.status) for r in results] == [
        ("ledger", "OK"), ("phorest", "OK"), ("google_analytics", "SKIPPED")
    ]  # fmt: skip
    assert results[-1].detail == "disabled (enabled = false)"
    assert render(results)[1] == 0


def test_an_unexpected_exception_becomes_a_failed_line(
    settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Exploding:
        def __init__(self, _settings: object) -> None:
            pass

        def check(self) -> CheckResult:
            raise RuntimeError("a message that might hold a secret")

    real_load = connectors.load

    def load(kind: str) -> Any:
        return Exploding if kind == "mailchimp" else real_load(kind)

    monkeypatch.setattr(connectors, "load", load)

    text, code = render(check_all(settings))

    assert code == 1
    assert _line(text, "mailchimp") == "mailchimp  FAILED  unexpected error (RuntimeError)"
    assert "secret" not in text and "Traceback" not in text
    assert _line(text, "phorest").startswith("phorest  OK")


def test_a_missing_secret_is_reported_without_building_the_connector(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    path = sandbox.write_config(tmp_path / "syncd.toml")
    (tmp_path / "syncd.toml.d" / "mailchimp_api_key").unlink()
    text = path.read_text().replace('api_key_file = "', '# api_key_file = "')
    path.write_text(text)
    settings = config.load(path, require_secrets=False)

    mailchimp = _by_name(check_all(settings))["mailchimp"]

    assert not mailchimp.ok and mailchimp.detail == "missing secret api_key"


def test_output_holds_no_secret_or_address(settings: config.Settings, sandbox: Sandbox) -> None:
    wrong = "wrong-password-Zq9"
    outputs = [
        render(check_all(settings))[0],
        render(check_all(_with(settings, "phorest", password=SecretStr(wrong))))[0],
        render(check_all(_with(settings, "mailchimp", api_key=SecretStr("bad-key-us1"))))[0],
        render(check_all(_with(settings, "google_analytics", property_id="987654321")))[0],
    ]
    sandbox.google.delete_service_account()
    outputs.append(render(check_all(settings))[0])
    c = sandbox.credentials
    forbidden = [
        c.phorest_password, wrong, c.phorest_username, c.phorest_username.split("/", 1)[1],
        c.mailchimp_api_key, "bad-key-us1", c.mailchimp_webhook_secret, c.hmac_key,
        "manager@example.com", "syncd@example.com", "private_key", "BEGIN",
        sandbox.google.client_email, sandbox.google.private_key_id,
    ]  # fmt: skip
    for text in outputs:
        for value in forbidden:
            assert value not in text
        assert "@" not in text


def test_render_format_and_exit_code() -> None:
    ok = ProcessorCheck("phorest", True, "credentials accepted", 0.1234)
    failed = ProcessorCheck("mailchimp", False, "unreachable\nsecond line", 2.0)
    skipped = ProcessorCheck("google_analytics", True, "no connector in this version", 0.0, True)

    assert render([ok, skipped]) == (
        "phorest  OK  credentials accepted (123 ms)\n"
        "google_analytics  SKIPPED  no connector in this version\n",
        0,
    )
    assert render([ok, failed]) == (
        "phorest  OK  credentials accepted (123 ms)\nmailchimp  FAILED  unreachable second line\n",
        1,
    )
