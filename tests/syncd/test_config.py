"""Configuration: file, environment, secrets, all errors at once, the sample file."""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import get_args

import annotated_types
import pytest

from syncd import config
from syncd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "syncd.example.toml"
HMAC_KEY = "0123456789abcdef-test-hmac-key"

MINIMAL = """
[identity]
hmac_key = "0123456789abcdef-test-hmac-key"

[phorest]
business_id = "biz-1"
username = "global/manager@example.com"
password = "phorest-password"
"""


def write(tmp_path: Path, text: str, name: str = "syncd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path: Path, **kwargs: bool) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        config.load(path, **kwargs)
    return info.value.errors


def test_minimal_file_loads_with_defaults_for_everything_else(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, MINIMAL))
    assert settings.phorest.business_id == "biz-1"
    assert settings.phorest.page_size == 100
    assert settings.phorest.password.get_secret_value() == "phorest-password"
    assert settings.ledger.path == Path("/var/lib/syncd/ledger.sqlite3")
    assert settings.identity.default_phone_region == "GB"
    assert settings.daemon.port == 8787
    # Processors that are not configured are simply absent.
    assert settings.mailchimp is None
    assert settings.google_analytics is None
    assert settings.alerts is None


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, MINIMAL))
    with pytest.raises(Exception):
        settings.phorest.page_size = 5  # type: ignore[misc]


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCD_PHOREST__PAGE_SIZE", "200")
    monkeypatch.setenv("SYNCD_POLICY__RETENTION_MONTHS", "36")
    settings = config.load(write(tmp_path, MINIMAL))
    assert settings.phorest.page_size == 200
    assert settings.policy.retention_months == 36
    assert settings.phorest.business_id == "biz-1"  # the rest of the section still comes from the file


def test_config_path_falls_back_to_environment_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert config.resolve_path(None) == Path("/etc/syncd/syncd.toml")
    monkeypatch.setenv("SYNCD_CONFIG", str(tmp_path / "x.toml"))
    assert config.resolve_path(None) == tmp_path / "x.toml"
    assert config.resolve_path("given.toml") == Path("given.toml")


def test_secret_comes_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL.replace('password = "phorest-password"\n', "")
    monkeypatch.setenv("SYNCD_PHOREST__PASSWORD", "from-env")
    assert config.load(write(tmp_path, text)).phorest.password.get_secret_value() == "from-env"


