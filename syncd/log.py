"""Logging for syncd: structlog configured once, with redaction as the last step.

Every module logs through structlog::

    log = structlog.get_logger(__name__)
    log.info("task_done", processor="mailchimp", action="unsubscribe")

and binds the connector and task as context for everything logged while it works::

    structlog.contextvars.bind_contextvars(processor="mailchimp", task_id=task.id)

:func:`configure` sends both structlog events and the standard library's
``logging`` records (urllib3, requests, google-auth) through one handler on the
root logger, so every line is rendered the same way: JSON lines on stderr when
it is not a terminal (journald), readable console output when it is.

Before rendering, :func:`redact_processor` masks email addresses, phone numbers,
the values of secret-named keys and the values of personal-data keys. It is
the last line of defence (DESIGN "Identity and personal data"): code should not
log personal data in the first place. :func:`redact_text` exposes the same
masking for other output, such as the CLI's one-line error messages.

What is deliberately *not* masked, so logs stay useful: ints and floats (only
strings are scanned, so ``status=429`` and ``task_id=12345`` survive), ISO dates
and times, UUIDs, IPv4 addresses, decimals, and hex ids (a digit run glued to
letters is never taken for a phone number).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, Final, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS: Final = ("auto", "json", "console")

EMAIL_MASK: Final = "<email>"
PHONE_MASK: Final = "<phone>"
SECRET_MASK: Final = "***"
PERSONAL_MASK: Final = "<redacted>"

# A key whose name contains one of these holds a secret, compared like
# PERSONAL_KEYS below (so apiKey and private-key match too). Substring matching
# over-masks ("author", "max_tokens"); that is the safe direction.
SECRET_KEY_PARTS: Final = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "auth",
    "credential",
    "hmac",
    "private_key",
    "cookie",
)
# Keys naming personal fields, compared after lower-casing and dropping "_" and
# "-" so that first_name, firstName and first-name all match. Exact names only
# for the generic ones ("name", "address"): "processor_name" and
# "listen_address" are not personal.
PERSONAL_KEYS: Final = frozenset(
    {
        "email",
        "phone",
        "mobile",
        "landline",
        "firstname",
        "lastname",
        "fullname",
        "name",
        "fname",
        "lname",
        "body",
        "address",
    }
)
# ...and any key ending in one of these (client_email, linkedClientMobile,
# response_body).
PERSONAL_KEY_SUFFIXES: Final = (
    "email",
    "emails",
    "emailaddress",
    "phone",
    "phones",
    "mobile",
    "firstname",
    "lastname",
    "fullname",
    "body",
)

# A phone number with a "+", "(" or trunk "0" in front needs this many digits;
# the international minimum is about 8, national UK/IE forms have 9 to 11.
PHONE_MIN_DIGITS: Final = 9
# Bare digit runs (no prefix, e.g. Phorest's "353871234567" or a US
# "202-555-0123") need one more, so a 9-digit id such as a GA4 property id
# survives.
BARE_PHONE_MIN_DIGITS: Final = 10
# Bounds how much a phone candidate can span, which also keeps the regex linear
# on long digit strings.
PHONE_MAX_CHARS: Final = 30

# Local part: what real addresses use (letters, digits, "._%+-'" and a few
# rarer RFC 5322 characters), starting with a letter or digit so that a quote
# before an address is kept. "/", "=", "?" and "&" are left out although RFC
# 5322 allows them: they are vanishingly rare in addresses and everywhere in
# URLs, where leaving them out keeps "/client?email=<email>" readable. "%40" is
# a URL-encoded "@", as in urllib3's request lines.
_EMAIL_LOCAL_CHARS = r"\w.!#$%'*+^`{|}~-"
_EMAIL_RE: Final = re.compile(
    rf"(?<![\w.+%-])\w[{_EMAIL_LOCAL_CHARS}]*(?:@|%40)[\w-]+(?:\.[\w-]+)+"
)

# Secrets in free text can only be spotted by what precedes them: an assignment
# to a secret-looking name ("api_key=...", "password: ...", as in URLs, headers
# and exception messages, "Authorization: Basic ...") or a bearer token on its
# own. A bare "Basic ..." is left alone: it is also an English word.
_SECRET_ASSIGNMENT_RE: Final = re.compile(
    r"""(?ix)
    (?P<name>(?:password|passwd|secret|token|api[_-]?key|authorization|credential
              |private[_-]?key|cookie|hmac)[\w-]*)
    (?P<sep>["']?\s*[:=]\s*["']?)
    (?:(?:bearer|basic)\s+)?
    [^\s"'&,;)]+
    """
)
_BEARER_TOKEN_RE: Final = re.compile(r"(?i)\b(?P<scheme>bearer)\s+[\w.~+/=-]+")

# Scanned left to right; at each position the "keep" shapes are tried before
# the phone candidate, so a timestamp or a UUID is consumed whole and its digits
# are never looked at again.
_PHONE_SEPARATORS = r" \t\u00a0().\-\u2010-\u2015"
_NUMBERS_RE: Final = re.compile(
    rf"""
    (?P<keep>
        # ISO date, optionally with time and zone: 2024-05-01T12:34:56.789Z
        \d{{4}}-\d{{2}}-\d{{2}}
        (?:[T\ ]\d{{2}}:\d{{2}}(?::\d{{2}}(?:[.,]\d+)?)?(?:Z|[+-]\d{{2}}(?::?\d{{2}})?)?)?
      | \d{{1,2}}:\d{{2}}(?::\d{{2}}(?:[.,]\d+)?)?                       # time: 12:34:56.789
      | [0-9a-fA-F]{{8}}(?:-[0-9a-fA-F]{{4}}){{3}}-[0-9a-fA-F]{{12}}(?![\w-])  # UUID
      | \d{{1,3}}(?:\.\d{{1,3}}){{3}}(?![.\d])                           # IPv4
      | \d+\.\d+(?![.\d])                                                # decimal: 1.234567891
    )
    | (?P<phone>
        (?<!\w)                                  # not the tail of a word or hex id
        [+(]?\d[{_PHONE_SEPARATORS}\d]{{0,{PHONE_MAX_CHARS - 2}}}\d
        (?!\w|[:.]\d)                            # nor the head of one, a time or a decimal
    )
    """,
    re.VERBOSE,
)
_PHONE_PREFIXES: Final = ("+", "(", "0")
_WHITESPACE_RE: Final = re.compile(r"\s+")


def redact_text(text: str) -> str:
    """Mask email addresses, phone numbers and assigned secrets in free text.

    Args:
        text: any string, e.g. an error message or a rendered traceback.

    Returns:
        The text with each email replaced by ``<email>``, each phone number by
        ``<phone>`` and each value assigned to a secret-looking name (or
        following ``Bearer``) by ``***``.
    """
    text = _SECRET_ASSIGNMENT_RE.sub(rf"\g<name>\g<sep>{SECRET_MASK}", text)
    text = _BEARER_TOKEN_RE.sub(rf"\g<scheme> {SECRET_MASK}", text)
    if "@" in text or "%40" in text:
        text = _EMAIL_RE.sub(EMAIL_MASK, text)
    return _NUMBERS_RE.sub(_mask_number, text)


def redact_processor(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """Structlog processor that masks personal data and secrets in an event.

    Secret-named keys become ``***``; personal-field keys become ``<redacted>``;
    every other string, at any depth of dicts, lists and tuples, goes through
    :func:`redact_text`. Objects that are not plain data are replaced by their
    redacted ``repr`` (what the renderers would print anyway), so an exception
    passed as a field cannot smuggle an address out.

    Args:
        _logger: unused.
        _method_name: unused.
        event_dict: the event, after ``format_exc_info``.

    Returns:
        A new, redacted event dict.
    """
    return _redact_mapping(event_dict)


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the standard ``logging`` module for syncd.

    Safe to call again: the root logger's handlers are replaced, so syncd owns
    the root logger and no handler installed earlier can bypass redaction.

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``, in any case.
        fmt: ``json`` or ``console``; ``auto`` picks console on a terminal and
            JSON lines otherwise (journald).
        stream: where lines go; ``None`` means ``sys.stderr``, looked up at each
            write so that a replaced ``sys.stderr`` is honoured.

    Raises:
        ValueError: the level or the format is unknown.
    """
    numeric_level = LEVELS.get(level.strip().lower())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")

    is_tty = _isatty(sys.stderr if stream is None else stream)
    if fmt == "console" or (fmt == "auto" and is_tty):
        renderer: Processor = structlog.dev.ConsoleRenderer(
            colors=is_tty,
            # The traceback is already a (redacted) string by the time it gets
            # here; Rich's formatter would re-render it from exc_info, with
            # local variables, bypassing redaction.
            exception_formatter=structlog.dev.plain_traceback,
        )
    else:
        renderer = structlog.processors.JSONRenderer()

    # Applied to structlog events before they reach logging, and to foreign
    # (stdlib) records inside the formatter, so both carry the same fields.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Render the traceback to text first so that redaction sees it.
            structlog.processors.format_exc_info,
            redact_processor,
            renderer,
        ],
    )
    handler: logging.Handler = (
        _StderrHandler() if stream is None else logging.StreamHandler(stream)
    )
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Loggers created at import time must pick up a later configure().
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger; the same as ``structlog.get_logger(name)``.

    Args:
        name: the module name, ``__name__``.

    Returns:
        A lazily configured bound logger.
    """
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes to whatever ``sys.stderr`` is at the time.

    ``logging.StreamHandler`` keeps the object it was given; looking it up at
    each write follows redirections (pytest's capture, a daemon's re-opened
    stderr).
    """

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        # StreamHandler.__init__ assigns sys.stderr; nothing to keep.
        pass


def _isatty(stream: TextIO) -> bool:
    """Return whether ``stream`` is a terminal, False if it cannot tell."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        # No isatty(), or a closed file.
        return False


def _mask_number(match: re.Match[str]) -> str:
    """Return the replacement for one match of ``_NUMBERS_RE``."""
    candidate = match.group("phone")
    if candidate is None:
        return match.group(0)
    digits = sum(ch.isdigit() for ch in candidate)
    if candidate.startswith(_PHONE_PREFIXES):
        return PHONE_MASK if digits >= PHONE_MIN_DIGITS else candidate
    whitespace = _WHITESPACE_RE.search(candidate)
    if whitespace is None:
        return PHONE_MASK if digits >= BARE_PHONE_MIN_DIGITS else candidate
    # Space-separated numbers with no phone prefix ("429 123456", the status and
    # size in an urllib3 line) are not one phone number, but a phone may follow
    # the first group ("429 07700900123"): keep the first group, scan the rest.
    head, tail = candidate[: whitespace.start()], candidate[whitespace.start() :]
    return head + _NUMBERS_RE.sub(_mask_number, tail)


def _redact_mapping(mapping: Mapping[Any, Any]) -> dict[Any, Any]:
    """Redact a dict: mask by key name, then by value."""
    redacted: dict[Any, Any] = {}
    for key, value in mapping.items():
        safe_key = redact_text(key) if isinstance(key, str) else key
        if value is None or not isinstance(key, str):
            redacted[safe_key] = _redact_value(value)
        elif _is_secret_key(key):
            redacted[safe_key] = SECRET_MASK
        elif _is_personal_key(key):
            redacted[safe_key] = PERSONAL_MASK
        else:
            redacted[safe_key] = _redact_value(value)
    return redacted


def _redact_value(value: Any) -> Any:
    """Redact one value of any type, recursing into containers."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return _redact_mapping(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(item) for item in value]
    return redact_text(repr(value))


def _is_secret_key(key: str) -> bool:
    """Return whether a key name looks like it holds a secret."""
    compact = _compact(key)
    return any(_compact(part) in compact for part in SECRET_KEY_PARTS)


def _is_personal_key(key: str) -> bool:
    """Return whether a key name looks like a personal-data field."""
    compact = _compact(key)
    return compact in PERSONAL_KEYS or compact.endswith(PERSONAL_KEY_SUFFIXES)


def _compact(key: str) -> str:
    """Return a key name lower-cased without "_" and "-", for matching."""
    return key.lower().replace("_", "").replace("-", "")
