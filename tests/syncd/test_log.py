"""Tests for syncd.log: rendering, level handling and redaction.

The end-to-end tests seed known personal data and secrets through every path a
log line can take, then grep the rendered output for them (DESIGN "Identity
and personal data").
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
import structlog

from syncd import log as syncd_log
from syncd.log import configure, get_logger, redact_processor, redact_text

EMAIL = "jane.doe+test@example.co.uk"
EMAIL_URL_ENCODED = "jane.doe%2Btest%40example.co.uk"
PHONE_INTERNATIONAL = "+44 7700 900123"
PHONE_NATIONAL = "07700900123"
PHONE_DIGITS = "7700900123"
SECRET = "s3cr3t-hunter2-value"
FIRST_NAME = "Zelda"
REQUEST_ID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
SINCE = "2024-05-01T12:34:56.789Z"

FORBIDDEN = [
    EMAIL,
    EMAIL_URL_ENCODED,
    "jane.doe",
    "example.co.uk",
    PHONE_INTERNATIONAL,
    PHONE_NATIONAL,
    PHONE_DIGITS,
    "7700 900123",
    SECRET,
    "hunter2",
    FIRST_NAME,
]
ANSI_ESCAPE = "\x1b["


class FakeTerminal(io.StringIO):
    """A StringIO that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo configure() so other tests see logging as pytest left it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)


def emit_seeded_events() -> None:
    """Log the seeded values through every path a line can take."""
    log = get_logger("syncd.tests")
    structlog.contextvars.bind_contextvars(processor="mailchimp", task_id=12345)

    log.info(f"sent welcome to {EMAIL} and {PHONE_INTERNATIONAL} / {PHONE_NATIONAL}")
    log.info(
        "client_seen",
        email=EMAIL,
        phone=PHONE_NATIONAL,
        mobile=PHONE_INTERNATIONAL,
        first_name=FIRST_NAME,
        password=SECRET,
        api_key=SECRET,
        headers={"Authorization": f"Bearer {SECRET}", "Accept": "application/json"},
        client={"email": EMAIL, "note": f"call {PHONE_NATIONAL} re {EMAIL}"},
        recipients=[EMAIL, (PHONE_INTERNATIONAL, "ok")],
        status=429,
        request_id=REQUEST_ID,
        since=SINCE,
        duration_seconds=1.234567891,
    )
    log.bind(linkedClientMobile=PHONE_NATIONAL).warning("bound_context")
    log.warning("call_failed", error=ValueError(f"member {EMAIL} exists"))
    try:
        raise ValueError(f"no member {EMAIL} with phone {PHONE_INTERNATIONAL}")
    except ValueError:
        log.exception("sync_failed", status=429)

    urllib3 = logging.getLogger("urllib3.connectionpool")
    urllib3.warning("Retrying lookup for %s", EMAIL)
    urllib3.debug(
        '%s://%s:%s "%s %s %s" %s %s',
        "https",
        "api-gateway-eu.phorest.com",
        443,
        "GET",
        f"/client?email={EMAIL_URL_ENCODED}&phone={PHONE_NATIONAL}",
        "HTTP/1.1",
        429,
        123456,
    )
    try:
        raise RuntimeError(
            f"401 for /lists?api_key={SECRET} (Authorization: Bearer {SECRET}) user {EMAIL}"
        )
    except RuntimeError:
        logging.getLogger("requests").exception("request failed for %s", PHONE_NATIONAL)


def json_lines(output: str) -> list[dict[str, Any]]:
    lines = output.splitlines()
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]


