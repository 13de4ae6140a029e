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


@pytest.mark.parametrize(("listed", "left_out", "hint"), [
    (60, 0, "... and 10 more (--json lists every row)"),
    (10_000, 2_500, "... and 12450 more (--json lists the first 10000)"),
])
def test_a_dry_run_says_how_many_rows_it_did_not_print_and_what_json_lists(
    capsys: pytest.CaptureFixture[str], listed: int, left_out: int, hint: str
) -> None:
    from syncd.cli import _resync as cli

    row = {"client_id": "c1", "processor": "mailchimp", "action": "subscribe", "rule": "R2",
           "why": "consent_in_phorest"}
    counts = [{**{k: row[k] for k in ("processor", "action", "rule", "why")},
               "count": listed + left_out}]
    cli._print_resync({"clients": 1, "members": 1, "unusable_addresses": 0, "dry_run": True,
                       "planned": listed + left_out, "counts": counts, "rows": [row] * listed,
                       "rows_left_out": left_out})
    assert hint in capsys.readouterr().out


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
    del data["processors"]  # tables of tables, not written below; they have defaults
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


# -- data-subject requests: bad input is one line and writes nothing --------------------------

HMAC_FOR_TESTS = "cli-test-hmac-key-0123456789abcdef"


def _outcome(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``syncd ARGV``, whether argparse or a handler ended it."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _dump(path: Path) -> list[str]:
    """Every row of the ledger, as SQL: equal dumps mean nothing was written."""
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@pytest.fixture
def seeded_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example config on a ledger holding one erasure (#1), already extended by two months."""
    from datetime import UTC, datetime

    from syncd.ledger import Ledger

    path = tmp_path / "ledger.sqlite3"
    monkeypatch.setenv("SYNCD_LEDGER__PATH", str(path))
    monkeypatch.setenv("SYNCD_IDENTITY__HMAC_KEY", HMAC_FOR_TESTS)
    due = datetime(2026, 12, 24, tzinfo=UTC)
    with Ledger.open(path) as ledger:
        request_id = ledger.add_request("erase", "subject-key", "email", due, filed_by="Ann",
                                        client_id="c1")  # fmt: skip
        ledger.add_step(request_id, "phorest", "manual", client_id="c1",
                        instructions="In Phorest, open client c1 and use Client actions › Forget")
        ledger.add_step(request_id, "mailchimp", "task")
        ledger.extend_request(request_id, 2, datetime(2027, 2, 24, tzinfo=UTC), "complex")
        ledger.add_audit("subject-key", None, "request_erase", "R3:request", "filed",
                         request_id=request_id)  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["request", "show", "99"], 1, "syncd: no request #99 (see syncd requests --all)"),
        (["request", "extend", "99", "--months", "1", "--reason", "complex"], 1,
         "syncd: no request #99 (see syncd requests --all)"),
        (["request", "confirm", "99", "--processor", "phorest", "--by", "Ann"], 1,
         "syncd: no request #99 (see syncd requests --all)"),
        (["request", "cancel", "99", "--reason", "duplicate"], 1,
         "syncd: no request #99 (see syncd requests --all)"),
        (["request", "show", "one"], 2, "syncd request show: error: argument ID: not a request "
         "id: 'one' (see syncd request show --help)"),
        (["request", "cancel", "0", "--reason", "x"], 2, "not a request id: '0'"),
        (["request", "extend", "1", "--months", "1", "--reason", "more"], 1,
         "syncd: a request can be extended by at most 2 months in all (UK GDPR Art. 12(3)); "
         "request #1 already has 2"),
        (["request", "extend", "1", "--months", "3", "--reason", "more"], 2,
         "argument --months: invalid choice: 3"),
        (["request", "extend", "1", "--months", "1", "--reason", "  "], 1,
         "syncd: --reason must say why the request needs more time"),
        (["request", "confirm", "1", "--processor", "sms_provider", "--by", "Ann"], 1,
         "syncd: request #1 has no 'sms_provider' step (its processors: mailchimp, phorest)"),
        (["request", "confirm", "1", "--processor", "mailchimp", "--by", "Ann"], 1,
         "syncd: syncd carries out the mailchimp step of request #1 itself"),
        (["audit", "--email", "not-an-email"], 1, "syncd: --email: not a valid email"),
        (["audit", "--phone", "12"], 1, "syncd: --phone: not a valid phone"),
        (["audit", "--since", "garbage"], 2,
         "argument --since: must be a date (YYYY-MM-DD) or an ISO 8601 time"),
        (["audit", "--since", "2026-13-01"], 2, "argument --since: must be a date"),
        (["audit", "--limit", "0"], 2, "argument --limit: must be a whole number >= 1"),
        (["audit", "--request", "99"], 1, "syncd: no request #99 (see syncd requests --all)"),
        (["request", "erase"], 1, "syncd: give --email, --phone or --client-id"),
        (["request", "restrict", "--note", "asked by phone"], 1,
         "syncd: give --email, --phone or --client-id"),
    ],
    ids=["show-unknown", "extend-unknown", "confirm-unknown", "cancel-unknown", "id-not-a-number",
         "id-zero", "extend-past-two-months", "extend-three-months", "extend-no-reason",
         "confirm-missing-processor", "confirm-task-step", "audit-bad-email", "audit-bad-phone",
         "audit-since-garbage", "audit-since-bad-date", "audit-limit-zero", "audit-unknown-request",
         "erase-no-identifier", "restrict-no-identifier"],
)
def test_bad_request_input_is_one_line_a_nonzero_exit_and_no_write(
    seeded_ledger: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int,
    message: str,
) -> None:  # fmt: skip
    before = _dump(seeded_ledger)

    exit_code, out, err = _outcome(["--config", str(EXAMPLE), *argv], capsys)

    assert exit_code == code
    assert err.count("\n") == 1 and message in err, err
    assert out == ""
    assert _dump(seeded_ledger) == before


