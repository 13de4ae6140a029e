"""Access and portability (R8): one file listing what each processor holds about a person.

``syncd request export`` resolves the person through Phorest
(:func:`syncd.rights.resolve`), reads live what each processor holds
(:func:`gather`), then files an ``export`` request and writes the file in one
transaction (:func:`file_export`): the file is created with mode 0600 and
never over an existing one; if it cannot be written, the ledger keeps nothing.

Each row names the processor, the record (a Phorest client id, a Mailchimp
address, a GA identifier), the field and its value, where the processor
stores it, when the data first went there and on what lawful basis and for how
long it is kept (``[processors.<name>]``). "First disclosed" is, for
Mailchimp, the first done task that sent the person's data there (the audit
trail); for Phorest, the controller's own system, the record's ``createdAt``;
GA receives nothing from syncd (the website's tag sends it), so it has none.

Personal data: the file is the only place the values go. Logs, the audit
trail and the command's output carry counts, processors and request ids.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import structlog

from syncd.identity import SubjectKeys
from syncd.ledger import AuditEvent, Ledger
from syncd.rights import (
    ANALYTICS,
    MAILCHIMP,
    PHOREST,
    Person,
    RequestError,
    add_months,
    login_name,
)

log = structlog.get_logger(__name__)

Format = Literal["csv", "json"]
FORMATS: tuple[Format, ...] = ("csv", "json")
EXPORT_FILE_MODE = 0o600
COLUMNS = ("processor", "record", "field", "value", "location", "first_disclosed",
           "lawful_basis", "retention")
RULE = "R8"
# Done tasks that sent the person's data to a processor (an erasure or an opt-out does not).
DISCLOSING_ACTIONS: Mapping[str, frozenset[str]] = {
    MAILCHIMP: frozenset({"subscribe", "update_names", "move_email"}),
}
NONE_HELD = "none held"
GA_UNREADABLE = ("not readable through the API: GA4 has no per-user read API; the events are "
                 "filed under the identifier above")
_EXISTS = "{path} already exists: an export never overwrites a file; choose another --output"
SHARED_WITHHELD = ("withheld: another Phorest client uses this address, and the member may hold "
                   "their data (UK GDPR Art. 15(4)); review it by hand")


@dataclass(frozen=True)
class Row:
    """One field a processor holds about the person.

    Attributes:
        processor: ``phorest``, ``mailchimp`` or ``google_analytics``.
        record: which of the processor's records (client id, address, identifier kind).
        field: the field's name at the processor (nested ones dotted: ``address.city``).
        value: its value as the processor returned it (None: empty).
        location: where the processor stores it (``[processors.<name>] location``).
        first_disclosed: when syncd's records show the data first went there (ISO 8601).
        lawful_basis: ``[processors.<name>] lawful_basis``.
        retention: ``[processors.<name>] retention``.
    """

    processor: str
    record: str
    field: str
    value: Any
    location: str
    first_disclosed: str | None
    lawful_basis: str
    retention: str


class ExportError(RequestError):
    """The export file cannot be written (one line, no personal data)."""


def gather(
    ledger: Ledger, settings: Any, keys: SubjectKeys, person: Person,
    connectors: Mapping[str, Any],
) -> list[Row]:  # fmt: skip
    """Read live what each processor holds about ``person``: Phorest, Mailchimp, GA.

    Args:
        ledger: the ledger (read only: the audit trail, for first disclosures).
        settings: the configuration (``[processors.<name>]``).
        keys: the subject keys.
        person: from :func:`syncd.rights.resolve`.
        connectors: ``phorest`` and ``mailchimp``, and ``google_analytics`` when configured.

    Returns:
        The rows, Phorest's first, then Mailchimp's, then GA's.

    Raises:
        ConnectorError: a processor could not be read.
        LedgerError: SQLite failed.
    """
    first = first_disclosures(ledger, subject_keys(ledger, keys, person))
    rows = _phorest_rows(settings, person, connectors[PHOREST])
    rows += _mailchimp_rows(settings, person, connectors[MAILCHIMP], first.get(MAILCHIMP))
    if ANALYTICS in connectors:
        rows += _analytics_rows(settings, person, connectors[ANALYTICS], first.get(ANALYTICS))
    return rows


def subject_keys(ledger: Ledger, keys: SubjectKeys, person: Person) -> list[str]:
    """Every key the ledger may file the person's entries under.

    Raises:
        LedgerError: SQLite failed.
    """
    found = [person.subject_key, *(keys.client_id(c.client_id) for c in person.clients),
             *(keys.email(e) for e in person.emails), *(keys.phone(p) for p in person.phones)]
    for key in list(found):
        subject = ledger.subject_for(key)
        if subject is not None:
            found.append(subject)
    for subject in list(dict.fromkeys(found)):
        for kind in ("email", "phone", "client_id"):
            found += ledger.identifier_keys(subject, kind)
    return list(dict.fromkeys(found))


def first_disclosures(ledger: Ledger, subject_keys: Sequence[str]) -> dict[str, str]:
    """Processor -> when the audit trail first shows the person's data sent there (ISO 8601).

    Raises:
        LedgerError: SQLite failed.
    """
    first: dict[str, str] = {}
    for event in ledger.find_audit(subject_keys=subject_keys):
        if _discloses(event) and event.processor not in first:
            first[str(event.processor)] = _iso(event.at)
    return first


def render(rows: Sequence[Row], fmt: Format, *, request_id: int, now: datetime) -> bytes:
    """The file's bytes: CSV with a header line, or JSON with the request id and time.

    Raises:
        ValueError: an unknown format.
    """
    if fmt == "json":
        document = {"request_id": request_id, "generated_at": _iso(now),
                    "rows": [asdict(row) for row in rows]}
        return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()
    if fmt != "csv":
        raise ValueError(f"unknown export format {fmt!r}")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_inert(_cell(getattr(row, column))) for column in COLUMNS])
    return text.getvalue().encode()


_EXPORT_NAME = re.compile(r"^syncd-export-([1-9][0-9]{0,17})\.(csv|json)$")


def file_name(request_id: int, fmt: str) -> str:
    """The default name of an export's file: ``syncd-export-<request id>.<format>``."""
    return f"syncd-export-{request_id}.{fmt}"


