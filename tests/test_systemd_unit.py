"""``systemd/syncd.service`` agrees with the daemon and the configuration schema.

The unit is read with a small parser of its own: configparser cannot hold the
repeated keys a unit file uses (``LoadCredential=``, ``SystemCallFilter=``).
Where ``systemd-analyze`` is installed, the unit is also checked by systemd
itself: its security exposure score and ``verify``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from syncd import config, engine

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "syncd.service"
CREDENTIALS_DIR = PurePosixPath("/etc/syncd/credentials")
MAX_EXPOSURE = 1.5
HARDENING_MARK = "# --- Hardening"
# A commented-out setting: "#" directly followed by Key=, e.g.
# "#LoadCredential=alerts_webhook_url:/etc/..." (prose comments have a space).
COMMENTED_DIRECTIVE = re.compile(r"^#([A-Z][A-Za-z]+)=(.*)$")

# What the hardening block must contain (value None: present, any value).
HARDENING = {
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "DevicePolicy": "closed",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallArchitectures": "native",
    "MemoryDenyWriteExecute": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "PrivateUsers": "yes",
    "RemoveIPC": "yes",
    "KeyringMode": "private",
}


@dataclass(frozen=True)
class Line:
    """One ``Key=Value`` line of the unit, or a commented-out one."""

    number: int
    section: str
    key: str
    value: str
    commented: bool


@dataclass(frozen=True)
class Unit:
    lines: list[str]
    directives: list[Line]

    def values(self, section: str, key: str) -> list[str]:
        """Every active value of ``key`` in ``section``, in file order."""
        return [d.value for d in self.directives
                if d.section == section and d.key == key and not d.commented]  # fmt: skip

    def value(self, section: str, key: str) -> str:
        """The one active value of ``key`` (the test fails if it is absent or repeated)."""
        found = self.values(section, key)
        assert len(found) == 1, f"[{section}] {key}= appears {len(found)} times, expected once"
        return found[0]


def parse(text: str) -> Unit:
    """Section headers, ``Key=Value`` lines and ``#``/``;`` comments; nothing more."""
    lines = text.splitlines()
    directives, section = [], ""
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        assert not line.endswith("\\"), f"line {number}: continuation lines are not used here"
        if not line:
            continue
        if line.startswith(("#", ";")):
            match = COMMENTED_DIRECTIVE.match(line)
            if match:
                directives.append(Line(number, section, match[1], match[2].strip(), True))
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"line {number}: bad section header {line!r}"
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: neither a comment, a section nor Key=Value: {line!r}"
        assert section, f"line {number}: {key}= before any section"
        directives.append(Line(number, section, key.strip(), value.strip(), False))
    return Unit(lines, directives)


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse(UNIT.read_text(encoding="utf-8"))


def _credential_names() -> dict[str, bool]:
    """Every secret of the schema as its credential name, and whether the daemon needs it.

    A secret is needed when it is a required secret of a section the daemon
    always has: one that cannot be left out of the file, or a processor the
    daemon insists on (``engine.PROCESSORS``).
    """
    # Required sections and those with a default_factory have a default other than None.
    always = {name for name, field in config.Settings.model_fields.items()
              if field.default is not None}  # fmt: skip
    always |= set(engine.PROCESSORS)
    names = {}
    for name, model in config.SECTION_MODELS.items():
        required = set(model.required_secret_fields())
        for key in model.secret_fields():
            names[f"{model.section}_{key}"] = name in always and key in required
    return names


def test_the_parser_keeps_repeated_and_commented_keys() -> None:
    text = "[Service]\n# Why= it is so\nKey=1\nKey=2\n#Key=3\n; note\n\n[Install]\nOther=\n"
    unit = parse(text)
    assert unit.values("Service", "Key") == ["1", "2"]
    assert [(d.key, d.value) for d in unit.directives if d.commented] == [("Key", "3")]
    assert unit.value("Install", "Other") == ""


def test_the_schema_has_secrets_to_check() -> None:
    names = _credential_names()
    assert "phorest_password" in names and names["phorest_password"]
    assert "alerts_webhook_url" in names and not names["alerts_webhook_url"]


def test_sections_are_the_usual_three(unit: Unit) -> None:
    assert [line[1:-1] for line in unit.lines if line.startswith("[")] == [
        "Unit", "Service", "Install"
    ]