def test_secret_comes_from_a_file_key(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    text = MINIMAL.replace('password = "phorest-password"', f'password_file = "{secret}"')
    assert config.load(write(tmp_path, text)).phorest.password.get_secret_value() == "from-file"


def test_secret_comes_from_systemd_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "phorest_password").write_text("from-credentials")
    (creds / "identity_hmac_key").write_text(HMAC_KEY)
    text = MINIMAL.replace('password = "phorest-password"\n', "").replace(
        f'hmac_key = "{HMAC_KEY}"\n', ""
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = config.load(write(tmp_path, text))
    assert settings.phorest.password.get_secret_value() == "from-credentials"
    assert settings.identity.hmac_key.get_secret_value() == HMAC_KEY


def test_unreadable_secret_file_is_a_one_line_error_naming_the_key(tmp_path: Path) -> None:
    text = MINIMAL.replace('password = "phorest-password"', f'password_file = "{tmp_path}/absent"')
    (line,) = errors_of(write(tmp_path, text))
    assert "phorest.password_file" in line
    assert f"{tmp_path}/absent" in line
    assert "\n" not in line


def test_secret_given_twice_is_an_error(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    text = MINIMAL + f'password_file = "{secret}"\n'
    (line,) = errors_of(write(tmp_path, text))
    assert "phorest.password" in line and "not both" in line


def test_missing_required_secrets_are_errors_when_required(tmp_path: Path) -> None:
    text = MINIMAL.replace('password = "phorest-password"\n', "").replace(
        f'hmac_key = "{HMAC_KEY}"\n', ""
    )
    lines = errors_of(write(tmp_path, text))
    assert len(lines) == 2
    assert any(
        "identity.hmac_key: missing secret" in line and "SYNCD_IDENTITY__HMAC_KEY" in line
        for line in lines
    )
    assert any(
        "phorest.password" in line and "$CREDENTIALS_DIRECTORY/phorest_password" in line
        for line in lines
    )


def test_missing_secrets_are_listed_not_raised_when_not_required(tmp_path: Path) -> None:
    text = MINIMAL.replace('password = "phorest-password"\n', "")
    settings = config.load(write(tmp_path, text), require_secrets=False)
    assert settings.phorest.password is None
    (line,) = config.missing_secrets(settings)
    assert line.startswith("phorest.password: missing secret")


def test_disabled_section_needs_no_secrets(tmp_path: Path) -> None:
    text = MINIMAL + '\n[google_analytics]\nenabled = false\nproperty_id = "42"\n'
    settings = config.load(write(tmp_path, text))
    assert settings.google_analytics is not None and not settings.google_analytics.enabled


@pytest.mark.parametrize(
    ("addition", "key_path", "fragment"),
    [
        ("[phorest]\n", None, "invalid TOML"),
        ("[ledger]\ncolour = 'blue'\n", "ledger.colour", "unknown key"),
        ("[nonsense]\nx = 1\n", "nonsense", "unknown key"),
        ("[policy]\nretention_months = 'two years'\n", "policy.retention_months", "integer"),
        ("[policy]\npurge_guard_percent = 500\n", "policy.purge_guard_percent", "(got 500)"),
        ("[daemon]\nlisten = '8787'\n", "daemon.listen", "host:port"),
        ("[daemon]\nnightly_resync_at = '25:00'\n", "daemon.nightly_resync_at", "HH:MM"),
        ("[identity]\n", None, "invalid TOML"),
        ("[logging]\nlevel = 'loud'\n", "logging.level", "'debug'"),
    ],
    ids=[
        "duplicate-table",
        "unknown-key",
        "unknown-section",
        "wrong-type",
        "out-of-range",
        "bad-listen",
        "bad-time",
        "duplicate-identity",
        "bad-level",
    ],
)
def test_each_kind_of_mistake_is_one_line_naming_file_and_key(
    tmp_path: Path, addition: str, key_path: str | None, fragment: str
) -> None:
    path = write(tmp_path, MINIMAL + addition)
    (line,) = errors_of(path)
    assert line.startswith(f"{path}: ")
    if key_path:
        assert f": {key_path}: " in line
    assert fragment in line
    assert "\n" not in line


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = MINIMAL + (
        "page_size = 500\n"
        "[mailchimp]\nlist_id = 'abc'\napi_key = 'no-dc-suffix'\nmax_connections = 50\n"
        "[daemon]\nlisten = 'nowhere'\n"
    )
    lines = errors_of(write(tmp_path, text))
    assert len(lines) == 3
    assert [re.search(r": ([a-z_.]+): ", line).group(1) for line in lines] == [
        "phorest.page_size",
        "mailchimp.max_connections",
        "daemon.listen",
    ]


def test_mailchimp_key_without_data_centre_needs_a_base_url(tmp_path: Path) -> None:
    text = MINIMAL + "[mailchimp]\nlist_id = 'abc'\napi_key = 'no-dc-suffix'\n"
    (line,) = errors_of(write(tmp_path, text))
    assert "mailchimp" in line and "-<dc> suffix" in line
    assert "no-dc-suffix" not in line  # a secret never appears in an error
    settings = config.load(write(tmp_path, text + "base_url = 'http://127.0.0.1:9/3.0'\n"))
    assert settings.mailchimp.api_root == "http://127.0.0.1:9/3.0"


def test_mailchimp_api_root_comes_from_the_key_suffix(tmp_path: Path) -> None:
    text = MINIMAL + "[mailchimp]\nlist_id = 'abc'\napi_key = 'abcdef0123-us6'\n"
    assert config.load(write(tmp_path, text)).mailchimp.api_root == (
        "https://us6.api.mailchimp.com/3.0"
    )


def test_error_from_environment_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNCD_PHOREST__PAGE_SIZE", "0")
    (line,) = errors_of(write(tmp_path, MINIMAL))
    assert line.startswith("environment SYNCD_PHOREST__PAGE_SIZE: phorest.page_size:")


def test_malformed_environment_value_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNCD_ALERTS__TO", "not json")
    (line,) = errors_of(write(tmp_path, MINIMAL))
    assert line.startswith("environment") and "\n" not in line


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    (line,) = errors_of(tmp_path / "nope.toml")
    assert line == f"{tmp_path}/nope.toml: config file not found (give --config PATH or set SYNCD_CONFIG)"


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        path = tmp_path  # a directory cannot be read as a file, even by root
    else:
        path = write(tmp_path, MINIMAL)
        path.chmod(0)
    (line,) = errors_of(path)
    assert line.startswith(f"{path}: cannot read config file")


def test_service_account_credentials_are_checked(tmp_path: Path) -> None:
    key = tmp_path / "sa.json"
    key.write_text(json.dumps({"type": "authorized_user"}))
    text = MINIMAL + f'[google_analytics]\nproperty_id = "42"\ncredentials_file = "{key}"\n'
    (line,) = errors_of(write(tmp_path, text))
    assert "google_analytics.credentials" in line and "service-account" in line


def test_alert_addresses_are_validated_without_echoing_them(tmp_path: Path) -> None:
    text = MINIMAL + '[alerts]\nto = ["not-an-address"]\nfrom = "syncd@example.com"\n'
    (line,) = errors_of(write(tmp_path, text))
    assert "alerts.to.0" in line and "not-an-address" not in line


def test_redacted_view_hides_every_secret(tmp_path: Path) -> None:
    text = MINIMAL + "[mailchimp]\nlist_id = 'abc'\napi_key = 'mc-secret-key-us6'\n"
    shown = json.dumps(config.redacted(config.load(write(tmp_path, text))))
    assert "phorest-password" not in shown and "mc-secret-key" not in shown and HMAC_KEY not in shown
    assert '"password": "***"' in shown and '"api_key": "***"' in shown


# --- the sample file --------------------------------------------------------


def test_example_file_is_what_the_schema_generates() -> None:
    assert EXAMPLE.read_text() == config.render_example(), (
        "config/syncd.example.toml is stale: run `syncd config example > config/syncd.example.toml`"
    )


def test_example_file_validates_with_secrets_supplied_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config.load(EXAMPLE, require_secrets=False)
    assert {name for name, _ in settings.sections()} == set(config.SECTION_MODELS)
    key = tmp_path / "sa.json"
    key.write_text(
        json.dumps(
            {
                "type": "service_account",
                "client_email": "sa@example.iam.gserviceaccount.com",
                "private_key": "-----BEGIN PRIVATE KEY-----\n...",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    monkeypatch.setenv("SYNCD_IDENTITY__HMAC_KEY", HMAC_KEY)
    monkeypatch.setenv("SYNCD_PHOREST__PASSWORD", "pw")
    monkeypatch.setenv("SYNCD_MAILCHIMP__API_KEY", "key-us6")
    monkeypatch.setenv("SYNCD_GOOGLE_ANALYTICS__CREDENTIALS_FILE", str(key))
    config.load(EXAMPLE)


def test_every_model_field_appears_in_the_example_with_its_default() -> None:
    text = EXAMPLE.read_text()
    parsed = tomllib.loads(text)
    section = None
    commented: dict[str, set[str]] = {}
    for line in text.splitlines():
        if m := re.match(r"^\[(\w+)\]$", line):
            section = m.group(1)
        elif section and (m := re.match(r"^# (\w+) = ", line)):
            commented.setdefault(section, set()).add(m.group(1))
    for name, model in config.SECTION_MODELS.items():
        assert name in parsed, f"section [{name}] missing from the example"
        for key, field in model.model_fields.items():
            toml_key = field.alias or key
            present = toml_key in parsed[name] or toml_key in commented.get(name, set())
            assert present, f"{name}.{toml_key} missing from the example"
            if toml_key in parsed[name] and not field.is_required():
                default = field.get_default(call_default_factory=True)
                shown = parsed[name][toml_key]
                assert str(shown) == str(default), f"{name}.{toml_key}: example {shown!r} != {default!r}"
        for key in model.secret_fields():
            assert key not in parsed[name], f"secret {name}.{key} must not be set in the example"


@pytest.mark.parametrize(
    ("section", "extra"),
    [("phorest", ""), ("mailchimp", "[mailchimp]\nlist_id = 'l'\napi_key = 'k-us1'\n")],
    ids=["phorest", "mailchimp"],
)
def test_a_non_http_base_url_is_one_error(tmp_path: Path, section: str, extra: str) -> None:
    text = MINIMAL + extra + "base_url = 'ftp://example.com'\n"
    (line,) = errors_of(write(tmp_path, text))
    assert line.endswith(f": {section}.base_url: must be an http:// or https:// URL")


def test_phorest_base_url_cannot_be_empty(tmp_path: Path) -> None:
    (line,) = errors_of(write(tmp_path, MINIMAL + "base_url = ''\n"))
    assert ": phorest.base_url: " in line


# --- bounds, strict types and safe reads --------------------------------------


def _scalar_type(annotation: object) -> type | None:
    """bool, int or float for a scalar setting (Optional or not), else None."""
    for candidate in (annotation, *get_args(annotation)):
        if candidate in (bool, int, float):
            return candidate  # type: ignore[return-value]
    return None


def _fields_of(kind: tuple[type, ...]) -> list[tuple[str, str]]:
    return [
        (section, field.alias or key)
        for section, model in config.SECTION_MODELS.items()
        for key, field in model.model_fields.items()
        if _scalar_type(field.annotation) in kind
    ]


NUMERIC_FIELDS = _fields_of((int, float))
BOOL_FIELDS = _fields_of((bool,))


def _bounds(section: str, key: str) -> tuple[float | None, float | None, bool]:
    """(lowest, highest, whether the lowest itself is allowed) from the field's metadata."""
    field = config.SECTION_MODELS[section].model_fields[key]
    low = high = None
    low_inclusive = True
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low, low_inclusive = item.gt, False
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Lt):
            high = item.lt
    return low, high, low_inclusive


def _absurd_values(section: str, key: str) -> list[object]:
    low, _high, low_inclusive = _bounds(section, key)
    values: list[object] = [math.inf, -math.inf, math.nan, 1e300, -1e300, True]
    if low is not None and (low > 0 or (low == 0 and not low_inclusive)):
        values.append(1e-300)  # a field that refuses 0 refuses "practically 0" too
    return values


def _example_with(section: str, key: str, value: object, tmp_path: Path) -> Path:
    data = tomllib.loads(EXAMPLE.read_text())
    data[section][key] = value
    return write(tmp_path, config.render_toml(data))


def test_the_generated_field_lists_are_not_empty() -> None:
    assert ("phorest", "poll_interval_seconds") in NUMERIC_FIELDS
    assert ("google_analytics", "enforce_retention") in BOOL_FIELDS


@pytest.mark.parametrize(("section", "key"), NUMERIC_FIELDS, ids=[".".join(f) for f in NUMERIC_FIELDS])
def test_every_numeric_setting_has_a_finite_lower_and_upper_bound(section: str, key: str) -> None:
    low, high, low_inclusive = _bounds(section, key)
    assert low is not None and high is not None, f"{section}.{key} needs ge= and le="
    assert math.isfinite(low) and math.isfinite(high)
    # A field that refuses 0 needs a real minimum (ge=), not gt=0, which lets 1e-300 in.
    assert low_inclusive, f"{section}.{key}: use ge=<smallest sensible value>, not gt="


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [(s, k, v) for s, k in NUMERIC_FIELDS for v in _absurd_values(s, k)],
    ids=[f"{s}.{k}={v!r}" for s, k in NUMERIC_FIELDS for v in _absurd_values(s, k)],
)
def test_non_finite_absurd_and_boolean_numbers_are_rejected_with_the_key_path(
    tmp_path: Path, section: str, key: str, value: object
) -> None:
    (line,) = errors_of(_example_with(section, key, value, tmp_path), require_secrets=False)
    assert f": {section}.{key}: " in line
    assert "\n" not in line


@pytest.mark.parametrize(("section", "key"), NUMERIC_FIELDS, ids=[".".join(f) for f in NUMERIC_FIELDS])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e999", "true"])
def test_non_finite_numbers_from_the_environment_are_rejected(
    monkeypatch: pytest.MonkeyPatch, section: str, key: str, value: str
) -> None:
    variable = f"SYNCD_{section}__{key}".upper()
    monkeypatch.setenv(variable, value)
    (line,) = errors_of(EXAMPLE, require_secrets=False)
    assert line.startswith(f"environment {variable}: {section}.{key}: ")


def test_numbers_from_the_environment_still_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCD_PHOREST__MAX_REQUESTS_PER_SECOND", "2.5")
    monkeypatch.setenv("SYNCD_PHOREST__POLL_INTERVAL_SECONDS", "30")
    settings = config.load(EXAMPLE, require_secrets=False)
    assert settings.phorest.max_requests_per_second == 2.5
    assert settings.phorest.poll_interval_seconds == 30


def test_a_number_written_as_a_toml_string_is_rejected(tmp_path: Path) -> None:
    (line,) = errors_of(_example_with("phorest", "page_size", "50", tmp_path), require_secrets=False)
    assert ": phorest.page_size: " in line


@pytest.mark.parametrize(("section", "key"), BOOL_FIELDS, ids=[".".join(f) for f in BOOL_FIELDS])
@pytest.mark.parametrize("value", [0, 1, "true", "false", "yes", 1.0], ids=repr)
def test_booleans_in_the_file_must_be_toml_booleans(
    tmp_path: Path, section: str, key: str, value: object
) -> None:
    (line,) = errors_of(_example_with(section, key, value, tmp_path), require_secrets=False)
    assert f": {section}.{key}: must be true or false" in line


@pytest.mark.parametrize(("section", "key"), BOOL_FIELDS, ids=[".".join(f) for f in BOOL_FIELDS])
@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("false", False), ("1", True), ("0", False), ("TRUE", True), ("False", False)],
)
def test_booleans_from_the_environment_accept_true_false_1_0(
    monkeypatch: pytest.MonkeyPatch, section: str, key: str, value: str, expected: bool
) -> None:
    monkeypatch.setenv(f"SYNCD_{section}__{key}".upper(), value)
    settings = config.load(EXAMPLE, require_secrets=False)
    assert getattr(getattr(settings, section), key) is expected


@pytest.mark.parametrize("value", ["yes", "on", "2", ""])
def test_other_environment_booleans_are_rejected_saying_what_is_accepted(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("SYNCD_GOOGLE_ANALYTICS__ENFORCE_RETENTION", value)
    (line,) = errors_of(EXAMPLE, require_secrets=False)
    assert line.startswith(
        "environment SYNCD_GOOGLE_ANALYTICS__ENFORCE_RETENTION: google_analytics.enforce_retention: "
    )
    assert "true, false, 1 or 0" in line


@pytest.mark.parametrize("value", ["", "   "], ids=["empty", "blank"])
def test_an_empty_ledger_path_is_rejected(tmp_path: Path, value: str) -> None:
    (line,) = errors_of(write(tmp_path, MINIMAL + f'[ledger]\npath = "{value}"\n'))
    assert ": ledger.path: " in line and "empty" in line


def test_an_empty_ledger_path_from_the_environment_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNCD_LEDGER__PATH", "")
    (line,) = errors_of(write(tmp_path, MINIMAL))
    assert line.startswith("environment SYNCD_LEDGER__PATH: ledger.path: ")


def test_a_directory_as_the_ledger_path_is_rejected(tmp_path: Path) -> None:
    (line,) = errors_of(write(tmp_path, MINIMAL + f'[ledger]\npath = "{tmp_path}"\n'))
    assert ": ledger.path: " in line and "directory" in line


@pytest.mark.parametrize(
    "variable", ["SYNCD_NOSECTION__X", "SYNCD_PHOREST_PAGE_SIZE", "SYNCD_NOSECTION"]
)
def test_an_unknown_environment_section_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "1")
    (line,) = errors_of(write(tmp_path, MINIMAL))
    assert line.startswith(f"environment {variable}: ")
    assert "unknown section" in line


def test_an_unknown_environment_key_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNCD_PHOREST__NO_SUCH_KEY", "1")
    (line,) = errors_of(write(tmp_path, MINIMAL))
    assert line == (
        "environment SYNCD_PHOREST__NO_SUCH_KEY: phorest.no_such_key: unknown key"
    )


def test_unknown_environment_sections_are_reported_with_the_other_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNCD_NOSECTION__X", "1")
    lines = errors_of(write(tmp_path, MINIMAL + "page_size = 0\n"))
    assert len(lines) == 2
    assert any(": phorest.page_size: " in line for line in lines)


def test_a_secret_file_that_is_a_directory_is_one_error_naming_the_key(tmp_path: Path) -> None:
    text = MINIMAL.replace('password = "phorest-password"', f'password_file = "{tmp_path}"')
    (line,) = errors_of(write(tmp_path, text))
    assert ": phorest.password_file: " in line and "not a regular file" in line


def test_a_secret_file_that_is_a_device_is_one_error_naming_the_key(tmp_path: Path) -> None:
    # /dev/null, not /dev/zero: an unfixed reader would fill memory (the CLI test covers it).
    text = MINIMAL.replace('password = "phorest-password"', 'password_file = "/dev/null"')
    (line,) = errors_of(write(tmp_path, text))
    assert ": phorest.password_file: " in line and "not a regular file" in line


def test_an_oversized_secret_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as fh:
        fh.truncate(config.FILE_LIMIT_BYTES + 1)  # sparse: nothing is really written
    text = MINIMAL.replace('password = "phorest-password"', f'password_file = "{big}"')
    (line,) = errors_of(write(tmp_path, text))
    assert ": phorest.password_file: " in line and "larger than" in line


def test_an_oversized_config_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "#" * config.FILE_LIMIT_BYTES + "\n")
    (line,) = errors_of(path)
    assert line.startswith(f"{path}: cannot read config file: ") and "larger than" in line


