"""The command line: exit codes, one-line errors, no tracebacks, no secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from syncd import __version__
from syncd.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "syncd.example.toml"
SYNCD = Path(sys.executable).with_name("syncd")

VALID = """
[identity]
hmac_key = "0123456789abcdef-test-hmac-key"
[phorest]
business_id = "biz-1"
username = "global/manager@example.com"
password = "phorest-password-value"
[mailchimp]
list_id = "abc"
api_key = "mailchimp-key-value-us6"
"""


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SYNCD), *argv], capture_output=True, text=True, timeout=60)


def test_installed_console_script_validates_the_example_config() -> None:
    result = run("config", "validate", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
    assert "Traceback" not in result.stderr


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"syncd {__version__}"


def test_help_lists_the_config_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "config" in capsys.readouterr().out


def test_no_command_shows_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: syncd" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["frobnicate"], ["config", "validate", "--bogus"], ["--log-level", "loud", "config"]],
    ids=["unknown-command", "unknown-option", "bad-choice"],
)
def test_bad_arguments_are_one_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("syncd")


def test_validate_reports_three_mistakes_as_three_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        VALID + "page_size = 9999\n[daemon]\nlisten = 'x'\n[policy]\nretention_month = 24\n"
    )
    assert main(["config", "validate", "--config", str(path)]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert {line.split(": ")[1] for line in lines} == {
        "mailchimp.page_size",
        "daemon.listen",
        "policy.retention_month",
    }
    assert out.out == ""


def test_validate_warns_about_missing_secrets_unless_required(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(VALID.replace('password = "phorest-password-value"\n', ""))
    assert main(["config", "validate", "--config", str(path)]) == 0
    assert "warning: phorest.password: missing secret" in capsys.readouterr().err
    assert main(["config", "validate", "--require-secrets", "--config", str(path)]) == 2
    assert "phorest.password: missing secret" in capsys.readouterr().err


def test_config_path_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(VALID)
    monkeypatch.setenv("SYNCD_CONFIG", str(path))
    assert main(["config", "validate"]) == 0
    assert str(path) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "config file not found"), ("[[[", "invalid TOML"), ("x = 1\n", "x: unknown key")],
    ids=["missing-file", "invalid-toml", "unknown-top-level-key"],
)
def test_unusable_files_give_one_line_without_traceback(
    tmp_path: Path, content: str | None, fragment: str
) -> None:
    path = tmp_path / "c.toml"
    if content is not None:
        path.write_text(content)
    for command in (["config", "validate"], ["config", "show"]):
        result = run("--config", str(path), *command)
        assert result.returncode == 2
        assert fragment in result.stderr
        assert "Traceback" not in result.stderr
        if content != "x = 1\n":  # that file has a second error: [phorest] is missing
            assert result.stderr.count("\n") == 1


def test_show_redacts_secrets_and_prints_loadable_toml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(VALID)
    assert main(["config", "show", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    for secret in ("phorest-password-value", "mailchimp-key-value", "test-hmac-key"):
        assert secret not in out
    shown = tomllib.loads(out)
    assert shown["phorest"]["password"] == "***"
    assert shown["phorest"]["page_size"] == 100
    assert shown["mailchimp"]["api_key"] == "***"


def test_show_json_redacts_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(VALID)
    assert main(["config", "show", "--json", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert '"password": "***"' in out and "phorest-password-value" not in out


def test_example_command_prints_the_sample_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "example"]) == 0
    assert capsys.readouterr().out == EXAMPLE.read_text()


def test_resync_progress_shows_a_bar_with_totals_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rich.console import Console

    from syncd.cli import _resync as cli

    screen = Console(record=True, width=100, force_terminal=True)
    monkeypatch.setattr("rich.console.Console", lambda **_: screen)
    with cli._ResyncProgress(enabled=True) as update:
        assert update is not None
        update("phorest", 200, None)
        update("phorest", 300, 300)
        update("applied", 0, 40)
        update("applied", 30, 40)
    text = screen.export_text()
    assert "Reading Phorest clients" in text and "300/300" in text
    assert "Applying actions" in text and "30/40" in text


def test_resync_progress_is_silent_off_a_terminal() -> None:
    from syncd.cli import _resync as cli

    with cli._ResyncProgress(enabled=False) as update:
        assert update is None


def test_alerts_lists_open_problems_and_resolves_the_handled_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from syncd.ledger import Ledger

    path = tmp_path / "ledger.sqlite3"
    monkeypatch.setenv("SYNCD_LEDGER__PATH", str(path))
    base = ["--config", str(EXAMPLE), "alerts"]
    assert main(base) == 1
    assert "no ledger at" in capsys.readouterr().err
    with Ledger.open(path) as ledger:
        ledger.raise_alert("task_failed:mailchimp", "task_failed", "mailchimp: 2 task(s) failed")
        ledger.raise_alert("job_failed:poll", "job_failed", "the poll job keeps failing")
    assert main(base) == 0
    table = capsys.readouterr().out
    assert "task_failed:mailchimp" in table and "job_failed:poll" in table
    assert main([*base, "--resolve", "task_failed:mailchimp"]) == 0
    assert capsys.readouterr().out == "resolved 1 alert(s)\n"
    assert main([*base, "--json"]) == 0
    assert [a["problem"] for a in json.loads(capsys.readouterr().out)] == ["job_failed:poll"]
    assert main([*base, "--resolve", "task_failed:mailchimp"]) == 1
    assert capsys.readouterr().err == (
        "syncd: no open alert for task_failed:mailchimp (see syncd alerts)\n")
    assert main([*base, "--resolve", "job_failed:poll"]) == 0
    capsys.readouterr()
    assert main(base) == 0 and capsys.readouterr().out == "No open alerts.\n"


def test_resync_without_the_mailchimp_section_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = EXAMPLE.read_text()
    for section in ("[mailchimp]", "[google_analytics]"):
        start = text.index(section)
        text = text[:start] + text[text.index("\n[", start + 1) + 1:]
    path = tmp_path / "syncd.toml"
    path.write_text(text)
    for name in ("IDENTITY__HMAC_KEY", "PHOREST__PASSWORD", "ALERTS__SMTP_PASSWORD"):
        monkeypatch.setenv(f"SYNCD_{name}", "a-secret-long-enough-for-a-key")
    assert main(["--config", str(path), "resync", "--dry-run"]) == 2
    assert capsys.readouterr().err == "resync needs the [mailchimp] section\n"


# -- resync: taking over a killed run's work, and owning up to work not done ----------


def _opted_out_in_mailchimp_only(sandbox: Any) -> list[dict[str, Any]]:
    """Consenting live clients whose Mailchimp member is unsubscribed or cleaned."""
    return [c for c in sandbox.phorest.snapshot_clients()
            if c.get("email") and c.get("emailMarketingConsent") and not c.get("archived")
            and not c.get("deleted")
            and (sandbox.mailchimp.member(c["email"]) or {}).get("status")
            in ("unsubscribed", "cleaned")]


def _plant_withdrawal(config_path: Path, client_id: str, **when: Any) -> None:
    """Queue the withdrawal a resync would plan for this client, as an earlier run left it."""
    from syncd import config, engine
    from syncd.ledger import Ledger

    settings = config.load(config_path)
    subject_key = engine.subject_keys(settings).client_id(client_id)
    with Ledger.open(settings.ledger.path) as ledger:
        task_id = ledger.add_task(
            subject_key, "phorest", "withdraw_consent", "R2:unsubscribed_in_mailchimp",
            payload={"client_id": client_id}, dedupe_key=f"phorest:withdraw_consent:{subject_key}",
            next_attempt_at=when.get("next_attempt_at"))
        if when.get("in_flight"):
            ledger.claim(task_id)


def test_resync_carries_out_the_withdrawal_a_killed_resync_left_in_flight(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from syncd.sandbox.app import Sandbox

    with Sandbox(clients=80, seed=3, smtp_port=None) as sandbox:
        config_path = sandbox.write_config(tmp_path / "syncd.toml")
        stuck = _opted_out_in_mailchimp_only(sandbox)[0]
        _plant_withdrawal(config_path, stuck["clientId"], in_flight=True)

        assert main(["--config", str(config_path), "resync"]) == 0
        assert "0 failed" in capsys.readouterr().out
        assert sandbox.phorest.client(stuck["clientId"])["emailMarketingConsent"] is False
        assert _opted_out_in_mailchimp_only(sandbox) == []
        assert main(["--config", str(config_path), "resync", "--dry-run", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["planned"] == 0


def test_resync_exits_1_in_one_line_when_a_planned_action_was_not_carried_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import UTC, datetime, timedelta

    from syncd.sandbox.app import Sandbox

    with Sandbox(clients=80, seed=3, smtp_port=None) as sandbox:
        config_path = sandbox.write_config(tmp_path / "syncd.toml")
        waiting = _opted_out_in_mailchimp_only(sandbox)[0]
        # An earlier run's withdrawal, waiting an hour to retry: the plan lands on it.
        _plant_withdrawal(config_path, waiting["clientId"],
                          next_attempt_at=datetime.now(UTC) + timedelta(hours=1))

        assert main(["--config", str(config_path), "resync"]) == 1
        out, err = capsys.readouterr()
        assert "0 failed; 1 not carried out" in " ".join(out.split())  # rich wraps at 80
        explanation = [line for line in err.splitlines() if "not carried out" in line]
        assert len(explanation) == 1 and explanation[0].startswith("syncd: 1 of ")
        assert sandbox.phorest.client(waiting["clientId"])["emailMarketingConsent"] is True
        assert [c["clientId"] for c in _opted_out_in_mailchimp_only(sandbox)] == [
            waiting["clientId"]]

# A hang guard, not a speed check: the unfixed reader blocked (FIFO) or filled memory (/dev/zero).
HANG_GUARD_SECONDS = 20


def run_guarded(*argv: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([str(SYNCD), *argv], capture_output=True, text=True,
                              timeout=HANG_GUARD_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"syncd {' '.join(argv)} hung")


@pytest.mark.parametrize(
    ("kind", "described"),
    [("fifo", "a FIFO"), ("dev-zero", "a character device"), ("directory", "a directory")],
    ids=["fifo", "dev-zero", "directory"],
)
def test_validate_refuses_a_secret_file_that_is_not_a_regular_file_without_hanging(
    tmp_path: Path, kind: str, described: str
) -> None:
    secret = {"fifo": tmp_path / "password.fifo", "dev-zero": Path("/dev/zero"),
              "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(secret)
    path = tmp_path / "c.toml"
    path.write_text(VALID.replace('password = "phorest-password-value"',
                                  f'password_file = "{secret}"'))
    result = run_guarded("config", "validate", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr == (
        f"{path}: phorest.password_file: cannot read {secret}: {described}, not a regular file\n")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_validate_refuses_a_config_path_that_is_not_a_regular_file_without_hanging(
    tmp_path: Path, kind: str
) -> None:
    if kind == "fifo":
        path = tmp_path / "syncd.fifo"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    result = run_guarded("config", "validate", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"{path}: cannot read config file: ")
    assert "not a regular file" in result.stderr


def test_deeply_nested_toml_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(VALID + "x = " + "[" * 2000 + "]" * 2000 + "\n")
    result = run_guarded("config", "validate", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "nested" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("section", "setting"),
    [("alerts", "remind_every_hours = inf"), ("phorest", "max_requests_per_second = 1e-300"),
     ("policy", "purge_guard_percent = nan"), ("policy", "request_deadline_months = true"),
     ("google_analytics", "enforce_retention = 0"), ("ledger", 'path = ""')],
    ids=["inf", "tiny", "nan", "bool-as-number", "number-as-bool", "empty-path"],
)
def test_validate_rejects_values_that_would_crash_at_run_time(
    tmp_path: Path, section: str, setting: str
) -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    key = setting.split(" = ")[0]
    del data[section][key]
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        + (f"{setting}\n" if name == section else "")
        for name, values in data.items()
    )
    path = tmp_path / "c.toml"
    path.write_text(text)
    result = run_guarded("config", "validate", "--config", str(path))
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"{path}: {section}.{key}: ")
    assert result.stderr.count("\n") == 1


def test_validate_rejects_an_unknown_environment_section(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(VALID)
    result = subprocess.run(
        [str(SYNCD), "config", "validate", "--config", str(path)], capture_output=True,
        text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")},
             "SYNCD_NOSECTION__X": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("environment SYNCD_NOSECTION__X: unknown section")