def event(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
    matches = [record for record in records if record["event"] == name]
    assert len(matches) == 1, f"expected one {name!r} event, got {len(matches)}"
    return matches[0]


# --- end to end: nothing personal gets out --------------------------------


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_seeded_personal_data_and_secrets_never_reach_the_output(fmt: str) -> None:
    stream = io.StringIO()
    configure(level="debug", fmt=fmt, stream=stream)  # type: ignore[arg-type]

    emit_seeded_events()

    output = stream.getvalue()
    assert output
    leaked = [seed for seed in FORBIDDEN if seed in output]
    assert not leaked, f"leaked {leaked} in:\n{output}"
    # Sanity check that every path really produced a line.
    for name in ("client_seen", "bound_context", "call_failed", "sync_failed"):
        assert name in output
    assert "Retrying lookup for <email>" in output
    assert "Traceback (most recent call last)" in output


def test_json_output_is_one_object_per_line_with_masks_in_place() -> None:
    stream = io.StringIO()
    configure(level="debug", fmt="json", stream=stream)

    emit_seeded_events()

    records = json_lines(stream.getvalue())
    assert len(records) == 8
    client = event(records, "client_seen")
    assert client["email"] == "<redacted>"
    assert client["phone"] == "<redacted>"
    assert client["mobile"] == "<redacted>"
    assert client["first_name"] == "<redacted>"
    assert client["password"] == "***"
    assert client["api_key"] == "***"
    assert client["headers"] == {"Authorization": "***", "Accept": "application/json"}
    assert client["client"] == {"email": "<redacted>", "note": "call <phone> re <email>"}
    assert client["recipients"] == ["<email>", ["<phone>", "ok"]]
    assert event(records, "bound_context")["linkedClientMobile"] == "<redacted>"
    assert event(records, "call_failed")["error"] == "ValueError('member <email> exists')"
    assert event(records, "Retrying lookup for <email>")["logger"] == "urllib3.connectionpool"
    assert "<email>" in event(records, "sync_failed")["exception"]


def test_non_personal_fields_survive_redaction_intact() -> None:
    stream = io.StringIO()
    configure(level="debug", fmt="json", stream=stream)

    emit_seeded_events()

    records = json_lines(stream.getvalue())
    client = event(records, "client_seen")
    assert client["status"] == 429
    assert client["task_id"] == 12345
    assert client["processor"] == "mailchimp"
    assert client["request_id"] == REQUEST_ID
    assert client["since"] == SINCE
    assert client["duration_seconds"] == 1.234567891
    assert client["level"] == "info"
    assert client["logger"] == "syncd.tests"
    failed = event(records, "sync_failed")
    assert failed["level"] == "error"
    assert failed["status"] == 429
    assert "ValueError: no member <email> with phone <phone>" in failed["exception"]
    wire = [r for r in records if r["logger"] == "urllib3.connectionpool" and r["level"] == "debug"]
    assert [r["event"] for r in wire] == [
        "https://api-gateway-eu.phorest.com:443"
        ' "GET /client?email=<email>&phone=<phone> HTTP/1.1" 429 123456'
    ]


def test_every_line_carries_an_iso_utc_timestamp_and_bound_context() -> None:
    stream = io.StringIO()
    configure(level="debug", fmt="json", stream=stream)

    emit_seeded_events()

    for record in json_lines(stream.getvalue()):
        stamp = datetime.fromisoformat(record["timestamp"])
        assert record["timestamp"].endswith("Z")
        assert stamp.utcoffset() == timezone.utc.utcoffset(None)
        assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 60
        # Third-party records get the bound context too.
        assert record["processor"] == "mailchimp"
        assert record["task_id"] == 12345


# --- formats, levels and reconfiguration -----------------------------------


def test_console_format_renders_readable_lines_without_colours_off_a_terminal() -> None:
    stream = io.StringIO()
    configure(level="info", fmt="console", stream=stream)

    get_logger("syncd.tests").info("task_done", processor="mailchimp", status=200, email=EMAIL)

    output = stream.getvalue()
    assert ANSI_ESCAPE not in output
    assert "task_done" in output
    assert "processor=mailchimp" in output
    assert "status=200" in output
    assert "email=<redacted>" in output
    assert EMAIL not in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output.splitlines()[0])