def test_a_device_as_the_config_file_is_refused() -> None:
    (line,) = errors_of(Path("/dev/null"))
    assert line == "/dev/null: cannot read config file: a character device, not a regular file"


def test_deeply_nested_toml_is_a_one_line_error(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "x = " + "[" * 2000 + "]" * 2000 + "\n")
    (line,) = errors_of(path)
    assert line.startswith(f"{path}: invalid TOML: ") and "nested" in line


def test_deeply_nested_json_in_the_environment_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNCD_ALERTS__TO", "[" * 100_000 + "]" * 100_000)
    (line,) = errors_of(write(tmp_path, MINIMAL))
    assert line.startswith("environment") and "nested" in line


def test_the_example_shows_a_path_for_every_secret_file_key() -> None:
    text = config.render_example()
    assert '"None"' not in text
    for section, model in config.SECTION_MODELS.items():
        for key in model.secret_fields():
            assert f'# {key}_file = "/etc/syncd/{section}_{key}"\n' in text


# -- [[manual_processors]] ---------------------------------------------------------------


def manual(name: str, instructions: str = "Shred the paper forms", *extra: str) -> str:
    return ("\n[[manual_processors]]\n"
            f"name = {json.dumps(name)}\ninstructions = {json.dumps(instructions)}\n"
            + "".join(f"{line}\n" for line in extra))  # fmt: skip


