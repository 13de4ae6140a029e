"""``syncd resync``: one full reconciliation, or its plan; handed to the daemon while it runs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from syncd.cli._common import EXIT_ERROR, EXIT_OK, Commands, load_settings
from syncd.errors import SyncdError


def add_parsers(commands: Commands, common: argparse.ArgumentParser) -> None:
    """Add ``syncd resync`` to the command line."""
    resync = commands.add_parser(
        "resync",
        help="reconcile Phorest and Mailchimp fully, now",
        description="Read every Phorest client and Mailchimp member, decide what the rules "
        "require, and carry it out. With --dry-run, print the differences and change nothing. "
        "While `syncd run` is running, a real resync is handed to it (one writer at a time) and "
        "this command follows its progress; Ctrl-C stops following, not the resync.",
        parents=[common],
    )
    resync.add_argument("--dry-run", action="store_true",
                        help="print what would be done, change nothing")
    resync.add_argument("--processor", choices=["mailchimp", "phorest", "google_analytics"],
                        default=None, help="only apply actions on this processor "
                        "(google_analytics: only when configured)")
    resync.add_argument("--json", action="store_true", help="print JSON instead of a table")
    resync.set_defaults(handler=cmd_resync)


RESYNC_ROWS_SHOWN = 50


def cmd_resync(args: argparse.Namespace) -> int:
    """``syncd resync``: one full reconciliation (or, with --dry-run, its plan)."""
    from syncd import engine, rights
    from syncd.ledger import Ledger
    from syncd.lock import AlreadyRunning, writer_ledger

    settings = load_settings(args, interactive=True)
    built, keys = engine.build(settings, needed_by="resync")
    if args.processor and args.processor not in built:
        raise SyncdError(f"--processor {args.processor}: not configured (or enabled = false)")
    processors = [args.processor] if args.processor else None
    # One writer: a real run holds the lock (and takes over what a killed holder left
    # in flight); while the daemon holds it, the daemon does it.
    opened = Ledger.open(settings.ledger.path) if args.dry_run else writer_ledger(
        settings.ledger.path)
    try:
        with opened as ledger:
            with _ResyncProgress(enabled=not args.json and sys.stderr.isatty()) as progress:
                summary = engine.resync(settings, ledger, built, keys, dry_run=args.dry_run,
                                        progress=progress, processors=processors).as_json()
            if not args.dry_run:  # a request's task may have run: its step closes with it
                rights.advance(ledger, now=datetime.now(UTC))
    except AlreadyRunning:
        summary = _resync_in_daemon(settings.ledger.path, args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_resync(summary)
    unfinished = summary.get("unfinished", 0)
    if unfinished:
        # Planned but not carried out (a retry wait, or a task that could not run): the
        # drift is still there, so this run did not do its job.
        print(f"syncd: {unfinished} of {summary['planned']} planned action(s) not carried out "
              "(still queued, e.g. waiting to retry); syncd run or the next syncd resync "
              "carries them out", file=sys.stderr)
    return EXIT_ERROR if summary["failed"] or unfinished else EXIT_OK


FOLLOW_EVERY_SECONDS = 0.25


def _resync_in_daemon(ledger_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Ask the running daemon to resync (a command row), follow it, return its summary.

    Raises:
        SyncdError: the resync failed in the daemon, or the daemon stopped first.
    """
    import time

    from syncd.ledger import Ledger
    from syncd.lock import lock_holder

    options = {"processor": args.processor} if args.processor else {}
    with Ledger.open(ledger_path) as ledger:
        command_id = ledger.add_command("resync", options)
        print(f"syncd is running: resync request #{command_id} handed to it; following its "
              "progress (Ctrl-C stops following, not the resync)", file=sys.stderr)
        try:
            with _ResyncProgress(enabled=not args.json and sys.stderr.isatty()) as progress:
                while True:
                    command = ledger.command(command_id)
                    assert command is not None
                    if command.state == "done" and command.result is not None:
                        return command.result
                    if command.state == "failed":
                        raise SyncdError(f"the daemon's resync #{command_id} failed: "
                                         f"{command.error or 'no detail'}")
                    if progress is not None and command.progress:
                        p = command.progress
                        progress(p["stage"], p["done"], p["total"])
                    if lock_holder(ledger_path) is None:
                        raise SyncdError(
                            f"the daemon stopped before resync #{command_id} finished; "
                            "start it again (a queued resync runs then) or run syncd resync")
                    time.sleep(FOLLOW_EVERY_SECONDS)
        except KeyboardInterrupt:
            print(f"stopped following; resync #{command_id} goes on in the daemon "
                  "(see syncd status)", file=sys.stderr)
            raise