@pytest.mark.parametrize(
    ("stream_factory", "is_json", "has_colours"),
    [(io.StringIO, True, False), (FakeTerminal, False, True)],
    ids=["pipe-gets-json-lines", "terminal-gets-coloured-console"],
)
def test_auto_format_follows_whether_the_stream_is_a_terminal(
    stream_factory: type[io.StringIO], is_json: bool, has_colours: bool
) -> None:
    stream = stream_factory()
    configure(level="info", fmt="auto", stream=stream)

    get_logger("syncd.tests").info("task_done", email=EMAIL)

    output = stream.getvalue()
    assert (ANSI_ESCAPE in output) is has_colours
    assert EMAIL not in output
    if is_json:
        assert json.loads(output)["event"] == "task_done"
    else:
        assert "task_done" in output and not output.startswith("{")


def test_json_format_is_forced_even_on_a_terminal() -> None:
    stream = FakeTerminal()
    configure(level="info", fmt="json", stream=stream)

    get_logger("syncd.tests").info("task_done")

    assert json.loads(stream.getvalue())["event"] == "task_done"


@pytest.mark.parametrize(
    ("level", "expected_events"),
    [
        ("debug", ["d", "i", "w", "e", "lib_d", "lib_w"]),
        ("INFO", ["i", "w", "e", "lib_w"]),
        (" Warning ", ["w", "e", "lib_w"]),
        ("error", ["e"]),
    ],
    ids=["debug", "upper-case-info", "padded-mixed-case-warning", "error"],
)
def test_level_filters_structlog_and_stdlib_records_alike(
    level: str, expected_events: list[str]
) -> None:
    stream = io.StringIO()
    configure(level=level, fmt="json", stream=stream)
    log = get_logger("syncd.tests")
    lib = logging.getLogger("urllib3")

    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    lib.debug("lib_d")
    lib.warning("lib_w")

    assert [r["event"] for r in json_lines(stream.getvalue())] == expected_events


@pytest.mark.parametrize("level", ["verbose", "", "critical", "warn "], ids=repr)
def test_unknown_level_is_a_value_error_naming_the_choices(level: str) -> None:
    with pytest.raises(ValueError, match="unknown log level.*debug, info, warning, error"):
        configure(level=level, fmt="json", stream=io.StringIO())


def test_unknown_format_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        configure(level="info", fmt="xml", stream=io.StringIO())  # type: ignore[arg-type]


def test_configure_twice_sends_lines_only_to_the_latest_stream() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure(level="info", fmt="json", stream=first)
    configure(level="info", fmt="json", stream=second)

    get_logger("syncd.tests").info("once")
    logging.getLogger("urllib3").warning("lib_once")

    assert first.getvalue() == ""
    assert [r["event"] for r in json_lines(second.getvalue())] == ["once", "lib_once"]


def test_configure_removes_handlers_that_would_bypass_redaction() -> None:
    leaky = io.StringIO()
    logging.getLogger().addHandler(logging.StreamHandler(leaky))
    stream = io.StringIO()
    configure(level="info", fmt="json", stream=stream)

    logging.getLogger("urllib3").warning("lookup for %s", EMAIL)

    assert leaky.getvalue() == ""
    assert EMAIL not in stream.getvalue()


def test_logger_created_before_configure_follows_it() -> None:
    early = get_logger("syncd.tests")
    stream = io.StringIO()
    configure(level="info", fmt="json", stream=stream)

    early.info("late_configured", email=EMAIL)

    assert json.loads(stream.getvalue())["email"] == "<redacted>"


def test_default_stream_is_stderr_at_the_time_of_writing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure(level="info", fmt="json")

    get_logger("syncd.tests").info("to_stderr", email=EMAIL)

    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err)["event"] == "to_stderr"
    assert EMAIL not in captured.err


