"""The ``syncd`` command: parse arguments, call a module, return an exit code.

Exit codes: 0 success, 1 a syncd error at run time, 2 bad usage or an unusable
configuration, 70 an internal error (a bug; the traceback goes to the log at
debug level, never to the terminal).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from syncd import __version__, config, log
from syncd.errors import ConfigError, SyncdError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2, as for every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, one subparser per command that works."""
    parser = _Parser(
        prog="syncd",
        description=(
            "Keeps Mailchimp and Google Analytics consistent with the Phorest client "
            "database: opt-outs, erasures and retention purges."
        ),
    )
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    _add_common_options(parser, None)
    # The same options after the command (`syncd config validate --config X`);
    # SUPPRESS keeps a subcommand from resetting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    cfg = commands.add_parser(
        "config", help="check or show the configuration", parents=[common]
    )
    cfg_commands = cfg.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    validate = cfg_commands.add_parser(
        "validate",
        help="report every configuration error at once (exit 2 if any)",
        parents=[common],
    )
    validate.add_argument(
        "--require-secrets",
        action="store_true",
        help="treat required secrets that cannot be found here as errors "
        "(by default they are warnings: systemd credentials are only visible to the service)",
    )
    validate.set_defaults(handler=cmd_config_validate)
    show = cfg_commands.add_parser(
        "show", help="print the effective configuration, secrets as ***", parents=[common]
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    show.set_defaults(handler=cmd_config_show)
    example = cfg_commands.add_parser(
        "example", help="print a sample configuration documenting every key"
    )
    example.set_defaults(handler=cmd_config_example)
    cfg.set_defaults(handler=_help_for(cfg))

    sandbox = commands.add_parser(
        "sandbox",
        help="run local emulators of Phorest, Mailchimp, Google Analytics and SMTP",
        description="Start faithful local emulators of every vendor syncd talks to, seeded with "
        "synthetic clients, on loopback only. Runs until interrupted (Ctrl-C or SIGTERM).",
        parents=[common],
    )
    sandbox.add_argument("--clients", type=_non_negative_int, default=200, metavar="N",
                         help="synthetic clients to seed (default: 200)")
    sandbox.add_argument("--members", type=_non_negative_int, default=None, metavar="M",
                         help="top the audience up to M members with newsletter-only "
                         "subscribers (default: only what the clients produce)")
    sandbox.add_argument("--seed", type=int, default=0, metavar="S",
                         help="seed for the synthetic data (default: 0)")
    sandbox.add_argument("--host", default="127.0.0.1", help="loopback address (default: 127.0.0.1)")
    sandbox.add_argument("--port", type=_port, default=8900, metavar="P",
                         help="HTTP port for every emulator (default: 8900; 0 picks a free one)")
    sandbox.add_argument("--smtp-port", type=_port, default=8925, metavar="P",
                         help="SMTP sink port (default: 8925; 0 picks a free one)")
    sandbox.add_argument("--latency-ms", type=_non_negative_float, default=0.0, metavar="X",
                         help="latency added to every vendor request (default: 0)")
    sandbox.add_argument("--drift", type=_share, default=0.2, metavar="SHARE",
                         help="share of the Mailchimp audience that disagrees with Phorest "
                         "(default: 0.2)")
    sandbox.add_argument("--write-config", type=Path, metavar="PATH",
                         help="write a syncd config pointing at the sandbox (secrets beside it)")
    sandbox.set_defaults(handler=cmd_sandbox)

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
    resync.add_argument("--processor", choices=["mailchimp", "phorest"], default=None,
                        help="only apply actions on this processor")
    resync.add_argument("--json", action="store_true", help="print JSON instead of a table")
    resync.set_defaults(handler=cmd_resync)

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

    run = commands.add_parser(
        "run",
        help="run the service (polls, webhooks, tasks, nightly resync, /healthz, /metrics)",
        description="Run syncd as a long-running service until SIGTERM or SIGINT; SIGHUP "
        "re-reads the configuration. Under systemd it reports readiness and pings the watchdog.",
        parents=[common],
    )
    run.set_defaults(handler=cmd_run)

    parser.set_defaults(handler=_help_for(parser))
    return parser


def _add_common_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=default,
        help=f"configuration file (default: ${config.CONFIG_PATH_ENV}, else "
        f"{config.DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=default,
        help="override [logging] level",
    )