@pytest.mark.parametrize("argv", [["request", "show", "1"], ["requests"], ["audit"],
                                  ["request", "cancel", "1", "--reason", "x"]],
                         ids=["show", "requests", "audit", "cancel"])  # fmt: skip
def test_reading_or_changing_requests_without_a_ledger_creates_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:  # fmt: skip
    path = tmp_path / "ledger.sqlite3"
    monkeypatch.setenv("SYNCD_LEDGER__PATH", str(path))

    code, out, err = _outcome(["--config", str(EXAMPLE), *argv], capsys)

    assert (code, out) == (1, "")
    assert err == f"syncd: no ledger at {path}: no request has been filed here yet\n"
    assert not path.exists()


# -- data-subject requests end to end against the sandbox: shapes, and no personal data ------


def _a_person(sandbox: Any) -> dict[str, Any]:
    """A live, consenting client with an address and a mobile of their own, and a member."""
    clients = sandbox.phorest.snapshot_clients()
    addresses = [c.get("email") for c in clients]
    mobiles = [c.get("mobile") for c in clients]
    return next(
        c for c in clients
        if c.get("email") and c.get("mobile") and c.get("emailMarketingConsent")
        and not c.get("archived") and not c.get("deleted") and not c.get("mergedToClientId")
        and addresses.count(c["email"]) == 1 and mobiles.count(c["mobile"]) == 1
        and (sandbox.mailchimp.member(c["email"]) or {}).get("status") == "subscribed"
    )  # fmt: skip


REQUEST_KEYS = {"id", "kind", "state", "client_id", "source", "received_at", "due_at", "days_left",
                "closed_at", "filed_by", "note", "extended_months", "extension_reason",
                "processors", "steps"}  # fmt: skip
STEP_KEYS = {"processor", "kind", "state", "client_id", "task_id", "instructions", "evidence",
             "confirmed_by", "opened_at", "closed_at"}  # fmt: skip
AUDIT_KEYS = {"actor", "at", "processor", "action", "reason", "outcome", "vendor_request_id",
              "detail", "request_id", "task_id"}  # fmt: skip