def test_manual_processors_load_in_order_with_their_confirmers(tmp_path: Path) -> None:
    text = MINIMAL + manual("paper_forms", "Shred the forms", 'confirmers = [" Ann Manager "]') \
        + manual("card_index2")
    settings = config.load(write(tmp_path, text))
    assert [p.name for p in settings.manual_processors] == ["paper_forms", "card_index2"]
    paper = settings.manual_processor("paper_forms")
    assert paper is not None and paper.confirmers == ["Ann Manager"]
    assert paper.instructions == "Shred the forms"
    assert settings.manual_processor("card_index2").confirmers == []  # type: ignore[union-attr]
    assert settings.manual_processor("mailchimp") is None
    assert config.load(write(tmp_path, MINIMAL, "none.toml")).manual_processors == ()


@pytest.mark.parametrize(
    ("entries", "expected"),
    [(manual("Paper Forms"), ["manual_processors.0.name: must be 1-40 lower-case"]),
     (manual("2forms"), ["manual_processors.0.name: must be 1-40 lower-case"]),
     (manual("x" * 41), ["manual_processors.0.name: must be 1-40 lower-case"]),
     (manual("google_analytics"),
      ["manual_processors.0.name: 'google_analytics' is a processor syncd reaches through its API"]),
     (manual("paper") + manual("cards") + manual("paper"),
      ["manual_processors: manual processor names must be unique: paper"]),
     (manual("paper", ""), ["manual_processors.0.instructions: String should have at least 1"]),
     (manual("paper", "x" * 501), ["manual_processors.0.instructions: String should have at most"]),
     (manual("paper", "Shred", 'confirmers = ["Ann", " "]'),
      ["manual_processors.0.confirmers: every confirmer must be a non-empty name"]),
     (manual("paper", "Shred", 'confirmers = "Ann"'),
      ["manual_processors.0.confirmers: Input should be a valid list"]),
     (manual("paper", "Shred", "colour = 'red'"), ["manual_processors.0.colour: unknown key"]),
     ("\n[[manual_processors]]\nname = 'paper'\n",
      ["manual_processors.0.instructions: required key is missing"])],
    ids=["capitals", "digit-first", "too-long", "api-name", "duplicate", "empty-instructions",
         "long-instructions", "blank-confirmer", "confirmers-not-a-list", "unknown-key",
         "no-instructions"],
)
def test_each_manual_processor_mistake_is_one_line_naming_the_entry(
    tmp_path: Path, entries: str, expected: list[str]
) -> None:
    path = write(tmp_path, MINIMAL + entries)
    lines = errors_of(path)
    assert len(lines) == len(expected), lines
    for line, fragment in zip(lines, expected):
        assert line.startswith(f"{path}: {fragment}"), line