class _ResyncProgress:
    """A rich progress display on a terminal (a bar once the total is known); else a no-op."""

    LABELS = {"phorest": "Reading Phorest clients", "mailchimp": "Reading Mailchimp members",
              "planned": "Planning", "applied": "Applying actions"}

    def __init__(self, *, enabled: bool) -> None:
        self._enabled = enabled
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> Callable[[str, int, int | None], None] | None:
        if not self._enabled:
            return None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            console=Console(stderr=True),
        )  # fmt: skip
        self._progress.start()
        return self._update

    def _update(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self._tasks:
            label = self.LABELS.get(stage, stage)
            self._tasks[stage] = self._progress.add_task(label, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)

    def __exit__(self, *_: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _print_resync(summary: dict[str, Any]) -> None:
    """Print a resync's summary (:meth:`syncd.engine.ResyncResult.as_json`) as tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    seen = f"{summary['clients']} Phorest clients, {summary['members']} Mailchimp members read"
    if summary["unusable_addresses"]:
        seen += f"; {summary['unusable_addresses']} unusable address(es) ignored"
    console.print(seen)
    _print_shared(console, summary)
    if not summary["planned"]:
        console.print("Nothing to do: Mailchimp and Phorest agree.")
        return
    title = "Differences (dry run: nothing changed)" if summary["dry_run"] else "Actions taken"
    table = Table(title=title)
    for column in ("rule", "why", "processor", "action", "count"):
        table.add_column(column, justify="right" if column == "count" else "left",
                         overflow="fold")
    for row in sorted(summary["counts"], key=lambda c: (c["rule"], c["why"], c["processor"],
                                                       c["action"])):
        table.add_row(row["rule"], row["why"], row["processor"], row["action"], str(row["count"]))
    console.print(table)
    if summary["dry_run"]:
        rows = Table(title="Per client (Phorest client id; - = no client)")
        for column in ("client", "processor", "action", "rule", "why"):
            rows.add_column(column, no_wrap=column == "client", overflow="fold")
        for row in summary["rows"][:RESYNC_ROWS_SHOWN]:
            rows.add_row(row["client_id"], row["processor"], row["action"], row["rule"],
                         row["why"])
        console.print(rows)
        listed, left_out = len(summary["rows"]), summary.get("rows_left_out", 0)
        more = listed + left_out - RESYNC_ROWS_SHOWN
        if more > 0:
            hint = f"--json lists the first {listed}" if left_out else "--json lists every row"
            console.print(f"... and {more} more ({hint})")
        return
    outcomes = ", ".join(
        f"{processor}: " + ", ".join(f"{n} {status}" for status, n in sorted(c.items()))
        for processor, c in sorted((summary["outcomes"] or {}).items()) if c
    ) or "none run"
    unfinished = summary.get("unfinished", 0)
    console.print(f"{summary['planned']} action(s) planned; outcomes: {outcomes}; "
                  f"{summary['failed']} failed"
                  + (f"; {unfinished} not carried out" if unfinished else ""))


def _print_shared(console: Any, summary: dict[str, Any]) -> None:
    """How the shared addresses were governed (counts), and the members kept (client ids)."""
    from rich.table import Table

    shared = summary.get("shared_addresses") or []
    if shared:
        table = Table(title=f"Shared addresses ({sum(row['count'] for row in shared)})")
        for column in ("records at the address", "governed by", "addresses"):
            table.add_column(column, justify="right" if column == "addresses" else "left")
        for row in shared:
            table.add_row(row["records"], row["governed_by"], str(row["count"]))
        console.print(table)
    kept = summary.get("kept") or []
    if kept and summary["dry_run"]:
        table = Table(title="Not erased (Phorest client id)")
        for column in ("client", "processor", "action", "rule", "why"):
            table.add_column(column, no_wrap=column == "client", overflow="fold")
        for row in kept[:RESYNC_ROWS_SHOWN]:
            table.add_row(row["client_id"], row["processor"], row["action"], row["rule"],
                          row["why"])
        console.print(table)

