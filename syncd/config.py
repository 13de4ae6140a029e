"""Configuration: one schema drives validation, the sample file and ``config show``.

The pipeline is TOML file → ``SYNCD_<SECTION>__<KEY>`` environment overrides →
secrets (``<key>``, ``<key>_file`` or ``$CREDENTIALS_DIRECTORY/<section>_<key>``)
→ validation that collects *every* error with its key path → frozen typed
objects, one per section, handed to the modules that need them.

The models below are the single source of truth: each field has a description
and a default (or an example for keys that have none), and
:func:`render_example` turns them into ``config/syncd.example.toml``.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

from syncd.errors import ConfigError, IdentifierError
from syncd.identity import normalise_email

DEFAULT_CONFIG_PATH = Path("/etc/syncd/syncd.toml")
CONFIG_PATH_ENV = "SYNCD_CONFIG"
ENV_PREFIX = "SYNCD_"
CREDENTIALS_DIRECTORY_ENV = "CREDENTIALS_DIRECTORY"
MIN_HMAC_KEY_BYTES = 16
REDACTED = "***"
# The config file and each secret file are read whole, so they are bounded:
# a service-account key is about 2 KiB, the sample config about 6 KiB.
FILE_LIMIT_BYTES = 1024 * 1024
ENV_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}

# Whether a missing required secret is an error. `syncd config validate` run
# from an admin's shell cannot see systemd's $CREDENTIALS_DIRECTORY, so it
# reports missing secrets as warnings unless asked to be strict; the daemon
# always loads strictly.
_require_secrets: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "syncd_require_secrets", default=True
)

_HH_MM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


def _secret(description: str, *, required: bool = False) -> Any:
    """A secret field: never printed, and never required to be in the file."""
    return Field(
        default=None,
        description=description,
        json_schema_extra={"secret": True, "required_secret": required},
    )


def _secret_file(section: str, key: str) -> Any:
    return Field(
        default=None,
        description=f"Path to a file holding {key} (trailing newline ignored).",
        examples=[f"/etc/syncd/{section}_{key}"],
    )


class _EnvText(str):
    """A value that came from an environment variable, where everything is text.

    Only such values may be parsed into numbers and booleans: in the TOML file
    a number or a boolean must be written as one.
    """


def _scalar_type(annotation: Any) -> type | None:
    """``bool``, ``int`` or ``float`` for a scalar field (optional or not), else None."""
    for candidate in (annotation, *get_args(annotation)):
        if candidate is bool or candidate is int or candidate is float:
            return candidate  # type: ignore[no-any-return]
    return None


class Section(BaseModel):
    """Base of every ``[section]``: unknown keys are errors, values are frozen.

    Numbers must be finite and booleans must be booleans: TOML ``0``, ``1`` or
    ``"true"`` is not a boolean, and ``true`` is not a number. From environment
    variables, where every value is text, numbers are parsed and booleans may
    be ``true``, ``false``, ``1`` or ``0``.

    Secret fields (marked with ``json_schema_extra={"secret": True}``) are
    resolved after validation: the value itself (from the file or the
    environment), else ``<key>_file``, else ``$CREDENTIALS_DIRECTORY/<section>_<key>``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    section: ClassVar[str] = ""

    @field_validator("*", mode="before")
    @classmethod
    def _no_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode would take 0 or "yes" as a boolean and true as a
        # number; only text from the environment is parsed.
        kind = _scalar_type(cls.model_fields[info.field_name].annotation)  # type: ignore[index]
        from_env = isinstance(value, _EnvText)
        if kind is bool and not isinstance(value, bool):
            word = value.strip().lower() if from_env else None
            if word in ENV_BOOLEANS:
                return ENV_BOOLEANS[word]
            raise PydanticCustomError(
                "strict_bool",
                "must be true or false (in the environment: true, false, 1 or 0)"
                if from_env
                else "must be true or false, without quotes",
            )
        if kind in (int, float) and (
            isinstance(value, bool) or (isinstance(value, str) and not from_env)
        ):
            raise PydanticCustomError(
                "strict_number",
                "must be {what}, written without quotes (true and false are not numbers)",
                {"what": "an integer" if kind is int else "a number"},
            )
        return str(value) if from_env else value

    @classmethod
    def secret_fields(cls) -> list[str]:
        """Names of this section's secret fields."""
        return [
            name
            for name, field in cls.model_fields.items()
            if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("secret")
        ]

    @classmethod
    def required_secret_fields(cls) -> list[str]:
        """Names of the secret fields this section cannot run without."""
        return [
            name
            for name in cls.secret_fields()
            if cls.model_fields[name].json_schema_extra.get("required_secret")  # type: ignore[union-attr]
        ]

    def is_active(self) -> bool:
        """Whether the section is switched on (sections with ``enabled = false`` are not)."""
        return bool(getattr(self, "enabled", True))

    @model_validator(mode="before")
    @classmethod
    def _resolve_secrets(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in cls.secret_fields():
            file_key = f"{name}_file"
            given = data.get(name) not in (None, "")
            path = data.get(file_key)
            if given and path:
                raise PydanticCustomError(
                    "secret_twice", "give either {key} or {key}_file, not both", {"key": name}
                )
            if given:
                continue
            data.pop(name, None)
            if path:
                data[name] = _read_secret_file(Path(str(path)), file_key)
                continue
            creds = os.environ.get(CREDENTIALS_DIRECTORY_ENV)
            candidate = Path(creds) / f"{cls.section}_{name}" if creds else None
            if candidate is not None and candidate.is_file():
                data[name] = _read_secret_file(candidate, name)
        return data

    @model_validator(mode="after")
    def _require_secrets(self) -> Section:
        if not _require_secrets.get() or not self.is_active():
            return self
        missing = [n for n in self.required_secret_fields() if getattr(self, n) is None]
        if missing:
            raise PydanticCustomError(
                "missing_secret",
                "missing secret {key}: {hint}",
                {"key": missing[0], "hint": secret_hint(self.section, missing[0])},
            )
        return self


def secret_hint(section: str, key: str) -> str:
    """Where a secret may be supplied, as one phrase for error messages."""
    return (
        f"set {ENV_PREFIX}{section.upper()}__{key.upper()}, {key}_file, "
        f"or $CREDENTIALS_DIRECTORY/{section}_{key}"
    )


class _NotAFile(Exception):
    """A path that is not a regular file of at most :data:`FILE_LIMIT_BYTES`."""


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file of at most :data:`FILE_LIMIT_BYTES`.

    The type and size are checked on the opened file before reading, so a FIFO
    or a device can neither block nor feed an endless stream, and a file that
    grows meanwhile is still cut off at the limit.

    Raises:
        OSError: the path cannot be opened.
        _NotAFile: not a regular file, or larger than the limit (the message says which).
    """
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    too_big = _NotAFile(f"larger than {FILE_LIMIT_BYTES // 1024 // 1024} MiB")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "a special file")
            raise _NotAFile(f"{kind}, not a regular file")
        if info.st_size > FILE_LIMIT_BYTES:
            raise too_big
        data = bytearray()
        while len(data) <= FILE_LIMIT_BYTES:
            chunk = os.read(fd, FILE_LIMIT_BYTES + 1 - len(data))
            if not chunk:
                return bytes(data)
            data += chunk
        raise too_big  # it grew after fstat, or its size was not known (/proc)
    finally:
        os.close(fd)


def _read_secret_file(path: Path, key: str) -> str:
    try:
        value = _read_regular_file(path).decode("utf-8").rstrip("\r\n")
    except OSError as exc:
        raise PydanticCustomError(
            "secret_file",
            "cannot read {path}: {reason}",
            {"key": key, "path": str(path), "reason": exc.strerror or type(exc).__name__},
        ) from None
    except _NotAFile as exc:
        raise PydanticCustomError(
            "secret_file",
            "cannot read {path}: {reason}",
            {"key": key, "path": str(path), "reason": str(exc)},
        ) from None
    except UnicodeDecodeError:
        raise PydanticCustomError(
            "secret_file", "{path} is not UTF-8 text", {"key": key, "path": str(path)}
        ) from None
    if not value:
        raise PydanticCustomError(
            "secret_file", "{path} is empty", {"key": key, "path": str(path)}
        )
    return value


def _check_http_url(value: str) -> str:
    if not re.match(r"^https?://[^\s/]+", value):
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


# An http(s) URL, kept as a string without the trailing slash.
HttpUrl = Annotated[str, AfterValidator(_check_http_url)]
# The same, or empty for "not set".
OptionalHttpUrl = Annotated[str, AfterValidator(lambda v: _check_http_url(v) if v else v)]


class LedgerSettings(Section):
    """Where syncd keeps its durable state."""

    section: ClassVar[str] = "ledger"
    path: Path = Field(
        default=Path("/var/lib/syncd/ledger.sqlite3"),
        description="SQLite ledger file (tasks, suppression list, audit trail). Created 0600.",
    )

    @field_validator("path", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must be the path of the ledger file, not empty")
        return value

    @field_validator("path")
    @classmethod
    def _not_a_directory(cls, value: Path) -> Path:
        if value.is_dir():
            raise ValueError("is a directory; give the path of the ledger file inside it")
        return value


class IdentitySettings(Section):
    """How people are keyed without storing who they are."""

    section: ClassVar[str] = "identity"
    hmac_key: SecretStr | None = _secret(
        "Keys the subject HMAC (at least 16 bytes). Losing it orphans the suppression list.",
        required=True,
    )
    hmac_key_file: Path | None = _secret_file("identity", "hmac_key")
    default_phone_region: str = Field(
        default="GB", description="Region assumed for phone numbers written without +country code."
    )

    @field_validator("hmac_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < MIN_HMAC_KEY_BYTES:
            raise ValueError(f"must be at least {MIN_HMAC_KEY_BYTES} bytes")
        return value

    @field_validator("default_phone_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        import phonenumbers

        region = value.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError("not a known ISO 3166 region code (e.g. GB, IE, US)")
        return region


class PhorestSettings(Section):
    """The controller's system of record."""

    section: ClassVar[str] = "phorest"
    base_url: HttpUrl = Field(
        default="https://api-gateway-eu.phorest.com/third-party-api-server",
        description="API root up to and including /third-party-api-server (EU, US or a sandbox).",
    )
    business_id: str = Field(
        min_length=1, description="Phorest business id.", examples=["your-business-id"]
    )
    username: str = Field(
        description="API user, global/<email> as issued by Phorest support.",
        examples=["global/manager@example.com"],
    )
    password: SecretStr | None = _secret("API password issued by Phorest.", required=True)
    password_file: Path | None = _secret_file("phorest", "password")
    page_size: int = Field(
        default=100, ge=1, le=200, description="Clients per page when scanning (Phorest max 200)."
    )
    max_requests_per_second: float = Field(
        default=20, ge=0.1, le=100,
        description=(
            "Client-side limit on all Phorest calls. Default 20: a fifth of Phorest's"
            " 100 requests/s, leaving room for the business's other integrations;"
            " a 429 pauses every thread."
        ),
    )
    poll_interval_seconds: int = Field(
        default=60, ge=5, le=86_400, description="How often the daemon asks Phorest for changes."
    )
    timeout_seconds: float = Field(default=30, ge=1, le=300, description="Per-request timeout.")

    @field_validator("username")
    @classmethod
    def _global_user(cls, value: str) -> str:
        if not value.startswith("global/") or len(value) <= len("global/"):
            raise ValueError("must look like global/<email>")
        return value


class MailchimpSettings(Section):
    """The marketing audience (a processor)."""

    section: ClassVar[str] = "mailchimp"
    api_key: SecretStr | None = _secret(
        "Marketing API key; its -usN suffix names the data centre.", required=True
    )
    api_key_file: Path | None = _secret_file("mailchimp", "api_key")
    list_id: str = Field(min_length=1, description="Audience (list) id.", examples=["a1b2c3d4e5"])
    base_url: OptionalHttpUrl = Field(
        default="",
        description="API root. Empty: https://<dc>.api.mailchimp.com from the key; set for a sandbox.",
    )
    max_connections: int = Field(
        default=4, ge=1, le=10, description="Simultaneous connections (Mailchimp allows 10)."
    )
    webhook_secret: SecretStr | None = _secret(
        "Last path segment of the audience webhook URL; unset disables the webhook route."
    )
    webhook_secret_file: Path | None = _secret_file("mailchimp", "webhook_secret")
    timeout_seconds: float = Field(default=30, ge=1, le=300, description="Per-request timeout.")

    @model_validator(mode="after")
    def _data_centre(self) -> MailchimpSettings:
        if not self.base_url and self.api_key is not None and self.data_centre is None:
            raise PydanticCustomError(
                "mailchimp_dc",
                "api_key has no -<dc> suffix (e.g. -us6) and base_url is empty",
            )
        return self

    @property
    def data_centre(self) -> str | None:
        """The data centre named by the key's suffix, e.g. ``us6``."""
        if self.api_key is None:
            return None
        match = re.search(r"-([a-z]{2}\d+)$", self.api_key.get_secret_value())
        return match.group(1) if match else None

    @property
    def api_root(self) -> str:
        """The URL the SDK talks to, ending in ``/3.0``."""
        if self.base_url:
            return self.base_url.rstrip("/")
        return f"https://{self.data_centre}.api.mailchimp.com/3.0"


RetentionDuration = Literal[
    "TWO_MONTHS", "FOURTEEN_MONTHS", "TWENTY_SIX_MONTHS", "THIRTY_EIGHT_MONTHS", "FIFTY_MONTHS"
]


class GoogleAnalyticsSettings(Section):
    """The website's GA4 property (a processor)."""

    section: ClassVar[str] = "google_analytics"
    enabled: bool = Field(default=True, description="Set false to keep the section but skip GA.")
    property_id: str = Field(
        pattern=r"^\d+$", description="Numeric GA4 property id.", examples=["123456789"]
    )
    credentials: SecretStr | None = _secret(
        "Service-account key JSON (usually given as credentials_file). The account needs the "
        "Editor role on the property.",
        required=True,
    )
    credentials_file: Path | None = _secret_file("google_analytics", "credentials")
    admin_base_url: HttpUrl = Field(
        default="https://analyticsadmin.googleapis.com",
        description="Admin API root; set to point at a sandbox.",
    )
    identity: Literal["user_id", "client_id", "email"] = Field(
        default="user_id",
        description="What an erasure sends GA: user_id or client_id (the Phorest client id, "
        "which the website must set as that GA field), or email (sent normalised). "
        "user_id | client_id | email.",
    )
    max_event_retention: RetentionDuration = Field(
        default="FOURTEEN_MONTHS", description="Longest event-data retention the policy allows."
    )
    writes_per_minute: float = Field(
        default=150, ge=1, le=6000,
        description="Admin API writes (user deletions) per minute; Google allows 180 a minute "
        "per user, so keep the default below it unless Google raised your quota.",
    )
    enforce_retention: bool = Field(
        default=False, description="Correct a longer retention setting instead of only reporting it."
    )
    timeout_seconds: float = Field(default=30, ge=1, le=300, description="Per-request timeout.")

    @field_validator("credentials")
    @classmethod
    def _service_account(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        try:
            info = json.loads(value.get_secret_value())
        except ValueError:
            raise ValueError("is not JSON (expected a service-account key file)") from None
        if not isinstance(info, dict) or info.get("type") != "service_account":
            raise ValueError('is not a service-account key (need "type": "service_account")')
        absent = [k for k in ("client_email", "private_key", "token_uri") if not info.get(k)]
        if absent:
            raise ValueError(f"service-account key lacks {', '.join(absent)}")
        return value


class PolicySettings(Section):
    """The privacy policy's numbers."""

    section: ClassVar[str] = "policy"
    retention_months: int = Field(
        default=24, ge=1, le=240, description="Purge clients with no visit for this many months."
    )
    appointment_lookahead_days: int = Field(
        default=180, ge=1, le=730,
        description="A booked appointment within this many days from today keeps a client "
        "from the retention purge.",
    )
    purge_guard_percent: float = Field(
        default=5,
        ge=0,
        le=100,
        description="Stop and alert if one purge would erase more than this share of clients.",
    )
    request_deadline_months: int = Field(
        default=1, ge=1, le=3, description="Statutory deadline for a data-subject request."
    )
    request_warning_days: int = Field(
        default=7, ge=1, le=60,
        description="Alert the manager this many days before a request's deadline.",
    )


# Processors syncd talks to through an API; a manual processor may not take their names.
API_PROCESSORS = ("phorest", "mailchimp", "google_analytics")
_PROCESSOR_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class ManualProcessorSettings(Section):
    """A processor with no API (e.g. paper forms): every erasure opens a step a person confirms."""

    section: ClassVar[str] = "manual_processors"
    name: str = Field(
        description="Short name, used as --processor NAME (lower case, digits, _).",
        examples=["paper_forms"],
    )
    instructions: str = Field(
        min_length=1, max_length=500,
        description="What staff must do for an erasure; the client id and request id are added.",
        examples=["Shred the client's paper consultation forms in the locked cabinet (policy 7.2)"],
    )
    confirmers: list[str] = Field(
        default_factory=list,
        description="Who may confirm the step (--by NAME); empty: anyone who can run syncd.",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _PROCESSOR_NAME.match(value):
            raise ValueError("must be 1-40 lower-case letters, digits or _, starting with a letter")
        if value in API_PROCESSORS:
            raise ValueError(f"{value!r} is a processor syncd reaches through its API")
        return value

    @field_validator("confirmers")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        if any(not isinstance(name, str) or not name.strip() for name in value):
            raise ValueError("every confirmer must be a non-empty name")
        return [name.strip() for name in value]


class ProcessorRecordSettings(Section):
    """Where one processor keeps personal data, on what lawful basis and for how long."""

    section: ClassVar[str] = "processors"
    location: str = Field(
        min_length=1, max_length=200,
        description="Where the processor stores the data (provider, region, country).",
        examples=["AWS Dublin, Ireland (EU)"],
    )
    lawful_basis: str = Field(
        min_length=1, max_length=300,
        description="The lawful basis for the processing (UK GDPR Art. 6).",
        examples=["Contract (UK GDPR Art. 6(1)(b)): the client's treatment records"],
    )
    retention: str = Field(
        min_length=1, max_length=300,
        description="How long the processor keeps the data.",
        examples=["24 months after the client's last visit"],
    )


# The records of processing behind `syncd request export` (R8; policy 2.3, 5.4, 5.5). A
# [processors.<name>] table overrides these key by key.
DEFAULT_PROCESSOR_RECORDS: Mapping[str, Mapping[str, str]] = {
    "phorest": {
        "location": "AWS Dublin, Ireland (EU)",
        "lawful_basis": "Contract (UK GDPR Art. 6(1)(b)): the client record needed to book and "
                        "provide treatments; the controller's own system",
        "retention": "Until 24 months after the client's last visit, then erased "
                     "(policy 5.5, [policy] retention_months)",
    },
    "mailchimp": {
        "location": "USA",
        "lawful_basis": "Consent (UK GDPR Art. 6(1)(a)): the client's email-marketing opt-in "
                        "recorded in Phorest (policy 5.4)",
        "retention": "While the client consents; erased on request or when the Phorest record "
                     "is purged (policy 5.5)",
    },
    "google_analytics": {
        "location": "USA",
        "lawful_basis": "Consent (UK GDPR Art. 6(1)(a)): analytics cookies accepted on the "
                        "website (policy 2.3)",
        "retention": "14 months of event data (policy 5.5, [google_analytics] "
                     "max_event_retention); deleted on request",
    },
}


def _check_address(value: str) -> str:
    try:
        return normalise_email(value)
    except IdentifierError:
        raise ValueError("is not a valid email address") from None


EmailAddress = Annotated[str, AfterValidator(_check_address)]


class AlertsSettings(Section):
    """How the manager is told when something needs a person."""

    section: ClassVar[str] = "alerts"
    to: list[EmailAddress] = Field(
        min_length=1, description="Who receives alerts.", examples=[["manager@example.com"]]
    )
    from_: EmailAddress = Field(
        alias="from", description="Sender address of alerts.", examples=["syncd@example.com"]
    )
    smtp_host: str = Field(default="localhost", description="SMTP server.")
    smtp_port: int = Field(default=587, ge=1, le=65535, description="SMTP port.")
    smtp_security: Literal["starttls", "ssl", "none"] = Field(
        default="starttls", description="starttls | ssl | none."
    )
    smtp_username: str = Field(default="", description="SMTP login; empty: no authentication.")
    smtp_password: SecretStr | None = _secret("SMTP password.")
    smtp_password_file: Path | None = _secret_file("alerts", "smtp_password")
    webhook_url: SecretStr | None = _secret("Optional JSON webhook (Slack/Teams/ntfy).")
    webhook_url_file: Path | None = _secret_file("alerts", "webhook_url")
    remind_every_hours: float = Field(
        default=24, ge=1, le=720, description="Repeat an unresolved alert this often, no more."
    )
    # The floor is low so tests can see a processor go down in seconds.
    processor_down_minutes: float = Field(
        default=30,
        ge=0.05,
        le=10_080,
        description="Alert when a processor has been unreachable this long.",
    )

    model_config = ConfigDict(populate_by_name=True)


class _Listener:
    """The ``host`` and ``port`` of a section's ``listen = "host:port"`` field."""

    @property
    def host(self) -> str:
        """The listen host, without IPv6 brackets."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The listen port."""
        return int(self.listen.rpartition(":")[2])


class DaemonSettings(Section, _Listener):
    """The long-running service."""

    section: ClassVar[str] = "daemon"
    listen: str = Field(
        default="127.0.0.1:8787", description="host:port for /healthz, /metrics and webhooks."
    )
    nightly_resync_at: str = Field(default="02:30", description="Local time (HH:MM) of the full resync.")
    retention_purge_at: str = Field(
        default="03:30", description="Local time (HH:MM) of the retention purge."
    )
    alert_check_seconds: int = Field(
        default=60, ge=1, le=3600,
        description="How often alert conditions are checked and due alerts are sent.",
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return _listen_address(value, "127.0.0.1:8787")

    @field_validator("nightly_resync_at", "retention_purge_at")
    @classmethod
    def _clock_time(cls, value: str) -> str:
        if not _HH_MM.match(value):
            raise ValueError("must be a 24-hour time HH:MM, e.g. 02:30")
        return value


def _listen_address(value: str, example: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port, e.g. {example}")
    return value


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class ConsoleSettings(Section, _Listener):
    """The manager's web console, served by ``syncd run`` on a listener of its own."""

    section: ClassVar[str] = "console"
    enabled: bool = Field(default=True, description="Serve the console (false: webhooks only).")
    listen: str = Field(
        default="127.0.0.1:8788",
        description="host:port of the console; keep it off the webhook listener's proxy.",
    )
    secure_cookies: Literal["auto", "on", "off"] = Field(
        default="auto",
        description='auto | on | off: mark the session cookie Secure (sent over HTTPS only). '
        '"auto": on unless the listener is loopback.',
    )
    idle_minutes: int = Field(default=15, ge=1, le=480,
                              description="Log a user out after this long without a request.")
    lockout_after: int = Field(default=5, ge=1, le=100,
                               description="Wrong passwords in a row that lock an account.")
    lockout_minutes: int = Field(default=15, ge=1, le=1440,
                                 description="How long a locked account stays locked (a "
                                 "manager's reset lifts it sooner).")
    address_failures: int = Field(
        default=20, ge=1, le=10_000,
        description="Failed logins from one address, in lockout_minutes, before that address "
        "is refused for a while.",
    )
    export_dir: str = Field(
        default="", description='Where console exports are written (0700); "": an "exports" '
        "directory next to the ledger.",
    )
    export_keep_minutes: int = Field(
        default=60, ge=1, le=10_080,
        description="A console export file is deleted this long after it was written.",
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return _listen_address(value, "127.0.0.1:8788")


    @property
    def cookies_secure(self) -> bool:
        """Whether the session cookie is Secure (``auto``: unless the listener is loopback)."""
        if self.secure_cookies == "auto":
            return self.host not in LOOPBACK_HOSTS
        return self.secure_cookies == "on"

    def exports_path(self, ledger_path: Path) -> Path:
        """The directory console exports go to."""
        return Path(self.export_dir) if self.export_dir else Path(ledger_path).parent / "exports"


class LoggingSettings(Section):
    """What syncd writes to stderr (journald under systemd)."""

    section: ClassVar[str] = "logging"
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="debug | info | warning | error (--log-level overrides)."
    )
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: JSON lines unless stderr is a terminal."
    )


class Settings(BaseSettings):
    """The whole configuration. Absent processor sections mean "not used"."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    ledger: LedgerSettings = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]
    identity: IdentitySettings = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]
    phorest: PhorestSettings
    mailchimp: MailchimpSettings | None = None
    google_analytics: GoogleAnalyticsSettings | None = None
    policy: PolicySettings = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]
    alerts: AlertsSettings | None = None
    daemon: DaemonSettings = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]
    console: ConsoleSettings = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]
    logging: LoggingSettings = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]
    # [[manual_processors]]: an array of tables, not a section.
    manual_processors: tuple[ManualProcessorSettings, ...] = ()
    # [processors.<name>]: a table of tables, not a section; every processor has defaults.
    processors: dict[str, ProcessorRecordSettings] = Field(
        default_factory=dict, validate_default=True,
        description="Where each processor keeps personal data, why and for how long.",
    )

    @field_validator("processors", mode="before")
    @classmethod
    def _processor_defaults(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value  # pydantic says what is wrong with it
        merged: dict[str, Any] = {name: dict(record)
                                  for name, record in DEFAULT_PROCESSOR_RECORDS.items()}
        for name, given in value.items():
            if not isinstance(name, str) or not _PROCESSOR_NAME.match(name):
                raise ValueError(f"processor names are 1-40 lower-case letters, digits or _: "
                                 f"{str(name)[:40]!r}")
            merged[name] = ({**merged.get(name, {}), **given} if isinstance(given, Mapping)
                            else given)
        return merged

    # A field validator, not a model one: it runs even when another section has
    # errors (a model validator is skipped then), and names its key path.
    @field_validator("manual_processors")
    @classmethod
    def _unique_manual_processors(
        cls, value: tuple[ManualProcessorSettings, ...]
    ) -> tuple[ManualProcessorSettings, ...]:
        names = [p.name for p in value]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"manual processor names must be unique: {', '.join(twice)}")
        return value

    def processor_record(self, name: str) -> ProcessorRecordSettings | None:
        """The ``[processors.<name>]`` record (defaults included), or None."""
        return self.processors.get(name)

    def manual_processor(self, name: str) -> ManualProcessorSettings | None:
        """The ``[[manual_processors]]`` entry called ``name``, or None."""
        return next((p for p in self.manual_processors if p.name == name), None)

    @classmethod
    def settings_customise_sources(  # noqa: D102
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):  # type: ignore[no-untyped-def]
        # Environment beats the file; no .env files, no /run/secrets guessing.
        return (_EnvSource(settings_cls), init_settings)

    def sections(self) -> Iterator[tuple[str, Section]]:
        """The configured sections, in schema order."""
        for name in SECTION_MODELS:
            value = getattr(self, name)
            if value is not None:
                yield name, value


class _EnvSource(EnvSettingsSource):
    """``SYNCD_<SECTION>__<KEY>`` variables, their text marked as coming from the environment."""

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        for name, values in data.items():
            if isinstance(values, dict):
                data[name] = {
                    key: _EnvText(value) if type(value) is str else value
                    for key, value in values.items()
                }
        return data


def _section_model(annotation: Any) -> type[Section]:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    raise TypeError(f"{annotation!r} is not a Section")


SECTION_MODELS: dict[str, type[Section]] = {
    name: _section_model(field.annotation) for name, field in Settings.model_fields.items()
    if name not in ("manual_processors", "processors")
}


def resolve_path(path: str | os.PathLike[str] | None) -> Path:
    """The config file to read: ``--config``, else ``$SYNCD_CONFIG``, else the default."""
    if path:
        return Path(path)
    from_env = os.environ.get(CONFIG_PATH_ENV)
    return Path(from_env) if from_env else DEFAULT_CONFIG_PATH


def read_toml(path: Path) -> dict[str, Any]:
    """Parse the file, turning every failure into a one-line ConfigError.

    Raises:
        ConfigError: missing, unreadable or malformed file.
    """
    try:
        return tomllib.loads(_read_regular_file(path).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (give --config PATH or set {CONFIG_PATH_ENV})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except _NotAFile as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text") from None
    except RecursionError:  # tomllib parses arrays and inline tables recursively
        raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None


def load(
    path: str | os.PathLike[str] | None = None, *, require_secrets: bool = True
) -> Settings:
    """Read, override, resolve and validate the configuration.

    Args:
        path: the TOML file; see :func:`resolve_path` for the fallbacks.
        require_secrets: when False, required secrets that cannot be found are
            left as None (see :func:`missing_secrets`) instead of being errors.

    Raises:
        ConfigError: with one line per problem found, all of them at once.
    """
    file = resolve_path(path)
    data = read_toml(file)
    problems = _unknown_environment_sections()
    token = _require_secrets.set(require_secrets)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        problems += _describe(exc, file)
    except SettingsError as exc:
        problems.append(f"environment: {_one_line(str(exc))}")
    except RecursionError:  # json.loads of a SYNCD_ variable's value
        problems.append("environment: a SYNCD_ variable holds JSON nested too deeply")
    finally:
        _require_secrets.reset(token)
    if problems:
        raise ConfigError(problems)
    return settings


def _unknown_environment_sections() -> list[str]:
    """One line per ``SYNCD_`` variable that names no section (pydantic would ignore it)."""
    problems = []
    for name in sorted(os.environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_PATH_ENV:
            continue
        section = upper.removeprefix(ENV_PREFIX).split("__", 1)[0].lower()
        # [processors.<name>] tables: SYNCD_PROCESSORS__<NAME>__<KEY>.
        if section not in SECTION_MODELS and section != "processors":
            problems.append(
                f"environment {name}: unknown section {section!r} (sections: "
                f"{', '.join(SECTION_MODELS)}; keys are set as {ENV_PREFIX}<SECTION>__<KEY>)"
            )
    return problems


def missing_secrets(settings: Settings) -> list[str]:
    """Required secrets of active sections that were not found, with a hint each."""
    return [
        f"{name}.{key}: missing secret ({secret_hint(name, key)})"
        for name, section in settings.sections()
        if section.is_active()
        for key in section.required_secret_fields()
        if getattr(section, key) is None
    ]


def _describe(exc: ValidationError, file: Path) -> list[str]:
    lines = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        ctx = error.get("ctx") or {}
        if error["type"] in ("missing_secret", "secret_twice", "secret_file") and "key" in ctx:
            loc.append(str(ctx["key"]))
        key_path = ".".join("from" if p == "from_" else p for p in loc) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing_secret":
            message = f"missing secret ({ctx['hint']})"
        elif error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required key is missing"
        value = error.get("input")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not _is_secret(loc):
            message = f"{message} (got {value})"
        lines.append(f"{_origin(loc, file)}: {key_path}: {_one_line(message)}")
    return lines


def _is_secret(loc: list[str]) -> bool:
    model = SECTION_MODELS.get(loc[0]) if loc else None
    return bool(model and len(loc) > 1 and loc[1] in model.secret_fields())


def _origin(loc: list[str], file: Path) -> str:
    if len(loc) >= 2:
        var = f"{ENV_PREFIX}{loc[0]}__{loc[1]}".upper()
        if any(name.upper() == var for name in os.environ):
            return f"environment {var}"
    return str(file)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data with every secret as ``***``."""
    out: dict[str, Any] = {}
    for name, section in settings.sections():
        values = section.model_dump(mode="json", by_alias=True)
        for key in section.secret_fields():
            values[key] = REDACTED if getattr(section, key) is not None else None
        out[name] = values
    if settings.manual_processors:
        out["manual_processors"] = [p.model_dump(mode="json") for p in settings.manual_processors]
    out["processors"] = {name: record.model_dump(mode="json")
                         for name, record in settings.processors.items()}
    return out


# --- the sample configuration, generated from the models -------------------


def render_example() -> str:
    """``config/syncd.example.toml``: every key, its description and its default.

    Keys with no default show an example value; secrets and their ``_file``
    twins are commented out, because secrets never need to be in the file.
    """
    out = [
        "# syncd configuration. Generated by `syncd config example` from the schema in",
        "# syncd/config.py; every key is shown with its default (or an example where",
        "# there is none). Any key can be overridden by SYNCD_<SECTION>__<KEY>.",
        "# Secrets are commented out: give them by environment variable, by <key>_file,",
        "# or as systemd credentials named <section>_<key>.",
        "# Sections for processors you do not use (mailchimp, google_analytics, alerts)",
        "# can simply be deleted.",
    ]
    for name, model in SECTION_MODELS.items():
        out += ["", f"# {model.__doc__.strip()}", f"[{name}]"]
        secrets = model.secret_fields()
        secret_files = {f"{s}_file" for s in secrets}
        for key, field in model.model_fields.items():
            toml_key = field.alias or key
            if key in secrets:
                kind = "required secret" if key in model.required_secret_fields() else "secret"
                out.append(f"# {field.description} ({kind}: {secret_hint(name, key)})")
                out.append(f'# {toml_key} = "…"')
                continue
            if key in secret_files:
                out.append(f"# {field.description}")
                out.append(f"# {toml_key} = {toml_value(field.examples[0])}")
                continue
            if field.is_required():
                value = field.examples[0]
                note = " (required; example value)"
            else:
                value = field.get_default(call_default_factory=True)
                note = ""
            out.append(f"# {field.description}{_bounds_note(field)}{note}")
            out.append(f"{toml_key} = {toml_value(value)}")
    out += ["", f"# {ProcessorRecordSettings.__doc__.strip()}",
            "# `syncd request export` (R8) lists these with every field a processor holds.",
            "# One [processors.<name>] table per processor (a manual processor may have one",
            "# too); a key left out keeps the default shown here."]
    for name, record in DEFAULT_PROCESSOR_RECORDS.items():
        out.append(f"[processors.{name}]")
        for key, field in ProcessorRecordSettings.model_fields.items():
            out.append(f"# {field.description}")
            out.append(f"{key} = {toml_value(record[key])}")
    out += ["", f"# {ManualProcessorSettings.__doc__.strip()}",
            "# One [[manual_processors]] table per such processor; none by default.",
            "# [[manual_processors]]"]
    for key, field in ManualProcessorSettings.model_fields.items():
        value = field.examples[0] if field.is_required() else ["Practice Manager"]
        out.append(f"# {field.description}")
        out.append(f"# {key} = {toml_value(value)}")
    return "\n".join(out) + "\n"


def _bounds_note(field: Any) -> str:
    """`` Allowed: 1 to 200.`` for a bounded number, else nothing."""
    low = next((m.ge for m in field.metadata if hasattr(m, "ge")), None)
    high = next((m.le for m in field.metadata if hasattr(m, "le")), None)
    if _scalar_type(field.annotation) not in (int, float) or low is None or high is None:
        return ""
    return f" Allowed: {low:g} to {high:g}."


def render_toml(data: Mapping[str, Any]) -> str:
    """Sections of plain values as TOML; None values become a comment.

    A section that is a list of tables (``manual_processors``) becomes
    ``[[section]]`` tables, one whose values are all tables (``processors``)
    becomes ``[section.name]`` tables.
    """
    out: list[str] = []

    def table(header: str, values: Mapping[str, Any]) -> None:
        out.append(header)
        for key, value in values.items():
            out.append(f"# {key} is not set" if value is None else f"{key} = {toml_value(value)}")
        out.append("")

    for section, values in data.items():
        if isinstance(values, list | tuple):
            for entry in values:
                table(f"[[{section}]]", entry)
        elif values and all(isinstance(v, Mapping) for v in values.values()):
            for name, entry in values.items():
                table(f"[{section}.{name}]", entry)
        else:
            table(f"[{section}]", values)
    return "\n".join(out)


def toml_value(value: Any) -> str:
    """One value in TOML syntax (strings JSON-quoted, which TOML accepts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        raise TypeError("nested tables are not used in the syncd schema")
    return json.dumps(str(value))
