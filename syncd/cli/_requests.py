"""``syncd request …``, ``syncd requests`` and ``syncd audit``: data-subject requests and evidence.

Filing resolves the person through Phorest and reads their Mailchimp member
before anything is written; with no daemon running, the command then carries
the tasks out itself (it holds the writer lock meanwhile), otherwise the
running daemon does. Output names request ids, Phorest client ids and staff
names, never an address, a number or a name of the person.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from syncd.cli._common import EXIT_OK, Commands, _help_for, load_settings
from syncd.errors import SyncdError

FILING_HELP = {
    "erase": "erase a person everywhere (R3): Mailchimp, GA, Phorest's Forget, manual processors",
    "restrict": "restrict a person (R7): off marketing and out of every sync until lifted",
    "unrestrict": "lift a restriction (R7): syncs include the person again",
}


def add_parsers(commands: Commands, common: argparse.ArgumentParser) -> None:
    """Add ``syncd request``, ``syncd requests`` and ``syncd audit`` to the command line."""
    request = commands.add_parser(
        "request",
        help="file, show, extend, confirm or cancel a data-subject request",
        description="Data-subject requests (UK GDPR): erasure, restriction, and the steps "
        "each processor must take. See `syncd requests` for the open ones.",
        parents=[common],
    )
    actions = request.add_subparsers(dest="request_command", metavar="ACTION",
                                     parser_class=type(request))
    request.set_defaults(handler=_help_for(request))
    for kind, text in FILING_HELP.items():
        filing = actions.add_parser(
            kind, help=text, parents=[common],
            description=f"{text[0].upper()}{text[1:]}. The person is found through Phorest "
            "from any of the identifiers given (they must all name the same client); an email "
            "several clients share is refused with their client ids: choose one with "
            "--client-id. With no daemon running, the work is carried out now; otherwise the "
            "daemon does it.",
        )
        filing.add_argument("--email", metavar="EMAIL", help="the person's email address")
        filing.add_argument("--phone", metavar="PHONE", help="the person's mobile number")
        filing.add_argument("--client-id", metavar="ID", help="the person's Phorest client id")
        filing.add_argument("--note", metavar="TEXT", help="kept with the request (no personal "
                            "data, please: it is stored as written)")
        filing.add_argument("--by", metavar="NAME", help="who files it (default: login name)")
        filing.add_argument("--json", action="store_true", help="print the request as JSON")
        filing.set_defaults(handler=cmd_file, kind=kind)

    export = actions.add_parser(
        "export", help="give a person a copy of what each processor holds (R8)",
        parents=[common],
        description="Access and portability (R8): write one file listing, per processor, "
        "each field held about the person, read live (Phorest, Mailchimp; for GA the "
        "identifier it files them under), with where it is stored, when syncd first sent it "
        "there, the lawful basis and the retention ([processors.<name>]). The file is created "
        "with mode 0600 and never overwrites one; it is the only output holding the person's "
        "data. The export is recorded as a request, closed when the file is written.",
    )
    export.add_argument("--email", metavar="EMAIL", help="the person's email address")
    export.add_argument("--phone", metavar="PHONE", help="the person's mobile number")
    export.add_argument("--client-id", metavar="ID", help="the person's Phorest client id")
    export.add_argument("--format", choices=["csv", "json"], default="csv",
                        help="file format (default: csv)")
    export.add_argument("--output", metavar="PATH", type=Path,
                        help="the file to create (default: syncd-export-<request id>.<format> "
                        "in the current directory); an existing file is refused")
    export.add_argument("--by", metavar="NAME", help="who files it (default: login name)")
    export.set_defaults(handler=cmd_export)

    show = actions.add_parser("show", help="one request: steps, evidence, deadline",
                              description="Show one request: its state and deadline, each "
                              "processor's steps with their evidence or instructions, and its "
                              "audit trail.", parents=[common])
    show.add_argument("id", type=_request_id, metavar="ID")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=cmd_show)

    extend = actions.add_parser(
        "extend", help="extend the deadline by one or two months (UK GDPR Art. 12(3))",
        description="Extend a request's deadline: at most two further months in all, with the "
        "reason recorded (tell the person within the first month, with the reason).",
        parents=[common])
    extend.add_argument("id", type=_request_id, metavar="ID")
    extend.add_argument("--months", type=int, choices=[1, 2], required=True)
    extend.add_argument("--reason", required=True, metavar="TEXT")
    extend.set_defaults(handler=cmd_extend)

    confirm = actions.add_parser(
        "confirm", help="confirm a manual step is done (e.g. --processor paper_forms)",
        description="Record that a person finished a processor's step of a request: a "
        "manual processor's, Phorest's Forget, or a step syncd could not finish itself.",
        parents=[common])
    confirm.add_argument("id", type=_request_id, metavar="ID")
    confirm.add_argument("--processor", required=True, metavar="NAME")
    confirm.add_argument("--by", metavar="NAME", help="who confirms (default: login name)")
    confirm.set_defaults(handler=cmd_confirm)

    cancel = actions.add_parser(
        "cancel", help="cancel an open request",
        description="Cancel an open request: its waiting tasks and steps stop. An erasure "
        "nothing was erased for yet releases the person's identifiers; after any erasure they "
        "stay suppressed.", parents=[common])
    cancel.add_argument("id", type=_request_id, metavar="ID")
    cancel.add_argument("--reason", required=True, metavar="TEXT")
    cancel.set_defaults(handler=cmd_cancel)

    listing = commands.add_parser(
        "requests", help="open requests with due dates and per-processor state",
        description="List open data-subject requests, soonest due first, with each "
        "processor's state; near (see [policy] request_warning_days) and past deadlines are "
        "marked.", parents=[common])
    listing.add_argument("--all", action="store_true", help="closed requests too")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=cmd_requests)

    audit = commands.add_parser(
        "audit", help="the evidence trail: every action per processor",
        description="List the audit trail: each action on each processor with its reason, "
        "outcome, time and evidence. Identifiers are hashed to look up; nothing plain is "
        "stored.", parents=[common])
    which = audit.add_mutually_exclusive_group()
    which.add_argument("--request", type=_request_id, metavar="ID")
    which.add_argument("--email", metavar="EMAIL")
    which.add_argument("--phone", metavar="PHONE")
    which.add_argument("--client-id", metavar="ID")
    audit.add_argument("--since", type=_since, metavar="DATE",
                       help="only entries from this date (YYYY-MM-DD) or time (ISO 8601) on")
    audit.add_argument("--limit", type=_positive_int, default=1000, metavar="N",
                       help="at most N entries, newest kept (default 1000)")
    audit.add_argument("--json", action="store_true", help="print JSON")
    audit.set_defaults(handler=cmd_audit)


# -- filing --------------------------------------------------------------------------------


def cmd_file(args: argparse.Namespace) -> int:
    """``syncd request erase|restrict|unrestrict``: resolve, record, and carry out if we may."""
    from syncd import desk, engine, rights
    from syncd.ledger import Ledger
    from syncd.lock import AlreadyRunning, writer_ledger
    from syncd.retry import RetryPolicy
    from syncd.tasks import run_due

    if not (args.email or args.phone or args.client_id):
        raise SyncdError("give --email, --phone or --client-id")
    settings = load_settings(args, interactive=True)
    built, keys = engine.build(settings, needed_by=f"syncd request {args.kind}")
    person = rights.resolve(built["phorest"], keys, email=args.email, phone=args.phone,
                            client_id=args.client_id)

    def file(ledger: Any) -> int:
        return desk.file_request(ledger, settings, built, keys, args.kind, person,
                                 filed_by=args.by, note=args.note, now=datetime.now(UTC))

    carried_out = True
    try:
        with writer_ledger(settings.ledger.path) as ledger:
            request_id = file(ledger)
            now = datetime.now(UTC)
            run_due(ledger, built, RetryPolicy(), keys, now=now)
            rights.advance(ledger, phorest=built["phorest"], now=now)
            shown = _request_json(ledger, request_id, now)
    except AlreadyRunning:
        carried_out = False
        with Ledger.open(settings.ledger.path) as ledger:
            request_id = file(ledger)
            shown = _request_json(ledger, request_id, datetime.now(UTC))
    if args.json:
        print(json.dumps(shown, indent=2))
        return EXIT_OK
    print(f"request #{request_id} filed: {args.kind} "
          f"{_who(shown)}, due {shown['due_at'][:10]}; state {shown['state']}")
    if not carried_out:
        print("syncd run is running: it carries the request out (see syncd request show "
              f"{request_id})")
    _print_steps(shown["steps"])
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """``syncd request export``: resolve, read every processor live, write the file, record it."""
    from syncd import engine, export, rights
    from syncd.ledger import Ledger

    if not (args.email or args.phone or args.client_id):
        raise SyncdError("give --email, --phone or --client-id")
    if args.output is not None:
        export.refuse_existing(args.output)
    settings = load_settings(args, interactive=True)
    built, keys = engine.build(settings, needed_by="syncd request export")
    person = rights.resolve(built["phorest"], keys, email=args.email, phone=args.phone,
                            client_id=args.client_id)
    with Ledger.open(settings.ledger.path) as ledger:
        rows = export.gather(ledger, settings, keys, person, built)
        request_id, path = export.file_export(ledger, settings, person, rows, args.format,
                                              output=args.output, filed_by=args.by,
                                              now=datetime.now(UTC))  # fmt: skip
    processors = sorted({row.processor for row in rows})
    who = _who({"client_id": person.primary.client_id if person.primary else None})
    print(f"request #{request_id} done: export of {who} written to {path} ({args.format}, "
          f"{len(rows)} row(s) from {', '.join(processors)}; mode 0600)")
    print("It holds the person's data: send it to them securely, then delete it.")
    return EXIT_OK


# -- reading and changing one request ------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    """``syncd request show ID``."""
    with _ledger(args) as ledger:
        shown = _request_json(ledger, args.id, datetime.now(UTC), audit=True)
    if args.json:
        print(json.dumps(shown, indent=2))
        return EXIT_OK
    print(f"request #{shown['id']}: {shown['kind']} {_who(shown)}; {shown['state']}")
    print(f"received {shown['received_at']} (filed by {shown['filed_by'] or '-'}, "
          f"with {shown['source']})")
    due = f"due {shown['due_at']}"
    if shown["extended_months"]:
        due += f" (extended by {shown['extended_months']} month(s): {shown['extension_reason']})"
    print(due + (f"; {_left(shown['days_left'])}" if shown["state"] == "open" else ""))
    if shown["note"]:
        print(f"note: {shown['note']}")
    _print_steps(shown["steps"])
    _print_audit(shown["audit"], title=f"Audit trail of request #{shown['id']}")
    return EXIT_OK


def cmd_extend(args: argparse.Namespace) -> int:
    """``syncd request extend ID --months N --reason TEXT``."""
    from syncd import rights

    settings = load_settings(args, require_secrets=False, interactive=True)
    with _ledger(args, settings) as ledger:
        request = rights.extend(ledger, settings, args.id, args.months, args.reason)
    print(f"request #{request.id} extended by {args.months} month(s) "
          f"({request.extended_months} in all): due {request.due_at:%Y-%m-%d}")
    return EXIT_OK


def cmd_confirm(args: argparse.Namespace) -> int:
    """``syncd request confirm ID --processor NAME``."""
    from syncd import rights

    settings = load_settings(args, require_secrets=False, interactive=True)
    with _ledger(args, settings) as ledger:
        progress = rights.confirm(ledger, settings, args.id, args.processor, by=args.by,
                                  now=datetime.now(UTC))
        request = ledger.request(args.id)
    print(f"request #{args.id}: {args.processor} confirmed ({progress.closed_steps} step(s))")
    if request is not None and request.state == "done":
        print(f"request #{args.id} is complete: every processor is done")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    """``syncd request cancel ID --reason TEXT``."""
    from syncd import rights

    with _ledger(args) as ledger:
        rights.cancel(ledger, args.id, args.reason)
    print(f"request #{args.id} cancelled")
    return EXIT_OK


def cmd_requests(args: argparse.Namespace) -> int:
    """``syncd requests``: open (or all) requests, soonest due first."""
    from rich.console import Console

    from syncd import desk
    from rich.table import Table

    settings = load_settings(args, require_secrets=False, interactive=True)
    now = datetime.now(UTC)
    with _ledger(args, settings) as ledger:
        chosen = ledger.all_requests() if args.all else ledger.open_requests()
        rows = [_request_json(ledger, r.id, now) for r in chosen]
    warn = settings.policy.request_warning_days
    for row in rows:
        row["deadline"] = desk.deadline(row, warn)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("No open requests." if not args.all else "No requests.")
        return EXIT_OK
    table = Table(title=f"{'Requests' if args.all else 'Open requests'} ({len(rows)})")
    for column in ("id", "kind", "client", "received", "due", "deadline", "state", "processors",
                   "filed by"):
        table.add_column(column, overflow="fold")
    for row in rows:
        processors = ", ".join(f"{p} {s}" for p, s in row["processors"].items())
        table.add_row(str(row["id"]), row["kind"], row["client_id"] or "-",
                      row["received_at"][:10], row["due_at"][:10], row["deadline"],
                      row["state"], processors or "-", row["filed_by"] or "-")
    Console().print(table)
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    """``syncd audit``: evidence entries, filtered by request or identifier."""
    from syncd import desk

    settings = load_settings(args, require_secrets=False, interactive=True)
    subject_keys: list[str] | None = None
    with _ledger(args, settings) as ledger:
        if args.email or args.phone or args.client_id:
            kind, value = next((k, v) for k, v in (("email", args.email), ("phone", args.phone),
                                                   ("client_id", args.client_id)) if v)
            try:
                subject_keys = desk.audit_keys(ledger, settings, kind, value)
            except SyncdError as error:
                raise SyncdError(f"--{kind.replace('_', '-')}: {error}") from None
        if args.request is not None and ledger.request(args.request) is None:
            raise SyncdError(f"no request #{args.request} (see syncd requests --all)")
        events = ledger.find_audit(subject_keys=subject_keys, request_id=args.request,
                                   since=args.since, limit=args.limit, newest_first=True)
    rows = [_audit_json(e) for e in reversed(events)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("No audit entries match.")
        return EXIT_OK
    _print_audit(rows, title=f"Audit trail ({len(rows)})")
    return EXIT_OK


# -- shared --------------------------------------------------------------------------------


class _ledger:  # noqa: N801 - used like a function
    """The existing ledger (never created by a read or an edit), as a context manager."""

    def __init__(self, args: argparse.Namespace, settings: Any = None) -> None:
        self.settings = settings or load_settings(args, require_secrets=False, interactive=True)

    def __enter__(self) -> Any:
        from syncd.ledger import Ledger

        path = Path(self.settings.ledger.path)
        if not path.exists():
            raise SyncdError(f"no ledger at {path}: no request has been filed here yet")
        self.ledger = Ledger.open(path)
        return self.ledger

    def __exit__(self, *exc: object) -> None:
        self.ledger.close()


def _request_json(ledger: Any, request_id: int, now: datetime, *,
                  audit: bool = False) -> dict[str, Any]:  # fmt: skip
    from syncd import desk

    return desk.describe(ledger, request_id, now, audit=audit)


def _audit_json(event: Any) -> dict[str, Any]:
    from syncd import desk

    return desk.audit_entry(event)


def _print_steps(steps: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not steps:
        return
    table = Table(title="Steps")
    for column in ("processor", "state", "client", "what / evidence", "by"):
        table.add_column(column, overflow="fold")
    for step in steps:
        what = step["evidence"] if step["state"] != "waiting" else (
            step["instructions"] or f"task {step['task_id']} (syncd carries it out)")
        table.add_row(step["processor"], step["state"], step["client_id"] or "-", what or "-",
                      step["confirmed_by"] or "-")
    Console().print(table)


def _print_audit(rows: Sequence[dict[str, Any]], *, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    table = Table(title=title)
    for column in ("time", "processor", "action", "reason", "outcome", "evidence", "request",
                   "by"):
        table.add_column(column, overflow="fold")
    for row in rows:
        evidence = "; ".join(p for p in (row["vendor_request_id"], row["detail"]) if p) or "-"
        table.add_row(row["at"][:19], row["processor"] or "-", row["action"],
                      row["reason"] or "-", row["outcome"], evidence,
                      str(row["request_id"]) if row["request_id"] else "-", row["actor"] or "-")
    Console().print(table)


def _left(days: int) -> str:
    from syncd import desk

    return desk.days_text(days)


def _who(shown: dict[str, Any]) -> str:
    return f"client {shown['client_id']}" if shown["client_id"] else "(no Phorest client)"


def _request_id(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a request id: {text[:20]!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError("must be a whole number >= 1")
    return value


def _since(text: str) -> datetime:
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a date (YYYY-MM-DD) or an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

