"""``syncd run``: the daemon."""

from __future__ import annotations

import argparse

from syncd.cli._common import Commands, load_settings


def add_parsers(commands: Commands, common: argparse.ArgumentParser) -> None:
    """Add ``syncd run`` to the command line."""
    run = commands.add_parser(
        "run",
        help="run the service (polls, webhooks, tasks, nightly resync, /healthz, /metrics)",
        description="Run syncd as a long-running service until SIGTERM or SIGINT; SIGHUP "
        "re-reads the configuration. Under systemd it reports readiness and pings the watchdog.",
        parents=[common],
    )
    run.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    """``syncd run``: the daemon, until a signal asks it to stop."""
    from syncd.daemon import Daemon

    settings = load_settings(args)  # all configuration errors at once, before anything starts
    return Daemon(args.config, settings=settings).run()