def _help_for(parser: argparse.ArgumentParser) -> Handler:
    def show_help(_: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    return show_help


def load_settings(
    args: argparse.Namespace, *, require_secrets: bool = True, interactive: bool = False
) -> config.Settings:
    """Load the configuration and apply its logging settings (``--log-level`` wins).

    Args:
        args: the parsed command line.
        require_secrets: whether a missing required secret is an error.
        interactive: a one-shot command whose own output is the report: its
            log lines are kept to warnings and errors unless ``--log-level``
            asks for more (``[logging] level`` is the daemon's).

    Raises:
        ConfigError: the configuration is unusable.
    """
    settings = config.load(args.config, require_secrets=require_secrets)
    level = args.log_level or settings.logging.level
    if interactive and not args.log_level and level in ("debug", "info"):
        level = "warning"
    log.configure(level, settings.logging.format)
    return settings


def cmd_config_validate(args: argparse.Namespace) -> int:
    """``syncd config validate``: all errors at once, one per line."""
    path = config.resolve_path(args.config)
    try:
        settings = config.load(path, require_secrets=args.require_secrets)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    for line in config.missing_secrets(settings):
        print(f"warning: {line}", file=sys.stderr)
    names = ", ".join(name for name, _ in settings.sections())
    print(f"{path}: configuration is valid ({names})")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    """``syncd config show``: the effective configuration with secrets redacted."""
    settings = load_settings(args, require_secrets=False)
    data = config.redacted(settings)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(config.render_toml(data), end="")
    return EXIT_OK


def cmd_config_example(_: argparse.Namespace) -> int:
    """``syncd config example``: the sample configuration generated from the schema."""
    print(config.render_example(), end="")
    return EXIT_OK


def cmd_sandbox(args: argparse.Namespace) -> int:
    """``syncd sandbox``: serve the emulators until interrupted."""
    # Imported here, not at the top: the sandbox is a development tool and the
    # daemon's own code paths never load it.
    from syncd.sandbox.app import Sandbox, check_config_path

    log.configure(args.log_level or "info")
    try:
        if args.write_config:  # before any port is taken
            check_config_path(args.write_config)
        sandbox = Sandbox(
            clients=args.clients,
            seed=args.seed,
            host=args.host,
            port=args.port,
            smtp_port=args.smtp_port,
            latency_ms=args.latency_ms,
            drift=args.drift,
            members=args.members,
        )
    except ValueError as exc:
        print(f"syncd sandbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"syncd sandbox: cannot listen on {args.host}:{args.port}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_ERROR
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with sandbox:
        if args.write_config:
            try:
                sandbox.write_config(args.write_config)
            except (OSError, ValueError) as exc:  # e.g. a read-only directory
                problem = (f"cannot write {args.write_config}: {exc.strerror or type(exc).__name__}"
                           if isinstance(exc, OSError) else str(exc))
                print(f"syncd sandbox: {problem}", file=sys.stderr)
                return EXIT_ERROR
        _print_sandbox(sandbox, args.write_config)
        stop.wait()
    print("sandbox stopped", file=sys.stderr)
    return EXIT_OK


RESYNC_ROWS_SHOWN = 50


def cmd_resync(args: argparse.Namespace) -> int:
    """``syncd resync``: one full reconciliation (or, with --dry-run, its plan)."""
    from syncd import engine
    from syncd.ledger import Ledger
    from syncd.lock import AlreadyRunning, writer_ledger

    settings = load_settings(args, interactive=True)
    built, keys = engine.build(settings, needed_by="resync")
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


def cmd_run(args: argparse.Namespace) -> int:
    """``syncd run``: the daemon, until a signal asks it to stop."""
    from syncd.daemon import Daemon

    settings = load_settings(args)  # all configuration errors at once, before anything starts
    return Daemon(args.config, settings=settings).run()


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
        more = len(summary["rows"]) - RESYNC_ROWS_SHOWN
        if more > 0:
            console.print(f"... and {more} more (use --json for every row)")
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


def _print_sandbox(sandbox: Any, config_path: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    base = sandbox.base_url
    table = Table(title="syncd sandbox", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("Phorest", f"{base}/third-party-api-server/api/business/"
                  f"{sandbox.credentials.phorest_business_id}")
    table.add_row("Mailchimp", f"{base}/3.0")
    table.add_row("Google token", f"{base}/token")
    table.add_row("Google Admin API", f"{base}/v1alpha, {base}/v1beta")
    if sandbox.smtp is not None:
        table.add_row("SMTP sink", f"{sandbox.smtp.host}:{sandbox.smtp.port}")
    table.add_row("Control API", f"{base}/_sandbox/")
    seeded = sandbox.report
    table.add_row("Seeded", f"{seeded.clients.get('total', 0)} clients, "
                  f"{seeded.members.get('total', 0)} members")
    if config_path is not None:
        table.add_row("Config", str(config_path))
    console = Console(stderr=True)
    console.print(table)
    console.print("Ctrl-C stops the sandbox.")
    sys.stderr.flush()


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be a port number 0-65535")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


# argparse names the type in its messages ("invalid port value: 'x'").
_non_negative_int.__name__ = "count"
_non_negative_float.__name__ = "number"
_port.__name__ = "port"
_share.__name__ = "share"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``syncd`` console script.

    Returns:
        The process exit code.
    """
    args = build_parser().parse_args(argv)
    log.configure(args.log_level or "warning")
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except SyncdError as exc:
        print(f"syncd: {log.redact_text(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line for the user, the traceback for the log
        structlog.get_logger(__name__).debug("internal_error", exc_info=True)
        print(
            f"syncd: internal error ({type(exc).__name__}); "
            "run with --log-level debug for the traceback",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
