"""What every ``syncd`` command shares: exit codes, the parser class, loading the settings."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeAlias

from syncd import config, log

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70

Handler = Callable[[argparse.Namespace], int]
# What each command group adds its subcommands to (a string: not subscriptable at run time).
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2, as for every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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

