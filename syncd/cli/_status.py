"""``syncd check``, ``syncd status`` and ``syncd alerts``: how syncd and its processors fare."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from syncd.cli._common import EXIT_OK, Commands, load_settings
from syncd.errors import SyncdError


def add_parsers(commands: Commands, common: argparse.ArgumentParser) -> None:
    """Add ``syncd check``, ``syncd status`` and ``syncd alerts`` to the command line."""
    check = commands.add_parser(
        "check",
        help="verify credentials and reachability of every configured processor",
        description="One line per processor (and the ledger): OK, FAILED or SKIPPED. "
        "Exit 0 when nothing failed, 1 otherwise.",
        parents=[common],
    )
    check.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                       help="cap each network call (default: each section's own timeout)")
    check.set_defaults(handler=cmd_check)

    status = commands.add_parser(
        "status",
        help="health of the daemon and each processor, queues, manual steps, requests",
        description="Read the ledger (never change it) and report: the daemon, each processor's "
        "last successful contact and last error, tasks by state, the oldest failing task, "
        "manual steps, open requests with due dates, open alerts, the last poll and resync. "
        "Exit 0 healthy, 1 degraded, 2 down (also for an unusable configuration).",
        parents=[common],
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.set_defaults(handler=cmd_status)

    alerts = commands.add_parser(
        "alerts",
        help="list open alerts, or mark problems handled",
        description="List the open alerts (the problems the manager is told about). With "
        "--resolve, close the named problems once a person has dealt with them: the manager "
        "gets the usual 'Resolved' notice, and a condition that still holds (a processor still "
        "down) is raised again at the next check.",
        parents=[common],
    )
    alerts.add_argument("--resolve", action="append", default=[], metavar="PROBLEM",
                        help="close this problem (as listed, e.g. task_failed:mailchimp); "
                        "repeatable")
    alerts.add_argument("--json", action="store_true", help="print JSON instead of a table")
    alerts.set_defaults(handler=cmd_alerts)


def cmd_status(args: argparse.Namespace) -> int:
    """``syncd status``: the verdict as the exit code, the details as tables or JSON."""
    from syncd import status

    settings = load_settings(args, require_secrets=False, interactive=True)
    report = status.gather(settings)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        status.render(report)
    return report.exit_code


def cmd_check(args: argparse.Namespace) -> int:
    """``syncd check``: reachability and credentials, one line each."""
    from syncd.check import check_all, render

    settings = load_settings(args, require_secrets=False, interactive=True)
    text, code = render(check_all(settings, timeout_seconds=args.timeout))
    print(text.rstrip("\n"))
    return code


def cmd_alerts(args: argparse.Namespace) -> int:
    """``syncd alerts``: the open alerts, or close the ones a person has handled."""
    from rich.console import Console
    from rich.table import Table

    from syncd.ledger import Ledger

    settings = load_settings(args, require_secrets=False, interactive=True)
    path = Path(settings.ledger.path)
    if not path.exists():
        raise SyncdError(f"no ledger at {path}: syncd has not run here yet")
    with Ledger.open(path) as ledger:
        if args.resolve:
            unknown = [key for key in args.resolve if not ledger.resolve_alert(key)]
            if unknown:
                raise SyncdError("no open alert for " + ", ".join(unknown)
                                 + " (see syncd alerts)")
            print(f"resolved {len(args.resolve)} alert(s)")
            return EXIT_OK
        open_alerts = ledger.open_alerts()
    rows = [{"problem": a.problem_key, "kind": a.kind, "summary": a.summary,
             "since": a.created_at.isoformat(timespec="seconds"), "notified": a.notify_count}
            for a in open_alerts]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("No open alerts.")
        return EXIT_OK
    table = Table(title=f"Open alerts ({len(rows)})")
    for column in ("problem", "summary", "since", "notified"):
        table.add_column(column, overflow="fold", no_wrap=column == "problem")
    for row in rows:
        table.add_row(row["problem"], row["summary"], row["since"], str(row["notified"]))
    Console().print(table)
    return EXIT_OK



def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value