# --- redaction, unit level -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (EMAIL, "<email>"),
        (f"mail {EMAIL}.", "mail <email>."),
        ("JANE@EXAMPLE.COM", "<email>"),
        ("o'brien@example.ie", "<email>"),
        ("zoë@exämple.de", "<email>"),
        (f"?email={EMAIL_URL_ENCODED}&x=1", "?email=<email>&x=1"),
        ("global/manager@example.com", "global/<email>"),
        (PHONE_INTERNATIONAL, "<phone>"),
        (PHONE_NATIONAL, "<phone>"),
        ("07700 900 123", "<phone>"),
        ("(020) 7946 0958", "<phone>"),
        ("020-7946-0958", "<phone>"),
        ("+44 (0)7700 900123", "<phone>"),
        ("0044 7700 900123", "<phone>"),
        ("353871234567", "<phone>"),
        ("+353 87 123 4567", "<phone>"),
        ("087 123 4567", "<phone>"),
        ("+1 (202) 555-0123", "<phone>"),
        ("202.555.0123", "<phone>"),
        ("tel:+447700900123", "tel:<phone>"),
        ("phone 07700900123: invalid", "phone <phone>: invalid"),
        ("429 07700900123", "429 <phone>"),
        ("at 12:30 07700900123", "at 12:30 <phone>"),
        ("2024-05-01 07700900123", "2024-05-01 <phone>"),
        ("07700900123 07700900124", "<phone>"),
    ],
    ids=[
        "email",
        "email-in-sentence",
        "upper-case-email",
        "apostrophe-email",
        "unicode-email",
        "url-encoded-email",
        "phorest-username",
        "phone-international",
        "phone-national-compact",
        "phone-national-spaced",
        "phone-bracketed-area-code",
        "phone-hyphens",
        "phone-international-with-trunk-zero",
        "phone-double-zero",
        "phone-phorest-digits",
        "phone-ie-international",
        "phone-ie-national",
        "phone-us-international",
        "phone-us-dotted",
        "phone-tel-uri",
        "phone-before-colon",
        "phone-after-status",
        "phone-after-time",
        "phone-after-date",
        "two-phones",
    ],
)
def test_redact_text_masks_emails_and_phone_numbers(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2024-05-01T12:34:56.789012Z",
        "2024-05-01T12:34:56+01:00",
        "2024-05-01 12:34:56",
        "2024-05-01",
        "12:34:56.789",
        "429",
        "task 12345 attempt 3 of 5",
        "retry after 120 seconds",
        "took 1.234567891 s",
        "123456789",
        "HTTP/1.1 429 123456",
        "sizes 100 200 300 400",
        REQUEST_ID,
        "0123456789abcdef0123456789abcdef",
        "123e4567-e89b-12d3-a456-426614174000",
        "192.168.100.200:8787",
        "0x7f1234567890",
        "/business/abc123/client/xYz987?page=0&size=100",
        "python3.11/site-packages/urllib3/connectionpool.py, line 1234",
        "",
    ],
    ids=[
        "iso-timestamp-utc",
        "iso-timestamp-offset",
        "iso-timestamp-space",
        "iso-date",
        "time",
        "http-status",
        "small-integers",
        "duration",
        "decimal",
        "nine-digit-id-like-a-ga4-property",
        "status-and-size",
        "number-list",
        "request-id-hex",
        "hex-with-digit-run",
        "uuid-ending-in-digits",
        "ip-and-port",
        "memory-address",
        "path",
        "traceback-line",
        "empty",
    ],
)
def test_redact_text_keeps_non_personal_numbers(text: str) -> None:
    assert redact_text(text) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"GET /lists?api_key={SECRET}&count=10", "GET /lists?api_key=***&count=10"),
        (f"password: {SECRET}", "password: ***"),
        (f'{{"access_token": "{SECRET}"}}', '{"access_token": "***"}'),
        (f"webhook_secret={SECRET}", "webhook_secret=***"),
        (f"Authorization: Bearer {SECRET}", "Authorization: ***"),
        (f"Authorization: Basic {SECRET}", "Authorization: ***"),
        (f"sent Bearer {SECRET} to the API", "sent Bearer *** to the API"),
        ("token refresh failed", "token refresh failed"),
        ("basic checks passed", "basic checks passed"),
    ],
    ids=[
        "query-parameter",
        "colon-assignment",
        "json-text",
        "suffix-name",
        "authorization-bearer",
        "authorization-basic",
        "bare-bearer-token",
        "word-token-without-assignment",
        "english-basic",
    ],
)
def test_redact_text_masks_values_assigned_to_secret_names(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "smtp_password",
        "passwd",
        "webhook_secret",
        "access_token",
        "refresh-token",
        "api_key",
        "apiKey",
        "APIKEY",
        "Authorization",
        "auth",
        "credentials_file",
        "hmac_key",
        "private_key",
        "privateKey",
        "Cookie",
        "set_cookie",
    ],
)
def test_redact_processor_masks_values_of_secret_named_keys(key: str) -> None:
    redacted = redact_processor(None, "info", {"event": "e", key: SECRET, "nested": {key: 1}})
    assert redacted[key] == syncd_log.SECRET_MASK
    assert redacted["nested"][key] == syncd_log.SECRET_MASK


