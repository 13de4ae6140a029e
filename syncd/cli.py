"""The ``syncd`` command: parse arguments, call a module, return an exit code.

Exit codes: 0 success, 1 a syncd error at run time, 2 bad usage or an unusable
configuration, 70 an internal error (a bug; the traceback goes to the log at
debug level, never to the terminal).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
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


def load_settings(args: argparse.Namespace, *, require_secrets: bool = True) -> config.Settings:
    """Load the configuration and apply its logging settings (``--log-level`` wins).

    Raises:
        ConfigError: the configuration is unusable.
    """
    settings = config.load(args.config, require_secrets=require_secrets)
    log.configure(args.log_level or settings.logging.level, settings.logging.format)
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
