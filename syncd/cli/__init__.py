"""The ``syncd`` command: parse arguments, call a module, return an exit code.

Exit codes: 0 success, 1 a syncd error at run time, 2 bad usage or an unusable
configuration, 70 an internal error (a bug; the traceback goes to the log at
debug level, never to the terminal).

One module per command group adds its subcommands (``add_parsers``) and holds
their handlers: :mod:`._config`, :mod:`._sandbox`, :mod:`._resync`,
:mod:`._requests` (request, requests, audit), :mod:`._retention`, :mod:`._status` (check,
status, alerts), :mod:`._users` (user) and :mod:`._run`; :mod:`._common`
holds what they share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import structlog

from syncd import __version__, config, log
from syncd.cli import _config, _requests, _resync, _retention, _run, _sandbox, _status, _users
from syncd.cli._common import (
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    Handler,
    _help_for,
    _Parser,
    load_settings,
)
from syncd.errors import ConfigError, SyncdError

__all__ = ["EXIT_ERROR", "EXIT_INTERNAL", "EXIT_OK", "EXIT_USAGE", "Handler", "build_parser",
           "load_settings", "main"]


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
    for group in (_config, _sandbox, _resync, _requests, _retention, _status, _users, _run):
        group.add_parsers(commands, common)

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