@pytest.mark.parametrize(
    "key",
    [
        "email",
        "EMAIL",
        "client_email",
        "newEmail",
        "email_address",
        "phone",
        "mobile",
        "linkedClientMobile",
        "landLine",
        "first_name",
        "firstName",
        "last_name",
        "lastname",
        "fname",
        "lname",
        "name",
        "body",
        "response_body",
        "requestBody",
        "address",
    ],
)
def test_redact_processor_masks_values_of_personal_keys(key: str) -> None:
    redacted = redact_processor(None, "info", {"event": "e", key: {"anything": "x"}})
    assert redacted[key] == syncd_log.PERSONAL_MASK


@pytest.mark.parametrize(
    "key",
    [
        "processor",
        "processor_name",
        "listen_address",
        "subject_key",
        "status",
        "task_id",
        "request_id",
        "path",
    ],
)
def test_redact_processor_keeps_values_of_ordinary_keys(key: str) -> None:
    assert redact_processor(None, "info", {"event": "e", key: "mailchimp"})[key] == "mailchimp"


def test_redact_processor_keeps_none_so_a_missing_value_stays_visible() -> None:
    redacted = redact_processor(None, "info", {"event": "e", "email": None, "api_key": None})
    assert redacted == {"event": "e", "email": None, "api_key": None}


def test_redact_processor_masks_personal_data_in_dict_keys_and_objects() -> None:
    class Member:
        def __repr__(self) -> str:
            return f"Member({EMAIL})"

    redacted = redact_processor(
        None, "info", {"event": "e", "by_address": {EMAIL: 1}, "member": Member()}
    )
    assert redacted["by_address"] == {"<email>": 1}
    assert redacted["member"] == "Member(<email>)"


def test_redact_text_is_fast_on_long_unbroken_input() -> None:
    # A regression guard against catastrophic backtracking: these would take
    # minutes with a quadratic pattern.
    for text in ("1 " * 50_000, "a" * 100_000 + "@", "1." * 50_000, "a." * 50_000 + "@x"):
        assert isinstance(redact_text(text), str)


def test_redact_text_does_not_mask_a_mask() -> None:
    assert redact_text("<email> <phone> *** <redacted>") == "<email> <phone> *** <redacted>"


def test_phone_masking_only_uses_the_digit_thresholds() -> None:
    # Pins the documented thresholds so a change is deliberate.
    assert syncd_log.PHONE_MIN_DIGITS == 9
    assert syncd_log.BARE_PHONE_MIN_DIGITS == 10
    assert redact_text("012345678") == "<phone>"
    assert redact_text("01234567") == "01234567"
    assert redact_text("1234567890") == "<phone>"
    assert redact_text("123456789") == "123456789"


def test_redaction_runs_after_traceback_rendering() -> None:
    stream = io.StringIO()
    configure(level="info", fmt="json", stream=stream)

    try:
        raise KeyError(EMAIL)
    except KeyError:
        get_logger("syncd.tests").exception("lookup_failed")

    record = json.loads(stream.getvalue())
    assert "exc_info" not in record
    assert re.search(r"KeyError: '<email>'$", record["exception"])