def test_requests_and_audit_show_ids_and_evidence_and_never_an_address_or_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from syncd.identity import normalise_phone
    from syncd.sandbox.app import Sandbox

    with Sandbox(clients=40, seed=5, smtp_port=None) as sandbox:
        config_path = sandbox.write_config(tmp_path / "syncd.toml")
        base = ["--config", str(config_path)]
        erased = _a_person(sandbox)
        restricted = next(c for c in sandbox.phorest.snapshot_clients()
                          if c.get("mobile") and c["clientId"] != erased["clientId"]
                          and not c.get("deleted") and not c.get("mergedToClientId")
                          and [o.get("mobile") for o in sandbox.phorest.snapshot_clients()]
                          .count(c["mobile"]) == 1)  # fmt: skip
        personal = {erased["email"], erased["mobile"], normalise_phone(erased["mobile"], "GB"),
                    restricted["mobile"], normalise_phone(restricted["mobile"], "GB"),
                    erased["firstName"], erased["lastName"]}  # fmt: skip
        if restricted.get("email"):
            personal.add(restricted["email"])
        personal = {p for p in personal if p and len(p) >= 4}
        printed: list[str] = []

        def run_ok(*argv: str) -> str:
            code, out, err = _outcome([*base, *argv], capsys)
            assert code == 0, err
            printed.extend((out, err))
            return out

        filed = json.loads(run_ok("request", "erase", "--email", erased["email"].upper(),
                                  "--by", "Ann Manager", "--json"))  # fmt: skip
        run_ok("request", "restrict", "--phone", restricted["mobile"], "--by", "Ann Manager")
        run_ok("request", "confirm", str(filed["id"]), "--processor", "phorest", "--by", "Ann")
        listed = json.loads(run_ok("requests", "--all", "--json"))
        shown = json.loads(run_ok("request", "show", str(filed["id"]), "--json"))
        trail = json.loads(run_ok("audit", "--json"))
        by_email = json.loads(run_ok("audit", "--email", erased["email"], "--json"))
        by_phone = json.loads(run_ok("audit", "--phone", erased["mobile"], "--json"))
        by_request = json.loads(run_ok("audit", "--request", str(filed["id"]), "--json"))
        for text_view in (["requests"], ["requests", "--all"], ["request", "show", "1"],
                          ["request", "show", "2"], ["audit"], ["audit", "--since", "2000-01-01"]):
            run_ok(*text_view)
        ledger_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("syncd.toml.d/ledger*"))

    assert (filed["kind"], filed["client_id"], filed["source"], filed["filed_by"]) == (
        "erase", erased["clientId"], "email", "Ann Manager")
    assert set(filed) == REQUEST_KEYS and all(set(s) == STEP_KEYS for s in filed["steps"])
    # Mailchimp and GA were carried out at once; Phorest's Forget waited for a person.
    assert filed["processors"] == {"mailchimp": "done", "google_analytics": "done",
                                   "phorest": "waiting"}  # fmt: skip
    assert shown["state"] == "done" and set(shown) == REQUEST_KEYS | {"audit"}
    assert [r["kind"] for r in listed] == ["restrict", "erase"]  # newest first
    assert all(set(r) == REQUEST_KEYS | {"deadline"} for r in listed)
    assert all(set(e) == AUDIT_KEYS for e in trail + by_email + by_phone + by_request)
    assert {e["request_id"] for e in by_request} == {filed["id"]}
    assert {"filed", "done"} <= {e["outcome"] for e in by_email}
    assert by_email and by_phone == by_email  # both identifiers lead to the same trail
    assert any(e["processor"] == "google_analytics" and "deletionRequestTime" in (e["detail"] or "")
               for e in by_request)  # fmt: skip
    everything = "\n".join(printed).lower()
    assert not [value for value in personal if value.lower() in everything]
    assert ledger_bytes and not [value for value in personal if value.encode() in ledger_bytes]
