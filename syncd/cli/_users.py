"""``syncd user …``: the console's staff accounts (there is no default account).

The first manager is made here: ``syncd user add NAME --role manager``. The
password is prompted for twice (or read from ``--password-file``, its first
line); it is hashed with argon2id and never stored, printed or logged.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path

from syncd.cli._common import EXIT_OK, Commands, _help_for, load_settings
from syncd.errors import SyncdError


def add_parsers(commands: Commands, common: argparse.ArgumentParser) -> None:
    """Add ``syncd user add|list|disable|enable|reset|role`` to the command line."""
    user = commands.add_parser(
        "user", help="staff accounts of the console: add, list, disable, enable, reset, role",
        description="Staff accounts of the web console ([console]). Roles: reception (files "
        "requests, sees the overview and progress) and manager (also confirms manual steps, "
        "extends or cancels requests, confirms a guarded purge, downloads exports, manages "
        "accounts). Every change is recorded in the audit trail.",
        parents=[common])
    actions = user.add_subparsers(dest="user_command", metavar="ACTION",
                                  parser_class=type(user))
    user.set_defaults(handler=_help_for(user))

    add = actions.add_parser("add", help="create an account", parents=[common],
                             description="Create an account. The password is prompted for "
                             "(twice) unless --password-file gives it.")
    add.add_argument("name", metavar="NAME", help="the login name (a letter, then up to 39 "
                     "letters, digits, '.', '_' or '-')")
    add.add_argument("--role", required=True, choices=["manager", "reception"])
    _password_file(add)
    add.set_defaults(handler=cmd_add)

    listing = actions.add_parser("list", help="every account with its role and state",
                                 parents=[common], description="List the accounts.")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=cmd_list)

    for name, text in (("disable", "stop an account from logging in (its sessions end)"),
                       ("enable", "let a disabled or locked account log in again")):
        action = actions.add_parser(name, help=text, parents=[common],
                                    description=f"{text[0].upper()}{text[1:]}.")
        action.add_argument("name", metavar="NAME")
        action.set_defaults(handler=cmd_enable if name == "enable" else cmd_disable)

    reset = actions.add_parser("reset", help="set a new password (lifts a lockout)",
                               parents=[common],
                               description="Set a new password for an account; this lifts a "
                               "lockout and ends the account's console sessions.")
    reset.add_argument("name", metavar="NAME")
    _password_file(reset)
    reset.set_defaults(handler=cmd_reset)

    role = actions.add_parser("role", help="change an account's role", parents=[common],
                              description="Change an account's role (the last active manager "
                              "stays a manager).")
    role.add_argument("name", metavar="NAME")
    role.add_argument("role", choices=["manager", "reception"])
    role.set_defaults(handler=cmd_role)


def _password_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--password-file", type=Path, metavar="PATH",
                        help="read the password from this file's first line instead of "
                        "prompting")


def cmd_add(args: argparse.Namespace) -> int:
    """``syncd user add NAME --role ROLE``."""
    from syncd import staff

    staff.check_name(args.name)
    password = _password(args)
    with _ledger(args) as ledger:
        member = staff.add(ledger, args.name, args.role, password, by=_by())
    print(f"account {member.name} added ({member.role})")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """``syncd user list``."""
    from rich.console import Console
    from rich.table import Table

    from syncd.desk import iso

    with _ledger(args) as ledger:
        rows = [{"name": m.name, "role": m.role, "active": m.active,
                 "locked_until": iso(m.locked_until), "last_login_at": iso(m.last_login_at),
                 "created_at": iso(m.created_at)} for m in ledger.all_staff()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("No accounts. Add the first manager: syncd user add NAME --role manager")
        return EXIT_OK
    table = Table(title=f"Accounts ({len(rows)})")
    for column in ("name", "role", "state", "last login", "created"):
        table.add_column(column)
    for row in rows:
        state = "active" if row["active"] else "disabled"
        if row["locked_until"]:
            state += f", locked until {row['locked_until']}"
        table.add_row(row["name"], row["role"], state, row["last_login_at"] or "never",
                      row["created_at"] or "-")
    Console().print(table)
    return EXIT_OK


def cmd_disable(args: argparse.Namespace) -> int:
    """``syncd user disable NAME``."""
    from syncd import staff

    with _ledger(args) as ledger:
        staff.set_active(ledger, args.name, False, by=_by())
    print(f"account {args.name} disabled")
    return EXIT_OK


def cmd_enable(args: argparse.Namespace) -> int:
    """``syncd user enable NAME``."""
    from syncd import staff

    with _ledger(args) as ledger:
        staff.set_active(ledger, args.name, True, by=_by())
    print(f"account {args.name} enabled")
    return EXIT_OK


def cmd_reset(args: argparse.Namespace) -> int:
    """``syncd user reset NAME``."""
    from syncd import staff

    with _ledger(args) as ledger:
        if ledger.staff_member(args.name) is None:
            raise SyncdError(f"no account called {args.name!r} (see syncd user list)")
        password = _password(args)
        staff.reset_password(ledger, args.name, password, by=_by())
    print(f"account {args.name}: password reset")
    return EXIT_OK


def cmd_role(args: argparse.Namespace) -> int:
    """``syncd user role NAME ROLE``."""
    from syncd import staff

    with _ledger(args) as ledger:
        staff.set_role(ledger, args.name, args.role, by=_by())
    print(f"account {args.name} is now {args.role}")
    return EXIT_OK


def _password(args: argparse.Namespace) -> str:
    from syncd import staff

    if args.password_file is not None:
        try:
            text = args.password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "not UTF-8 text"
            raise SyncdError(f"--password-file {args.password_file}: {reason}") from None
        return staff.check_password(text.splitlines()[0] if text else "")
    if not sys.stdin.isatty():
        raise SyncdError("standard input is not a terminal, so nothing can be prompted for; "
                         "use --password-file")
    first = getpass.getpass("Password: ")
    staff.check_password(first)
    if getpass.getpass("Password again: ") != first:
        raise SyncdError("the passwords differ; nothing changed")
    return first


def _by() -> str:
    from syncd.rights import login_name

    return login_name()


class _ledger:  # noqa: N801 - used like a function
    """The ledger (created if absent: the first account may precede the first run)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.settings = load_settings(args, require_secrets=False, interactive=True)

    def __enter__(self):  # type: ignore[no-untyped-def]
        from syncd.ledger import Ledger

        self.ledger = Ledger.open(self.settings.ledger.path)
        return self.ledger

    def __exit__(self, *exc: object) -> None:
        self.ledger.close()