def test_manual_processor_mistakes_are_reported_with_every_other_error(tmp_path: Path) -> None:
    text = (MINIMAL + "[policy]\nrequest_warning_days = 0\n" + manual("paper") + manual("paper")
            + manual("Cards", "", "confirmers = ['']"))  # fmt: skip
    lines = errors_of(write(tmp_path, text))
    assert [re.search(r": ([a-z_.0-9]+): ", line).group(1) for line in lines] == [  # type: ignore[union-attr]
        "policy.request_warning_days",
        "manual_processors.2.name",
        "manual_processors.2.instructions",
        "manual_processors.2.confirmers",
    ]


def test_duplicate_manual_processor_names_are_reported_with_other_sections_errors(
    tmp_path: Path,
) -> None:
    text = MINIMAL + "[policy]\nrequest_warning_days = 0\n" + manual("paper") + manual("paper")
    lines = errors_of(write(tmp_path, text))
    assert [re.search(r": ([a-z_.0-9]+): ", line).group(1) for line in lines] == [  # type: ignore[union-attr]
        "policy.request_warning_days", "manual_processors"]


def test_the_example_documents_manual_processors_commented_out(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    assert "# [[manual_processors]]" in text
    assert "manual_processors" not in tomllib.loads(text)  # none configured by default
    # Uncommented, the documented entry is a valid one.
    block = text[text.index("# [[manual_processors]]"):]
    entry = "\n".join(line.removeprefix("# ") for line in block.splitlines()
                      if line.startswith("# [[") or re.match(r"^# \w+ = ", line))  # fmt: skip
    settings = config.load(write(tmp_path, MINIMAL + "\n" + entry + "\n"))
    assert [p.name for p in settings.manual_processors] == ["paper_forms"]
    assert settings.manual_processors[0].confirmers == ["Practice Manager"]


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("request_warning_days", 0, "policy.request_warning_days"),
    ("request_warning_days", 61, "policy.request_warning_days"),
])  # fmt: skip
def test_request_warning_days_is_bounded(
    tmp_path: Path, key: str, value: int, fragment: str
) -> None:
    (line,) = errors_of(write(tmp_path, MINIMAL + f"[policy]\n{key} = {value}\n"))
    assert f": {fragment}: " in line and f"(got {value})" in line


