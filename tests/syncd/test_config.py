"""Configuration: file, environment, secrets, all errors at once, the sample file."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

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


def test_the_example_shows_a_path_for_every_secret_file_key() -> None:
    text = config.render_example()
    assert '"None"' not in text
    for section, model in config.SECTION_MODELS.items():
        for key in model.secret_fields():
            assert f'# {key}_file = "/etc/syncd/{section}_{key}"\n' in text


# --- files that are not regular files, or too big, or nested too deeply -----


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
