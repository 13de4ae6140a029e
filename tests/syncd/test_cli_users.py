"""``syncd user add|list|disable|enable|reset|role``: one-line errors, and the password nowhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from syncd.cli import main
from syncd.ledger import Ledger
from tests.syncd.test_cli import SYNCD, VALID

PASSWORD = "first-password-1"
NEW_PASSWORD = "second-password-2"
CONFIG = """
[ledger]
path = "{ledger}"
""" + VALID


class Cli:
    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp_path = tmp_path
        self.capsys = capsys
        self.ledger_path = tmp_path / "ledger.sqlite3"
        self.config = tmp_path / "syncd.toml"
        self.config.write_text(CONFIG.format(ledger=self.ledger_path))
        self.config.chmod(0o600)
        self.outputs: list[str] = []

    def password_file(self, text: str, name: str = "password") -> str:
        path = self.tmp_path / name
        path.write_text(text)
        return str(path)

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = main(["--config", str(self.config), "user", *argv])
        out, err = self.capsys.readouterr()
        self.outputs += [out, err]
        return code, out, err

    def accounts(self) -> dict[str, Any]:
        with Ledger.open(self.ledger_path) as ledger:
            return {m.name: m for m in ledger.all_staff()}

    def audit(self) -> list[tuple[str, str | None, str | None]]:
        with Ledger.open(self.ledger_path) as ledger:
            return [(e.action, e.actor, e.detail) for e in ledger.find_audit(limit=1000)]


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("USER", "operator")
    monkeypatch.setenv("LOGNAME", "operator")
    return Cli(tmp_path, capsys)


def _one_line_error(code: int, out: str, err: str, *, text: str) -> None:
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("syncd: ") and text in err, err
    assert "Traceback" not in err


def test_add_from_a_password_file_and_list(cli: Cli) -> None:
    code, out, err = cli("add", "ann", "--role", "manager", "--password-file",
                         cli.password_file(f"{PASSWORD}\nsecond line ignored\n"))
    assert (code, out, err) == (0, "account ann added (manager)\n", "")
    code, out, _ = cli("add", "bob", "--role", "reception", "--password-file",
                       cli.password_file(PASSWORD))
    assert code == 0
    code, out, _ = cli("list", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["name"], r["role"], r["active"], r["last_login_at"]) for r in rows] == [
        ("ann", "manager", True, None), ("bob", "reception", True, None)]
    assert set(rows[0]) == {"name", "role", "active", "locked_until", "last_login_at",
                            "created_at"}
    code, out, _ = cli("list")
    assert code == 0 and "ann" in out and "bob" in out and "reception" in out
    accounts = cli.accounts()
    assert accounts["ann"].password_hash.startswith("$argon2id$")
    assert cli.audit()[0] == ("staff_add", "operator", "account ann; role manager")


def test_list_with_no_accounts_says_how_to_add_the_first(cli: Cli) -> None:
    code, out, _ = cli("list")
    assert code == 0 and "syncd user add NAME --role manager" in out
    assert json.loads(cli("list", "--json")[1]) == []


def test_disable_enable_reset_and_role(cli: Cli) -> None:
    pw = cli.password_file(PASSWORD)
    cli("add", "ann", "--role", "manager", "--password-file", pw)
    cli("add", "bob", "--role", "reception", "--password-file", pw)
    assert cli("disable", "bob")[:2] == (0, "account bob disabled\n")
    assert not cli.accounts()["bob"].active
    assert cli("enable", "bob")[:2] == (0, "account bob enabled\n")
    assert cli.accounts()["bob"].active
    before = cli.accounts()["bob"].password_hash
    assert cli("reset", "bob", "--password-file",
               cli.password_file(NEW_PASSWORD, "new"))[:2] == (0, "account bob: password reset\n")
    assert cli.accounts()["bob"].password_hash != before
    assert cli("role", "bob", "manager")[:2] == (0, "account bob is now manager\n")
    assert cli.accounts()["bob"].role == "manager"
    assert [a for a, _, _ in cli.audit()] == ["staff_add", "staff_add", "staff_disable",
                                              "staff_enable", "staff_reset_password",
                                              "staff_role"]
    assert {actor for _, actor, _ in cli.audit()} == {"operator"}


def test_the_last_manager_is_kept(cli: Cli) -> None:
    cli("add", "ann", "--role", "manager", "--password-file", cli.password_file(PASSWORD))
    _one_line_error(*cli("disable", "ann"), text="last active manager")
    _one_line_error(*cli("role", "ann", "reception"), text="last active manager")
    assert cli.accounts()["ann"].active and cli.accounts()["ann"].role == "manager"


@pytest.mark.parametrize(("argv", "text"), [
    (["add", "9ann", "--role", "reception"], "login name"),
    (["add", "ann b", "--role", "reception"], "login name"),
    (["add", "ann\n", "--role", "reception", "--password-file", "{good}"], "login name"),
    (["add", "ann", "--role", "reception", "--password-file", "{short}"], "at least 10"),
    (["add", "ann", "--role", "reception", "--password-file", "{empty}"], "at least 10"),
    (["add", "ann", "--role", "reception", "--password-file", "{missing}"], "No such file"),
    (["add", "ann", "--role", "reception", "--password-file", "{binary}"], "not UTF-8"),
    (["reset", "ghost", "--password-file", "{good}"], "no account called 'ghost'"),
    (["disable", "ghost"], "no account called 'ghost'"),
    (["enable", "ghost"], "no account called 'ghost'"),
    (["role", "ghost", "manager"], "no account called 'ghost'"),
])
def test_refusals_are_one_line_and_change_nothing(cli: Cli, argv: list[str], text: str) -> None:
    files = {"{short}": cli.password_file("too-short\n", "short"),
             "{empty}": cli.password_file("", "empty"),
             "{missing}": str(cli.tmp_path / "missing"),
             "{good}": cli.password_file(PASSWORD, "good")}
    binary = cli.tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" + b"\x00" * 20)
    files["{binary}"] = str(binary)
    _one_line_error(*cli(*[files.get(a, a) for a in argv]), text=text)
    assert cli.accounts() == {}


def test_a_taken_name_is_refused(cli: Cli) -> None:
    pw = cli.password_file(PASSWORD)
    cli("add", "ann", "--role", "manager", "--password-file", pw)
    _one_line_error(*cli("add", "ANN", "--role", "reception", "--password-file", pw),
                    text="already an account")
    assert list(cli.accounts()) == ["ann"]


def test_prompting_asks_twice_and_refuses_a_mismatch(cli: Cli,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([PASSWORD, PASSWORD, PASSWORD, "something-else-1"])
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert cli("add", "ann", "--role", "manager")[0] == 0
    _one_line_error(*cli("add", "bob", "--role", "manager"), text="the passwords differ")
    assert list(cli.accounts()) == ["ann"]


def test_the_password_is_in_no_output_and_not_in_the_ledger(cli: Cli) -> None:
    cli("add", "ann", "--role", "manager", "--password-file", cli.password_file(PASSWORD))
    cli("add", "bob", "--role", "reception", "--password-file", cli.password_file(PASSWORD))
    cli("reset", "bob", "--password-file", cli.password_file(NEW_PASSWORD, "new"))
    cli("list")
    cli("list", "--json")
    cli("add", "cat", "--role", "reception", "--password-file", cli.password_file("short-pw"))
    text = "".join(cli.outputs)
    assert PASSWORD not in text and NEW_PASSWORD not in text and "short-pw" not in text
    data = b"".join(p.read_bytes() for p in cli.tmp_path.glob("ledger.sqlite3*"))
    assert PASSWORD.encode() not in data and NEW_PASSWORD.encode() not in data


def _run(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SYNCD), "--config", str(config), "user", *argv],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                          check=False)


def test_without_a_terminal_there_is_no_prompt_but_a_one_line_error(cli: Cli) -> None:
    for argv in (["add", "ann", "--role", "manager"], ["reset", "ann"]):
        if argv[0] == "reset":
            cli("add", "ann", "--role", "manager", "--password-file", cli.password_file(PASSWORD))
        result = _run(cli.config, *argv)
        assert result.returncode == 1, result.stderr
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and "not a terminal" in result.stderr
        assert "--password-file" in result.stderr and "Traceback" not in result.stderr
    assert list(cli.accounts()) == ["ann"]


def test_the_installed_command_refuses_a_bad_name_in_one_line(cli: Cli) -> None:
    result = _run(cli.config, "add", "-bad", "--role", "manager", "--password-file",
                  cli.password_file(PASSWORD))
    assert result.returncode in (1, 2)  # "-bad" may be read as an option: argparse's usage error
    assert "Traceback" not in result.stderr and PASSWORD not in result.stderr
    result = _run(cli.config, "add", "a.b/c", "--role", "manager", "--password-file",
                  cli.password_file(PASSWORD))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "login name" in result.stderr and "Traceback" not in result.stderr