def test_request_warning_days_defaults_to_a_week(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, MINIMAL)).policy.request_warning_days == 7


def test_processor_records_default_per_processor_and_a_table_overrides_key_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = MINIMAL + '[processors.mailchimp]\nlocation = "EU (Frankfurt)"\n'
    monkeypatch.setenv("SYNCD_PROCESSORS__GOOGLE_ANALYTICS__RETENTION", "2 months")
    settings = config.load(write(tmp_path, text), require_secrets=False)

    phorest = settings.processor_record("phorest")
    mailchimp = settings.processor_record("mailchimp")
    analytics = settings.processor_record("google_analytics")
    assert phorest is not None and phorest.location == "AWS Dublin, Ireland (EU)"
    assert mailchimp is not None and mailchimp.location == "EU (Frankfurt)"
    defaults = config.DEFAULT_PROCESSOR_RECORDS
    assert mailchimp.lawful_basis == defaults["mailchimp"]["lawful_basis"]  # kept
    assert analytics is not None
    assert (analytics.location, analytics.retention) == ("USA", "2 months")
    assert settings.processor_record("paper_forms") is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[processors.paper_forms]\nlocation = "the office"\nretention = "a year"\n',
         "processors.paper_forms.lawful_basis: required key is missing"),
        ('[processors.Paper]\nlocation = "x"\n', "processors: processor names are"),
        ('[processors.mailchimp]\nlocation = ""\n', "processors.mailchimp.location: String should"),
    ],
    ids=["new-processor-needs-every-key", "bad-name", "empty-location"],
)
def test_a_bad_processor_record_is_one_error_with_its_key_path(
    tmp_path: Path, table: str, message: str
) -> None:
    (line,) = errors_of(write(tmp_path, MINIMAL + table), require_secrets=False)
    assert message in line