def test_unit_waits_for_the_network_and_stops_a_crash_loop(unit: Unit) -> None:
    assert "network-online.target" in unit.value("Unit", "Wants").split()
    assert "network-online.target" in unit.value("Unit", "After").split()
    assert unit.value("Unit", "StartLimitIntervalSec")
    assert int(unit.value("Unit", "StartLimitBurst")) >= 1
    assert unit.value("Install", "WantedBy") == "multi-user.target"


def test_service_matches_the_daemon(unit: Unit) -> None:
    assert unit.value("Service", "Type") == "notify"
    assert unit.value("Service", "NotifyAccess") == "main"
    assert unit.value("Service", "Restart") == "on-failure"
    assert int(unit.value("Service", "WatchdogSec")) > 0
    # syncd exits within 10 s of SIGTERM; systemd must not kill it first.
    assert int(unit.value("Service", "TimeoutStopSec")) > 10
    assert unit.value("Service", "ExecReload") == "kill -HUP $MAINPID"


def test_exec_start_runs_the_daemon(unit: Unit) -> None:
    argv = shlex.split(unit.value("Service", "ExecStart"))
    assert PurePosixPath(argv[0]).is_absolute() and PurePosixPath(argv[0]).name == "syncd"
    assert argv[-1] == "run"
    assert argv[argv.index("--config") + 1] == "/etc/syncd/syncd.toml"


def test_state_directory_holds_the_default_ledger(unit: Unit) -> None:
    assert unit.value("Service", "DynamicUser") == "yes" or unit.values("Service", "User")
    state = unit.value("Service", "StateDirectory")
    assert state == "syncd"
    assert unit.value("Service", "StateDirectoryMode") == "0700"
    assert unit.value("Service", "UMask") == "0077"
    ledger = PurePosixPath(config.LedgerSettings.model_fields["path"].default)
    assert ledger.parent == PurePosixPath("/var/lib") / state


def test_every_secret_has_a_credential_line(unit: Unit) -> None:
    lines = [d for d in unit.directives if d.section == "Service" and d.key == "LoadCredential"]
    by_name: dict[str, Line] = {}
    for line in lines:
        name, sep, source = line.value.partition(":")
        assert sep, f"line {line.number}: LoadCredential= without a source path"
        assert name not in by_name, f"line {line.number}: {name} loaded twice"
        assert source == str(CREDENTIALS_DIR / name), f"line {line.number}: source {source}"
        by_name[name] = line
    expected = _credential_names()
    assert sorted(by_name) == sorted(expected), "LoadCredential lines differ from the secrets"
    for name, needed in expected.items():
        # systemd refuses to start a unit whose LoadCredential= file is missing,
        # so only secrets the daemon cannot run without are loaded unconditionally.
        state = "loaded" if needed else "commented out"
        assert by_name[name].commented is not needed, f"{name} should be {state}"


def test_every_hardening_line_says_why(unit: Unit) -> None:
    start = next(i for i, line in enumerate(unit.lines) if line.startswith(HARDENING_MARK))
    block = []
    for index in range(start + 1, len(unit.lines)):
        line = unit.lines[index].strip()
        if line.startswith("["):
            break
        if line and not line.startswith(("#", ";")):
            above = unit.lines[index - 1].strip()
            assert above.startswith("#"), f"line {index + 1} ({line}) has no comment above it"
            block.append(line.partition("=")[0])
    missing = [key for key in HARDENING if key not in block]
    assert not missing, f"not in the hardening block: {missing}"
    assert unit.values("Service", "SystemCallFilter") == [
        "@system-service", "~@privileged @resources"
    ]


def test_hardening_values(unit: Unit) -> None:
    for key, value in HARDENING.items():
        assert unit.value("Service", key) == value, key


def test_no_comment_at_the_end_of_a_line(unit: Unit) -> None:
    # systemd has no inline comments: "Key=value # why" makes "# why" part of the value.
    for line in unit.directives:
        assert "#" not in line.value, f"line {line.number}: '#' inside a value"


needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_analyze
def test_security_exposure_is_low() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager",
         f"--threshold={round(MAX_EXPOSURE * 10)}", str(UNIT)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


@needs_analyze
def test_systemd_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify insists that ExecStart exists; only that line is changed.
    text = UNIT.read_text(encoding="utf-8")
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, count=1, flags=re.M)
    copy = tmp_path / UNIT.name
    copy.write_text(text, encoding="utf-8")
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    about_us = [line for line in (result.stdout + result.stderr).splitlines()
                if UNIT.name in line]  # fmt: skip
    assert not about_us, "\n".join(about_us)
