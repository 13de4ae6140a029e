"""``syncd config``: validate, show, or print a sample of the configuration."""

from __future__ import annotations

import argparse
import json
import sys

from syncd import config
from syncd.cli._common import EXIT_OK, EXIT_USAGE, Commands, _help_for, _Parser, load_settings
from syncd.errors import ConfigError


def add_parsers(commands: Commands, common: argparse.ArgumentParser) -> None:
    """Add ``syncd config`` and its actions to the command line."""
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