def refuse_existing(path: Path) -> None:
    """Refuse a path that exists (a dangling link too), before anything is read.

    :func:`write_new` refuses it again atomically; this spares Phorest and
    Mailchimp the reads when the answer is known.

    Raises:
        ExportError: the path exists.
    """
    if os.path.lexists(path):
        raise ExportError(_EXISTS.format(path=path))


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``; an existing path is never touched.

    Raises:
        ExportError: the path exists (even as a dangling link), or it cannot be created
            or written (a partly written file is removed).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, EXPORT_FILE_MODE)
    except FileExistsError:
        raise ExportError(_EXISTS.format(path=path)) from None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ExportError(f"cannot create {path}: {reason}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), EXPORT_FILE_MODE)  # whatever the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as error:
        path.unlink(missing_ok=True)
        reason = error.strerror or type(error).__name__
        raise ExportError(f"cannot write {path}: {reason}") from None


def file_export(
    ledger: Ledger, settings: Any, person: Person, rows: Sequence[Row], fmt: Format, *,
    output: Path | None, filed_by: str | None, now: datetime, directory: Path | None = None,
) -> tuple[int, Path]:  # fmt: skip
    """File the ``export`` request, write the file, and close the request done: all or nothing.

    The request and its audit entries are written in the transaction that
    writes the file: if the file cannot be created (it exists, the directory
    is not writable) the ledger keeps nothing, and if the ledger cannot commit
    the file is removed.

    Args:
        ledger: the ledger.
        settings: the configuration (``[policy] request_deadline_months``).
        person: from :func:`syncd.rights.resolve`.
        rows: from :func:`gather`.
        fmt: ``csv`` or ``json``.
        output: where to write; None: ``syncd-export-<request id>.<fmt>`` in ``directory``.
        filed_by: who asked for it (default: the login name).
        now: the time received.
        directory: where a default-named file goes (default: the current directory).

    Returns:
        The request's id and the file's path.

    Raises:
        ExportError: the file cannot be written (nothing is recorded).
        LedgerError: SQLite failed (no file is left).
    """
    filed_by = filed_by or login_name()
    primary = person.primary
    due = add_months(now, settings.policy.request_deadline_months)
    created: Path | None = None
    try:
        with ledger.transaction():
            request_id = ledger.add_request("export", person.subject_key, person.source, due,
                                            filed_by=filed_by, received_at=now,
                                            client_id=primary.client_id if primary else None)
            ledger.add_audit(person.subject_key, None, "request_export", f"{RULE}:request",
                             "filed", request_id=request_id, actor=filed_by,
                             detail=f"filed with {person.source}; format {fmt}")  # fmt: skip
            path = output or (directory or Path()) / file_name(request_id, fmt)
            write_new(path, render(rows, fmt, request_id=request_id, now=now))
            created = path
            for processor, count in _counts(rows).items():
                ledger.add_audit(person.subject_key, processor, "export_read", f"{RULE}:access",
                                 "done", request_id=request_id,
                                 detail=f"{count} field(s) read and exported")  # fmt: skip
            ledger.add_audit(person.subject_key, None, "request_export", f"{RULE}:request",
                             "done", request_id=request_id,
                             detail=f"export written ({fmt}, {len(rows)} row(s), mode 0600)")
            ledger.close_request(request_id, "done")
    except BaseException:
        if created is not None:
            created.unlink(missing_ok=True)
        raise
    log.info("request_exported", request_id=request_id, format=fmt, rows=len(rows),
             processors=len(_counts(rows)))
    return request_id, path


def delete_expired(ledger: Ledger, directory: Path, keep_minutes: int, now: datetime) -> int:
    """Delete the export files in ``directory`` written more than ``keep_minutes`` ago.

    Only files this module names (``syncd-export-<request id>.<format>``) are
    touched; each deletion is audited against its request.

    Returns:
        How many files were deleted.
    """
    if not directory.is_dir():
        return 0
    deleted = 0
    horizon = now.timestamp() - keep_minutes * 60
    for path in directory.iterdir():
        found = _EXPORT_NAME.match(path.name)
        if found is None or path.is_symlink() or not path.is_file():
            continue
        try:
            if path.stat().st_mtime > horizon:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        deleted += 1
        request_id = int(found.group(1))
        request = ledger.request(request_id)
        ledger.add_audit(request.subject_key if request else None, None, "export_deleted",
                         f"{RULE}:access", "done", request_id=request_id,
                         detail=f"file deleted {keep_minutes} min after it was written")
    return deleted


# -- per processor -------------------------------------------------------------------------


def _phorest_rows(settings: Any, person: Person, phorest: Any) -> list[Row]:
    make = _maker(settings, PHOREST)
    rows: list[Row] = []
    for client in person.clients:
        fields = phorest.client_fields(client.client_id)
        if fields is None:
            rows.append(make(client.client_id, "client", NONE_HELD, None))
            continue
        created = fields.get("createdAt")
        since = str(created) if created else None
        rows += [make(client.client_id, name, value, since) for name, value in _flat(fields)]
    if not person.clients:
        rows.append(make("-", "client", f"{NONE_HELD}: no client record", None))
    return rows


def _mailchimp_rows(settings: Any, person: Person, mailchimp: Any, since: str | None) -> list[Row]:
    make = _maker(settings, MAILCHIMP)
    rows: list[Row] = []
    for email in person.emails:
        if email in person.shared_emails:
            rows.append(make(email, "member", SHARED_WITHHELD, since))
            continue
        fields = mailchimp.member_fields(email)
        if fields is None:
            rows.append(make(email, "member", f"{NONE_HELD}: no member at this address", None))
            continue
        rows += [make(email, name, value, since) for name, value in _flat(fields)]
    if not person.emails:
        rows.append(make("-", "member", f"{NONE_HELD}: the person has no email address", None))
    return rows


def _analytics_rows(settings: Any, person: Person, analytics: Any, since: str | None) -> list[Row]:
    make = _maker(settings, ANALYTICS)
    identity = getattr(analytics, "identity", "user_id")
    if identity == "email":
        filed = [(email, "user_provided_data (email)") for email in person.own_emails]
    else:
        filed = [(c.client_id, f"{identity} (Phorest client id)") for c in person.clients]
    if not filed:
        return [make("-", identity, f"{NONE_HELD}: no identifier GA files the person under",
                     since)]
    rows = [make(identity, field, value, since) for value, field in filed]
    rows.append(make(identity, "events", GA_UNREADABLE, since))
    return rows


def _maker(settings: Any, processor: str) -> Any:
    record = settings.processor_record(processor)

    def make(which: str, field: str, value: Any, since: str | None) -> Row:
        return Row(processor, which, field, value, record.location, since, record.lawful_basis,
                   record.retention)

    return make


def _flat(values: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted name, value) of every leaf; an empty table is one empty value."""
    for name, value in values.items():
        if isinstance(value, Mapping) and value:
            yield from _flat(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", None if isinstance(value, Mapping) else value


def _counts(rows: Sequence[Row]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.processor] = counts.get(row.processor, 0) + 1
    return counts


def _discloses(event: AuditEvent) -> bool:
    return (event.outcome == "done" and event.processor is not None
            and event.action in DISCLOSING_ACTIONS.get(event.processor, frozenset()))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | Mapping):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _inert(text: str) -> str:
    """A CSV cell a spreadsheet shows as text, never runs as a formula (CWE-1236).

    Text starting with ``=``, ``@``, a tab or a carriage return, or with ``+`` or
    ``-`` not followed by a digit, gets a leading apostrophe; a phone number such
    as ``+447700900123`` or a negative number is left as it is.
    """
    if not text:
        return text
    first, rest = text[0], text[1:2]
    if first in "=@\t\r" or (first in "+-" and not rest.isdigit()):
        return "'" + text
    return text


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")
